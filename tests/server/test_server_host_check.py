"""The Host check on every endpoint of a server with an API key (issue 21, item 7): /health, /metrics,
/api/version and the index need no key, so a page using DNS rebinding could read them; now a request
without the key that names a DNS name other than an allowed one or the machine's own gets the 403
host_not_allowed the API paths get (OpenAI's body, Ollama's under /api/), while health checks on
loopback (127.0.0.1, localhost, [::1]), clients by IP address and clients with the key pass. Against
the real server on loopback."""

from __future__ import annotations

import socket

import httpx
import pytest

from support.fakes import UnusedRunner
from rksmolvlm.runtime.server import BackgroundServer, Metrics, ModelService, ServedModel, create_app
from rksmolvlm.runtime.server.config import ServerConfig, with_overrides

KEY = "k3y-" + "x" * 28
EVIL = "evil.example"
# every GET path a client or probe may send, those that need no key first
OPEN = ["/health", "/health/live", "/health/ready", "/metrics", "/api/version", "/"]
KEYED = ["/v1/models", "/props", "/api/tags", "/api/ps", "/no/such/path"]
POSTS = ["/v1/chat/completions", "/api/chat", "/api/generate", "/api/show"]



def _served(**settings):
    config = with_overrides(ServerConfig(), settings)
    service = ModelService(UnusedRunner, ServedModel("m", (), 2048, 0, "host"), 2, Metrics())
    return BackgroundServer(create_app(service, config, api_key=KEY), config)


@pytest.fixture(scope="module")
def server():
    with _served() as served:
        yield served


def _get(server, path: str, host: str, **headers) -> httpx.Response:
    return httpx.get(f"{server.url}{path}", headers={"Host": host, **headers}, timeout=10)


def _refusal(reply: httpx.Response, path: str) -> str:
    assert reply.status_code == 403, (path, reply.status_code, reply.text[:200])
    body = reply.json()
    if path.startswith("/api/"):  # Ollama's form
        return body["error"]
    assert body["error"]["code"] == "host_not_allowed" and body["error"]["type"] == "permission_error"
    return body["error"]["message"]


@pytest.mark.parametrize("host", [EVIL, f"{EVIL}:8080", "127.0.0.1.nip.io", "localhost.evil.example"])
def test_every_path_refuses_a_rebinding_host_without_the_key(server, host):
    for path in OPEN + KEYED:
        message = _refusal(_get(server, path, host), path)
        assert "Authorization: Bearer KEY" in message and "server.allowed_hosts" in message, path
    for path in POSTS:
        reply = httpx.post(f"{server.url}{path}", json={"model": "m"}, headers={"Host": host}, timeout=10)
        _refusal(reply, path)
    assert _get(server, "/health", "127.0.0.1").status_code == 200  # nothing stuck behind the refusals


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.1:{port}", "localhost:{port}", "LOCALHOST", "[::1]:{port}",
                                  "192.168.1.20:{port}", "[fe80::1]"])
def test_health_checks_and_clients_by_address_pass(server, host):
    """systemd/Docker health checks on loopback send Host 127.0.0.1:port or localhost:port; Kubernetes
    probes and LAN clients an IP address."""
    host = host.format(port=server.port)
    for path in OPEN:
        assert _get(server, path, host).status_code == 200, (path, host)
    assert _get(server, "/v1/models", host).status_code == 401  # the key is still needed where it was


def test_the_machine_s_own_name_passes():
    name = socket.gethostname().lower()
    with _served() as served:
        for host in {name, f"{name.split('.')[0]}.local:{served.port}"}:
            assert _get(served, "/health", host).status_code == 200, host


def test_a_client_with_the_key_passes_under_any_name(server):
    auth = {"Authorization": f"Bearer {KEY}"}
    for path in ("/health", "/metrics", "/v1/models", "/api/tags"):
        assert _get(server, path, "rksmolvlm:8080", **auth).status_code == 200, path  # e.g. a compose service name
    wrong = _get(server, "/health", "rksmolvlm:8080", Authorization="Bearer wrong")
    _refusal(wrong, "/health")


def test_allowed_hosts_and_star():
    with _served(**{"server.allowed_hosts": ["board.lan"]}) as served:
        assert _get(served, "/health", "board.lan:8080").status_code == 200
        assert _get(served, "/health", "localhost:8080").status_code == 200  # loopback probes need no entry
        _refusal(_get(served, "/metrics", EVIL), "/metrics")
    with _served(**{"server.allowed_hosts": ["*"]}) as served:
        assert _get(served, "/health", EVIL).status_code == 200  # the operator turned the check off

"""Hostile input against the real server (uvicorn on loopback, host-preview engines): each bomb —
a progressive JPEG with thousands of scans, a 97 KB 16-bit PNG, a float TIFF, a 1×50,000,000 PNG,
a 19 MB prompt, too many messages or parts, a NUL in a path, spaces or CR/LF in a URL — gets its
named 4xx within a bounded time and without a big RSS jump, /health answers within 100 ms while
it is handled, and a good request succeeds after. Remote images (images.allow_remote), against a
local http.server: loopback refused unless images.allow_private_networks, redirects checked (none
to ftp://, at most 3), a slow drip cut at the one total deadline, error text that never repeats
what the remote server said."""

import base64
import io
import ipaddress
import json
import socket
import threading
import time
from http.server import ThreadingHTTPServer

import httpx
import numpy as np
import openai
import pytest
from PIL import Image

from support.images import rng_image

from support.net import LoopbackHandler, health_within_limit, loopback_http
from support.hostile_images import float_tiff, jpeg_tiff, scan_bomb, zero_png
from support.fakes import UnusedRunner
from rksmolvlm.runners import RUNNERS
from rksmolvlm.runtime.server import BackgroundServer, Metrics, ModelService, ServedModel, build_app, create_app
from rksmolvlm.runtime.server.remote import FetchError, fetch, is_public_address
from rksmolvlm.runtime.server.config import ServerConfig, with_overrides

MODEL = "idefics3-256m"
MIB = 1024 * 1024
REMOTE_TIMEOUT_S = 1.0


def data_uri(data: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def chat(*parts, **extra) -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": list(parts)}], **extra}


def image_part(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


def text_part(text: str = "Describe.") -> dict:
    return {"type": "text", "text": text}


# -- the remote image server ---------------------------------------------------------------------
SECRET = "SECRET-REMOTE-TEXT-7f3a"
CAT = png(rng_image(64, 48, seed=11))


class RemoteImages(LoopbackHandler):
    """Serves the remote-fetch cases; ``hits`` counts the requests it got."""

    hits: list[str] = []

    def do_GET(self):
        RemoteImages.hits.append(self.path)
        path = self.path
        if path == "/cat.png":
            return self.reply(200, CAT, "image/png")
        if path in ("/to-ftp", "/to-cat", "/loop", "/to-file"):
            target = {"/to-ftp": "ftp://127.0.0.1/cat.png", "/to-cat": "/cat.png", "/loop": "/loop",
                      "/to-file": "file:///etc/passwd"}[path]
            return self.redirect(target)
        if path == "/secret":
            self.send_response(500, SECRET)
            self.send_header("X-Detail", SECRET)
            body = f"<h1>{SECRET}</h1>".encode()
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            return None
        if path == "/html":
            return self.reply(200, f"<p>{SECRET}</p>".encode(), f"text/html; {SECRET}")
        if path == "/drip":  # a valid start, then one byte every 50 ms: never done within the deadline
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", str(len(CAT)))
            self.end_headers()
            return self._drip(CAT)
        if path == "/drip-headers":  # the status line and headers themselves, a byte at a time
            return self._drip(b"HTTP/1.1 200 OK\r\nContent-Type: image/png\r\n" + b"X-Pad: " + b"a" * 200 + b"\r\n")
        self.reply(404, b"not here", "text/plain")

    def _drip(self, data: bytes):
        for byte in data[:100]:  # at most 5 s: the server stops by itself
            try:
                self.wfile.write(bytes([byte]))
                self.wfile.flush()
            except OSError:
                return
            time.sleep(0.05)



@pytest.fixture(scope="module")
def remote():
    with loopback_http(RemoteImages) as base:
        yield base


# -- servers ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def images_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("local-images")
    (path / "cat.png").write_bytes(CAT)
    return path


@pytest.fixture(scope="module")
def served(preview_bundles, images_dir):
    """The real model; remote images allowed, private networks too (the only way to reach the
    loopback test server), a 128 MiB decode budget, a short remote deadline."""
    config = with_overrides(ServerConfig(), {
        "bundle": str(preview_bundles[MODEL]), "engine": "host", "limits.max_decode_bytes": 128 * MIB,
        "images.allow_remote": True, "images.allow_private_networks": True,
        "images.remote_timeout_s": REMOTE_TIMEOUT_S, "images.local_dir": str(images_dir)})
    with BackgroundServer(build_app(config, RUNNERS), config) as server:
        yield server



@pytest.fixture(scope="module")
def public_only():
    """images.allow_remote with the default images.allow_private_networks = false."""
    config = with_overrides(ServerConfig(), {"images.allow_remote": True})
    service = ModelService(UnusedRunner, ServedModel(MODEL, (), 2048, 0, "host"), 2, Metrics())
    with BackgroundServer(create_app(service, config), config) as server:
        yield server


@pytest.fixture(scope="module")
def client(served):
    return openai.OpenAI(base_url=f"{served.url}/v1", api_key="unused", max_retries=0, timeout=60)


def good_request(client):
    reply = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hello?"}],
                                           max_tokens=2)
    assert reply.choices[0].finish_reason in ("stop", "length")


# -- watching the server while a request is handled ------------------------------------------------
def _rss() -> int:
    with open("/proc/self/statm") as f:  # the server runs in this process
        return int(f.read().split()[1]) * 4096


class Watch:
    """While a request is handled: /health probed every 10 ms from another thread (its slowest
    answer kept) and this process's RSS sampled (its peak above the start kept)."""

    def __init__(self, url: str):
        self.url = url
        self.slowest = 0.0
        self.times: list[float] = []
        self.probes = 0
        self.peak = 0
        self.failures: list[str] = []
        self._done = threading.Event()

    def __enter__(self) -> "Watch":
        self._base = _rss()
        self._threads = [threading.Thread(target=self._probe), threading.Thread(target=self._sample)]
        self._client = httpx.Client(timeout=5)
        self._client.get(f"{self.url}/health")  # the probe's connection is open before the request starts
        for thread in self._threads:
            thread.start()
        time.sleep(0.03)
        return self

    def __exit__(self, *exc):
        time.sleep(0.03)
        self._done.set()
        for thread in self._threads:
            thread.join()
        self._client.close()

    @property
    def health_ok(self) -> bool:
        """/health answered within 100 ms throughout (this test process hosts the server, the probe
        and the remote double: see health_within_limit)."""
        return health_within_limit(self.times)

    @property
    def rss_jump(self) -> int:
        return self.peak - self._base

    def _probe(self):
        while not self._done.is_set():
            start = time.perf_counter()
            try:
                status = self._client.get(f"{self.url}/health").status_code
                if status != 200:
                    self.failures.append(f"HTTP {status}")
            except httpx.HTTPError as exc:
                self.failures.append(repr(exc))
            self.times.append(time.perf_counter() - start)
            self.slowest = max(self.slowest, self.times[-1])
            self.probes += 1
            time.sleep(0.01)

    def _sample(self):
        while not self._done.is_set():
            self.peak = max(self.peak, _rss())
            time.sleep(0.002)


def post(server, body: bytes) -> tuple[httpx.Response, float]:
    start = time.perf_counter()
    response = httpx.post(f"{server.url}/v1/chat/completions", content=body, timeout=120,
                          headers={"Content-Type": "application/json"})
    return response, time.perf_counter() - start


# -- the hostile matrix ---------------------------------------------------------------------------
HOSTILE = {
    # case: (body maker, status, code, words in the message, allowed RSS jump)
    "progressive JPEG with 5,000 scans": (
        lambda: chat(image_part(data_uri(scan_bomb(2000, 2000, 5000), "image/jpeg")), text_part()),
        400, "image_too_complex", "limits.max_jpeg_scans", 64 * MIB),
    "TIFF with a progressive JPEG strip": (
        lambda: chat(image_part(data_uri(jpeg_tiff(2000, 2000, scan_bomb(2000, 2000, 300)), "image/tiff")),
                     text_part()),
        400, "image_too_complex", "progressive", 64 * MIB),
    "97 KB 16-bit PNG (294 MB decoded)": (
        lambda: chat(image_part(data_uri(zero_png(7000, 7000, 16), "image/png")), text_part()),
        400, "image_decode_too_large", "limits.max_decode_bytes", 64 * MIB),
    "float TIFF": (
        lambda: chat(image_part(data_uri(float_tiff(4500, 4500), "image/tiff")), text_part()),
        400, "image_decode_too_large", "mode F", 64 * MIB),
    "1×50,000,000 PNG": (
        lambda: chat(image_part(data_uri(zero_png(1, 50_000_000), "image/png")), text_part()),
        400, "image_decode_too_large", "1×50000000", 64 * MIB),
    "19 MB prompt": (
        lambda: chat(text_part("lorem ipsum " * 1_583_333)),
        400, "text_too_long", "8 a token of the model's context", 200 * MIB),
    "5,000 messages": (
        lambda: {"model": MODEL, "messages": [{"role": "user", "content": "hi"}] * 5000},
        400, "too_many_messages", "limits.max_messages = 1,024", 64 * MIB),
    "1,000 parts": (lambda: chat(*[text_part("a")] * 1000), 400, "too_many_parts", "limits.max_parts = 256", 64 * MIB),
    "NUL in a file URL": (lambda: chat(image_part("file:///srv/a%00.png"), text_part()), 400, "invalid_image_url",
                          "NUL", 64 * MIB),
    "NUL in a path": (lambda: chat(image_part("/srv/a\x00.png"), text_part()), 400, "invalid_image_url", "NUL",
                      64 * MIB),
    "spaces in a URL": (lambda: chat(image_part("http://example.com/a cat.png"), text_part()), 400,
                        "invalid_image_url", "spaces", 64 * MIB),
    "CR/LF in a URL": (lambda: chat(image_part("http://example.com/a.png\r\nX-Evil: 1"), text_part()), 400,
                       "invalid_image_url", "control characters", 64 * MIB),
}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_input_is_refused_fast_while_the_server_keeps_answering(served, client, case):
    make, status, code, words, rss_limit = HOSTILE[case]
    body = json.dumps(make()).encode()
    with Watch(served.url) as watch:
        response, seconds = post(served, body)
    del body
    assert response.status_code == status, response.text[:500]
    error = response.json()["error"]
    assert error["code"] == code and words in error["message"], error
    assert len(response.text) < 2000 and "Traceback" not in response.text
    assert seconds < 2.0, f"{case}: answered in {seconds:.2f} s"
    assert watch.rss_jump < rss_limit, f"{case}: RSS grew by {watch.rss_jump / MIB:.0f} MiB"
    assert watch.probes >= 2 and not watch.failures, watch.failures
    assert watch.health_ok, f"{case}: /health took up to {watch.slowest * 1000:.0f} ms"
    good_request(client)


def test_good_images_still_pass(client):
    progressive = io.BytesIO()
    rng_image(200, 150, seed=12).save(progressive, "JPEG", progressive=True)
    sixteen = png(Image.fromarray(np.asarray(rng_image(160, 120, "L", seed=13)).astype(np.uint16) * 257))
    for url in (data_uri(progressive.getvalue(), "image/jpeg"), data_uri(sixteen, "image/png")):
        reply = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": [
            image_part(url), text_part("What is it?")]}], max_tokens=2)
        assert reply.choices[0].finish_reason in ("stop", "length")


def test_the_official_client_sees_the_named_error(client):
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": [
            image_part(data_uri(scan_bomb(500, 500, 300), "image/jpeg")), text_part()]}])
    assert info.value.code == "image_too_complex"


# -- remote images ---------------------------------------------------------------------------------
def _remote_error(server, url: str) -> tuple[dict, float]:
    response, seconds = post(server, json.dumps(chat(image_part(url), text_part())).encode())
    assert response.status_code == 400, response.text
    return response.json()["error"], seconds


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "[::ffff:127.0.0.1]", "127.1", "0.0.0.0"])
def test_loopback_is_refused_by_default_without_connecting(public_only, remote, host):
    port = remote.rsplit(":", 1)[1]
    RemoteImages.hits.clear()
    error, _ = _remote_error(public_only, f"http://{host}:{port}/cat.png")
    assert error["code"] == "image_url_not_allowed" and "images.allow_private_networks" in error["message"]
    assert RemoteImages.hits == []  # refused before any connection


def test_remote_images_when_private_networks_are_allowed(client, remote):
    for path in ("/cat.png", "/to-cat"):  # a relative redirect to an image is followed
        reply = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": [
            image_part(f"{remote}{path}"), text_part("What is it?")]}], max_tokens=2)
        assert reply.choices[0].finish_reason in ("stop", "length")


@pytest.mark.parametrize("path, code, words", [
    ("/to-ftp", "image_url_not_allowed", "not http(s)"),
    ("/to-file", "image_url_not_allowed", "not http(s)"),
    ("/loop", "image_fetch_failed", "more than 3 times"),
    ("/secret", "image_fetch_failed", "HTTP 500"),
    ("/html", "unsupported_image_type", "did not answer with an image type"),
    ("/missing", "image_fetch_failed", "HTTP 404"),
])
def test_remote_failures_are_named_and_generic(served, remote, path, code, words):
    RemoteImages.hits.clear()
    error, _ = _remote_error(served, f"{remote}{path}")
    assert error["code"] == code and words in error["message"], error
    assert SECRET not in json.dumps(error) and "not here" not in error["message"]
    if path == "/loop":
        assert RemoteImages.hits == ["/loop"] * 4  # the first URL and 3 redirects
    if path in ("/to-ftp", "/to-file"):
        assert RemoteImages.hits == [path]  # the ftp:// or file:// target is never fetched


@pytest.mark.parametrize("path", ["/drip", "/drip-headers"])
def test_a_slow_drip_is_cut_at_the_total_deadline(served, client, remote, path):
    with Watch(served.url) as watch:
        error, seconds = _remote_error(served, f"{remote}{path}")
    assert error["code"] == "image_fetch_failed" and "timed out" in error["message"], error
    assert REMOTE_TIMEOUT_S - 0.1 < seconds < REMOTE_TIMEOUT_S + 0.8
    assert watch.health_ok and not watch.failures, f"/health took up to {watch.slowest * 1000:.0f} ms"
    good_request(client)


# -- the fetcher on its own (no traffic leaves loopback) --------------------------------------------
@pytest.mark.parametrize("address, public", [
    ("8.8.8.8", True), ("2606:4700:4700::1111", True), ("127.0.0.1", False), ("127.255.0.9", False),
    ("10.1.2.3", False), ("172.16.0.1", False), ("192.168.1.1", False), ("169.254.169.254", False),
    ("100.64.0.1", False), ("0.0.0.0", False), ("224.0.0.1", False), ("239.255.255.250", False),
    ("240.0.0.1", False), ("255.255.255.255", False), ("192.0.2.1", False), ("::1", False), ("::", False),
    ("fe80::1", False), ("fc00::1", False), ("fd12:3456::1", False), ("ff02::1", False),
    ("::ffff:127.0.0.1", False), ("::ffff:10.0.0.1", False), ("::ffff:8.8.8.8", True),
    ("2002:7f00:1::", False), ("2002:0808:0808::", True),
])
def test_public_addresses(address, public):
    assert is_public_address(ipaddress.ip_address(address)) is public


@pytest.mark.parametrize("url, code", [
    ("ftp://example.com/a.png", "image_url_not_allowed"), ("gopher://x/", "image_url_not_allowed"),
    ("http://user:pw@example.com/a.png", "invalid_image_url"), ("http:///a.png", "invalid_image_url"),
    ("http://example.com:99999/a.png", "invalid_image_url"), ("http://exa mple.com/", "invalid_image_url"),
    ("http://example.com/\x7f", "invalid_image_url"),
])
def test_urls_refused_before_any_lookup(url, code, monkeypatch):
    monkeypatch.setattr(socket, "getaddrinfo", lambda *a, **k: pytest.fail("looked up"))
    with pytest.raises(FetchError) as info:
        fetch(url, timeout_s=1, max_bytes=1000)
    assert info.value.code == code


def test_the_checked_address_is_the_one_connected_to(remote, monkeypatch):
    """A rebinding DNS answers loopback when checked and something else later: the fetcher looks
    the name up once per hop and connects to the address it checked."""
    port = int(remote.rsplit(":", 1)[1])
    answers = []

    def rebinding(host, port_, *args, **kwargs):
        answers.append(host)
        address = "127.0.0.1" if len(answers) == 1 else "127.0.0.2"  # nothing listens there
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (address, port_))]

    monkeypatch.setattr(socket, "getaddrinfo", rebinding)
    fetched = fetch(f"http://images.rebind.test:{port}/cat.png", timeout_s=2, max_bytes=1 << 20,
                          allow_private=True)
    assert fetched.data == CAT and answers == ["images.rebind.test"]


def test_a_name_with_any_private_address_is_refused_whole(monkeypatch):
    def mixed(host, port, *args, **kwargs):
        # loopback first: a fetcher that checked only some addresses would still stay on this machine
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", port)),
                (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("93.184.216.34", port))]

    monkeypatch.setattr(socket, "getaddrinfo", mixed)
    with pytest.raises(FetchError) as info:
        fetch("http://mixed.test/cat.png", timeout_s=1, max_bytes=1000)
    assert info.value.code == "image_url_not_allowed"


def test_a_host_that_does_not_resolve_fails_generically(monkeypatch):
    def missing(*args, **kwargs):
        raise socket.gaierror(-2, "Name or service not known (internal resolver detail)")

    monkeypatch.setattr(socket, "getaddrinfo", missing)
    with pytest.raises(FetchError, match="does not resolve") as info:
        fetch("http://nowhere.test/cat.png", timeout_s=1, max_bytes=1000)
    assert "internal resolver detail" not in str(info.value)


def test_a_body_over_the_limit_stops_at_the_limit(remote):
    fetched = fetch(f"{remote}/cat.png", timeout_s=2, max_bytes=100, allow_private=True)
    assert fetched.content_length == len(CAT) and fetched.data == b""  # declared too big: not read


# -- the reader on its own ---------------------------------------------------------------------------
def _reader(**overrides):
    from rksmolvlm.runtime.server import RequestReader

    return RequestReader(with_overrides(ServerConfig(), overrides), ServedModel(MODEL, (), 2048, 0, "host"))


def test_the_text_limit_is_configurable_and_counts_every_message():
    from rksmolvlm.runtime.server import ApiError

    reader = _reader(**{"limits.max_text_chars": 20})
    reader.read(json.dumps({"messages": [{"role": "system", "content": "0123456789"},
                                         {"role": "user", "content": [text_part("0123456789")]}]}).encode())
    with pytest.raises(ApiError, match="21 characters of text, over the 20 allowed") as info:
        reader.read(json.dumps({"messages": [{"role": "system", "content": "0123456789"},
                                             {"role": "user", "content": [text_part("0123456789X")]}]}).encode())
    assert (info.value.status, info.value.code) == (400, "text_too_long")
    assert "limits.max_text_chars" in info.value.message
    assert _reader().limits.max_text_chars == 0  # default: 8 characters a token of the context (16,384 here)
    _reader().read(json.dumps(chat(text_part("x" * 16_384))).encode())


def test_a_fifo_under_local_dir_is_refused_without_blocking(tmp_path):
    import os

    from rksmolvlm.runtime.server import ApiError

    os.mkfifo(tmp_path / "pipe.png")
    start = time.perf_counter()
    with pytest.raises(ApiError, match="not a regular file") as info:
        _reader(**{"images.local_dir": str(tmp_path)}).read(
            json.dumps(chat(image_part(str(tmp_path / "pipe.png")), text_part())).encode())
    assert info.value.code == "invalid_image" and time.perf_counter() - start < 1.0


def test_a_refusal_in_the_worker_keeps_its_code():
    """load_image in the worker checks the library limits too: its ImageError subclass is answered
    with its own code, not a generic invalid_image."""
    from rksmolvlm.errors import ImageDecodeTooLargeError

    class Refusing(UnusedRunner):
        def generate(self, messages, config):
            raise ImageDecodeTooLargeError("image is 9000×9000 in mode F: decoding it takes about 618 MiB")

    config = ServerConfig()
    service = ModelService(Refusing, ServedModel(MODEL, (), 2048, 0, "host"), 2, Metrics())
    with BackgroundServer(create_app(service, config), config) as server:
        response, _ = post(server, json.dumps(chat(text_part("hi"))).encode())
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "image_decode_too_large"


@pytest.fixture(scope="module")
def https_remote(tmp_path_factory):
    """The remote image server over TLS, with a self-signed certificate for "localhost"."""
    import shutil
    import ssl
    import subprocess

    if shutil.which("openssl") is None:
        pytest.skip("openssl is needed to make a test certificate")
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out",
                    str(cert), "-days", "1", "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost"],
                   check=True, capture_output=True)
    server = ThreadingHTTPServer(("127.0.0.1", 0), RemoteImages)
    server.daemon_threads = True
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server.server_address[1], cert
    server.shutdown()
    server.server_close()


def test_https_verifies_the_name_while_connecting_to_the_checked_address(https_remote, monkeypatch):
    import ssl

    from rksmolvlm.runtime.server import remote

    port, cert = https_remote
    with pytest.raises(FetchError, match="certificate was refused"):  # not trusted by default
        fetch(f"https://localhost:{port}/cat.png", timeout_s=2, max_bytes=1 << 20, allow_private=True)
    trusting = ssl.create_default_context(cafile=str(cert))
    monkeypatch.setattr(remote.ssl, "create_default_context", lambda: trusting)
    fetched = fetch(f"https://localhost:{port}/cat.png", timeout_s=2, max_bytes=1 << 20, allow_private=True)
    assert fetched.data == CAT
    with pytest.raises(FetchError, match="certificate was refused"):  # the address is not the name on the cert
        fetch(f"https://127.0.0.1:{port}/cat.png", timeout_s=2, max_bytes=1 << 20, allow_private=True)

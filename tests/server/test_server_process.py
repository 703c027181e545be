"""`rksmolvlm serve` as systemd runs it: a real process that tells $NOTIFY_SOCKET READY=1 once the
bundle is loaded, feeds the watchdog every WATCHDOG_USEC/2, says STOPPING=1 and exits 0 on SIGTERM,
and logs one line per request to stdout without image bytes or stack traces."""

import base64
import io
import os
import re
import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest

from support import ROOT

from support.images import rng_image
from rksmolvlm.runtime.server import SystemdNotifier

MODEL = "idefics3-256m"
RKSMOLVLM = [sys.executable, "-m", "rksmolvlm"]


class NotifySocket:
    """The manager's end of $NOTIFY_SOCKET: a datagram socket collecting sd_notify messages."""

    def __init__(self, address: str):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind("\0" + address[1:] if address.startswith("@") else address)
        self.sock.settimeout(0.2)
        self.messages: list[str] = []

    def collect(self, until: str, timeout: float) -> list[str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                self.messages.append(self.sock.recv(4096).decode())
            except socket.timeout:
                continue
            if until in self.messages[-1]:
                return self.messages
        raise AssertionError(f"no {until!r} within {timeout} s; got {self.messages}")

    def close(self):
        self.sock.close()


def test_notifier_speaks_the_sd_notify_protocol(tmp_path):
    for address in (str(tmp_path / "notify"), f"@rksmolvlm-test-{os.getpid()}"):
        manager = NotifySocket(address)
        try:
            notifier = SystemdNotifier.from_environ({"NOTIFY_SOCKET": address, "WATCHDOG_USEC": "5000000"})
            assert notifier.watchdog_interval == 2.5
            assert notifier.ready("serving m") and notifier.watchdog() and notifier.stopping()
            assert not notifier.stopping()  # said once
            assert manager.collect("STOPPING=1", 5) == ["READY=1\nSTATUS=serving m", "WATCHDOG=1",
                                                         "STOPPING=1\nSTATUS=stopping"]
        finally:
            manager.close()


def test_notifier_outside_systemd_and_for_another_pid():
    assert not SystemdNotifier.from_environ({}).ready("x")
    other = SystemdNotifier.from_environ({"NOTIFY_SOCKET": "/x", "WATCHDOG_USEC": "100", "WATCHDOG_PID": "1"})
    assert other.watchdog_interval is None  # the watchdog is meant for another process
    broken = SystemdNotifier("/nonexistent/notify")
    assert not broken.ready("x") and not broken.watchdog()  # logged once, never raised


def test_serve_under_systemd_protocol(preview_bundles, tmp_path):
    manager = NotifySocket(str(tmp_path / "notify"))
    env = {**os.environ, "NOTIFY_SOCKET": str(tmp_path / "notify"), "WATCHDOG_USEC": "400000",
           "PYTHONUNBUFFERED": "1"}
    env.pop("RKSMOLVLM_CONFIG", None)
    process = subprocess.Popen([*RKSMOLVLM, "serve", str(preview_bundles[MODEL]), "--no-config", "--engine", "host",
                                "--port", "0"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env,
                               cwd=tmp_path, text=True)
    try:
        first = process.stdout.readline()
        match = re.search(r"listening on http://127\.0\.0\.1:(\d+)", first)
        assert match, first
        url = f"http://127.0.0.1:{match.group(1)}"
        messages = list(manager.collect("READY=1", 120))
        assert messages[0].startswith("STATUS=loading") and messages[-1].startswith("READY=1\nSTATUS=serving")
        assert httpx.get(f"{url}/health").json()["status"] == "ok"  # ready before READY=1 was sent
        manager.collect("WATCHDOG=1", 5)
        manager.collect("WATCHDOG=1", 5)  # fed again and again (every 0.2 s here)
        buffer = io.BytesIO()
        rng_image(120, 90, seed=21).save(buffer, format="PNG")
        encoded = base64.b64encode(buffer.getvalue()).decode()
        image = {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{encoded}"}}
        question = [{"role": "user", "content": [image, {"type": "text", "text": "Describe the picture."}]}]
        reply = httpx.post(f"{url}/v1/chat/completions", timeout=60,
                           json={"model": MODEL, "max_tokens": 4, "messages": question})
        assert reply.status_code == 200
        bad = httpx.post(f"{url}/v1/chat/completions", timeout=60, json={"messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "data:image/png;base64," + encoded[:200]}}]}]})
        assert bad.status_code == 400
        process.send_signal(signal.SIGTERM)
        assert process.wait(30) == 0
        manager.collect("STOPPING=1", 5)
        log = process.stdout.read()
    finally:
        if process.poll() is None:
            process.kill()
        manager.close()
    assert "POST /v1/chat/completions 200" in log and "images=1" in log and "error=invalid_image" in log
    assert encoded[:40] not in log and encoded[-40:] not in log and "Describe the picture" not in log
    assert "Traceback" not in log
    assert "SIGTERM received" in log and "stopped" in log


def test_check_prints_the_settings(preview_bundles, tmp_path):
    config = tmp_path / "config.toml"
    config.write_text(f'bundle = "{preview_bundles[MODEL]}"\nengine = "host"\n[server]\nport = 9999\n')
    result = subprocess.run([*RKSMOLVLM, "serve", "--config", str(config), "--check"], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "listen: 127.0.0.1:9999" in result.stdout and "api key: none" in result.stdout
    assert "connections: at most 256; head 10 s" in result.stdout and "stop grace 10 s" in result.stdout
    assert "host check: localhost, 127.0.0.1, [::1] (no API key is set" in result.stdout
    assert result.stdout.rstrip().endswith("ok")


@pytest.mark.parametrize("host, keyed, words", [
    # it said "off (an API key is set, or the server listens beyond loopback)" with no key on 0.0.0.0
    ("0.0.0.0", False, ["api key: none", "host check: off: no API key is set and the server listens on 0.0.0.0",
                        "set server.api_key_file"]),
    ("0.0.0.0", True, ["api key: required", "host check: on for requests without the API key: IP addresses, "
                       "localhost, 127.0.0.1, [::1]"]),
])
def test_check_says_truthfully_whether_a_key_is_set(preview_bundles, tmp_path, host, keyed, words):
    config = tmp_path / "config.toml"
    lines = [f'bundle = "{preview_bundles[MODEL]}"', 'engine = "host"', "[server]", f'host = "{host}"']
    if keyed:
        key = tmp_path / "api_key"
        key.write_text("k" * 32 + "\n")
        key.chmod(0o600)
        lines.append(f'api_key_file = "{key}"')
    config.write_text("\n".join(lines) + "\n")
    result = subprocess.run([*RKSMOLVLM, "serve", "--config", str(config), "--check"], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    for expected in words:
        assert expected in result.stdout, (expected, result.stdout)
    if not keyed:
        assert "an API key is set" not in result.stdout


def test_a_busy_port_is_a_clear_error(preview_bundles):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run([*RKSMOLVLM, "serve", str(preview_bundles[MODEL]), "--no-config", "--engine", "host",
                                 "--port", str(port)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert f"cannot listen on 127.0.0.1:{port}" in result.stderr and "--port" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("args, message", [
    (["--port", "70000"], "server.port = 70000 is out of range"),
    (["--queue-size", "-2"], "server.queue_size = -2 is out of range"),
])
def test_bad_flags_exit_78_before_loading(preview_bundles, args, message):
    result = subprocess.run([*RKSMOLVLM, "serve", str(preview_bundles[MODEL]), "--no-config", *args],
                            capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert result.returncode == 78 and message in result.stderr

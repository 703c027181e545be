"""Request bodies bounded before they are expanded (issue 21, item 3): the JSON values of a body are
counted on its raw bytes before json.loads builds a Python object (``json_values``), so a 21 MB body
of 4 million two-letter Ollama images, or of 800,000 empty OpenAI text parts, is a named 413 in well
under a second with a small RSS jump (it took +2.29 GB and 17 s); Ollama's ``images`` are counted on
the parsed lists before any becomes a part; a chunked body is counted as it is read and refused at
limits.max_body_bytes. Against the real server on loopback (its runner never reached)."""

from __future__ import annotations

import base64
import json
import os
import socket
import threading
import time

import httpx
import pytest

from support.fakes import UnusedRunner
from rksmolvlm.runtime.server import BackgroundServer, Metrics, ModelService, ServedModel, create_app
from rksmolvlm.runtime.server.config import ServerConfig, with_overrides
from rksmolvlm.runtime.server.errors import ApiError
from rksmolvlm.runtime.server.requests import json_values, parse_json

MIB = 1024 * 1024
LIMIT = ServerConfig().limits.max_json_values



@pytest.fixture(scope="module")
def server():
    config = ServerConfig()
    service = ModelService(UnusedRunner, ServedModel("m", (), 2048, 0, "host"), 2, Metrics())
    with BackgroundServer(create_app(service, config), config) as served:
        yield served


def _rss() -> int:
    with open("/proc/self/statm") as f:  # the server runs in this process
        return int(f.read().split()[1]) * 4096


class PeakRss:
    """This process's RSS sampled every 2 ms from a thread; ``jump`` is the peak above the start."""

    def __enter__(self) -> "PeakRss":
        self.base = self.peak = _rss()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._sample)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._done.set()
        self._thread.join()

    @property
    def jump(self) -> int:
        return self.peak - self.base

    def _sample(self):
        while not self._done.is_set():
            self.peak = max(self.peak, _rss())
            time.sleep(0.002)


def _bomb_images(n: int = 4_190_000) -> bytes:
    return (b'{"model": "m", "stream": false, "messages": [{"role": "user", "content": "Describe.", "images": ['
            + b",".join([b'"AA"'] * n) + b"]}]}")


def _bomb_parts(n: int = 780_000) -> bytes:
    return (b'{"model": "m", "messages": [{"role": "user", "content": ['
            + b",".join([b'{"type":"text","text":""}'] * n) + b"]}]}")


# -- counting on the raw bytes ---------------------------------------------------------------------
def _reference(value) -> int:
    """The count json_values makes, from the parsed value: every string (keys too), and every '[', '{'
    and ',' outside strings."""
    if isinstance(value, dict):
        return 1 + max(0, len(value) - 1) + sum(1 + _reference(v) for v in value.values())
    if isinstance(value, list):
        return 1 + max(0, len(value) - 1) + sum(_reference(v) for v in value)
    return 1 if isinstance(value, str) else 0


@pytest.mark.parametrize("value", [
    {"a": [1, 2, "x,[{"], 'b"c': "\\"},
    {"messages": [{"role": "user", "content": [{"type": "text", "text": "a, [b] {c} \"d\" \\\\"}]}], "n": None},
    [[], {}, [[[]]], "", "\\\"", "\u2603,"],
    {"deep": [[[[{"k": ["v", 1.5e3, True, None]}]]]]},
])
def test_json_values_counts_outside_strings_exactly(value):
    """Refused exactly when the count is over the limit, whichever pass decides."""
    body = json.dumps(value).encode()
    count = _reference(value)
    assert json_values(body, count) <= count and json_values(body, count - 1) >= count
    assert json_values(body, 0) >= 1 and json_values(body, 10 ** 9) <= 10 ** 9


def test_json_values_sees_a_string_bomb_by_its_strings_and_a_bracket_bomb_by_its_structure():
    strings = _bomb_images(200_000)
    assert json_values(strings, LIMIT) >= 200_000
    brackets = b"[" * 150_000 + b"]" * 150_000  # no strings: the blanked structure decides
    assert json_values(brackets, LIMIT) == 150_000
    text = json.dumps({"messages": [{"role": "user", "content": "a, [b] {c}, " * 50_000}]}).encode()
    assert json_values(text, LIMIT) == 9  # 200,000 structural bytes, all inside one string: within


def test_a_legitimate_14_mb_body_is_counted_at_a_fraction_of_its_parse():
    image = base64.b64encode(os.urandom(10_500_000)).decode()
    body = json.dumps({"model": "m", "messages": [{"role": "user", "content": [
        {"type": "text", "text": "Describe, please. " * 100},
        {"type": "image_url", "image_url": {"url": "data:image/jpeg;base64," + image}}]}]}).encode()
    assert len(body) > 14_000_000
    count, parse = [], []
    for _ in range(3):
        start = time.perf_counter()
        values = json_values(body, LIMIT)
        count.append(time.perf_counter() - start)
        start = time.perf_counter()
        parse_json(body, LIMIT)
        parse.append(time.perf_counter() - start)
    assert values < 200
    assert min(count) < min(parse), f"count {min(count) * 1000:.1f} ms, parse {min(parse) * 1000:.1f} ms"


def test_parse_json_names_the_limit_and_the_fix():
    with pytest.raises(ApiError) as refused:
        parse_json(json.dumps({"messages": [{"role": "user", "content": "hi"}] * 600}).encode(), 1000)
    error = refused.value
    assert (error.status, error.code) == (413, "too_many_json_values")
    assert "limits.max_json_values = 1,000" in error.message and "send fewer messages" in error.message


# -- against the real server -----------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("path, make, ollama", [
    ("/api/chat", _bomb_images, True),
    ("/v1/chat/completions", _bomb_parts, False),
])
def test_a_21_mb_bomb_of_tiny_values_is_413_before_it_is_parsed(server, path, make, ollama):
    body = make()
    assert 20 * 10**6 < len(body) <= ServerConfig().limits.max_body_bytes
    with PeakRss() as rss:
        start = time.perf_counter()
        response = httpx.post(f"{server.url}{path}", content=body, timeout=60,
                              headers={"Content-Type": "application/json"})
        seconds = time.perf_counter() - start
    del body
    assert response.status_code == 413, response.text[:300]
    message = response.json()["error"] if ollama else response.json()["error"]["message"]
    if not ollama:
        assert response.json()["error"]["code"] == "too_many_json_values"
    assert "limits.max_json_values = 100,000" in message and "send fewer" in message
    assert seconds < 3.0, f"answered in {seconds:.2f} s"
    assert rss.jump < 150 * MIB, f"RSS grew by {rss.jump / MIB:.0f} MiB"  # the body itself, a few copies
    assert httpx.get(f"{server.url}/health").status_code == 200


def test_ollama_images_are_counted_before_they_become_parts(server):
    """33 images (under the value limit) are refused by their count, naming the Ollama field."""
    image = base64.b64encode(b"\x89PNG not decoded").decode()
    chat = httpx.post(f"{server.url}/api/chat", json={"model": "m", "stream": False, "messages": [
        {"role": "user", "content": "Describe.", "images": [image] * 33}]})
    assert chat.status_code == 400 and "33 images, over limits.max_images = 32" in chat.json()["error"]
    generate = httpx.post(f"{server.url}/api/generate", json={"model": "m", "prompt": "Describe.",
                                                              "images": [image] * 40})
    assert generate.status_code == 400 and "40 images, over limits.max_images = 32" in generate.json()["error"]


# -- chunked bodies ----------------------------------------------------------------------------------
def _chunked_post(server, path: str, total: int, chunk: int = 64 * 1024) -> tuple[bytes, int]:
    """POST a chunked body of ``total`` bytes (or until the server stops reading); the answer and the bytes
    the server took."""
    sent = 0
    with socket.create_connection((server.host, server.port), timeout=10) as sock:
        sock.sendall(f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     "Transfer-Encoding: chunked\r\n\r\n".encode())
        piece = b"%x\r\n" % chunk + b" " * chunk + b"\r\n"
        try:
            while sent < total:
                sock.sendall(piece)
                sent += chunk
            sock.sendall(b"0\r\n\r\n")
        except (BrokenPipeError, ConnectionResetError):
            pass
        data = b""
        try:
            while part := sock.recv(65536):
                data += part
                if b"\r\n\r\n" in data and data.split(b"\r\n\r\n", 1)[1].rstrip().endswith(b"}"):
                    break
        except (ConnectionResetError, TimeoutError):
            pass
    return data, sent


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/api/chat"])
def test_a_chunked_body_over_the_limit_is_counted_as_read_and_413(path):
    limit = 1 * MIB
    config = with_overrides(ServerConfig(), {"limits.max_body_bytes": limit, "limits.max_image_bytes": 512 * 1024})
    service = ModelService(UnusedRunner, ServedModel("m", (), 2048, 0, "host"), 2, Metrics())
    with BackgroundServer(create_app(service, config), config) as served:
        data, _ = _chunked_post(served, path, limit + 256 * 1024)  # no Content-Length: counted as read
        head, _, rest = data.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 413"), data[:300]
        error = json.loads(rest)["error"]
        message = error if isinstance(error, str) else error["message"]
        assert "limits.max_body_bytes = 1,048,576" in message
        if isinstance(error, dict):
            assert error["code"] == "request_too_large"
        data, sent = _chunked_post(served, path, 64 * limit)  # an endless sender is cut off, not read to the end
        head = data.partition(b"\r\n\r\n")[0]
        assert head.startswith(b"HTTP/1.1 413") and b"connection: close" in head.lower() and sent < 16 * limit
        assert httpx.get(f"{served.url}/health").status_code == 200

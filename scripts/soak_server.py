#!/usr/bin/env python3
"""Soak `rksmolvlm serve` on loopback: a fixed number of requests (half one after another, half from
several clients at once), bounded in time, then a report — throughput, p50/p99 latency, tokens/s,
errors, and the server's RSS at start and end (a leak shows as growth).

    .venv/bin/python scripts/soak_server.py BUNDLE [--requests 1000] [--concurrency 4] [--time-limit 900]
    .venv/bin/python scripts/soak_server.py BUNDLE --hostile [--idle 200] [--slow-headers 50] [--slow-bodies 20]

The server runs as its own process (`python -m rksmolvlm serve`), so its RSS is the server's alone.
Requests mix text-only and image questions (more distinct images than the server's feature cache
holds), streaming and not, with and without stop strings. Exit status 1 if any request failed.

``--hostile`` runs the same good requests while a hostile mix runs beside them, from threads of this
process: idle sockets, clients that send a request head one byte every 2 s or a body 10 bytes a
second (each reopened when the server closes it), and bombs the server must refuse with a 4xx at
its default limits — a 900-megapixel 1-bit PNG, a 1×50,000,000 PNG, a progressive JPEG of 5,000
scans and a TIFF with a progressive JPEG strip (tests/support/hostile_images.py), a 10-million-character
text and a body over the size limit. /health is probed on a new connection every 100 ms. The report
adds /health p50/p99/max, the bombs' answers and times, and how often the server closed the slow
clients. The server gets max_connections above the mix (eviction is tested in
tests/server/test_server_hostile_network.py). Exit status 1 also if a bomb was not refused or /health failed.
"""

from __future__ import annotations

import argparse
import base64
import http.client
import io
import json
import os
import re
import selectors
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
from PIL import Image


@dataclass
class Outcome:
    ok: bool
    seconds: float
    tokens: int = 0
    retries: int = 0
    problem: str = ""


@dataclass
class Phase:
    name: str
    outcomes: list[Outcome] = field(default_factory=list)
    seconds: float = 0.0

    def summary(self) -> dict:
        latencies = sorted(o.seconds for o in self.outcomes if o.ok)
        done = len(self.outcomes)
        tokens = sum(o.tokens for o in self.outcomes)
        return {"phase": self.name, "requests": done, "failed": sum(not o.ok for o in self.outcomes),
                "retried_429": sum(o.retries for o in self.outcomes), "seconds": round(self.seconds, 2),
                "requests_per_s": round(done / self.seconds, 2) if self.seconds else 0.0,
                "completion_tokens_per_s": round(tokens / self.seconds, 1) if self.seconds else 0.0,
                "latency_p50_ms": round(_percentile(latencies, 50) * 1000, 1),
                "latency_p99_ms": round(_percentile(latencies, 99) * 1000, 1),
                "latency_max_ms": round((latencies[-1] if latencies else 0) * 1000, 1)}


def _percentile(values: list[float], p: float) -> float:
    if not values:
        return 0.0
    index = min(len(values) - 1, max(0, round(p / 100 * len(values) + 0.5) - 1))
    return values[index]


def make_images(count: int) -> list[str]:
    """``count`` distinct small PNGs as data URIs, of varied shapes."""
    rng = np.random.RandomState(1234)
    uris = []
    for i in range(count):
        width, height = 64 + 24 * (i % 7), 48 + 20 * (i % 5)
        ramp = np.linspace(0, 255, width)[None, :, None] * np.ones((height, 1, 3))
        pixels = (ramp * 0.7 + rng.randint(0, 80, (height, width, 3))).clip(0, 255).astype(np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="PNG")
        uris.append("data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode())
    return uris


def body_for(i: int, model: str, images: list[str], max_tokens: int) -> dict:
    content: list[dict] = []
    if i % 2 == 0:
        content.append({"type": "image_url", "image_url": {"url": images[(i // 2) % len(images)]}})
    content.append({"type": "text", "text": f"Request {i}: describe what you see in a few words."})
    body = {"model": model, "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens,
            "stream": i % 3 == 0}
    if i % 5 == 0:
        body["stop"] = ["\n\n", "."]
    return body


def send(client: httpx.Client, url: str, body: dict, deadline: float) -> Outcome:
    start = time.perf_counter()
    retries = 0
    while True:
        try:
            if body["stream"]:
                with client.stream("POST", url, json=body) as response:
                    if response.status_code == 429 and time.monotonic() < deadline:
                        retries += 1
                        time.sleep(float(response.headers.get("retry-after", "1")))
                        continue
                    if response.status_code != 200:
                        response.read()
                        return Outcome(False, time.perf_counter() - start, problem=f"HTTP {response.status_code}: "
                                       f"{response.text[:200]}")
                    events = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]
                if events[-1] != "[DONE]":
                    return Outcome(False, time.perf_counter() - start, problem=f"stream ended with {events[-1][:200]}")
                final = json.loads(events[-2])
                tokens = len(final["rksmolvlm"]["token_ids"])
            else:
                response = client.post(url, json=body)
                if response.status_code == 429 and time.monotonic() < deadline:
                    retries += 1
                    time.sleep(float(response.headers.get("retry-after", "1")))
                    continue
                if response.status_code != 200:
                    return Outcome(False, time.perf_counter() - start,
                                   problem=f"HTTP {response.status_code}: {response.text[:200]}")
                reply = response.json()
                tokens = len(reply["rksmolvlm"]["token_ids"])
                if reply["choices"][0]["finish_reason"] not in ("stop", "length"):
                    return Outcome(False, time.perf_counter() - start, problem=f"finish {reply['choices'][0]}")
            if not 1 <= tokens <= body["max_tokens"]:
                return Outcome(False, time.perf_counter() - start, problem=f"{tokens} tokens")
            return Outcome(True, time.perf_counter() - start, tokens, retries)
        except (httpx.HTTPError, ValueError, KeyError, IndexError) as exc:
            return Outcome(False, time.perf_counter() - start, problem=f"{type(exc).__name__}: {exc}")


# ==============================================================================================
# The hostile mix (--hostile)
# ==============================================================================================
def bombs(model: str) -> list[tuple[str, bytes]]:
    """Request bodies the server must refuse with a 4xx, each cheap to send."""
    def chat(content) -> bytes:
        return json.dumps({"model": model, "max_tokens": 4, "messages": [{"role": "user", "content": content}]}
                          ).encode()

    def image(data: bytes, mime: str) -> bytes:
        return chat([{"type": "image_url", "image_url": {"url": f"data:{mime};base64,"
                                                          f"{base64.b64encode(data).decode()}"}},
                     {"type": "text", "text": "What is this?"}])

    out = [("900 MP 1-bit PNG", image(_one_bit_png(30000, 30000), "image/png")),
           ("10M-character text", chat("word " * 2_000_000)),
           ("body over the limit", b'{"messages": [{"role": "user", "content": "' + b"a" * (21 << 20) + b'"}]}')]
    try:  # the test suite's costly-to-decode images, when run from a checkout
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
        from support.hostile_images import jpeg_tiff, scan_bomb, zero_png
    except ImportError:
        return out
    return out + [("1×50,000,000 PNG", image(zero_png(1, 50_000_000), "image/png")),
                  ("JPEG of 5,000 scans", image(scan_bomb(2000, 2000, 5000), "image/jpeg")),
                  ("TIFF, progressive JPEG strip", image(jpeg_tiff(2000, 2000, scan_bomb(2000, 2000, 300)),
                                                         "image/tiff"))]


def _one_bit_png(width: int, height: int) -> bytes:
    def chunk(kind: bytes, body: bytes) -> bytes:
        return len(body).to_bytes(4, "big") + kind + body + zlib.crc32(kind + body).to_bytes(4, "big")

    header = width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes([1, 0, 0, 0, 0])
    row = b"\x00" * (1 + (width + 7) // 8)
    compressor = zlib.compressobj(9)
    pixels = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels) + chunk(b"IEND", b"")


class HostileMix:
    """Hostile clients in threads: ``idle`` silent sockets, ``slow_headers`` sockets sending a request
    head a byte every 2 s, ``slow_bodies`` sending a body 10 bytes a second (all reopened when the
    server closes them), bombs posted one after another, and a /health probe every 100 ms."""

    def __init__(self, url: str, model: str, idle: int, slow_headers: int, slow_bodies: int, with_bombs: bool):
        parsed = httpx.URL(url)
        self.url, self.address = url, (parsed.host, parsed.port)
        self.counts = {"idle": idle, "slow_header": slow_headers, "slow_body": slow_bodies}
        self.closed_by_server: Counter = Counter()
        self.bombs = bombs(model) if with_bombs else []
        self.bomb_answers: dict[str, Counter] = {name: Counter() for name, _ in self.bombs}
        self.bomb_seconds: dict[str, float] = {name: 0.0 for name, _ in self.bombs}
        self.health: list[float] = []
        self.health_failures: list[str] = []
        self._stop = threading.Event()
        work = (self._sockets, self._probe, *((self._bomber,) if self.bombs else ()))
        self._threads = [threading.Thread(target=t, daemon=True) for t in work]

    def start(self) -> "HostileMix":
        for thread in self._threads:
            thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(30)

    def _open(self, kind: str) -> socket.socket | None:
        try:
            sock = socket.create_connection(self.address, timeout=5)
        except OSError:
            return None
        sock.setblocking(False)
        if kind == "slow_body":
            sock.send(b"POST /v1/chat/completions HTTP/1.1\r\nHost: " + self.address[0].encode() +
                      b"\r\nContent-Type: application/json\r\nContent-Length: 1000000\r\n\r\n")
        return sock

    def _sockets(self) -> None:
        """Keep every hostile socket open: drip to the slow ones, reopen what the server closed."""
        selector = selectors.DefaultSelector()
        held: dict[socket.socket, str] = {}
        head = b"GET /health HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"a" * 4000
        sent: dict[socket.socket, int] = {}
        last_drip = 0.0
        while not self._stop.is_set():
            for kind, count in self.counts.items():
                missing = count - sum(1 for k in held.values() if k == kind)
                for _ in range(missing):
                    sock = self._open(kind)
                    if sock is None:
                        break
                    held[sock], sent[sock] = kind, 0
                    selector.register(sock, selectors.EVENT_READ)
            for key, _ in selector.select(timeout=0.2):  # readable: the server's 408 or its close
                sock = key.fileobj
                try:
                    sock.recv(65536)
                except BlockingIOError:
                    continue
                except OSError:
                    pass
                self.closed_by_server[held.pop(sock)] += 1
                selector.unregister(sock)
                sock.close()
            now = time.monotonic()
            if now - last_drip >= 1.0:  # slow heads: a byte every 2 s; slow bodies: 10 bytes a second
                last_drip = now
                for sock, kind in list(held.items()):
                    try:
                        if kind == "slow_header" and int(now) % 2 == 0:
                            sock.send(head[sent[sock] % len(head):][:1])
                            sent[sock] += 1
                        elif kind == "slow_body":
                            sock.send(b" " * 10)
                    except OSError:
                        pass
        for sock in held:
            sock.close()

    def _bomber(self) -> None:
        with httpx.Client(timeout=120) as client:
            while not self._stop.is_set():
                for name, body in self.bombs:
                    if self._stop.is_set():
                        return
                    start = time.perf_counter()
                    try:
                        status = str(client.post(f"{self.url}/v1/chat/completions", content=body,
                                                 headers={"Content-Type": "application/json"}).status_code)
                    except httpx.HTTPError as exc:
                        status = type(exc).__name__
                    self.bomb_answers[name][status] += 1
                    self.bomb_seconds[name] = max(self.bomb_seconds[name], time.perf_counter() - start)
                    self._stop.wait(0.5)

    def _probe(self) -> None:
        while not self._stop.is_set():
            start = time.perf_counter()
            try:
                connection = http.client.HTTPConnection(*self.address, timeout=10)
                connection.request("GET", "/health")
                status = connection.getresponse().status
                connection.close()
                self.health.append(time.perf_counter() - start)
                if status != 200:
                    self.health_failures.append(f"HTTP {status}")
            except OSError as exc:
                self.health_failures.append(f"{type(exc).__name__}: {exc}")
            self._stop.wait(0.1)

    def summary(self) -> dict:
        health = sorted(self.health)
        refused = all(set(answers) <= {"400", "413"} and answers for answers in self.bomb_answers.values())
        return {"health_probes": len(health), "health_failures": len(self.health_failures),
                "health_p50_ms": round(_percentile(health, 50) * 1000, 1),
                "health_p99_ms": round(_percentile(health, 99) * 1000, 1),
                "health_max_ms": round((health[-1] if health else 0) * 1000, 1),
                "hostile_sockets": dict(self.counts), "closed_by_server": dict(self.closed_by_server),
                "bombs": {name: {"answers": dict(self.bomb_answers[name]),
                                 "slowest_s": round(self.bomb_seconds[name], 3)} for name, _ in self.bombs},
                "bombs_all_refused": refused}


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def start_server(args, log_path: Path) -> tuple[subprocess.Popen, str]:
    command = [sys.executable, "-m", "rksmolvlm", "serve", str(args.bundle), "--no-config", "--engine", args.engine,
               "--port", "0", "--queue-size", str(max(args.concurrency, 1)), "--request-timeout", "120"]
    if args.hostile:  # room for the hostile sockets beside the good clients (eviction is tested elsewhere)
        at = command.index("--no-config")
        command[at:at + 1] = ["--config", str(_hostile_config(args, log_path.parent))]
    log = open(log_path, "w")
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env={**os.environ,
                                                                                 "PYTHONUNBUFFERED": "1"})
    deadline = time.monotonic() + args.start_timeout
    while time.monotonic() < deadline:
        match = re.search(r"listening on (http://\S+?);", log_path.read_text())
        if match:
            url = match.group(1)
            while time.monotonic() < deadline:
                try:
                    health = httpx.get(f"{url}/health", timeout=5)
                    if health.status_code == 200:
                        return process, url
                    if health.json().get("status") == "failed":
                        break
                except httpx.HTTPError:
                    pass
                if process.poll() is not None:
                    break
                time.sleep(0.2)
            break
        if process.poll() is not None:
            break
        time.sleep(0.1)
    process.kill()
    raise SystemExit(f"the server did not become ready; its log ({log_path}):\n{log_path.read_text()[-3000:]}")


def _hostile_config(args, directory: Path) -> Path:
    path = directory / "config.toml"
    path.write_text(f"[server]\nmax_connections = {args.idle + args.slow_headers + args.slow_bodies + 64}\n")
    return path


def run_phase(name: str, indices: range, concurrency: int, url: str, model: str, images: list[str],
              max_tokens: int, deadline: float) -> Phase:
    phase = Phase(name)
    lock = threading.Lock()
    local = threading.local()

    def one(i: int) -> None:
        if time.monotonic() > deadline:
            return
        if not hasattr(local, "client"):
            local.client = httpx.Client(timeout=180)
        outcome = send(local.client, f"{url}/v1/chat/completions", body_for(i, model, images, max_tokens), deadline)
        with lock:
            phase.outcomes.append(outcome)
            if not outcome.ok and sum(not o.ok for o in phase.outcomes) <= 5:
                print(f"  request {i} failed: {outcome.problem}", file=sys.stderr)

    start = time.perf_counter()
    if concurrency <= 1:
        for i in indices:
            one(i)
    else:
        with ThreadPoolExecutor(concurrency) as pool:
            list(pool.map(one, indices))
    phase.seconds = time.perf_counter() - start
    return phase


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("bundle", type=Path)
    parser.add_argument("--requests", type=int, default=1000, help="total requests (default 1000)")
    parser.add_argument("--concurrency", type=int, default=4, help="clients in the concurrent half (default 4)")
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--images", type=int, default=40, help="distinct images (default 40: beyond the cache of 32)")
    parser.add_argument("--engine", default="auto", choices=["auto", "host", "npu"])
    parser.add_argument("--time-limit", type=float, default=900, help="seconds; no new request after it (900)")
    parser.add_argument("--start-timeout", type=float, default=300)
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument("--hostile", action="store_true", help="run a hostile mix beside the good requests")
    parser.add_argument("--idle", type=int, default=200, help="idle sockets in the hostile mix (200)")
    parser.add_argument("--slow-headers", type=int, default=50, help="slow-head clients in the hostile mix (50)")
    parser.add_argument("--slow-bodies", type=int, default=20, help="slow-body clients in the hostile mix (20)")
    parser.add_argument("--no-bombs", action="store_true", help="leave the bombs out of the hostile mix")
    args = parser.parse_args()

    images = make_images(args.images)
    log_path = Path(tempfile.mkdtemp(prefix="rksmolvlm-soak-")) / "server.log"
    process, url = start_server(args, log_path)
    hostile = None
    try:
        deadline = time.monotonic() + args.time_limit
        model = httpx.get(f"{url}/v1/models").json()["data"][0]["id"]
        warm = run_phase("warm-up", range(10), 1, url, model, images, args.max_tokens, deadline)
        rss_start = rss_mb(process.pid)
        hostile = HostileMix(url, model, args.idle, args.slow_headers, args.slow_bodies,
                             not args.no_bombs).start() if args.hostile else None
        half = args.requests // 2
        sequential = run_phase("sequential", range(half), 1, url, model, images, args.max_tokens, deadline)
        rss_middle = rss_mb(process.pid)
        concurrent = run_phase(f"concurrent x{args.concurrency}", range(half, args.requests), args.concurrency, url,
                               model, images, args.max_tokens, deadline)
        if hostile is not None:
            hostile.stop()
        rss_end = rss_mb(process.pid)
        metrics = httpx.get(f"{url}/metrics").text
        alive = httpx.get(f"{url}/health").status_code == 200
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            code = process.wait(60)
        except subprocess.TimeoutExpired:
            process.kill()
            code = -9
    log_text = log_path.read_text()
    phases = [sequential.summary(), concurrent.summary()]
    done = sum(p["requests"] for p in phases)
    failed = sum(p["failed"] for p in phases) + sum(not o.ok for o in warm.outcomes)
    served = sum(float(m) for m in re.findall(
        r'^rksmolvlm_requests_total\{path="/v1/chat/completions",status="200"\} (\S+)$', metrics, re.MULTILINE))
    report = {"url": url, "bundle": str(args.bundle), "requests": done, "failed": failed,
              "stopped_by_time_limit": done < args.requests, "phases": phases,
              "server_rss_mb": {"start": round(rss_start, 1), "after_sequential": round(rss_middle, 1),
                                "end": round(rss_end, 1),
                                "growth": round(rss_end - rss_start, 1)},
              "server_counted_200": int(served), "healthy_at_end": alive, "server_exit_code": code,
              "server_log": str(log_path), "tracebacks_in_log": log_text.count("Traceback")}
    if hostile is not None:
        report["hostile"] = hostile.summary()
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(f"soak: {done} requests against {args.bundle} ({url}), {failed} failed"
              + (" — stopped by --time-limit" if report["stopped_by_time_limit"] else ""))
        for p in phases:
            print(f"  {p['phase']:<15} {p['requests']:>5} req in {p['seconds']:>7.1f} s  "
                  f"{p['requests_per_s']:>6.2f} req/s  {p['completion_tokens_per_s']:>7.1f} tok/s  "
                  f"p50 {p['latency_p50_ms']:>7.1f} ms  p99 {p['latency_p99_ms']:>7.1f} ms  "
                  f"max {p['latency_max_ms']:>7.1f} ms  429-retries {p['retried_429']}")
        r = report["server_rss_mb"]
        print(f"  server RSS: {r['start']:.1f} MB at start, {r['after_sequential']:.1f} MB after the sequential "
              f"half, {r['end']:.1f} MB at end ({r['growth']:+.1f} MB)")
        print(f"  server counted {report['server_counted_200']} answered requests; healthy at end: {alive}; "
              f"exit code after SIGTERM: {code}; tracebacks in its log: {report['tracebacks_in_log']} ({log_path})")
        if hostile is not None:
            h = report["hostile"]
            print(f"  hostile mix: {h['hostile_sockets']} held open; the server closed {h['closed_by_server']}")
            print(f"  /health during it: {h['health_probes']} probes, p50 {h['health_p50_ms']} ms, p99 "
                  f"{h['health_p99_ms']} ms, max {h['health_max_ms']} ms, {h['health_failures']} failed")
            for name, bomb in h["bombs"].items():
                print(f"  bomb {name:<28} answers {bomb['answers']}  slowest {bomb['slowest_s']:.3f} s")
    ok = failed == 0 and alive and code == 0 and report["tracebacks_in_log"] == 0
    if hostile is not None:
        ok = ok and report["hostile"]["bombs_all_refused"] and report["hostile"]["health_failures"] == 0
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

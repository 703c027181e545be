"""`rksmolvlm serve` as its own process for end-to-end suites, and what they watch while it works: the
/health latency from a keep-alive client every ~20 ms (in a process of its own, so that the test's own
work — encoding a 14 MB body, parsing an answer — never holds the prober's interpreter lock), and the
resident memory of the server's whole process tree (the server and every descendant, e.g. the media
jail's children) every ~50 ms.

    with ServeProcess.start(bundle, config_text, workdir) as server, Sampler(server.url, server.pid) as sampler:
        with sampler.window() as window:
            ...  # a hostile request
        window.peak_tree_rss, window.health_p99()

The server writes its log to ``workdir/serve.log`` (``ServeProcess.log_tail`` for a failure message).
Memory is read from /proc (Linux): ``VmRSS`` of each process, the tree walked through
``/proc/<pid>/task/<tid>/children`` (or every /proc/<pid>/stat's parent where that file is missing).
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

__all__ = ["ServeProcess", "Sampler", "Window", "process_tree", "tree_rss", "rss", "MIB"]

MIB = 1024 * 1024
HEALTH_INTERVAL_S = 0.02
MEMORY_INTERVAL_S = 0.05
MIN_WINDOW_S = 0.15  # at least ~5 /health probes in every window


class ServeProcess:
    """``python -m rksmolvlm serve BUNDLE --config FILE`` on a free loopback port (the config's
    server.port should be 0), its output in ``workdir/serve.log``; ``stop()`` sends SIGTERM, then
    SIGKILL after ``timeout``."""

    def __init__(self, process: subprocess.Popen, url: str, log_path: Path):
        self.process = process
        self.url = url
        self.log_path = log_path

    @property
    def pid(self) -> int:
        return self.process.pid

    @classmethod
    def start(cls, bundle: Path, config_text: str, workdir: Path, ready_timeout: float = 180.0) -> "ServeProcess":
        """Write ``config_text`` to ``workdir/config.toml``, start the server and wait until /health
        answers 200 (the model loaded); RuntimeError with the log's tail when it does not."""
        workdir.mkdir(parents=True, exist_ok=True)
        config = workdir / "config.toml"
        config.write_text(config_text)
        log_path = workdir / "serve.log"
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        env.pop("RKSMOLVLM_CONFIG", None)
        with open(log_path, "wb") as log:
            process = subprocess.Popen([sys.executable, "-m", "rksmolvlm", "serve", str(bundle), "--config",
                                        str(config)], stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                       cwd=workdir, env=env)
        server = cls(process, "", log_path)
        try:
            server.url = server._wait_listening(ready_timeout)
            server._wait_healthy(ready_timeout)
        except BaseException:
            server.stop()
            raise
        return server

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM and wait (the server drains, kills its decoding children and exits 0); SIGKILL past
        ``timeout``. The exit status."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        return self.process.returncode

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def __enter__(self) -> "ServeProcess":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- private ----------------------------------------------------------------------------------
    def _wait_listening(self, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        pattern = re.compile(r"listening on (http://127\.0\.0\.1:\d+)")
        while time.monotonic() < deadline:
            match = pattern.search(self.log_path.read_text(errors="replace"))
            if match:
                return match.group(1)
            if self.process.poll() is not None:
                raise RuntimeError(f"serve exited with {self.process.returncode} before listening:\n{self.log_tail()}")
            time.sleep(0.05)
        raise RuntimeError(f"serve did not listen within {timeout:.0f} s:\n{self.log_tail()}")

    def _wait_healthy(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.url}/health", timeout=5).status_code == 200:
                    return
            if self.process.poll() is not None:
                raise RuntimeError(f"serve exited with {self.process.returncode} while loading:\n{self.log_tail()}")
            time.sleep(0.1)
        raise RuntimeError(f"serve was not healthy within {timeout:.0f} s:\n{self.log_tail()}")


@dataclass
class Window:
    """What the sampler saw between a window's start and end: /health latencies (seconds) and
    failures (non-200 answers or errors), the peak RSS of the whole tree and of the server process
    alone (bytes), and the most processes the tree held at once."""

    seconds: float = 0.0
    health: list[float] = field(default_factory=list)
    health_failures: list[str] = field(default_factory=list)
    peak_tree_rss: int = 0
    peak_server_rss: int = 0
    peak_processes: int = 0

    def health_p99(self) -> float:
        """The 99th percentile /health latency (nearest rank); inf when no probe answered."""
        if not self.health:
            return float("inf")
        ordered = sorted(self.health)
        return ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]


class Sampler:
    """Two daemon threads: /health on one keep-alive connection every HEALTH_INTERVAL_S, and the
    process tree of ``pid`` every MEMORY_INTERVAL_S. ``window()`` yields a Window filled when the
    block ends; ``peak`` is the highest tree RSS since the start."""

    def __init__(self, url: str, pid: int):
        self.url = url
        self.pid = pid
        self._lock = threading.Lock()
        self._health: list[tuple[float, float, str | None]] = []  # (start time, latency, failure)
        self._memory: list[tuple[float, int, int, int]] = []  # (time, tree RSS, server RSS, processes)
        self._stop = threading.Event()
        self._prober: subprocess.Popen | None = None
        self._threads = [threading.Thread(target=self._read_health, name="sampler-health", daemon=True),
                         threading.Thread(target=self._probe_memory, name="sampler-memory", daemon=True)]

    def start(self) -> "Sampler":
        self._prober = subprocess.Popen([sys.executable, __file__, "health", self.url], stdout=subprocess.PIPE,
                                        stdin=subprocess.DEVNULL, text=True)
        for thread in self._threads:
            thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._prober is not None and self._prober.poll() is None:
            self._prober.terminate()
            self._prober.wait(10)
        for thread in self._threads:
            thread.join(10)

    def all_health(self) -> list[float]:
        """Every /health latency since the start (answered probes), in seconds."""
        with self._lock:
            return [h[1] for h in self._health if h[2] is None]

    @property
    def peak(self) -> int:
        with self._lock:
            return max((m[1] for m in self._memory), default=0)

    @contextlib.contextmanager
    def window(self):
        result = Window()
        start = time.monotonic()
        try:
            yield result
        finally:
            # a window spans a few /health probes even when its case is answered at once (0 probes proves nothing)
            time.sleep(max(0.0, start + MIN_WINDOW_S - time.monotonic()))
            end = time.monotonic()
            time.sleep(MEMORY_INTERVAL_S * 2)  # one more memory sample that covers the end
            self._fill(result, start, end)

    def __enter__(self) -> "Sampler":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- private ----------------------------------------------------------------------------------
    def _fill(self, result: Window, start: float, end: float) -> None:
        with self._lock:
            health = [h for h in self._health if start <= h[0] <= end]
            memory = [m for m in self._memory if start <= m[0] <= end + MEMORY_INTERVAL_S * 2]
        result.seconds = end - start
        result.health = [h[1] for h in health if h[2] is None]
        result.health_failures = [h[2] for h in health if h[2] is not None]
        result.peak_tree_rss = max((m[1] for m in memory), default=0)
        result.peak_server_rss = max((m[2] for m in memory), default=0)
        result.peak_processes = max((m[3] for m in memory), default=0)

    def _read_health(self) -> None:
        """The prober's lines: its CLOCK_MONOTONIC start time (the same clock as ours), latency, failure."""
        assert self._prober is not None and self._prober.stdout is not None
        for line in self._prober.stdout:
            began, latency, failure = line.rstrip("\n").split(" ", 2)
            with self._lock:
                self._health.append((float(began), float(latency), failure if failure != "-" else None))

    def _probe_memory(self) -> None:
        while not self._stop.is_set():
            began = time.monotonic()
            pids = process_tree(self.pid)
            sizes = {pid: rss(pid) for pid in pids}
            with self._lock:
                self._memory.append((began, sum(sizes.values()), sizes.get(self.pid, 0), len(pids)))
            self._stop.wait(max(0.0, MEMORY_INTERVAL_S - (time.monotonic() - began)))


def process_tree(pid: int) -> list[int]:
    """``pid`` and all its live descendants (empty when ``pid`` is gone)."""
    if not os.path.exists(f"/proc/{pid}"):
        return []
    out, todo = [], [pid]
    parents = None
    while todo:
        current = todo.pop()
        out.append(current)
        children = _children(current)
        if children is None:  # no task/*/children (CONFIG_PROC_CHILDREN off): every process's parent
            parents = parents if parents is not None else _parents()
            children = [p for p, parent in parents.items() if parent == current]
        todo.extend(children)
    return out


def rss(pid: int) -> int:
    """VmRSS of ``pid`` in bytes (0 when it is gone or a zombie)."""
    try:
        with open(f"/proc/{pid}/status", "rb") as status:
            for line in status:
                if line.startswith(b"VmRSS:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return 0


def tree_rss(pid: int) -> int:
    """The summed VmRSS of ``pid`` and its descendants, in bytes."""
    return sum(rss(p) for p in process_tree(pid))


# ==============================================================================================
# Private helpers
# ==============================================================================================
def _children(pid: int) -> list[int] | None:
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return []
    out: list[int] = []
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/children") as handle:
                out.extend(int(p) for p in handle.read().split())
        except FileNotFoundError:
            if not os.path.exists(f"/proc/{pid}/task/{tid}"):
                continue  # the thread ended meanwhile
            return None
        except (OSError, ValueError):
            continue
    return out


def _parents() -> dict[int, int]:
    out = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as stat:
                text = stat.read()
            out[int(name)] = int(text[text.rindex(b")") + 2:].split()[1])
        except (OSError, ValueError, IndexError):
            continue
    return out


def _probe_health(url: str) -> None:
    """The prober process: GET /health on one keep-alive connection every HEALTH_INTERVAL_S, a line per
    probe on stdout, until stdout closes or the process is terminated."""
    with httpx.Client(timeout=10) as client:
        while True:
            began = time.monotonic()
            failure = "-"
            try:
                status = client.get(f"{url}/health").status_code
                if status != 200:
                    failure = f"status {status}"
            except httpx.HTTPError as exc:
                failure = type(exc).__name__
            latency = time.monotonic() - began
            try:
                print(f"{began:.6f} {latency:.6f} {failure}", flush=True)
            except BrokenPipeError:
                return
            time.sleep(max(0.0, HEALTH_INTERVAL_S - latency))


if __name__ == "__main__" and len(sys.argv) == 3 and sys.argv[1] == "health":
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    _probe_health(sys.argv[2])

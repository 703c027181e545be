#!/usr/bin/env python3
"""Two boards behind one address: the LiteLLM proxy (a real gateway, not ours) in front of two
`rksmolvlm serve` processes on loopback, configured with the YAML block of README.md's section
"Several boards behind one address" (only the board addresses and the model id are filled in).

    .venv/bin/python scripts/litellm_two_boards.py [--bundle DIR] [--litellm-venv /tmp/litellm-venv] [--rounds 10]

Each board runs with `server.queue_size = 0`: while it answers one request, the next gets 429. The
script sends bursts of two concurrent requests (the openai client, no client-side retries):
  1. straight at board 1: one answer and one 429 per burst;
  2. through the proxy: every request is answered; the 429s the proxy met show on the boards'
     /metrics and in LiteLLM's x-litellm-attempted-* response headers, never at the client;
  3. one burst larger than both boards together, through the proxy, the openai client retrying: LiteLLM
     answers 429 once every board is busy, the client waits and retries, all are answered.
Without --bundle a tiny host-preview bundle is built with `rksmolvlm demo`. Without a LiteLLM in
--litellm-venv the venv is created there and `litellm[proxy]` installed from PyPI.
Exit status 1 if a request through the proxy failed in step 2.
"""

from __future__ import annotations

import argparse
import base64
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
SECTION = "## Several boards behind one address"
README_BOARDS = ("http://board1:8080/v1", "http://board2:8080/v1")
README_MODEL = "openai/SmolVLM-256M-Instruct"
QUESTION = "What is on the table?"


@dataclass
class Outcome:
    ok: bool
    seconds: float
    board: str = ""  # which board answered (from LiteLLM's x-litellm-model-api-base)
    retries: int = 0  # x-litellm-attempted-retries
    fallbacks: int = 0  # x-litellm-attempted-fallbacks
    problem: str = ""


# -- set-up ---------------------------------------------------------------------------------------
def readme_config() -> str:
    """The YAML block of README.md's scale-out section, verbatim."""
    text = README.read_text()
    start = text.index(SECTION)
    match = re.compile(r"```yaml\n(.*?)```", re.DOTALL).search(text, start)
    if not match:
        raise SystemExit(f"no ```yaml block after {SECTION!r} in {README}")
    return match.group(1)


def proxy_config(boards: list[str], model_id: str) -> str:
    config = readme_config()
    for placeholder, url in zip(README_BOARDS, boards):
        assert placeholder in config, f"{placeholder} is not in README's config"
        config = config.replace(placeholder, url)
    assert README_MODEL in config, f"{README_MODEL} is not in README's config"
    return config.replace(README_MODEL, f"openai/{model_id}")


def litellm_executable(venv: Path) -> Path:
    executable = venv / "bin" / "litellm"
    if executable.exists():
        return executable
    print(f"installing litellm[proxy] into {venv} (a venv of its own)", flush=True)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run([str(venv / "bin" / "pip"), "install", "-q", "litellm[proxy]"], check=True)
    return executable


def build_bundle(directory: Path) -> Path:
    print(f"building a tiny host-preview bundle: rksmolvlm demo -o {directory}", flush=True)
    subprocess.run([sys.executable, "-m", "rksmolvlm", "demo", "-o", str(directory), "-q"], check=True,
                   stdout=subprocess.DEVNULL)
    return directory


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(url: str, seconds: float, process: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"{url}: the process ended ({process.returncode}); its log:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"{url} did not answer 200 within {seconds:.0f} s; log: {log}")


def start_board(bundle: Path, key_file: Path, log: Path) -> tuple[subprocess.Popen, str]:
    command = [sys.executable, "-m", "rksmolvlm", "serve", str(bundle), "--no-config", "--engine", "host",
               "--host", "127.0.0.1", "--port", "0", "--queue-size", "0", "--api-key-file", str(key_file)]
    process = subprocess.Popen(command, stdout=log.open("w"), stderr=subprocess.STDOUT,
                               env={**os.environ, "PYTHONUNBUFFERED": "1"})
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        match = re.search(r"listening on (http://\S+?);", log.read_text())
        if match:
            return process, match.group(1)
        if process.poll() is not None:
            raise SystemExit(f"rksmolvlm serve ended ({process.returncode}):\n{log.read_text()[-3000:]}")
        time.sleep(0.2)
    raise SystemExit(f"rksmolvlm serve did not start; log: {log}")


def chat_counts(board: str) -> dict[str, int]:
    """The board's /v1/chat/completions answers by status, from its /metrics."""
    text = httpx.get(f"{board}/metrics", timeout=10).text
    pattern = r'rksmolvlm_requests_total\{path="/v1/chat/completions",status="(\d+)"\} (\d+)'
    return {status: int(float(count)) for status, count in re.findall(pattern, text)}


# -- requests -------------------------------------------------------------------------------------
def ask(client: openai.OpenAI, model: str, image: str, barrier: threading.Barrier | None) -> Outcome:
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": image}},
                                             {"type": "text", "text": QUESTION}]}]
    if barrier is not None:
        barrier.wait()
    start = time.monotonic()
    try:
        raw = client.chat.completions.with_raw_response.create(model=model, messages=messages, max_tokens=16)
        raw.parse()
    except openai.APIStatusError as exc:
        code = exc.code if isinstance(exc.code, str) and not exc.code.isdigit() else exc.message.split(" - ")[-1][:60]
        return Outcome(False, time.monotonic() - start, problem=f"{exc.status_code} {code}")
    except openai.APIError as exc:
        return Outcome(False, time.monotonic() - start, problem=f"{type(exc).__name__}: {exc}"[:120])
    headers = raw.headers
    return Outcome(True, time.monotonic() - start, board=headers.get("x-litellm-model-api-base", ""),
                   retries=int(headers.get("x-litellm-attempted-retries") or 0),
                   fallbacks=int(headers.get("x-litellm-attempted-fallbacks") or 0))


def bursts(client: openai.OpenAI, model: str, image: str, rounds: int, size: int) -> list[Outcome]:
    outcomes: list[Outcome] = []
    with ThreadPoolExecutor(size) as pool:
        for _ in range(rounds):
            barrier = threading.Barrier(size)
            outcomes += list(pool.map(lambda _, b=barrier: ask(client, model, image, b), range(size)))
    return outcomes


def delta(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    return {status: after.get(status, 0) - before.get(status, 0) for status in sorted(set(before) | set(after))
            if after.get(status, 0) - before.get(status, 0)}


def describe(outcomes: list[Outcome], names: dict[str, str]) -> str:
    ok = [o for o in outcomes if o.ok]
    failed = [o for o in outcomes if not o.ok]
    line = f"{len(ok)}/{len(outcomes)} answered"
    by_board = {name: sum(1 for o in ok if o.board == url) for url, name in names.items()}
    if any(by_board.values()):
        line += " (" + ", ".join(f"{name}: {count}" for name, count in by_board.items()) + ")"
    moved = [o for o in ok if o.retries or o.fallbacks]
    if moved:
        line += f"; {len(moved)} answered after a retry or failover"
    if failed:
        problems: dict[str, int] = {}
        for o in failed:
            problems[o.problem] = problems.get(o.problem, 0) + 1
        line += "; failed: " + "; ".join(f"{count} × {problem}" for problem, count in problems.items())
    latencies = sorted(o.seconds for o in ok)
    if latencies:
        line += f"; latency p50 {latencies[len(latencies) // 2]:.2f} s, max {latencies[-1]:.2f} s"
    return line


# -- the run --------------------------------------------------------------------------------------
def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", type=Path, help="a host-preview bundle (default: build one with rksmolvlm demo)")
    parser.add_argument("--litellm-venv", type=Path, default=Path("/tmp/litellm-venv"),
                        help="venv holding LiteLLM's proxy (created with litellm[proxy] if it has none)")
    parser.add_argument("--rounds", type=int, default=10, help="bursts of two concurrent requests (default 10)")
    parser.add_argument("--overload", type=int, default=6, help="size of the burst beyond both boards (default 6)")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (logs, keys, config)")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="litellm-two-boards-"))
    processes: list[subprocess.Popen] = []
    try:
        litellm = litellm_executable(args.litellm_venv)
        version = subprocess.run([str(args.litellm_venv / "bin" / "python"), "-c",
                                  "import importlib.metadata as m; print(m.version('litellm'))"],
                                 capture_output=True, text=True, check=True).stdout.strip()
        bundle = args.bundle or build_bundle(work / "bundle")
        keys = []
        for i in (1, 2):
            key_file = work / f"board{i}.key"
            key_file.write_text(secrets.token_hex(32) + "\n")
            key_file.chmod(0o600)
            keys.append(key_file.read_text().strip())
        boards = []
        for i in (1, 2):
            process, url = start_board(bundle, work / f"board{i}.key", work / f"board{i}.log")
            processes.append(process)
            boards.append(url)
        for i, url in enumerate(boards):
            wait_for(f"{url}/health", 300, processes[i], work / f"board{i + 1}.log")
        model_id = httpx.get(f"{boards[0]}/v1/models", headers={"Authorization": f"Bearer {keys[0]}"},
                             timeout=10).json()["data"][0]["id"]
        names = {f"{url}/v1": f"board{i + 1}" for i, url in enumerate(boards)}

        config = work / "litellm.yaml"
        config.write_text(proxy_config([f"{url}/v1" for url in boards], model_id))
        port, master_key = free_port(), "sk-" + secrets.token_hex(16)
        env = {**os.environ, "BOARD1_API_KEY": keys[0], "BOARD2_API_KEY": keys[1],
               "LITELLM_MASTER_KEY": master_key,
               "LITELLM_LOCAL_MODEL_COST_MAP": "True"}  # no fetch of the price list from GitHub at start-up
        proxy_log = work / "litellm.log"
        processes.append(subprocess.Popen([str(litellm), "--config", str(config), "--host", "127.0.0.1",
                                           "--port", str(port)], stdout=proxy_log.open("w"),
                                          stderr=subprocess.STDOUT, env=env))
        proxy = f"http://127.0.0.1:{port}"
        wait_for(f"{proxy}/health/liveliness", 300, processes[-1], proxy_log)
        print(f"LiteLLM {version} proxy at {proxy} (config: README's, {config}); board1 {boards[0]}, "
              f"board2 {boards[1]}; model {model_id!r}, server.queue_size = 0", flush=True)

        from rksmolvlm.calibration.vision_set import shipped_images_dir

        image = "data:image/jpeg;base64," + base64.b64encode(
            (shipped_images_dir() / "photo_coffee_cup_table.jpg").read_bytes()).decode()
        direct = openai.OpenAI(base_url=f"{boards[0]}/v1", api_key=keys[0], max_retries=0, timeout=120)
        through = openai.OpenAI(base_url=f"{proxy}/v1", api_key=master_key, max_retries=0, timeout=120)
        ask(through, "smolvlm", image, None)  # warm both the proxy and one board
        ask(direct, model_id, image, None)

        counts = [chat_counts(url) for url in boards]
        outcomes = bursts(direct, model_id, image, args.rounds, 2)
        after = [chat_counts(url) for url in boards]
        print(f"\n1. straight at board1, {args.rounds} bursts of 2: {describe(outcomes, {})}")
        print(f"   board1 /metrics: {delta(counts[0], after[0])}")
        direct_429 = sum(1 for o in outcomes if o.problem.startswith("429"))

        counts = after
        outcomes = bursts(through, "smolvlm", image, args.rounds, 2)
        after = [chat_counts(url) for url in boards]
        proxied_failed = sum(1 for o in outcomes if not o.ok)
        moved = [delta(counts[i], after[i]).get("429", 0) for i in range(2)]
        print(f"\n2. through the proxy, {args.rounds} bursts of 2: {describe(outcomes, names)}")
        for i in range(2):
            print(f"   board{i + 1} /metrics: {delta(counts[i], after[i])}")
        print(f"   → the proxy met {sum(moved)} × 429 and sent each of those requests to the other board; "
              f"the client saw {proxied_failed} errors")

        patient = openai.OpenAI(base_url=f"{proxy}/v1", api_key=master_key, timeout=120, max_retries=8)
        counts = after
        start = time.monotonic()
        outcomes = bursts(patient, "smolvlm", image, 1, args.overload)
        after = [chat_counts(url) for url in boards]
        print(f"\n3. through the proxy, one burst of {args.overload} (both boards hold 2), the openai client "
              f"retrying 429s (max_retries=8): {describe(outcomes, names)}; {time.monotonic() - start:.1f} s in all")
        for i in range(2):
            print(f"   board{i + 1} /metrics: {delta(counts[i], after[i])}")

        print(f"\nsummary: direct burst → {direct_429} × 429 at the client; through LiteLLM → {proxied_failed} "
              f"failed, {sum(moved)} × 429 absorbed by the proxy")
        if not sum(moved):
            print("(no two requests of a burst landed on the same board this time: run more --rounds)")
        return 1 if proxied_failed else 0
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
        if args.keep:
            print(f"work directory kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())

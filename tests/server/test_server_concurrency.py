"""One runner owns the model: parallel clients beyond the queue get 429 with Retry-After, every
accepted request completes with its own answer (nothing lost or mixed), a client that disconnects
aborts its generation, and a request over its time limit is stopped — all visible in /metrics."""

import base64
import io
import re
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from support.fakes import LlmWrapper
from support.images import rng_image
from rksmolvlm.runtime.engines import EngineOptions
from rksmolvlm.runners import open_engines
from rksmolvlm.runtime.runner import Runner
from rksmolvlm.runtime.server import BackgroundServer, build_app
from rksmolvlm.runtime.server.config import ServerConfig, with_overrides

MODEL = "idefics3-256m"


class SlowLlm(LlmWrapper):
    """The real engine, slowed down per token so that requests overlap (tests only)."""

    def __init__(self, llm, delay: float):
        super().__init__(llm)
        self.delay = delay

    def generate(self, embeddings, config, keep_history, stats):
        for token in self.llm.generate(embeddings, config, keep_history, stats):
            time.sleep(self.delay)
            yield token


def start(bundle, delay: float, **settings) -> tuple[BackgroundServer, SlowLlm]:
    config = with_overrides(ServerConfig(), {"bundle": str(bundle), "engine": "host", **settings})
    slow = {}

    def load(opened):
        vision, llm = open_engines(opened, "host", EngineOptions(max_new_tokens=config.limits.max_tokens))
        slow["llm"] = SlowLlm(llm, delay)
        return Runner(opened, vision, slow["llm"], image_cache_size=config.image_cache_size,
                      max_pixels=config.limits.max_image_pixels)

    server = BackgroundServer(build_app(config, load=load), config).start()
    return server, slow["llm"]


@pytest.fixture(scope="module")
def busy(preview_bundles):
    # one client (loopback) may hold the whole queue: these cases are the queue's, not the per-client cap's
    server, llm = start(preview_bundles[MODEL], 0.03, **{"server.queue_size": 2, "server.max_requests_per_client": 16})
    yield server, llm
    server.stop()


def metric(server, name: str, **labels) -> float:
    text = httpx.get(f"{server.url}/metrics").text
    selector = "{" + ",".join(f'{k}="{v}"' for k, v in sorted(labels.items())) + "}" if labels else ""
    match = re.search(rf"^{re.escape(name + selector)} (\S+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


def wait_for(condition, timeout=15.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def png_uri(seed: int, size=(96, 80)) -> str:
    buffer = io.BytesIO()
    rng_image(*size, seed=seed).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def request(seed: int, max_tokens=10) -> dict:
    return {"model": MODEL, "max_tokens": max_tokens, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": png_uri(seed, (80 + 16 * seed, 64 + 8 * seed))}},
        {"type": "text", "text": f"Question number {seed}: what do you see?"}]}]}


def test_beyond_the_queue_clients_get_429_and_accepted_requests_complete(busy):
    server, _ = busy
    body = request(0, max_tokens=16)

    def post(_):
        return httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=60)

    with ThreadPoolExecutor(10) as pool:
        responses = list(pool.map(post, range(10)))
    accepted = [r for r in responses if r.status_code == 200]
    refused = [r for r in responses if r.status_code == 429]
    assert len(accepted) + len(refused) == 10
    assert 3 <= len(accepted) < 10 and refused  # one running + two waiting, at least
    for r in refused:
        assert int(r.headers["retry-after"]) >= 1
        error = r.json()["error"]
        assert error["code"] == "queue_full" and error["type"] == "rate_limit_error"
        assert "server.queue_size = 2" in error["message"]
    ids = {tuple(r.json()["rksmolvlm"]["token_ids"]) for r in accepted}
    assert len(ids) == 1 and len(next(iter(ids))) == 16  # every accepted request ran to its end
    assert metric(server, "rksmolvlm_errors_total", code="queue_full") >= len(refused)
    wait_for(lambda: httpx.get(f"{server.url}/health").json()["queue"] == {"waiting": 0, "running": 0,
                                                                           "capacity": 2})


def test_nothing_is_lost_or_mixed_between_requests(busy):
    server, _ = busy
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=30, timeout=120)
    seeds = range(7)

    def ask(seed, stream=False):
        body = request(seed)
        if not stream:
            reply = client.chat.completions.create(**body)
            return reply.choices[0].message.content, reply.model_extra["rksmolvlm"]["token_ids"]
        chunks = list(client.chat.completions.create(**body, stream=True))
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        return text, chunks[-1].model_extra["rksmolvlm"]["token_ids"]

    alone = {seed: ask(seed) for seed in seeds}
    assert len({tuple(ids) for _, ids in alone.values()}) > 1  # the requests really differ
    with ThreadPoolExecutor(len(seeds)) as pool:  # beyond the queue: the client retries after Retry-After
        together = dict(zip(seeds, pool.map(lambda s: ask(s, stream=s % 2 == 1), seeds)))
    assert together == alone


def test_a_client_that_disconnects_mid_stream_aborts_its_generation(busy):
    server, _ = busy
    before = metric(server, "rksmolvlm_aborted_generations_total", reason="client_disconnect")
    generated_before = metric(server, "rksmolvlm_completion_tokens_total")
    with httpx.Client(timeout=60) as http:
        with http.stream("POST", f"{server.url}/v1/chat/completions", json={**request(1, 1000), "stream": True}) as r:
            assert r.status_code == 200
            got = []
            for line in r.iter_lines():
                if line.startswith("data: "):
                    got.append(line)
                if len(got) == 4:
                    break
    # 1000 tokens at 30 ms would take 30 s: the abort is seen well before that
    wait_for(lambda: metric(server, "rksmolvlm_aborted_generations_total", reason="client_disconnect") == before + 1)
    assert metric(server, "rksmolvlm_completion_tokens_total") - generated_before < 100
    assert httpx.get(f"{server.url}/health").json()["queue"]["running"] == 0
    reply = httpx.post(f"{server.url}/v1/chat/completions", json=request(2, 3), timeout=30)
    assert reply.status_code == 200 and len(reply.json()["rksmolvlm"]["token_ids"]) == 3


def test_a_client_that_gives_up_on_a_non_streaming_request_aborts_it(busy):
    server, _ = busy
    before = metric(server, "rksmolvlm_aborted_generations_total", reason="client_disconnect")
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server.url}/v1/chat/completions", json=request(3, 1000), timeout=httpx.Timeout(30, read=1.0))
    wait_for(lambda: metric(server, "rksmolvlm_aborted_generations_total", reason="client_disconnect") == before + 1)


def test_a_client_that_leaves_the_queue_frees_its_place(busy):
    server, _ = busy
    dropped = metric(server, "rksmolvlm_dropped_queued_total", reason="client_disconnect")
    with ThreadPoolExecutor(2) as pool:
        running = pool.submit(httpx.post, f"{server.url}/v1/chat/completions", json=request(4, 40), timeout=60)
        wait_for(lambda: httpx.get(f"{server.url}/health").json()["queue"]["running"] == 1)
        with pytest.raises(httpx.ReadTimeout):  # waits in the queue, then gives up
            httpx.post(f"{server.url}/v1/chat/completions", json=request(5, 5), timeout=httpx.Timeout(30, read=0.3))
        assert running.result().status_code == 200
    wait_for(lambda: metric(server, "rksmolvlm_dropped_queued_total", reason="client_disconnect") == dropped + 1)


def test_requests_over_their_time_limit_are_stopped(preview_bundles):
    server, llm = start(preview_bundles[MODEL], 0.05, **{"server.request_timeout_s": 1.0})
    try:
        started = time.monotonic()
        reply = httpx.post(f"{server.url}/v1/chat/completions", json=request(6, 1000), timeout=60)
        assert reply.status_code == 504 and time.monotonic() - started < 10
        error = reply.json()["error"]
        assert error["code"] == "request_timeout" and "server.request_timeout_s = 1 s" in error["message"]
        with httpx.stream("POST", f"{server.url}/v1/chat/completions", json={**request(6, 1000), "stream": True},
                          timeout=60) as stream:
            events = [line for line in stream.iter_lines() if line.startswith("data: ")]
        assert '"code":"request_timeout"' in events[-1] and "[DONE]" not in events[-1]
        wait_for(lambda: metric(server, "rksmolvlm_aborted_generations_total", reason="timeout") == 2)
        llm.delay = 0
        fine = httpx.post(f"{server.url}/v1/chat/completions", json=request(6, 4), timeout=30)
        assert fine.status_code == 200
    finally:
        server.stop()

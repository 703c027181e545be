"""Frigate's structured answer is the same text on the host engine and on the NPU path (issue 20).

The NPU path runs ``RkllmEngine`` against the librkllmrt contract double, whose GET_LOGITS rows come
from a logits provider (``double_set_logits_provider``) implemented here around the demo bundle's
host decoder: the provider keeps its own transformers KV cache in step with the double's (the KV
position the double passes says how much of it the run builds on: 0 after keep_history 0 or
rkllm_clear_kv_cache), so the double hands the engine the logits the model computes. Both runners
share the host vision encoder; the NPU runner takes its embeddings from the bundle's table as on the
board. Greedy, the same GenerationConfig with the compiled Frigate grammar: the same token ids and
text, finish "stop", and the text validates against Frigate's ReviewMetadata schema."""

from __future__ import annotations

import ctypes
import json
import shutil
import subprocess

import jsonschema
import numpy as np
import pytest

from support import DOUBLES
from support.frigate import FRIGATE, FRIGATE_FORMAT, FRIGATE_PROMPT, coffee_photo

from rksmolvlm.runtime.engines import EngineOptions, GenerationConfig
from rksmolvlm.runtime.loader import RuntimeBundle
from rksmolvlm.runtime.npu_engines import RkllmEngine
from rksmolvlm.runtime.runner import Runner
from rksmolvlm.runtime.structured import GrammarCompiler, from_openai_response_format

pytestmark = pytest.mark.skipif(shutil.which("cc") is None, reason="needs a C compiler")

PENALTY = 1.0  # the server tests' Frigate option (see tests/server/test_server_structured.py)

# int provider(void* userdata, const float* embed, const int32_t* tokens, int n, int hidden,
#              int keep_history, int pos, float* out, int vocab)
PROVIDER = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.POINTER(ctypes.c_float),
                            ctypes.POINTER(ctypes.c_int32), ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                            ctypes.POINTER(ctypes.c_float), ctypes.c_int)


class HostLogits:
    """GET_LOGITS rows from the host decoder, with a KV cache of its own kept at the double's position."""

    def __init__(self, model):
        import torch

        from rksmolvlm.preview.host_engines import cache_keyword

        self.torch = torch
        self.model = model
        self.keyword = cache_keyword(model)
        self.cache = None
        self.length = 0  # positions in self.cache
        self.calls: list[tuple[str, int, int, int]] = []  # (input kind, n, keep_history, pos)
        self.errors: list[BaseException] = []
        self.callback = PROVIDER(self._provide)

    def _provide(self, _userdata, embed, tokens, n, hidden, keep_history, pos, out, vocab) -> int:
        try:
            self._fill(embed, tokens, n, hidden, keep_history, pos, out, vocab)
            return 0
        except BaseException as exc:  # noqa: BLE001 - reported by the test, the double stops the run
            self.errors.append(exc)
            return 1

    def _fill(self, embed, tokens, n, hidden, keep_history, pos, out, vocab) -> None:
        from transformers import DynamicCache

        torch = self.torch
        if pos > self.length:
            raise AssertionError(f"the double is at KV position {pos}, the provider's cache holds {self.length}")
        if pos == 0 or self.cache is None:
            self.cache, self.length = DynamicCache(), 0
        elif pos < self.length:
            self.cache.crop(pos)
            self.length = pos
        if embed:
            rows = np.ctypeslib.as_array(embed, shape=(n, hidden)).copy()
            inputs = {"inputs_embeds": torch.from_numpy(rows)[None]}
        else:
            ids = np.ctypeslib.as_array(tokens, shape=(n,)).astype(np.int64)
            inputs = {"input_ids": torch.from_numpy(ids)[None]}
        self.calls.append(("embed" if embed else "tokens", n, keep_history, pos))
        with torch.no_grad():
            result = self.model(**inputs, use_cache=True, position_ids=torch.arange(pos, pos + n)[None],
                                **{self.keyword: self.cache})
        self.length = pos + n
        logits = result.logits[0].float().numpy()
        assert logits.shape == (n, vocab), (logits.shape, n, vocab)
        np.ctypeslib.as_array(out, shape=(n, vocab))[:] = logits


@pytest.fixture(scope="module")
def libraries(tmp_path_factory):
    out = {}
    for abi, flag in (("1.2", "123"), ("1.3", "130")):
        path = tmp_path_factory.mktemp(f"rkllm-same{flag}") / "librkllmrt.so"
        subprocess.run(["cc", "-shared", "-fPIC", "-O1", "-Wall", "-Werror", f"-DRKLLM_ABI={flag}", "-o", str(path),
                        str(DOUBLES / "librkllmrt" / "rkllm_double.c"), "-lpthread"], check=True)
        out[abi] = path
    return out


# ------------------------------------------------------------------ the hook itself (raw ABI, no model)

HOOK_VOCAB, HOOK_HIDDEN = 16, 4


class RawDouble:
    """The double driven through the ABI structs directly, recording every logits callback."""

    def __init__(self, path, abi: str, tmp_path, init_max_new: int):
        from rksmolvlm.runtime import rkllm_abi

        self.m, self.A = rkllm_abi, rkllm_abi.ABIS[abi]
        self.lib = L = ctypes.CDLL(str(path))
        L.double_last_error.restype = L.double_calls_json.restype = ctypes.c_char_p
        L.double_set_logits_provider.argtypes = [PROVIDER, ctypes.c_void_p]
        L.rkllm_createDefaultParam.restype = self.A.param
        L.rkllm_run.argtypes = [ctypes.c_void_p, ctypes.POINTER(self.A.input), ctypes.POINTER(self.A.infer),
                                ctypes.c_void_p]
        L.rkllm_clear_kv_cache.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p]
        L.rkllm_destroy.argtypes = [ctypes.c_void_p]
        L.double_reset()
        L.double_set_hidden(HOOK_HIDDEN)
        L.double_set_vocab(HOOK_VOCAB)
        self.rows: list[tuple[int, np.ndarray]] = []  # (token_id, rows) of each logits callback
        self._cb = rkllm_abi.ResultCallback(self._on_result)
        model = tmp_path / "llm.rkllm"
        model.write_bytes(b"model")
        param = L.rkllm_createDefaultParam()
        param.model_path = str(model).encode()
        param.max_context_len, param.max_new_tokens = 64, init_max_new
        self.handle = ctypes.c_void_p()
        if self.A.init_takes_struct:
            self._cbs = rkllm_abi.Callback13(result_callback=self._cb)
            L.rkllm_init.argtypes = [ctypes.c_void_p, ctypes.POINTER(self.A.param),
                                     ctypes.POINTER(rkllm_abi.Callback13)]
            assert L.rkllm_init(ctypes.byref(self.handle), ctypes.byref(param), ctypes.byref(self._cbs)) == 0
        else:
            L.rkllm_init.argtypes = [ctypes.c_void_p, ctypes.POINTER(self.A.param), rkllm_abi.ResultCallback]
            assert L.rkllm_init(ctypes.byref(self.handle), ctypes.byref(param), self._cb) == 0

    def _on_result(self, result, _userdata, state) -> int:
        r = result.contents
        if state == self.m.RUN_NORMAL and r.logits.num_tokens:
            n, v = r.logits.num_tokens, r.logits.vocab_size
            self.rows.append((int(r.token_id), np.ctypeslib.as_array(r.logits.logits, shape=(n, v)).copy()))
        return 0

    def run(self, *, ids=None, embeds=None, keep_history=1) -> int:
        inp = self.A.input()
        inp.role = b"user"
        if ids is not None:
            keep = (ctypes.c_int32 * len(ids))(*ids)
            inp.input_type = self.m.INPUT_TOKEN
            inp.token_input.input_ids, inp.token_input.n_tokens = keep, len(ids)
        else:
            keep = np.ascontiguousarray(embeds, dtype=np.float32)
            inp.input_type = self.m.INPUT_EMBED
            inp.embed_input.embed = keep.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
            inp.embed_input.n_tokens = len(keep)
        infer = self.A.infer()
        infer.mode = self.m.INFER_GET_LOGITS
        infer.keep_history = keep_history
        return self.lib.rkllm_run(self.handle, ctypes.byref(inp), ctypes.byref(infer), None)

    def calls(self) -> list[dict]:
        return json.loads(self.lib.double_calls_json())

    def close(self) -> None:
        self.lib.double_set_logits_provider(PROVIDER(), None)
        self.lib.rkllm_destroy(self.handle)


def _row(key: float, pos: int) -> np.ndarray:
    """A provider's row: one clear maximum at (key + pos) mod vocab, so the runtime's own pick is known."""
    row = np.arange(HOOK_VOCAB, dtype=np.float32) * 0.01
    row[int(key + pos) % HOOK_VOCAB] = 5.0
    return row


@pytest.mark.parametrize("abi", ["1.2", "1.3"])
def test_the_provider_fills_every_logits_callback_and_follows_the_history(libraries, abi, tmp_path):
    double = RawDouble(libraries[abi], abi, tmp_path, init_max_new=3)
    seen: list[tuple] = []

    def provide(_ud, embed, tokens, n, hidden, keep_history, pos, out, vocab):
        keys = (np.ctypeslib.as_array(embed, shape=(n, hidden))[:, 0] if embed
                else np.ctypeslib.as_array(tokens, shape=(n,)))
        seen.append(("embed" if embed else "tokens", [float(k) for k in keys], keep_history, pos, vocab))
        np.ctypeslib.as_array(out, shape=(n, vocab))[:] = [_row(k, pos + i) for i, k in enumerate(keys)]
        return 0

    callback = PROVIDER(provide)
    double.lib.double_set_logits_provider(callback, None)
    try:
        assert double.run(ids=[5, 6, 7]) == 0
        # prefill: the three inputs at positions 0..2; the runtime then picks argmax (7 + 2) % 16 = 9 by
        # itself and steps on it at position 3 → picks 12, steps at 4 → picks 0 (max_new_tokens 3)
        assert seen == [("tokens", [5.0, 6.0, 7.0], 1, 0, HOOK_VOCAB), ("tokens", [9.0], 1, 3, HOOK_VOCAB),
                        ("tokens", [12.0], 1, 4, HOOK_VOCAB)]
        assert [t for t, _ in double.rows] == [9, 12, 0]
        assert np.array_equal(double.rows[0][1], np.stack([_row(5, 0), _row(6, 1), _row(7, 2)]))
        assert np.array_equal(double.rows[2][1], _row(12, 4)[None])
        assert double.calls()[-1]["logits_rows"] == [3, 1, 1] and double.calls()[-1]["history_after"] == 5
        # EMBED input on that history (the first float of a row is its key here)
        embeds = np.array([[1, 0, 0, 0], [2, 0, 0, 0]], dtype=np.float32)
        seen.clear()
        assert double.run(embeds=embeds) == 0
        assert seen[0] == ("embed", [1.0, 2.0], 1, 5, HOOK_VOCAB) and [c[3] for c in seen] == [5, 7, 8]
        # keep_history 0 discards the history before the run: the provider is told position 0
        seen.clear()
        assert double.run(ids=[1], keep_history=0) == 0
        assert [(c[2], c[3]) for c in seen] == [(0, 0), (0, 1), (0, 2)]
        # so does rkllm_clear_kv_cache
        assert double.run(ids=[3]) == 0 and double.calls()[-1]["history_after"] == 3
        assert double.lib.rkllm_clear_kv_cache(double.handle, 0, None, None) == 0
        seen.clear()
        assert double.run(ids=[2]) == 0
        assert seen[0] == ("tokens", [2.0], 1, 0, HOOK_VOCAB)
        # without a provider: the formula again
        double.lib.double_set_logits_provider(PROVIDER(), None)
        seen.clear()
        double.rows.clear()
        assert double.run(ids=[4], keep_history=0) == 0 and seen == []
        formula = np.empty(HOOK_VOCAB, dtype=np.float32)
        double.lib.double_logits_row(formula.ctypes.data_as(ctypes.POINTER(ctypes.c_float)), HOOK_VOCAB, 0, 4)
        assert np.array_equal(double.rows[0][1][0], formula)
    finally:
        double.close()


@pytest.mark.parametrize("failure", ["returns 1", "leaves NaN"])
def test_a_failing_provider_stops_the_run(libraries, failure, tmp_path):
    double = RawDouble(libraries["1.3"], "1.3", tmp_path, init_max_new=1)

    def provide(_ud, embed, tokens, n, hidden, keep_history, pos, out, vocab):
        if failure == "returns 1":
            return 1
        rows = np.ctypeslib.as_array(out, shape=(n, vocab))
        rows[:] = 0.0
        rows[-1, 3] = np.nan
        return 0

    callback = PROVIDER(provide)
    double.lib.double_set_logits_provider(callback, None)
    try:
        assert double.run(ids=[1, 2]) == -1
        assert double.rows == []  # the engine never saw those rows
        assert "logits provider" in double.lib.double_last_error().decode()
        assert double.calls()[-1]["stop"] == "callback_invalid"
    finally:
        double.close()


# ------------------------------------------------------------------ Frigate on the demo bundle


@pytest.fixture(scope="module")
def demo(demo_preview_bundle):
    """The demo bundle, its host runner and the Frigate grammar."""
    from rksmolvlm.runners import open_runner

    bundle = RuntimeBundle.open(demo_preview_bundle)
    runner = open_runner(bundle, "host")
    grammar = GrammarCompiler.for_bundle(bundle).compile(from_openai_response_format(FRIGATE_FORMAT))
    yield bundle, runner, grammar
    runner.close()


def frigate_messages() -> list[dict]:
    return [{"role": "user", "content": [{"type": "text", "text": FRIGATE_PROMPT},
                                         {"type": "image", "image": coffee_photo(), "detail": "low"}]}]


def open_npu_runner(bundle, host, library, abi: str, tmp_path, **settings):
    """(the double, its provider, a Runner of the host vision encoder and RkllmEngine on the double)."""
    from rksmolvlm.preview.host_engines import make_host_vision

    lib = ctypes.CDLL(str(library))
    lib.double_calls_json.restype = ctypes.c_char_p
    lib.double_last_error.restype = ctypes.c_char_p
    lib.double_set_logits_provider.argtypes = [PROVIDER, ctypes.c_void_p]
    lib.double_reset()
    lib.double_set_hidden(bundle.embedding_table().hidden_size)
    lib.double_set_vocab(bundle.manifest.model.vocab_size)
    provider = HostLogits(host.llm.model)
    lib.double_set_logits_provider(provider.callback, None)
    model_file = tmp_path / "llm.rkllm"
    model_file.write_bytes(b"model")
    # start-up max_new_tokens as make_npu_engines sets it; on 1.2.x (no per-run value) the double counts
    # it against every GET_LOGITS run's context (history + n + max_new_tokens, stricter than the real
    # runtime is known to be), so a 1.2.x engine here starts with 1: the structured path needs no more
    startup = min(EngineOptions().max_new_tokens, bundle.max_context - 1) if abi == "1.3" else 1
    engine = RkllmEngine(model_file, library, abi, bundle.max_context, GenerationConfig(max_new_tokens=startup))
    return lib, provider, Runner(bundle, make_host_vision(bundle, EngineOptions()), engine, **settings)


@pytest.mark.parametrize("abi", ["1.3", "1.2"])
def test_frigate_review_same_text_on_host_and_npu_double(demo, libraries, abi, tmp_path):
    bundle, host, grammar = demo
    config = GenerationConfig(max_new_tokens=bundle.max_context, cap_to_context=True, frequency_penalty=PENALTY,
                              grammar=grammar)
    expected = host.generate(frigate_messages(), config).consume()
    assert expected.finish_reason == "stop", expected.text
    jsonschema.validate(json.loads(expected.text), FRIGATE)

    lib, provider, npu = open_npu_runner(bundle, host, libraries[abi], abi, tmp_path)
    try:
        got = npu.generate(frigate_messages(), config).consume()
        assert not provider.errors, provider.errors
        assert lib.double_last_error().decode() == ""
        assert got.prefill_ids == expected.prefill_ids
        assert got.token_ids == expected.token_ids
        assert got.text == expected.text and got.finish_reason == "stop"
        jsonschema.validate(json.loads(got.text), FRIGATE)

        calls = json.loads(lib.double_calls_json())
        assert {(c["mode"], c["stop"]) for c in calls} <= {(2, "max_new_tokens"), (2, "abort")}, calls
        # the prompt in one EMBED call of every position, then the chosen ids as TOKEN input on the history
        assert calls[0]["input_type"] == 2 and calls[0]["n_tokens"] == len(expected.prefill_ids)
        assert calls[0]["logits_rows"] == [len(expected.prefill_ids)]
        assert all(c["input_type"] == 1 and c["keep_history"] == 1 for c in calls[1:])
        fed = [t for c in calls[1:] for t in c["tokens"]]
        assert fed == expected.token_ids[:len(fed)] and len(fed) >= len(expected.token_ids) - 1
        assert calls[-1]["history_after"] == len(expected.prefill_ids) + len(fed) == provider.length
        assert provider.calls[0] == ("embed", len(expected.prefill_ids), calls[0]["keep_history"], 0)
        assert [c[3] for c in provider.calls] == [c["history_before"] for c in calls]
    finally:
        npu.close()
        lib.double_set_logits_provider(PROVIDER(), None)


# ------------------------------------------------------------------ the same request over HTTP

API_KEY = "same-text-key-0123456789abcdef"


class NpuDoubleRunners:
    """A RunnerFactory for build_app: the NPU runner on the double (whatever engine the config names)."""

    def __init__(self, host, library, tmp_path):
        self.host, self.library, self.tmp_path = host, library, tmp_path
        self.lib = self.provider = None

    def resolve(self, engine: str) -> str:
        return "host"  # the server's own checks see the x86 engine; the runner it gets is the NPU one

    def open(self, bundle, engine, options, **settings):
        self.lib, self.provider, runner = open_npu_runner(bundle, self.host, self.library, "1.3", self.tmp_path,
                                                          **settings)
        return runner


def _frigate_over_http(runners, bundle_path, tmp_path) -> list[dict]:
    """Frigate's request through /v1/chat/completions (its openai provider) and /api/generate with
    ``format`` (its Ollama provider), greedy: the two JSON replies."""
    import base64

    import httpx

    from rksmolvlm.runtime.server import BackgroundServer, build_app
    from rksmolvlm.runtime.server.config import ServerConfig, with_overrides

    tmp_path.mkdir()
    key_file = tmp_path / "api_key"
    key_file.write_text(API_KEY + "\n")
    config = with_overrides(ServerConfig(), {"bundle": str(bundle_path), "engine": "host",
                                             "server.api_key_file": str(key_file),
                                             "server.request_timeout_s": 600})
    photo = base64.b64encode(coffee_photo()).decode()
    chat = {"model": "idefics3-256m", "temperature": 0, "frequency_penalty": PENALTY,
            "response_format": FRIGATE_FORMAT,
            "messages": [{"role": "user", "content": [
                {"type": "text", "text": FRIGATE_PROMPT},
                {"type": "image_url", "image_url": {"url": "data:image/jpeg;base64," + photo, "detail": "low"}}]}]}
    generate = {"model": "idefics3-256m", "prompt": FRIGATE_PROMPT, "images": [photo], "format": FRIGATE,
                "stream": False, "options": {"temperature": 0, "frequency_penalty": PENALTY}}
    headers = {"Authorization": f"Bearer {API_KEY}"}
    with BackgroundServer(build_app(config, runners), config) as server:
        replies = [httpx.post(f"{server.url}/v1/chat/completions", json=chat, headers=headers, timeout=600),
                   httpx.post(f"{server.url}/api/generate", json=generate, headers=headers, timeout=600)]
    assert [r.status_code for r in replies] == [200, 200], [r.text for r in replies]
    return [r.json() for r in replies]


def test_frigate_review_same_text_over_http(demo, demo_preview_bundle, libraries, tmp_path):
    from rksmolvlm.runners import RUNNERS

    _, host, _ = demo
    on_host = _frigate_over_http(RUNNERS, demo_preview_bundle, tmp_path / "host")
    npu = NpuDoubleRunners(host, libraries["1.3"], tmp_path)
    on_npu = _frigate_over_http(npu, demo_preview_bundle, tmp_path / "npu")
    try:
        assert not npu.provider.errors, npu.provider.errors
        calls = json.loads(npu.lib.double_calls_json())
        assert calls and all(c["mode"] == 2 for c in calls)  # both answers came from GET_LOGITS runs
    finally:
        npu.lib.double_set_logits_provider(PROVIDER(), None)
    texts = []
    for chat, generate in (on_host, on_npu):
        assert chat["choices"][0]["finish_reason"] == "stop" and generate["done_reason"] == "stop"
        for text in (chat["choices"][0]["message"]["content"], generate["response"]):
            jsonschema.validate(json.loads(text), FRIGATE)
        texts.append((chat["choices"][0]["message"]["content"], generate["response"]))
    assert texts[0] == texts[1]  # per endpoint: the same text on the host engine and on the NPU path

"""Structured output on the NPU engine against the librkllmrt contract double (both ABIs): the
answer is chosen on the CPU from RKLLM_INFER_GET_LOGITS. The double's logits are a known function
of (KV position, input), so the tests predict every answer: the prompt in one GET_LOGITS call of
which only the last row is read, then one call per choice with the chosen ids as TOKEN input
(keep_history=1, one new token, a forced run in one call), the KV cache exactly prompt + chosen
ids, abort, stop at grammar completion, "length", n_batch > 1 refused, free text unchanged."""

from __future__ import annotations

import ctypes
import json
import shutil
import subprocess
import threading
from dataclasses import replace

import jsonschema
import numpy as np
import pytest

from support import DOUBLES
from support.frigate import FRIGATE
from support.bpe import byte_level_bpe

from rksmolvlm.runtime import rkllm_abi
from rksmolvlm.runtime.engines import GenerationConfig, PerfStats
from rksmolvlm.runtime.npu_engines import BatchedLogitsError, EngineError, KvCacheMismatchError, RkllmEngine
from rksmolvlm.runtime.structured import GrammarCompiler, Guide, from_ollama_format, from_openai_response_format

pytestmark = pytest.mark.skipif(shutil.which("cc") is None, reason="needs a C compiler")

VOCAB = 512  # wider than the tokenizer, like the model's padded rows
HIDDEN = 8
CONTEXT = 8192

SMALL = {"type": "object", "properties": {"color": {"type": "string", "maxLength": 12},
                                          "count": {"type": "integer", "minimum": 0, "maximum": 99},
                                          "kind": {"type": "string", "enum": ["car", "truck", "bike"]}},
         "required": ["color", "count", "kind"]}

_CORPUS = [
    'The quick brown fox jumps over the lazy dog. A person walks to the front door at night.',
    '{"title": "Person at door", "scene": "A delivery driver", "confidence": 0.85, "count": 3}',
    '{"color": "red", "count": 2, "kind": "truck"} observations shortSummary potential_threat_level',
    'Hello world 0123456789 true false null [1, 2.5, -3e10] {} \\n \\" café',
]


# ------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def libraries(tmp_path_factory):
    out = {}
    for abi, flag in (("1.2", "123"), ("1.3", "130")):
        path = tmp_path_factory.mktemp(f"rkllm-structured{flag}") / "librkllmrt.so"
        subprocess.run(["cc", "-shared", "-fPIC", "-O1", "-Wall", "-Werror", f"-DRKLLM_ABI={flag}", "-o", str(path),
                        str(DOUBLES / "librkllmrt" / "rkllm_double.c"), "-lpthread"], check=True)
        out[abi] = path
    return out


@pytest.fixture(scope="module")
def tokenizer_json() -> str:
    text = byte_level_bpe(_CORPUS, 420, ["<|endoftext|>", "<image>", "<end_of_utterance>"])
    assert len(json.loads(text)["model"]["vocab"]) < VOCAB
    return text


@pytest.fixture(scope="module")
def tokenizer(tokenizer_json):
    from tokenizers import Tokenizer

    return Tokenizer.from_str(tokenizer_json)


@pytest.fixture(scope="module")
def eou(tokenizer) -> int:
    return tokenizer.token_to_id("<end_of_utterance>")


@pytest.fixture(scope="module")
def compiler(tokenizer_json, eou) -> GrammarCompiler:
    return GrammarCompiler(tokenizer_json, VOCAB, [eou])


class Double:
    def __init__(self, path):
        self.lib = ctypes.CDLL(str(path))
        for name in ("double_last_run_json", "double_last_error", "double_calls_json"):
            getattr(self.lib, name).restype = ctypes.c_char_p
        self.lib.double_calls_count.restype = ctypes.c_size_t
        self.lib.double_logits_floats.restype = ctypes.c_ulonglong
        self.lib.double_logits_row.argtypes = [ctypes.POINTER(ctypes.c_float), ctypes.c_int, ctypes.c_uint32,
                                               ctypes.c_uint32]
        self.lib.double_script_push.argtypes = [ctypes.c_int32, ctypes.c_char_p, ctypes.c_int]
        self.lib.double_reset()
        self.lib.double_set_hidden(HIDDEN)
        self.lib.double_set_vocab(VOCAB)

    def calls(self) -> list[dict]:
        return json.loads(self.lib.double_calls_json())

    def error(self) -> str:
        return self.lib.double_last_error().decode()


@pytest.fixture(params=["1.2", "1.3"])
def setup(request, libraries, tmp_path):
    abi = request.param
    double = Double(libraries[abi])
    model = tmp_path / "llm.rkllm"
    model.write_bytes(b"model")
    engine = RkllmEngine(model, libraries[abi], abi, CONTEXT, GenerationConfig(max_new_tokens=64))
    yield abi, double, engine
    engine.close()


# ------------------------------------------------------------------ the double's logits, predicted


def _fmix32(x):
    x = np.asarray(x, dtype=np.uint32)
    x = x ^ (x >> np.uint32(16))
    x = x * np.uint32(0x85EBCA6B)
    x = x ^ (x >> np.uint32(13))
    x = x * np.uint32(0xC2B2AE35)
    return x ^ (x >> np.uint32(16))


def logits_row(position: int, key: int, vocab: int = VOCAB) -> np.ndarray:
    """The double's row for KV ``position`` whose input has ``key`` (README: GET_LOGITS)."""
    seed = _fmix32(np.array([(position * 0x9E3779B1 ^ key) & 0xFFFFFFFF], dtype=np.uint32))[0]
    v = np.arange(vocab, dtype=np.uint32) * np.uint32(0x27D4EB2F)
    return ((_fmix32(seed ^ v) >> np.uint32(8)).astype(np.float32) * np.float32(8.0 / 16777216.0))


def embed_key(row: np.ndarray) -> int:
    h = 2166136261
    for byte in np.ascontiguousarray(row, dtype=np.float32).tobytes():
        h = ((h ^ byte) * 16777619) & 0xFFFFFFFF
    return h


def predict(grammar, config: GenerationConfig, embeds: np.ndarray, eou: int, history: int = 0,
            prefill_row: int = -1) -> tuple[list[int], list[list[int]]]:
    """The answer and the TOKEN calls the protocol gives on the double: the prompt's row
    ``prefill_row`` (the last one), then each fed run's last position."""
    guide = Guide(config, grammar.constraint())
    index = prefill_row % len(embeds)
    row = logits_row(history + index, embed_key(embeds[index]))
    position = history + len(embeds)
    out: list[int] = []
    calls: list[list[int]] = []
    chosen = guide.begin()
    while True:
        ids = chosen[:config.max_new_tokens - len(out)]
        done = guide.done and len(ids) == len(chosen)
        if done and (not ids or ids[-1] != eou) and len(out) + len(ids) < config.max_new_tokens:
            ids = [*ids, eou]
        out += ids
        if ids:
            calls.append(ids)
        if done or len(out) >= config.max_new_tokens:
            return out, calls
        if ids:
            row = logits_row(position + len(ids) - 1, ids[-1])
            position += len(ids)
        chosen = guide.step(row)


def prompt(n: int = 12, seed: int = 3) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, HIDDEN)).astype(np.float32)


def config_for(compiler, schema, eou, **kwargs) -> GenerationConfig:
    grammar = compiler.compile(from_ollama_format(schema))
    return GenerationConfig(grammar=grammar, stop_ids=(eou,), **{"max_new_tokens": 2000, **kwargs})


def answer_text(tokenizer, ids, eou) -> str:
    return tokenizer.decode([t for t in ids if t != eou], skip_special_tokens=False)


# ------------------------------------------------------------------ tests


def test_prediction_helper_is_the_double_formula(libraries):
    double = Double(libraries["1.3"])
    out = (ctypes.c_float * VOCAB)()
    for position, key in ((0, 0), (7, 123), (4000, 0xDEADBEEF)):
        double.lib.double_logits_row(out, VOCAB, position, key)
        assert np.array_equal(np.frombuffer(out, dtype=np.float32), logits_row(position, key))


def test_call_sequence_one_run_per_choice(setup, compiler, tokenizer, eou):
    abi, double, engine = setup
    config = config_for(compiler, SMALL, eou)
    embeds = prompt()
    stats = PerfStats()
    ids = list(engine.generate(embeds, config, False, stats))
    expected, token_calls = predict(config.grammar, config, embeds, eou)
    assert ids == expected and ids[-1] == eou
    jsonschema.validate(json.loads(answer_text(tokenizer, ids, eou)), SMALL)

    calls = double.calls()
    assert len(calls) == 1 + len(token_calls) == stats.engine["structured"]["rkllm_runs"]
    prefill, steps = calls[0], calls[1:]
    # the prompt: one GET_LOGITS call of embeddings; the double handed every prompt row at once
    assert (prefill["mode"], prefill["input_type"], prefill["keep_history"]) == (2, 2, 1)
    assert prefill["n_tokens"] == len(embeds) and prefill["logits_rows"] == [len(embeds)]
    assert prefill["history_before"] == 0 and prefill["history_after"] == len(embeds)
    assert prefill["released"] == (1 if abi == "1.3" else 0)
    for call, fed in zip(steps, token_calls):
        assert (call["mode"], call["input_type"], call["keep_history"], call["role"]) == (2, 1, 1, "user")
        assert call["tokens"] == fed and call["n_tokens"] == len(fed)
        assert call["history_after"] == call["history_before"] + len(fed)  # nothing the runtime sampled is kept
        assert call["logits_rows"] == [len(fed)]  # the runtime took no step of its own
        if abi == "1.3":  # the logits buffer is released at once (callback return value 2)
            assert call["max_new_tokens"] == 1 and call["stop"] == "max_new_tokens" and call["released"] == 1
        else:  # no per-run max_new_tokens: the engine aborts once the first logits are in
            assert call["max_new_tokens"] is None and call["stop"] == "abort"
    assert [t for call in steps for t in call["tokens"]] == ids  # every chosen id fed once, in order
    assert any(len(fed) > 1 for fed in token_calls)  # forced runs (keys, punctuation) went in one call
    held = len(embeds) + len(ids)
    assert engine.kv_cache_size() == engine.history_tokens == held == double.lib.double_history_tokens()


def test_only_the_last_prefill_row_is_read(setup, compiler, tokenizer, eou):
    abi, double, engine = setup
    # nothing forced at the start (an object would force "{"): the first choice comes from the prompt's logits
    schema = {"anyOf": [{"type": "integer"}, {"type": "string", "maxLength": 6}]}
    config = config_for(compiler, schema, eou)
    assert not config.grammar.constraint().forced()
    embeds = prompt(n=9, seed=11)
    ids = list(engine.generate(embeds, config, False, PerfStats()))
    assert ids == predict(config.grammar, config, embeds, eou)[0]
    jsonschema.validate(json.loads(answer_text(tokenizer, ids, eou)), schema)
    others = {tuple(predict(config.grammar, config, embeds, eou, prefill_row=r)[0]) for r in range(len(embeds) - 1)}
    assert tuple(ids) not in others  # any other row would have given another answer
    # the double hands out every input row of every call (prefill N × vocab); the engine copies one per call
    calls = double.calls()
    assert double.lib.double_logits_floats() == sum(c["n_tokens"] for c in calls) * VOCAB


def test_bytes_copied_per_call_are_one_row(setup, compiler, eou):
    abi, double, engine = setup
    stats = PerfStats()
    list(engine.generate(prompt(n=40), config_for(compiler, SMALL, eou), False, stats))
    counters = stats.engine["structured"]
    assert counters["logits_bytes"] == counters["rkllm_runs"] * VOCAB * 4  # one row per call
    assert double.calls()[0]["logits_rows"] == [40]  # while the prefill offered 40 rows


def test_frigate_answer_validates_and_costs_about_one_call_per_choice(setup, compiler, tokenizer, eou):
    abi, double, engine = setup
    config = config_for(compiler, FRIGATE, eou, max_new_tokens=3000)
    embeds = prompt(n=30, seed=5)
    stats = PerfStats()
    ids = list(engine.generate(embeds, config, False, stats))
    assert ids == predict(config.grammar, config, embeds, eou)[0] and ids[-1] == eou
    answer = json.loads(answer_text(tokenizer, ids, eou))
    jsonschema.validate(answer, FRIGATE)
    runs = stats.engine["structured"]["rkllm_runs"]
    assert runs == len(double.calls()) and runs < len(ids)  # forced runs share a call
    assert engine.kv_cache_size() == len(embeds) + len(ids)


def test_sampling_on_the_cpu_is_seeded_and_works_on_both_abis(setup, compiler, tokenizer, eou):
    abi, double, engine = setup  # 1.2.x takes sampling only at start-up, but here the CPU samples
    config = config_for(compiler, SMALL, eou, temperature=0.9, top_p=0.9, top_k=50, seed=7,
                        repeat_penalty=1.1, presence_penalty=0.3)
    embeds = prompt(seed=8)
    ids = list(engine.generate(embeds, config, False, PerfStats()))
    assert ids == predict(config.grammar, config, embeds, eou)[0]
    jsonschema.validate(json.loads(answer_text(tokenizer, ids, eou)), SMALL)


def test_grammar_completion_yields_the_first_stop_id(setup, compiler, tokenizer, eou):
    abi, double, engine = setup
    other = tokenizer.token_to_id("<|endoftext|>")
    grammar = compiler.compile(from_ollama_format({"type": "object", "properties": {"ok": {"type": "boolean"}},
                                                   "required": ["ok"]}))
    config = GenerationConfig(grammar=grammar, stop_ids=(eou, other), max_new_tokens=50)
    ids = list(engine.generate(prompt(), config, False, PerfStats()))
    assert ids[-1] == eou and ids.count(eou) == 1
    assert json.loads(answer_text(tokenizer, ids, eou)) in ({"ok": True}, {"ok": False})


def test_max_new_tokens_cuts_the_answer_and_the_cache_keeps_it(setup, compiler, eou):
    abi, double, engine = setup
    config = config_for(compiler, FRIGATE, eou, max_new_tokens=7)
    embeds = prompt()
    ids = list(engine.generate(embeds, config, False, PerfStats()))
    assert len(ids) == 7 and eou not in ids  # "length": no stop id
    assert ids == predict(config.grammar, config, embeds, eou)[0]
    assert engine.kv_cache_size() == len(embeds) + 7  # the last chosen ids were fed too


def test_an_answer_complete_on_the_last_allowed_token_ends_length_as_on_the_host(setup, compiler, eou):
    """The stop id counts against max_new_tokens (as on the host engine): a grammar completed by the
    max_new_tokens-th id leaves no room for it, so the answer ends "length" with its whole text."""
    abi, double, engine = setup
    small = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}
    grammar = compiler.compile(from_ollama_format(small))
    embeds = prompt()
    whole = list(engine.generate(embeds, GenerationConfig(grammar=grammar, stop_ids=(eou,), max_new_tokens=50),
                                 False, PerfStats()))
    assert whole[-1] == eou
    exact = GenerationConfig(grammar=grammar, stop_ids=(eou,), max_new_tokens=len(whole) - 1)
    cut = list(engine.generate(embeds, exact, False, PerfStats()))
    assert cut == whole[:-1] and eou not in cut
    room = GenerationConfig(grammar=grammar, stop_ids=(eou,), max_new_tokens=len(whole))
    assert list(engine.generate(embeds, room, False, PerfStats())) == whole


def test_abort_mid_answer(setup, compiler, eou):
    abi, double, engine = setup
    double.lib.double_set_prefill_delay_us(5000)  # every call waits 5 ms before its logits
    config = config_for(compiler, FRIGATE, eou, max_new_tokens=2000)
    got = []
    for token in engine.generate(prompt(), config, False, PerfStats()):
        got.append(token)
        if len(got) == 3:
            threading.Thread(target=engine.abort).start()
    assert 3 <= len(got) < 60 and eou not in got
    calls = double.calls()
    assert len(calls) < 40
    assert engine.history_tokens == engine.kv_cache_size()
    # the next answer starts clean
    double.lib.double_set_prefill_delay_us(0)
    small = config_for(compiler, SMALL, eou)
    ids = list(engine.generate(prompt(), small, False, PerfStats()))
    assert ids == predict(small.grammar, small, prompt(), eou)[0]


def test_abort_during_the_prefill(setup, compiler, eou):
    abi, double, engine = setup
    double.lib.double_set_prefill_delay_us(400_000)
    timer = threading.Timer(0.05, engine.abort)
    timer.start()
    assert list(engine.generate(prompt(), config_for(compiler, SMALL, eou), False, PerfStats())) == []
    timer.join()
    assert [c["stop"] for c in double.calls()] == ["abort"] and double.calls()[0]["logits_rows"] == []
    assert engine.history_tokens == engine.kv_cache_size()


def test_a_runtime_without_logits_is_a_named_error(setup, compiler, eou, monkeypatch):
    abi, double, engine = setup
    monkeypatch.setattr(engine, "_on_logits", lambda result, state: 0)  # callbacks without logits
    with pytest.raises(EngineError, match="delivered no logits"):
        list(engine.generate(prompt(), config_for(compiler, SMALL, eou), False, PerfStats()))
    assert engine.history_tokens == 0


def test_history_kept_across_turns(setup, compiler, eou):
    abi, double, engine = setup
    config = config_for(compiler, SMALL, eou)
    first, second = prompt(seed=1), prompt(n=5, seed=2)
    ids1 = list(engine.generate(first, config, False, PerfStats()))
    held = len(first) + len(ids1)
    assert engine.kv_cache_size() == held
    ids2 = list(engine.generate(second, config, True, PerfStats()))
    assert ids2 == predict(config.grammar, config, second, eou, history=held)[0]
    prefill = [c for c in double.calls() if c["input_type"] == 2][-1]
    assert prefill["history_before"] == held
    assert engine.kv_cache_size() == held + len(second) + len(ids2)
    engine.generate(first, config, False, PerfStats()).close()  # a fresh answer clears the cache first
    list(engine.generate(first, config, False, PerfStats()))
    assert engine.kv_cache_size() == len(first) + len(ids1)


def test_free_text_is_unchanged(setup, compiler, eou):
    abi, double, engine = setup
    for token in (7, 8, eou):
        double.lib.double_script_push(token, b"x", 0)
    ids = list(engine.generate(prompt(), GenerationConfig(max_new_tokens=16), False, PerfStats()))
    assert ids == [7, 8, eou]
    calls = double.calls()
    assert len(calls) == 1 and calls[0]["mode"] == 0 and calls[0]["input_type"] == 2
    assert calls[0]["logits_rows"] is None and double.lib.double_logits_floats() == 0


def test_n_batch_above_one_is_refused(setup, compiler, eou):
    abi, double, engine = setup
    engine.n_batch = 2  # as if the engine had configured batching
    with pytest.raises(BatchedLogitsError, match="n_batch 2 > 1"):
        list(engine.generate(prompt(), config_for(compiler, SMALL, eou), False, PerfStats()))
    assert double.lib.double_calls_count() == 0


def test_the_double_refuses_logits_with_batches(libraries, tmp_path):
    for abi_name, path in libraries.items():
        double = Double(path)
        abi = rkllm_abi.ABIS[abi_name]
        lib = double.lib
        lib.rkllm_createDefaultParam.restype = abi.param
        param = lib.rkllm_createDefaultParam()
        (tmp_path / "m").write_bytes(b"m")
        param.model_path = str(tmp_path / "m").encode()
        param.max_context_len, param.max_new_tokens = 256, 1
        param.extend_param.n_batch = 2
        callback = rkllm_abi.ResultCallback(lambda *args: 0)
        handle = ctypes.c_void_p()
        if abi.init_takes_struct:
            callbacks = rkllm_abi.Callback13(result_callback=callback)
            assert lib.rkllm_init(ctypes.byref(handle), ctypes.byref(param), ctypes.byref(callbacks)) == 0
        else:
            assert lib.rkllm_init(ctypes.byref(handle), ctypes.byref(param), callback) == 0
        ids = (ctypes.c_int32 * 2)(5, 6)
        inp = abi.input(role=b"user", input_type=rkllm_abi.INPUT_TOKEN)
        inp.token_input.input_ids, inp.token_input.n_tokens = ids, 2
        infer = abi.infer(mode=rkllm_abi.INFER_GET_LOGITS, keep_history=1)
        assert lib.rkllm_run(handle, ctypes.byref(inp), ctypes.byref(infer), None) == -1
        assert "not supported for multiple batches" in double.error()
        sizes = (ctypes.c_int * 2)(-1, -1)
        assert lib.rkllm_get_kv_cache_size(handle, sizes) == 0 and list(sizes) == [0, 0]  # one per batch
        assert lib.rkllm_destroy(handle) == 0


def test_a_runtime_that_keeps_its_own_tokens_is_refused(setup, compiler, eou, monkeypatch):
    abi, double, engine = setup
    real = engine.kv_cache_size
    monkeypatch.setattr(engine, "kv_cache_size", lambda: real() + 1)  # a runtime that kept its own sample
    with pytest.raises(KvCacheMismatchError, match="holds 13 positions, expected 12"):
        list(engine.generate(prompt(n=12), config_for(compiler, SMALL, eou), False, PerfStats()))


def test_without_the_kv_size_symbol_the_history_is_counted(setup, compiler, eou, monkeypatch):
    abi, double, engine = setup
    monkeypatch.setattr(engine, "_kv_cache_size", None)  # a librkllmrt without rkllm_get_kv_cache_size
    assert engine.kv_cache_size() is None
    config = config_for(compiler, SMALL, eou)
    ids = list(engine.generate(prompt(), config, False, PerfStats()))
    assert ids == predict(config.grammar, config, prompt(), eou)[0]
    assert engine.history_tokens == len(prompt()) + len(ids) == double.lib.double_history_tokens()


def test_openai_json_object_mode(setup, compiler, tokenizer, eou):
    abi, double, engine = setup
    grammar = compiler.compile(from_openai_response_format({"type": "json_object"}))
    config = GenerationConfig(grammar=grammar, stop_ids=(eou,), max_new_tokens=400)
    ids = list(engine.generate(prompt(seed=21), config, False, PerfStats()))
    if ids[-1] == eou:
        assert isinstance(json.loads(answer_text(tokenizer, ids, eou)), dict)
    else:
        assert len(ids) == 400  # cut by max_new_tokens ("length")
    assert ids == predict(grammar, replace(config), prompt(seed=21), eou)[0]


# ------------------------------------------------------------------ through the Runner (a bundle: slow)


@pytest.fixture(scope="module")
def bundle(preview_bundles):
    from rksmolvlm.runtime.loader import RuntimeBundle

    return RuntimeBundle.open(preview_bundles["idefics3-256m"])


@pytest.mark.parametrize("abi", ["1.2", "1.3"])
def test_runner_session_reuses_the_cache_after_structured_answers(abi, libraries, bundle, tmp_path):
    from rksmolvlm.preview.host_engines import OnnxVisionEncoder
    from rksmolvlm.runtime.runner import Runner

    double = Double(libraries[abi])
    double.lib.double_set_hidden(bundle.manifest.model.text_hidden_size)
    double.lib.double_set_vocab(bundle.manifest.model.vocab_size)
    model = tmp_path / "llm.rkllm"
    model.write_bytes(b"model")
    engine = RkllmEngine(model, libraries[abi], abi, bundle.max_context, GenerationConfig(max_new_tokens=64))
    try:
        grammar = GrammarCompiler.for_bundle(bundle).compile(from_ollama_format(SMALL))
        config = GenerationConfig(max_new_tokens=120, grammar=grammar)
        session = Runner(bundle, OnnxVisionEncoder(bundle.file("vision.onnx"), bundle.settings), engine).session()
        turn1 = [{"role": "user", "content": [{"type": "text", "text": "Which vehicle is it?"}]}]
        g1 = session.generate(turn1, config).consume()
        assert g1.finish_reason == "stop" and g1.token_ids[-1] == bundle.stop_ids[0]
        jsonschema.validate(json.loads(g1.text), SMALL)
        held = g1.prompt_tokens + len(g1.token_ids)
        assert engine.kv_cache_size() == held  # prompt + every chosen id, the stop id included
        turn2 = turn1 + [{"role": "assistant", "content": [{"type": "text", "text": g1.text}]},
                         {"role": "user", "content": [{"type": "text", "text": "And the next one?"}]}]
        g2 = session.generate(turn2, config).consume()
        prefill = [c for c in double.calls() if c["input_type"] == 2][-1]
        assert prefill["history_before"] == held == g2.reused_tokens and prefill["n_tokens"] == len(g2.prefill_ids)
        assert g2.finish_reason == "stop"
        jsonschema.validate(json.loads(g2.text), SMALL)
        assert engine.kv_cache_size() == g2.prompt_tokens + len(g2.token_ids)
        cut = session.generate(turn1, replace(config, max_new_tokens=5)).consume()
        assert cut.finish_reason == "length" and len(cut.token_ids) == 5
        assert engine.kv_cache_size() == cut.prompt_tokens + 5
    finally:
        engine.close()

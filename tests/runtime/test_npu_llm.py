"""The librkllmrt ctypes engine against the C contract double (compiled here with the system C
compiler) for both runtime ABIs: layouts, what is passed (the embeddings themselves), streaming
with WAITING/ERROR, abort from another thread, history, sampling, and refusals."""

import ctypes
import json
import shutil
import subprocess
import threading

import numpy as np
import pytest

from support import DOUBLES

from support.images import rng_image
from rksmolvlm.errors import BundleError, ToolkitMissingError
from rksmolvlm.runtime import rkllm_abi
from rksmolvlm.runtime.engines import GenerationConfig, PerfStats
from rksmolvlm.runners import open_engines
from rksmolvlm.preview.host_engines import OnnxVisionEncoder
from rksmolvlm.runtime.loader import RuntimeBundle
from rksmolvlm.runtime.npu_engines import EngineError, RkllmEngine, find_rkllm_library
from rksmolvlm.runtime.runner import Runner

pytestmark = pytest.mark.skipif(shutil.which("cc") is None, reason="needs a C compiler")


@pytest.fixture(scope="session")
def libraries(tmp_path_factory):
    """librkllmrt doubles: ABI name → path."""
    out = {}
    for abi, flag in (("1.2", "123"), ("1.3", "130")):
        path = tmp_path_factory.mktemp(f"rkllm{flag}") / "librkllmrt.so"
        subprocess.run(["cc", "-shared", "-fPIC", "-O1", "-Wall", "-Werror", f"-DRKLLM_ABI={flag}", "-o", str(path),
                        str(DOUBLES / "librkllmrt" / "rkllm_double.c"), "-lpthread"], check=True)
        out[abi] = path
    return out


class Double:
    def __init__(self, path):
        self.lib = ctypes.CDLL(str(path))
        for name in ("double_init_json", "double_last_run_json", "double_last_error"):
            getattr(self.lib, name).restype = ctypes.c_char_p
        self.lib.double_sizeof.restype = ctypes.c_size_t
        self.lib.double_offsetof.restype = ctypes.c_long
        self.lib.double_copy_last_embed.restype = ctypes.c_size_t
        self.lib.double_script_push.argtypes = [ctypes.c_int32, ctypes.c_char_p, ctypes.c_int]
        self.lib.double_reset()

    def json(self, name):
        raw = getattr(self.lib, name)()
        return json.loads(raw) if raw else None

    def push(self, token, text=None, state=0):
        assert self.lib.double_script_push(token, text, state) == 0

    def last_embed(self):
        n = self.lib.double_copy_last_embed(None, 0)
        out = (ctypes.c_float * n)()
        self.lib.double_copy_last_embed(out, n)
        return np.frombuffer(out, dtype=np.float32).copy()


@pytest.fixture(scope="module")
def bundle(preview_bundles):
    return RuntimeBundle.open(preview_bundles["idefics3-256m"])


@pytest.fixture(params=["1.2", "1.3"])
def setup(request, libraries, bundle, tmp_path):
    abi = request.param
    double = Double(libraries[abi])
    double.lib.double_set_hidden(bundle.manifest.model.text_hidden_size)
    model = tmp_path / "llm.rkllm"
    model.write_bytes(b"model")
    engine = RkllmEngine(model, libraries[abi], abi, bundle.max_context, GenerationConfig(max_new_tokens=64))
    yield abi, double, engine
    engine.close()


def test_layouts_match_the_c_header(libraries):
    names = {"RKLLMExtendParam": "ExtendParam", "RKLLMParam": "param", "RKLLMInput": "input",
             "RKLLMInferParam": "infer", "RKLLMResult": "Result", "RKLLMPerfStat": "PerfStat"}
    for abi_name, path in libraries.items():
        double, abi = Double(path), rkllm_abi.ABIS[abi_name]
        for c_name in names:
            ours = abi.sizes[c_name][0]
            assert ctypes.sizeof(ours) == double.lib.double_sizeof(c_name.encode()), (abi_name, c_name)
        assert abi.param.extend_param.offset == double.lib.double_offsetof(b"RKLLMParam", b"extend_param")
        assert abi.input.input_type.offset == double.lib.double_offsetof(b"RKLLMInput", b"input_type")
        assert abi.infer.keep_history.offset == double.lib.double_offsetof(b"RKLLMInferParam", b"keep_history")
        assert rkllm_abi.probe_default_param(double.lib) == abi_name


def test_init_parameters(setup, bundle):
    abi, double, engine = setup
    init = double.json("double_init_json")
    assert init["max_context_len"] == bundle.max_context and init["max_new_tokens"] == 64
    assert init["base_domain_id"] == 1 and init["skip_special_token"] in (1, True) and init["n_batch"] == 1
    assert init["top_k"] == 1  # greedy by default


def test_embeddings_passed_are_the_host_preview_ones(setup, bundle):
    abi, double, engine = setup
    vision = OnnxVisionEncoder(bundle.file("vision.onnx"), bundle.settings)
    eos = bundle.stop_ids[0]
    for token in (1674, 42615):
        double.push(token, b"x")
    double.push(eos, b"")
    npu = Runner(bundle, vision, engine)
    messages = [{"role": "user", "content": [{"type": "image", "image": rng_image(300, 200, seed=31)},
                                             {"type": "text", "text": "What is it?"}]}]
    g = npu.generate(messages, GenerationConfig(max_new_tokens=16)).consume()
    assert g.token_ids == [1674, 42615, eos] and g.finish_reason == "stop"
    run = double.json("double_last_run_json")
    assert run["input_type"] == 2 and run["role"] == "user" and run["history_before"] == 0
    assert run["n_tokens"] == g.prompt_tokens
    # the host preview renders the same ids; the embeddings are the board table's rows + the features
    host = Runner(bundle, *open_engines(bundle, "host"))
    h = host.generate(messages, GenerationConfig(max_new_tokens=1)).consume()
    assert h.prefill_ids == g.prefill_ids
    from rksmolvlm.processing.embed import splice
    from rksmolvlm.processing.image import preprocess

    features = vision.encode(preprocess(messages[0]["content"][0]["image"], bundle.settings).tiles)
    expected = splice(bundle.embedding_table().lookup(g.prefill_ids), g.prefill_ids, bundle.image_id, features)
    assert np.array_equal(double.last_embed(), expected.ravel())
    assert g.stats.engine["prefill_tokens"] == g.prompt_tokens


def test_utf8_split_across_waiting(setup, bundle):
    abi, double, engine = setup
    tok = bundle.tokenizer.tokenizer
    first, second = tok.token_to_id("Ã"), tok.token_to_id("©")  # the two bytes of "é"
    double.push(first, b"\xc3", 1)  # WAITING: incomplete UTF-8
    double.push(second, "é".encode(), 0)
    double.push(bundle.stop_ids[0], b"", 0)
    g = Runner(bundle, OnnxVisionEncoder(bundle.file("vision.onnx"), bundle.settings), engine).generate(
        [{"role": "user", "content": "Say é"}], GenerationConfig(max_new_tokens=8))
    assert list(g) == ["é"] and g.token_ids[:2] == [first, second]


def test_error_mid_stream(setup, bundle):
    abi, double, engine = setup
    double.push(1674, b"a")
    double.push(5, b"", 3)  # ERROR
    g = Runner(bundle, OnnxVisionEncoder(bundle.file("vision.onnx"), bundle.settings), engine).generate(
        [{"role": "user", "content": "Hi"}], GenerationConfig(max_new_tokens=8))
    with pytest.raises(EngineError, match="RKLLM_RUN_ERROR"):
        g.consume()
    assert engine.history_tokens == 0


def test_abort_from_another_thread(setup, bundle):
    abi, double, engine = setup
    for _ in range(60):
        double.push(1674, b"a")
    double.lib.double_set_delay_us(20000)
    runner = Runner(bundle, OnnxVisionEncoder(bundle.file("vision.onnx"), bundle.settings), engine)
    g = runner.generate([{"role": "user", "content": "Go"}], GenerationConfig(max_new_tokens=60))
    for _ in g:
        if len(g.token_ids) == 3:
            threading.Thread(target=runner.abort).start()
    assert g.finish_reason == "abort" and 3 <= len(g.token_ids) < 10
    assert double.json("double_last_run_json")["stop"] == "abort"


def test_history_kept_across_turns_and_cleared(setup, bundle):
    abi, double, engine = setup
    session = Runner(bundle, OnnxVisionEncoder(bundle.file("vision.onnx"), bundle.settings), engine).session()
    eos = bundle.stop_ids[0]
    for t in (1674, eos):
        double.push(t, b"")
    turn1 = [{"role": "user", "content": [{"type": "text", "text": "Hello"}]}]
    g1 = session.generate(turn1, GenerationConfig(max_new_tokens=8)).consume()
    for t in (42615, eos):
        double.push(t, b"")
    turn2 = turn1 + [{"role": "assistant", "content": [{"type": "text", "text": g1.text}]},
                     {"role": "user", "content": [{"type": "text", "text": "More"}]}]
    g2 = session.generate(turn2, GenerationConfig(max_new_tokens=8)).consume()
    run = double.json("double_last_run_json")
    assert run["keep_history"] == 1 and run["history_before"] == g1.prompt_tokens + len(g1.token_ids)
    assert run["n_tokens"] == len(g2.prefill_ids) and g2.reused_tokens == run["history_before"]
    session.reset()
    assert double.lib.double_history_tokens() == 0


def test_sampling_values_reach_the_runtime(setup, bundle, libraries, tmp_path):
    abi, double, engine = setup
    config = GenerationConfig(max_new_tokens=8, temperature=0.7, top_k=20, top_p=0.8, repeat_penalty=1.1,
                              frequency_penalty=0.5, presence_penalty=-0.25)
    double.push(bundle.stop_ids[0], b"")
    run = lambda: engine.generate(np.zeros((3, bundle.manifest.model.text_hidden_size), np.float32),  # noqa
                                  config, False, PerfStats())
    if abi == "1.2":  # sampling is fixed at init in 1.2.x
        with pytest.raises(EngineError, match="only at start-up"):
            list(run())
        penalties_only = GenerationConfig(max_new_tokens=8, frequency_penalty=0.5)
        with pytest.raises(EngineError, match="only at start-up"):  # the penalties are start-up values too
            list(engine.generate(np.zeros((3, bundle.manifest.model.text_hidden_size), np.float32), penalties_only,
                                 False, PerfStats()))
        started = RkllmEngine(tmp_path / "llm.rkllm", libraries["1.2"], "1.2", bundle.max_context, config)
        init = double.json("double_init_json")
        assert abs(init["frequency_penalty"] - 0.5) < 1e-6 and abs(init["presence_penalty"] + 0.25) < 1e-6
        started.close()
        return
    list(run())
    sampling = double.json("double_last_run_json")["sampling"]
    assert sampling["top_k"] == 20 and abs(sampling["top_p"] - 0.8) < 1e-6
    assert abs(sampling["temperature"] - 0.7) < 1e-6 and abs(sampling["repeat_penalty"] - 1.1) < 1e-6
    assert abs(sampling["frequency_penalty"] - 0.5) < 1e-6 and abs(sampling["presence_penalty"] + 0.25) < 1e-6
    assert double.json("double_last_run_json")["max_new_tokens"] == 8


def test_layout_mismatch_is_refused(libraries, tmp_path):
    model = tmp_path / "llm.rkllm"
    model.write_bytes(b"m")
    with pytest.raises(BundleError, match="has the librkllmrt 1.3 layout but the bundle was built for 1.2"):
        RkllmEngine(model, libraries["1.3"], "1.2", 2048)
    with pytest.raises(BundleError, match="has the librkllmrt 1.2 layout"):
        RkllmEngine(model, libraries["1.2"], "1.3", 2048)


def test_missing_library(tmp_path, monkeypatch):
    monkeypatch.setenv("RKLLM_LIBRARY", str(tmp_path / "nope.so"))
    monkeypatch.setattr("rksmolvlm.runtime.npu_engines.LIBRARY_DIRS", (str(tmp_path),))
    monkeypatch.setattr("ctypes.util.find_library", lambda name: None)
    with pytest.raises(ToolkitMissingError, match="librkllm_api/aarch64/librkllmrt.so"):
        find_rkllm_library()

"""The Runner on the direct librknnrt tower answers as it does on RKNNLite: the same bundle, the same
librkllmrt double as decoder, once with RknnLiteVisionEncoder (the rknn-toolkit-lite2 contract
double, onnxruntime on vision.onnx) and once with RknnRuntimeVisionEncoder (the librknnrt C double,
whose outputs come from a provider running the same vision.onnx on the uint8 tile it was handed, with
the normalisation the real vision.rknn bakes in). The decoder receives the same embeddings and the
answers are the same, for a split image and for a video's frames."""

from __future__ import annotations

import ctypes
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from support import DOUBLES
from support.images import rng_image
from support.rknn_double import PROVIDER, RknnDouble, compile_double, model_blob

from rksmolvlm.runtime.engines import GenerationConfig
from rksmolvlm.runtime.loader import RuntimeBundle
from rksmolvlm.runtime.npu_engines import RkllmEngine, RknnLiteVisionEncoder, RknnRuntimeVisionEncoder
from rksmolvlm.runtime.runner import Runner

pytestmark = pytest.mark.skipif(shutil.which("cc") is None, reason="needs a C compiler")
CLIP = Path(__file__).resolve().parents[1] / "data" / "video" / "h264_70s_25fps_64x48.mp4"


@pytest.fixture(scope="module")
def libraries(tmp_path_factory):
    root = tmp_path_factory.mktemp("doubles")
    rkllm = root / "librkllmrt.so"
    subprocess.run(["cc", "-shared", "-fPIC", "-O1", "-Wall", "-Werror", "-DRKLLM_ABI=130", "-o", str(rkllm),
                    str(DOUBLES / "librkllmrt" / "rkllm_double.c"), "-lpthread"], check=True)
    return compile_double(root), rkllm


class OnnxTower:
    """The provider: vision.onnx on the tile the double received, (x − 127.5) / 127.5 as vision.rknn bakes in."""

    def __init__(self, onnx: Path):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        self.session = ort.InferenceSession(str(onnx), options, providers=["CPUExecutionProvider"])
        _, _, self.side, _ = self.session.get_inputs()[0].shape
        self.tokens, self.hidden = self.session.get_outputs()[0].shape[1:]
        self.errors: list[BaseException] = []
        self.callback = PROVIDER(self._provide)

    def _provide(self, _userdata, pixels, n_bytes, out, n_out) -> int:
        try:
            x = np.ctypeslib.as_array(pixels, shape=(n_bytes,)).reshape(1, self.side, self.side, 3)
            normalized = ((x.astype(np.float32) - 127.5) / 127.5).transpose(0, 3, 1, 2)
            name = self.session.get_inputs()[0].name
            features = self.session.run(None, {name: np.ascontiguousarray(normalized)})[0]
            np.ctypeslib.as_array(out, shape=(n_out,))[:] = features.ravel()
            return 0
        except BaseException as exc:  # noqa: BLE001 - reported by the test; the double fails the run
            self.errors.append(exc)
            return 1


def answer(bundle, vision, rkllm_library, tmp_path, messages, script):
    """(token ids, text, the embeddings the decoder received) of one greedy answer."""
    lib = ctypes.CDLL(str(rkllm_library))
    lib.double_reset()
    lib.double_set_hidden(bundle.manifest.model.text_hidden_size)
    lib.double_copy_last_embed.restype = ctypes.c_size_t
    lib.double_script_push.argtypes = [ctypes.c_int32, ctypes.c_char_p, ctypes.c_int]
    for token in script:
        assert lib.double_script_push(token, b"x", 0) == 0
    model = tmp_path / "llm.rkllm"
    model.write_bytes(b"model")
    engine = RkllmEngine(model, rkllm_library, "1.3", bundle.max_context, GenerationConfig(max_new_tokens=16))
    runner = Runner(bundle, vision, engine)
    try:
        g = runner.generate(messages, GenerationConfig(max_new_tokens=16)).consume()
        n = lib.double_copy_last_embed(None, 0)
        embeds = (ctypes.c_float * n)()
        lib.double_copy_last_embed(embeds, n)
        return g.token_ids, g.text, np.frombuffer(embeds, dtype=np.float32).copy()
    finally:
        runner.close()


@pytest.mark.parametrize("kind", ["image", "video"])
def test_the_same_answer_on_the_direct_tower_and_on_rknnlite(preview_bundles, libraries, rknnlite_double, tmp_path,
                                                             kind):
    rknn_library, rkllm_library = libraries
    bundle = RuntimeBundle.open(preview_bundles["idefics3-256m" if kind == "image" else "smolvlm2"])
    if kind == "image":
        content = [{"type": "image", "image": rng_image(700, 420, seed=41)}, {"type": "text", "text": "What is it?"}]
    else:
        content = [{"type": "video", "video": str(CLIP), "max_frames": 6}, {"type": "text", "text": "What happens?"}]
    messages = [{"role": "user", "content": content}]
    eos = bundle.stop_ids[0]
    script = [1674, 42615, eos]

    lite = answer(bundle, RknnLiteVisionEncoder(bundle.file("vision.rknn"), [1, 2, 4]), rkllm_library, tmp_path,
                  messages, script)

    tower = OnnxTower(bundle.file("vision.onnx"))
    double = RknnDouble(rknn_library)
    double.set_provider(tower.callback)
    model = tmp_path / "vision-double.rknn"
    model.write_bytes(model_blob(tower.side, tower.side, tower.tokens, tower.hidden))
    try:
        direct = answer(bundle, RknnRuntimeVisionEncoder(model, [1, 2, 4], rknn_library), rkllm_library, tmp_path,
                        messages, script)
    finally:
        double.set_provider(None)
    assert not tower.errors, tower.errors
    runs = double.calls("rknn_run")
    assert len(runs) > 3 and {r["mask"] for r in runs} == {1, 2, 4} and all(r["zero_copy_in"] for r in runs)
    assert direct[0] == lite[0] == script and direct[1] == lite[1]
    assert np.array_equal(direct[2], lite[2])  # the decoder received the same embeddings
    assert double.live() == (0, 0)


def test_make_npu_vision_opens_the_direct_tower_with_the_profiles_core_masks(preview_bundles, libraries, tmp_path,
                                                                             monkeypatch):
    """Without rknn-toolkit-lite2 the bundle's vision.rknn opens on librknnrt, on the rk3588 profile's
    cores (all three, or the ones asked for); with it, RKSMOLVLM_VISION_BACKEND still forces the direct path."""
    import importlib.util

    from rksmolvlm.runtime.engines import EngineOptions
    from rksmolvlm.runtime.npu_engines import make_npu_vision

    rknn_library, _ = libraries
    copy = tmp_path / "bundle"
    shutil.copytree(preview_bundles["idefics3-256m"], copy)
    bundle = RuntimeBundle.open(copy, verify=False)  # its vision.rknn becomes one the double loads
    tower = OnnxTower(bundle.file("vision.onnx"))
    bundle.file("vision.rknn").write_bytes(model_blob(tower.side, tower.side, tower.tokens, tower.hidden))
    double = RknnDouble(rknn_library)
    monkeypatch.setenv("RKNN_LIBRARY", str(rknn_library))
    monkeypatch.delenv("RKSMOLVLM_VISION_BACKEND", raising=False)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "rknnlite" else real(name, *a))
    for cores, masks in ((None, [1, 2, 4]), ((0, 2), [1, 4])):
        double.lib.double_reset()
        vision = make_npu_vision(bundle, EngineOptions(cores=cores))
        try:
            assert isinstance(vision, RknnRuntimeVisionEncoder) and list(vision.core_masks) == masks
            assert [c["mask"] for c in double.calls("rknn_set_core_mask")] == masks
        finally:
            vision.close()
    monkeypatch.setattr(importlib.util, "find_spec", real)
    monkeypatch.setenv("RKSMOLVLM_VISION_BACKEND", "librknnrt")
    vision = make_npu_vision(bundle, EngineOptions(cores=(1,)))
    assert isinstance(vision, RknnRuntimeVisionEncoder) and vision.core_masks == (2,)
    vision.close()
    assert double.live() == (0, 0)

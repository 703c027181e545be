"""The board vision engine (RKNNLite, one runtime and worker per NPU core) run end to end on x86
through the rknn-toolkit-lite2 contract double: same features as the host preview, tile order
kept, cores used in parallel, clean release, clear errors."""

import numpy as np
import pytest

from support.images import rng_image
from rksmolvlm.errors import ToolkitMissingError
from rksmolvlm.preview.host_engines import OnnxVisionEncoder
from rksmolvlm.runtime.loader import RuntimeBundle
from rksmolvlm.runtime.npu_engines import EngineError, RknnLiteVisionEncoder
from rksmolvlm.processing.image import preprocess


@pytest.fixture(scope="module")
def bundle(preview_bundles):
    return RuntimeBundle.open(preview_bundles["idefics3-256m"])


def test_same_features_as_the_host_preview_in_tile_order(bundle, rknnlite_double, monkeypatch):
    monkeypatch.setenv("RKNNLITE_DOUBLE_DELAY_MS", "30")
    tiles = preprocess(rng_image(900, 500, seed=21), bundle.settings).tiles
    assert len(tiles) > 6
    encoder = RknnLiteVisionEncoder(bundle.file("vision.rknn"), [1, 2, 4])
    got = encoder.encode(tiles)
    host = OnnxVisionEncoder(bundle.file("vision.onnx"), bundle.settings).encode(tiles)
    assert got.shape == host.shape
    np.testing.assert_allclose(got, host, atol=1e-4, rtol=0)
    for i in range(len(tiles)):  # each position holds its own tile's features
        np.testing.assert_allclose(got[i], host[i], atol=1e-4, rtol=0)
    runtimes = rknnlite_double.instances
    assert sorted(r.core_mask for r in runtimes) == [1, 2, 4]
    assert all(len(r.calls) >= len(tiles) // 3 for r in runtimes)  # work spread over the cores
    threads = {name for r in runtimes for name, _, _ in r.calls}
    assert len(threads) == 3
    spans = sorted((s, e) for r in runtimes for _, s, e in r.calls)
    assert any(b[0] < a[1] for a, b in zip(spans, spans[1:])), "no two cores ever ran at the same time"
    encoder.close()
    assert all(r.released for r in runtimes)


def test_configurable_core_set(bundle, rknnlite_double):
    tiles = preprocess(rng_image(300, 300, seed=22), bundle.settings).tiles
    encoder = RknnLiteVisionEncoder(bundle.file("vision.rknn"), [2])
    assert encoder.encode(tiles).shape[0] == len(tiles)
    assert [r.core_mask for r in rknnlite_double.instances] == [2]
    encoder.close()


def test_invalid_core_mask_for_the_soc(bundle, rknnlite_double, monkeypatch):
    monkeypatch.setenv("RKNNLITE_DOUBLE_SOC", "rk3576")
    with pytest.raises(EngineError, match="init_runtime\\(core_mask=4\\) failed.*librknnrt.so"):
        RknnLiteVisionEncoder(bundle.file("vision.rknn"), [1, 4])
    assert all(r.released for r in rknnlite_double.instances)


def test_missing_package_is_named(bundle, monkeypatch):
    import builtins

    real = builtins.__import__

    def guarded(name, *a, **k):
        if name.startswith("rknnlite"):
            raise ImportError(name)
        return real(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", guarded)
    with pytest.raises(ToolkitMissingError, match="rknn-toolkit-lite2"):
        RknnLiteVisionEncoder(bundle.file("vision.rknn"), [1])


def test_video_frames_run_on_all_cores(preview_bundles, rknnlite_double, monkeypatch):
    """A SmolVLM2 video through the runner on the board's vision engine: its frames are unsplit tiles
    encoded in one call spread over the three cores, features in frame order as the host preview's."""
    from pathlib import Path

    from support.fakes import FakeLlm
    from rksmolvlm.processing.content import Message, TextPart, VideoPart
    from rksmolvlm.runtime.runner import Runner

    monkeypatch.setenv("RKNNLITE_DOUBLE_DELAY_MS", "20")
    video_bundle = RuntimeBundle.open(preview_bundles["smolvlm2"])
    clip = Path(__file__).resolve().parents[1] / "data" / "video" / "h264_70s_25fps_64x48.mp4"
    runner = Runner(video_bundle, RknnLiteVisionEncoder(video_bundle.file("vision.rknn"), [1, 2, 4]), FakeLlm([2]))
    messages = [Message("user", (VideoPart(clip, max_frames=12), TextPart("What happens?")))]
    npu = runner.generate(messages).consume()
    runtimes = rknnlite_double.instances
    assert npu.stats.video_frames == 12 and sum(len(r.calls) for r in runtimes) >= 12
    assert all(len(r.calls) >= 12 // 3 for r in runtimes)  # the frames spread over the cores
    host = Runner(video_bundle, OnnxVisionEncoder(video_bundle.file("vision.onnx"), video_bundle.settings),
                  FakeLlm([2]))
    host.generate(messages).consume()
    np.testing.assert_allclose(runner.llm.prefills[0].embeddings, host.llm.prefills[0].embeddings, atol=1e-4, rtol=0)
    runner.close()

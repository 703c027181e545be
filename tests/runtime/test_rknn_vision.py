"""The direct librknnrt vision encoder (RknnRuntimeVisionEncoder) against the C double: the features
are the double's linear map of each tile and frame in order, on one context per NPU core running in
parallel, zero-copy or not, with strided input rows and float16 towers; everything it made is freed;
each failure is a named error; make_npu_vision chooses the backend in one place."""

import inspect
import shutil

import numpy as np
import pytest

from support.rknn_double import FLOAT16, RknnDouble, compile_double, expected_features, model_blob

from rksmolvlm.errors import BundleError, ToolkitMissingError
from rksmolvlm.runtime.engines import VisionEncoder
from rksmolvlm.runtime.npu_engines import (EngineError, RknnRuntimeVisionEncoder, choose_vision_backend,
                                           find_rknn_library)

pytestmark = pytest.mark.skipif(shutil.which("cc") is None, reason="needs a C compiler")

S, T, D = 64, 8, 24  # tile side, tokens, hidden


@pytest.fixture(scope="module")
def library(tmp_path_factory):
    return compile_double(tmp_path_factory.mktemp("librknnrt"))


@pytest.fixture
def double(library):
    d = RknnDouble(library)
    yield d
    d.lib.double_reset()


def model(tmp_path, **kwargs):
    path = tmp_path / "vision.rknn"
    path.write_bytes(model_blob(S, S, T, D, payload=b"w" * 4096, **kwargs))
    return path


def tiles(n, seed=0):
    return np.random.RandomState(seed).randint(0, 256, (n, S, S, 3)).astype(np.uint8)


@pytest.mark.parametrize("zero_copy", [True, False])
@pytest.mark.parametrize("variant", [{}, {"w_stride": 80}, {"out_type": FLOAT16}])
def test_features_are_the_maps_of_each_tile_in_order_over_three_cores(double, library, tmp_path, zero_copy, variant):
    double.lib.double_set_delay_us(3000)
    encoder = RknnRuntimeVisionEncoder(model(tmp_path, **variant), [1, 2, 4], library, zero_copy=zero_copy)
    x = tiles(10)
    got = encoder.encode(x)
    want = expected_features(x, T, D, fp16=variant.get("out_type") == FLOAT16)
    assert got.shape == (10, T, D) and got.dtype == np.float32
    assert np.array_equal(got, want)
    runs = double.calls("rknn_run")
    assert len(runs) == 10 and all(r["rc"] == 0 for r in runs)
    assert sorted({r["mask"] for r in runs}) == [1, 2, 4] and len({r["ctx"] for r in runs}) == 3
    assert {r["zero_copy_in"] for r in runs} == {int(zero_copy)}
    spans = sorted((r["start_ns"], r["end_ns"]) for r in runs)
    assert any(b[0] < a[1] for a, b in zip(spans, spans[1:])), "no two cores ever ran at the same time"
    assert len({r["tid"] for r in runs}) == 3
    # one rknn_init, the other cores duplicated from it
    assert [c["fn"] for c in double.calls() if c["fn"] in ("rknn_init", "rknn_dup_context")] == \
        ["rknn_init", "rknn_dup_context", "rknn_dup_context"]
    assert double.calls("rknn_init")[0]["size"] == 80 + 4096  # the model blob from memory, not a path
    encoder.close()
    assert double.live() == (0, 0) and double.last_error() == ""


def test_frames_and_repeated_calls(double, library, tmp_path):
    encoder = RknnRuntimeVisionEncoder(model(tmp_path), [2, 4], library)
    frames = tiles(5, seed=3)
    assert np.array_equal(encoder.encode_frames(frames), expected_features(frames, T, D))
    one = tiles(1, seed=4)
    assert np.array_equal(encoder.encode(one), expected_features(one, T, D))  # the next tile replaces the last
    assert np.array_equal(encoder.encode(one[:0]), np.empty((0, T, D), np.float32))
    assert encoder.sdk_version == ("2.3.2 (rknn-double)", "0.9.8")
    encoder.close()
    encoder.close()  # idempotent
    assert double.live() == (0, 0)
    with pytest.raises(EngineError, match="closed"):
        encoder.encode(one)


def test_the_encoder_is_a_vision_encoder():
    for name in ("encode", "encode_frames", "close"):
        want, got = getattr(VisionEncoder, name), getattr(RknnRuntimeVisionEncoder, name)
        assert list(inspect.signature(got).parameters) == list(inspect.signature(want).parameters)
    assert "__getattr__" not in vars(RknnRuntimeVisionEncoder)


def test_wrong_tiles_are_refused(double, library, tmp_path):
    encoder = RknnRuntimeVisionEncoder(model(tmp_path), [1], library)
    with pytest.raises(EngineError, match="takes 64×64 tiles, got 32×32"):
        encoder.encode(np.zeros((1, 32, 32, 3), np.uint8))
    with pytest.raises(ValueError, match="uint8"):
        encoder.encode(np.zeros((1, S, S, 3), np.float32))
    encoder.close()


def test_no_library_names_the_file_and_where_to_get_it(tmp_path, monkeypatch):
    monkeypatch.delenv("RKNN_LIBRARY", raising=False)
    monkeypatch.setattr("rksmolvlm.runtime.npu_engines.LIBRARY_DIRS", (str(tmp_path),))
    monkeypatch.setattr("ctypes.util.find_library", lambda name: None)
    with pytest.raises(ToolkitMissingError, match=r"librknnrt.so not found .*librknn_api/aarch64/librknnrt.so.*"
                                                  r"airockchip/rknn-toolkit2.*RKNN_LIBRARY"):
        find_rknn_library()
    with pytest.raises(ToolkitMissingError, match="librknnrt.so not found"):
        RknnRuntimeVisionEncoder(model(tmp_path), [1])


def test_library_found_through_the_environment(library, tmp_path, monkeypatch):
    monkeypatch.setenv("RKNN_LIBRARY", str(library))
    assert find_rknn_library() == library


def test_not_a_librknnrt(tmp_path):
    broken = tmp_path / "librknnrt.so"
    broken.write_bytes(b"\x7fELF not really")
    with pytest.raises(ToolkitMissingError, match="cannot load .*aarch64 librknnrt.so"):
        RknnRuntimeVisionEncoder(model(tmp_path), [1], broken)
    import ctypes.util

    # a loadable library without the rknn_* symbols: the C library
    with pytest.raises(ToolkitMissingError, match="lacks rknn_init, .*rknn_destroy_mem"):
        RknnRuntimeVisionEncoder(model(tmp_path), [1], ctypes.util.find_library("c"))


@pytest.mark.parametrize("case, error, words", [
    ("not ours", EngineError, r"rknn_init returned -6 \(RKNN_ERR_MODEL_INVALID\) for .*vision.rknn"),
    ("device", EngineError, r"rknn_init returned -3 \(RKNN_ERR_DEVICE_UNAVAILABLE\).*open the NPU device"),
    ("platform", EngineError, r"-13 \(RKNN_ERR_TARGET_PLATFORM_UNMATCH\).*matches this SoC"),
    ("empty", BundleError, "is empty"),
    ("missing", BundleError, "is missing"),
    ("core mask", EngineError, r"rknn_set_core_mask\(4\) returned -5.*board profile"),
    ("no cores", BundleError, "no NPU cores"),
])
def test_failures_are_named_and_leave_nothing_behind(double, library, tmp_path, case, error, words):
    path, masks = model(tmp_path), [1, 2, 4]
    if case == "not ours":
        path.write_bytes(b"RKNN\0" * 50)
    elif case == "device":
        double.lib.double_fail_init(-3)
    elif case == "platform":
        path = model(tmp_path, platform="rk3562")
    elif case == "empty":
        path.write_bytes(b"")
    elif case == "missing":
        path = tmp_path / "absent.rknn"
    elif case == "core mask":
        double.lib.double_set_soc(b"rk3576")
        path = model(tmp_path, platform="rk3576")
    elif case == "no cores":
        masks = []
    with pytest.raises(error, match=words):
        RknnRuntimeVisionEncoder(path, masks, library)
    assert double.live() == (0, 0)


def test_a_failing_run_is_an_engine_error(double, library, tmp_path):
    from support.rknn_double import PROVIDER

    encoder = RknnRuntimeVisionEncoder(model(tmp_path), [1, 2], library)
    callback = PROVIDER(lambda *_: 1)
    double.set_provider(callback)
    try:
        with pytest.raises(EngineError, match=r"rknn_run returned -1 \(RKNN_ERR_FAIL\) on NPU core mask"):
            encoder.encode(tiles(2))
    finally:
        double.set_provider(None)
        encoder.close()
    assert double.live() == (0, 0)


def test_the_backend_is_chosen_in_one_place(monkeypatch, rknnlite_double):
    monkeypatch.delenv("RKSMOLVLM_VISION_BACKEND", raising=False)
    assert choose_vision_backend() == "rknnlite"  # importable (here: the contract double)
    monkeypatch.setenv("RKSMOLVLM_VISION_BACKEND", "librknnrt")
    assert choose_vision_backend() == "librknnrt"
    assert choose_vision_backend("rknnlite") == "rknnlite"
    monkeypatch.setenv("RKSMOLVLM_VISION_BACKEND", "onnx")
    with pytest.raises(BundleError, match="unknown vision backend 'onnx'.*auto, rknnlite, librknnrt"):
        choose_vision_backend()


def test_without_rknnlite_the_direct_path_is_chosen(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.delenv("RKSMOLVLM_VISION_BACKEND", raising=False)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "rknnlite" else real(name, *a))
    assert choose_vision_backend() == "librknnrt"

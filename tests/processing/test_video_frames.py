"""SmolVLM2 video frames after decoding (rksmolvlm/processing/lanczos.py, video_frames.py) against
torchvision 0.29 / transformers 5.24, byte for byte.

The goldens (tests/data/video/frame_goldens.json) were made once in a reference venv by
scripts/make_lanczos_goldens.py (torch 2.14's ``_upsample_lanczos2d_aa`` behind torchvision's LANCZOS
resize, ``SmolVLMVideoProcessor``); the inputs are regenerated here by that script's own integer-only
``frames()``. Nothing here needs torch or torchvision.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest

from rksmolvlm.processing import lanczos
from rksmolvlm.processing.lanczos import resize_uint8, resize_uint8_chain
from rksmolvlm.processing.video_frames import (
    VideoSettings,
    frame_timestamps,
    longest_edge_size,
    normalize_frames,
    resize_frames,
    sample_indices,
)

ROOT = Path(__file__).resolve().parents[2]
GOLDENS = json.loads((ROOT / "tests" / "data" / "video" / "frame_goldens.json").read_text())


def _load_script():
    spec = importlib.util.spec_from_file_location("make_lanczos_goldens", ROOT / "scripts" / "make_lanczos_goldens.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("make_lanczos_goldens", module)
    spec.loader.exec_module(module)
    return module


SCRIPT = _load_script()


def sha256(array: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()


def test_goldens_come_from_the_reference_stack():
    v = GOLDENS["versions"]
    assert v["torchvision"].startswith("0.29") and v["transformers"] == "5.24.0" and v["torch"].startswith("2.14")
    # the case lists in the script are the ones the goldens were made from
    assert [c["name"] for c in GOLDENS["resize"]] == [c[0] for c in SCRIPT.RESIZE_CASES]
    assert [c["name"] for c in GOLDENS["processor"]] == [c[0] for c in SCRIPT.PROCESSOR_CASES]
    assert len(GOLDENS["sampling"]) == len(SCRIPT.SAMPLING_CASES)


# -- the Lanczos resize -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("case", GOLDENS["resize"], ids=lambda c: c["name"])
def test_resize_is_torchvision_lanczos(case):
    x = SCRIPT.frames(tuple(case["shape"]), case["kind"], case["seed"])
    out = resize_uint8(x, *case["size"])
    assert out.dtype == np.uint8 and list(out.shape) == case["out_shape"]
    assert sha256(out) == case["sha256"]


def test_goldens_cover_every_exact_arithmetic():
    """The resize cases run each way of summing exactly: float32, float32 on centred inputs, float64."""
    modes = set()
    for case in GOLDENS["resize"]:
        (_, h, w), (oh, ow) = case["shape"], case["size"]
        for a, b in ((w, ow), (h, oh)):
            if a != b:
                plan = lanczos._axis_plan(a, b)
                modes.add((np.dtype(plan.dtype).name, plan.shift))
    assert modes == {("float32", 0), ("float32", 128), ("float64", 0)}


def _integer_resize(x: np.ndarray, height: int, width: int) -> np.ndarray:
    """The kernel written plainly: int64 sums of the int16 weights, >> p, width pass then height pass."""
    def axis(a: np.ndarray, out_size: int, ax: int) -> np.ndarray:
        plan = lanczos._axis_plan(a.shape[ax], out_size)
        a = np.moveaxis(a, ax, 0).astype(np.int64)
        acc = np.zeros((out_size, *a.shape[1:]), np.int64)
        for o in range(out_size):
            lo, k = int(plan.xmin[o]), int(plan.xsize[o])
            acc[o] = np.tensordot(plan.weights[o, :k].astype(np.int64), a[lo:lo + k], axes=1)
        acc = (acc + ((1 << plan.precision) >> 1)) >> plan.precision
        return np.moveaxis(np.clip(acc, 0, 255).astype(np.uint8), 0, ax)

    if x.shape[2] != width:
        x = axis(x, width, 2)
    if x.shape[1] != height:
        x = axis(x, height, 1)
    return x


def test_block_products_are_the_plain_integer_sums():
    """The float32 / centred float32 / float64 block products equal exact integer arithmetic, on sizes the
    goldens do not have (ratios from 1:40 to 12:1, saturated inputs where the lanczos lobes overshoot)."""
    rng = np.random.default_rng(3)
    for _ in range(60):
        h, w = (int(v) for v in rng.integers(1, 160, 2))
        oh, ow = (int(v) for v in rng.integers(1, 160, 2))
        x = (rng.integers(0, 2, (1, h, w, 3)) * 255).astype(np.uint8) if rng.random() < 0.5 else \
            rng.integers(0, 256, (1, h, w, 3), dtype=np.uint8)
        assert np.array_equal(resize_uint8(x, oh, ow), _integer_resize(x, oh, ow)), ((h, w), (oh, ow))


def test_resize_single_frame_batch_and_chain_agree():
    x = SCRIPT.frames((3, 40, 30), "scene", 1)
    batch = resize_uint8(x, 50, 20)
    assert np.array_equal(batch[1], resize_uint8(x[1], 50, 20))  # (H, W, C) in, (h, w, C) out
    chained = resize_uint8_chain(x, [(120, 90), (32, 32)])
    assert np.array_equal(chained, resize_uint8(resize_uint8(x, 120, 90), 32, 32))
    assert resize_uint8(x, 40, 30) is x  # torchvision returns an unchanged size as is
    assert resize_uint8(np.ascontiguousarray(x[:, ::-1]), 50, 20).shape == (3, 50, 20, 3)
    assert resize_uint8(np.empty((0, 8, 8, 3), np.uint8), 4, 4).shape == (0, 4, 4, 3)


def test_resize_refuses_what_it_cannot_do():
    with pytest.raises(TypeError, match="uint8"):
        resize_uint8(np.zeros((4, 4, 3), np.float32), 2, 2)
    with pytest.raises(ValueError, match=r"\(H, W, C\)"):
        resize_uint8(np.zeros((4, 4), np.uint8), 2, 2)
    with pytest.raises(ValueError, match="at least 1x1"):
        resize_uint8(np.zeros((4, 4, 3), np.uint8), 0, 2)


# -- sampling, timestamps -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("case", GOLDENS["sampling"],
                         ids=lambda c: f"{c['total_num_frames']}f-{c['duration']:.3f}s-{c['fps']}fps-"
                                       f"max{c['max_frames']}-skip{c['skip_secs']}")
def test_sampling_is_transformers(case):
    indices = sample_indices(case["total_num_frames"], case["duration"], case["video_fps"], case["fps"],
                             case["max_frames"], case["skip_secs"])
    assert indices.dtype == np.int64 and indices.tolist() == case["indices"]
    timestamps = frame_timestamps(indices, case["video_fps"])
    assert timestamps.dtype == np.float64 and timestamps.tolist() == case["timestamps"]  # exact floats


def test_seventy_second_clip_gives_the_documented_frames():
    indices = sample_indices(1750, 70.0, 25.0, 1, 64)
    assert len(indices) == 64 and indices[:3].tolist() == [25, 51, 78] and indices[-1] == 1725


@pytest.mark.parametrize("args, problem", [
    ((0, 1.0, 25.0, 1, 64), "nothing to sample"),
    ((10, float("nan"), 25.0, 1, 64), "finite duration"),
    ((10, 1.0, None, 1, 64), "video fps"),
    ((10, -1.0, 25.0, 1, 64), "broken container"),
    ((10, 1.0, 0.0, 1, 64), "broken container"),
    ((10, 1.0, 25.0, 0, 64), "more than 0 frames per second"),
    ((10, 1.0, 25.0, 1, 0), "at least one frame"),
])
def test_sampling_refuses_bad_metadata(args, problem):
    with pytest.raises(ValueError, match=problem):
        sample_indices(*args)


def test_timestamps_need_an_fps():
    with pytest.raises(ValueError, match="fps"):
        frame_timestamps(np.array([0, 1]), 0.0)


# -- settings -----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("case", GOLDENS["settings"], ids=lambda c: c["name"])
def test_settings_are_what_the_processor_keeps(case):
    s = VideoSettings.from_preprocessor(case["config"])
    assert (s.fps, s.max_frames, s.longest_edge, s.frame_size) == \
        (case["fps"], case["num_frames"], case["size"]["longest_edge"], case["max_image_size"]["longest_edge"])
    assert list(s.image_mean) == case["image_mean"] and list(s.image_std) == case["image_std"]
    assert s.rescale_factor == case["rescale_factor"] and case["resample"] == 1 and s.skip_secs == 1


def test_settings_round_trip_through_json():
    s = VideoSettings.from_preprocessor(GOLDENS["settings"][-1]["config"])
    d = json.loads(json.dumps(s.to_dict()))
    assert VideoSettings.from_dict(d) == s
    assert all(isinstance(v, (int, float, list)) for v in d.values())
    with pytest.raises(ValueError, match="lack frame_size"):
        VideoSettings.from_dict({k: v for k, v in d.items() if k != "frame_size"})


@pytest.mark.parametrize("change, problem", [
    ({"video_sampling": None}, "no 'video_sampling'"),
    ({"video_sampling": {"max_frames": 64, "video_size": {"longest_edge": 512}}}, "no 'fps'"),
    ({"size": {"height": 512, "width": 512}}, "longest-edge"),
    ({"max_image_size": {"height": 512}}, "max_image_size"),
    ({"resample": 3}, "LANCZOS"),
    ({"do_normalize": False}, "do_normalize"),
    ({"image_mean": [0.5, 0.5]}, "one number or three"),
    ({"video_sampling": {"fps": 0, "max_frames": 64, "video_size": {"longest_edge": 512}}}, "fps 0.0"),
    ({"video_sampling": {"fps": 1, "max_frames": 1.5, "video_size": {"longest_edge": 512}}}, "whole number"),
    ({"image_std": [0.5, 0.0, 0.5]}, "divides by zero"),
])
def test_settings_refuse_configs_we_would_not_match(change, problem):
    config = {**SCRIPT.REAL_SETTINGS, **change}
    with pytest.raises(ValueError, match=problem):
        VideoSettings.from_preprocessor(config)


# -- resizing and normalising frames ------------------------------------------------------------------------------

@pytest.mark.parametrize("case", GOLDENS["stage1"], ids=lambda c: f"{c['height']}x{c['width']}-{c['longest_edge']}")
def test_stage1_size_is_transformers(case):
    assert list(longest_edge_size(case["height"], case["width"], case["longest_edge"])) == case["size"]


@pytest.mark.parametrize("case", GOLDENS["normalize"], ids=lambda c: c["name"])
def test_normalize_is_the_fused_rescale_and_normalize(case):
    x = SCRIPT.frames(tuple(case["shape"]), case["kind"], case["seed"])
    settings = VideoSettings(fps=1, max_frames=1, longest_edge=8, frame_size=8,
                             image_mean=tuple(case["image_mean"]), image_std=tuple(case["image_std"]),
                             rescale_factor=case["rescale_factor"])
    out = normalize_frames(x, settings)
    assert out.dtype == np.float32 and out.shape == (x.shape[0], 3, *x.shape[1:3]) and out.flags.c_contiguous
    assert sha256(out) == case["sha256"]
    if case["name"] == "default":
        assert np.array_equal(out, normalize_frames(x))  # SmolVLM2's 0.5/0.5/255 are the defaults


def test_normalize_is_not_the_image_paths_formula():
    """(x − 127.5)/127.5 differs from the image path's (x/255 − 0.5)/0.5 by an ULP on some levels."""
    levels = np.arange(256, dtype=np.uint8).reshape(1, 16, 16, 1).repeat(3, axis=3)
    fused = normalize_frames(levels)[0, 0].ravel()
    image_path = ((levels[0, :, :, 0].ravel().astype(np.float32) * np.float32(1 / 255) - np.float32(0.5))
                  / np.float32(0.5))
    assert np.array_equal(fused, (levels[0, :, :, 0].ravel().astype(np.float32) - 127.5) / np.float32(127.5))
    assert 0 < np.count_nonzero(fused != image_path) < 256


@pytest.mark.parametrize("case", GOLDENS["processor"], ids=lambda c: c["name"])
def test_whole_video_processor_pixel_values(case):
    if case["kind"] == "picture":
        picture = ROOT / GOLDENS["calibration_picture"]["path"]
        assert SCRIPT.file_sha256(picture) == GOLDENS["calibration_picture"]["sha256"], \
            f"{picture} changed: regenerate the goldens (scripts/make_lanczos_goldens.py)"
    settings = VideoSettings.from_preprocessor(GOLDENS["processor_settings"])
    x = SCRIPT.frames(tuple(case["shape"]), case["kind"], case["seed"])
    resized = resize_frames(x, settings)
    assert list(resized.shape) == case["resized_shape"] and sha256(resized) == case["resized_sha256"]
    pixel_values = normalize_frames(resized, settings)
    assert list(pixel_values.shape) == case["pixel_values_shape"]
    assert sha256(pixel_values) == case["pixel_values_sha256"]


def test_resize_frames_on_threads_gives_the_same_frames():
    settings = VideoSettings(fps=1, max_frames=8, longest_edge=300, frame_size=64)
    x = SCRIPT.frames((5, 90, 160), "scene", 4)
    assert np.array_equal(resize_frames(x, settings, workers=3), resize_frames(x, settings))


def test_resize_frames_refuses_non_rgb_frames():
    settings = VideoSettings(fps=1, max_frames=4, longest_edge=64, frame_size=16)
    with pytest.raises(ValueError, match="RGB24"):
        resize_frames(np.zeros((2, 8, 8), np.uint8), settings)
    with pytest.raises(ValueError, match="RGB24"):
        resize_frames(np.zeros((2, 8, 8, 3), np.float32), settings)
    assert resize_frames(np.zeros((0, 8, 8, 3), np.uint8), settings).shape == (0, 16, 16, 3)

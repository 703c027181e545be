#!/usr/bin/env python3
"""Goldens for tests/processing/test_video_frames.py: what torchvision and transformers make of video frames after
decoding, for rksmolvlm/processing/lanczos.py and video_frames.py to match byte for byte.

Run it in the reference venv (torch >= 2.14 with torchvision >= 0.27 — transformers falls back to
BICUBIC below that — and transformers 5.24), never from the test suite::

    /tmp/ref-venv/bin/python scripts/make_lanczos_goldens.py [--out tests/data/video/frame_goldens.json]

Recorded:
- ``resize``: torchvision v2 ``resize(uint8 (N, 3, H, W), [h, w], LANCZOS, antialias=True)`` of generated
  inputs of awkward sizes (enlarging, shrinking, one axis, identity, odd sizes, ratios up to 1:150), as the
  sha256 of the (N, h, w, 3) output; every input also resized channels-last, which must not change a byte;
- ``sampling``: ``SmolVLMVideoProcessor.sample_frames`` indices and ``VideoMetadata.timestamps`` for a grid of
  clips (frame counts, durations, fps, max_frames, skip_secs);
- ``settings``: what ``SmolVLMVideoProcessor(**config)`` keeps of a few preprocessor configs (fps, num_frames,
  size — ``video_sampling.video_size`` replaced by ``size`` —, max_image_size, mean, std, rescale, resample);
- ``stage1``: ``get_resize_output_image_size`` for a grid of frame sizes;
- ``normalize``: the sha256 of ``rescale_and_normalize`` (float32 bytes) for a few uint8 inputs and settings;
- ``processor``: the whole ``SmolVLMVideoProcessor`` at SmolVLM2-256M/500M's settings (stage 1 2048, frames
  512) on frame stacks shaped like decoded video (1080p, 720p, portrait, tiny, odd; synthetic scenes and a
  calibration picture): the sha256 of the resized uint8 frames and of ``pixel_values``.

The inputs are made by ``frames()`` below from integer arithmetic only, so the test regenerates them
bit for bit with any numpy; the test imports this file for it (nothing at module level needs torch).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "tests" / "data" / "video" / "frame_goldens.json"
CALIBRATION_PICTURE = ROOT / "calibration" / "images" / "scene_text_street_signs.png"

KINDS = ("noise", "binary", "smooth", "scene")

# (name, (N, H, W), (h, w), kind): awkward resizes of small inputs
RESIZE_CASES = [
    ("up_both", (2, 10, 7), (17, 23), "noise"),
    ("down_both", (2, 37, 91), (12, 20), "noise"),
    ("up_down", (1, 30, 80), (75, 33), "binary"),
    ("width_only_up", (1, 33, 17), (33, 40), "noise"),
    ("height_only_down", (1, 120, 17), (50, 17), "binary"),
    ("identity", (1, 5, 5), (5, 5), "noise"),
    ("one_pixel_up", (1, 1, 1), (3, 3), "noise"),
    ("one_row", (1, 1, 100), (4, 4), "noise"),
    ("one_column", (1, 100, 1), (4, 4), "smooth"),
    ("strip_2048_to_512", (1, 8, 2048), (8, 512), "binary"),
    ("strip_2048_to_384", (1, 8, 2048), (8, 384), "noise"),
    ("column_1152_to_512", (1, 1152, 6), (512, 6), "binary"),
    ("ratio_150", (1, 6, 900), (2, 6), "noise"),
    ("odd_65x49_to_512", (1, 49, 65), (512, 512), "scene"),
    ("odd_up_to_even", (1, 49, 65), (1536, 2048), "smooth"),
    ("near_identity_down", (1, 64, 513), (64, 512), "binary"),
    ("near_identity_up", (1, 511, 16), (512, 16), "noise"),
    ("x_1_5_down", (1, 48, 768), (48, 512), "binary"),
    ("x_2_25_down", (1, 1152, 4), (512, 4), "noise"),
    ("x_3_down", (1, 12, 1536), (12, 512), "binary"),
    ("x_3_75_down", (1, 1440, 4), (384, 4), "binary"),
    ("x_4_down_2d", (1, 256, 256), (64, 64), "scene"),
    ("x_5_33_down", (1, 16, 2048), (16, 384), "binary"),
    ("x_8_down", (1, 512, 24), (64, 24), "binary"),
    ("x_16_5_up", (1, 4, 31), (66, 512), "noise"),
    ("portrait_up", (1, 96, 48), (2048, 1024), "scene"),
    ("batch_of_4", (4, 30, 40), (36, 48), "noise"),
    ("stage1_720p_strip", (1, 4, 1280), (4, 2048), "scene"),
    ("stage1_1080p_strip", (1, 1080, 4), (1152, 4), "scene"),
    ("stage2_from_2048x1152_strip", (1, 1152, 8), (512, 8), "scene"),
]

# (total_num_frames, duration, video_fps, fps, max_frames, skip_secs)
SAMPLING_CASES = [
    (1750, 70.0, 25.0, 1, 64, 1),  # 64 frames 25, 51, …, 1725
    (1750, 70.0, 25.0, 2, 64, 1),
    (1750, 70.0, 25.0, 1, 8, 1),
    (300, 300 / (30000 / 1001), 30000 / 1001, 1, 64, 1),  # 29.97 fps, 10.01 s
    (2997, 2997 / (30000 / 1001), 30000 / 1001, 1, 64, 1),  # 100 s at 29.97
    (2997, 2997 / (30000 / 1001), 30000 / 1001, 0.5, 64, 1),
    (1, 0.04, 25.0, 1, 64, 1),  # one frame
    (5, 0.2, 25.0, 1, 64, 1),  # 0.2 s
    (12, 0.5, 24.0, 1, 64, 1),  # round(0.5) = 0 → one frame
    (60, 2.5, 24.0, 1, 64, 1),  # round(2.5) = 2 (banker's rounding)
    (84, 3.5, 24.0, 1, 64, 1),  # round(3.5) = 4
    (72, 3.0, 24.0, 2, 64, 1),
    (240, 10.0, 24.0, 1, 64, 1),
    (240, 10.0, 24.0, 24, 64, 1),  # every frame wanted, 64 kept
    (240, 10.0, 24.0, 30, 300, 1),  # more wanted than there are: duplicates removed
    (1584, 66.0, 24.0, 1, 64, 1),  # duration − 2 == max_frames·fps: no skip
    (1608, 67.0, 24.0, 1, 64, 1),  # just over: skip
    (1608, 67.0, 24.0, 1, 64, 0),  # skip_secs 0
    (1608, 67.0, 24.0, 1, 64, 2),
    (1608, 67.0, 24.0, 1, 64, 0.5),
    (250, 10.0, 25.0, 1, 2, 1),  # skip decided by max_frames (2·1 < 8), not by desired
    (25, 1.0, 25.0, 1, 64, 1),
    (3, 4.0, 0.75, 1, 64, 1),  # a slide show: 3 frames over 4 s
    (100, 3.3333333333333335, 30.0, 1, 64, 1),
    (901, 30.033333333333335, 30.0, 1, 64, 1),  # count and duration slightly inconsistent
    (48, 2.0, 23.976023976023978, 1, 64, 1),
    (36000, 1200.0, 30.0, 1, 64, 1),  # 20 minutes
    (7, 7.0, 1.0, 1, 64, 1),
    (10, 100.0, 0.1, 1, 64, 1),  # skip start/end beyond the clip: falls back to the whole clip
]

# (name, shape (N, H, W), kind, image_mean, image_std, rescale_factor)
NORMALIZE_CASES = [
    ("default", (2, 16, 16), "noise", None, None, None),
    ("all_levels", (1, 16, 16), "ramp", None, None, None),
    ("imagenet", (1, 16, 16), "ramp", [0.485, 0.456, 0.406], [0.229, 0.224, 0.225], None),
    ("odd_rescale", (1, 16, 16), "ramp", [0.3, 0.5, 0.7], [0.2, 0.25, 0.9], 1 / 256),
]

# (name, (N, H, W), kind): frame stacks for the whole processor at SmolVLM2-256M/500M's settings
PROCESSOR_CASES = [
    ("1080p_scene", (2, 1080, 1920), "scene"),
    ("720p_scene", (2, 720, 1280), "scene"),
    ("480p_noise", (1, 480, 640), "noise"),
    ("portrait_1080x1920", (1, 1920, 1080), "scene"),
    ("tiny_96x64", (3, 64, 96), "scene"),
    ("odd_65x49", (2, 49, 65), "binary"),
    ("square_2048", (1, 2048, 2048), "smooth"),  # stage 1 is no resize
    ("1080p_picture", (2, 1080, 1920), "picture"),
]
REAL_SETTINGS = {"size": {"longest_edge": 2048}, "max_image_size": {"longest_edge": 512},
                 "video_sampling": {"fps": 1, "max_frames": 64, "video_size": {"longest_edge": 512}}}

# preprocessor configs → the settings SmolVLMVideoProcessor(**config) ends up with
SETTINGS_CASES = [
    ("smolvlm2_256m", REAL_SETTINGS),
    ("smolvlm2_2b", {"size": {"longest_edge": 1536}, "max_image_size": {"longest_edge": 384},
                     "video_sampling": {"fps": 1, "max_frames": 64, "video_size": {"longest_edge": 384}},
                     "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5], "rescale_factor": 1 / 255,
                     "resample": 1}),
    ("no_size", {"max_image_size": {"longest_edge": 512},
                 "video_sampling": {"fps": 2.5, "max_frames": 16, "video_size": {"longest_edge": 1024}}}),
    ("no_max_image_size", {"size": {"longest_edge": 1456}, "video_sampling": {"fps": 1, "max_frames": 8,
                                                                            "video_size": {"longest_edge": 364}}}),
    ("custom_norm", {"size": {"longest_edge": 2048}, "max_image_size": {"longest_edge": 512},
                     "image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225],
                     "rescale_factor": 0.00392156862745098,
                     "video_sampling": {"fps": 1, "max_frames": 64, "video_size": {"longest_edge": 512}}}),
]

# (height, width, longest_edge): stage 1's output size
STAGE1_CASES = [(1080, 1920, 2048), (720, 1280, 2048), (480, 640, 2048), (1920, 1080, 2048), (64, 96, 2048),
                (49, 65, 2048), (2048, 2048, 2048), (1080, 1920, 1536), (100, 7, 2048), (7, 100, 2048),
                (1, 4096, 2048), (4096, 1, 2048), (1, 5000, 2048), (333, 1000, 2048), (1000, 333, 2048),
                (1000, 333, 5000), (333, 1000, 5000), (1081, 1920, 2048), (1079, 1919, 2048), (576, 720, 2048),
                (1088, 1920, 2048), (360, 480, 1536), (2160, 3840, 2048), (3840, 2160, 2048), (99, 99, 2048)]


# --- inputs (integer arithmetic only: the same bytes on every numpy) --------------------------------------------------

def _mix(values: np.ndarray, seed: int) -> np.ndarray:
    """lowbias32 of uint32 values: a fixed, version-independent integer hash."""
    z = values.astype(np.uint32) ^ np.uint32((0x9E3779B9 * (seed + 1)) & 0xFFFFFFFF)
    z ^= z >> np.uint32(16)
    z *= np.uint32(0x7FEB352D)
    z ^= z >> np.uint32(15)
    z *= np.uint32(0x846CA68B)
    z ^= z >> np.uint32(16)
    return z


def frames(shape: tuple[int, int, int], kind: str, seed: int = 0) -> np.ndarray:
    """uint8 (N, H, W, 3) frames of ``kind``: noise (uniform bytes), binary (0/255), smooth (gradients),
    scene (moving shapes and stripes over gradients with a little noise, like decoded video), ramp (every
    level 0..255 in turn), picture (the calibration picture tiled and shifted per frame)."""
    n, h, w = shape
    if kind == "picture":
        return _picture_frames(n, h, w)
    idx = np.arange(n * h * w * 3, dtype=np.uint32).reshape(n, h, w, 3)
    if kind == "ramp":
        return (idx & np.uint32(255)).astype(np.uint8)
    noise = (_mix(idx, seed) >> np.uint32(24)).astype(np.uint8)  # 0..255
    if kind == "noise":
        return noise
    if kind == "binary":
        return (noise & np.uint8(1)) * np.uint8(255)
    t = np.arange(n, dtype=np.int32)[:, None, None, None]
    y = np.arange(h, dtype=np.int32)[None, :, None, None]
    x = np.arange(w, dtype=np.int32)[None, None, :, None]
    c = np.arange(3, dtype=np.int32)[None, None, None, :]
    smooth = ((x * 255 // max(w - 1, 1) * (c + 1) + y * 255 // max(h - 1, 1) * (3 - c) + t * 17) >> 2) & 255
    if kind == "smooth":
        return smooth.astype(np.uint8)
    if kind != "scene":
        raise ValueError(f"unknown kind {kind!r}")
    cx, cy, r = (w * (3 + t) // 8), (h // 2), max(min(h, w) // 5, 1)
    disc = (x - cx) ** 2 + (y - cy) ** 2 <= r * r
    box = (np.abs(x - w // 4) < max(w // 10, 1)) & (np.abs(y - h // 3 - 2 * t) < max(h // 8, 1))
    stripes = ((x // max(w // 60, 1) + y // max(h // 40, 1)) % 2 == 0) & (y > h * 3 // 4)
    scene = smooth.astype(np.uint8)
    scene[np.broadcast_to(disc, (n, h, w, 1))[..., 0]] = (230, 40, 30)
    scene[np.broadcast_to(box, (n, h, w, 1))[..., 0]] = (20, 60, 200)
    flip = np.broadcast_to(stripes, (n, h, w, 1))[..., 0]
    scene[flip] = 255 - scene[flip]
    return np.clip(scene.astype(np.int16) + (noise & np.uint8(7)) - 4, 0, 255).astype(np.uint8)


def _picture_frames(n: int, h: int, w: int) -> np.ndarray:
    from PIL import Image

    with Image.open(CALIBRATION_PICTURE) as im:
        picture = np.asarray(im.convert("RGB"))
    ph, pw = picture.shape[:2]
    rows, cols = -(-(h + 64 * n) // ph), -(-(w + 64 * n) // pw)
    big = np.tile(picture, (rows, cols, 1))
    return np.stack([big[16 * i: 16 * i + h, 24 * i: 24 * i + w] for i in range(n)])


def sha256(array: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()


def file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --- references (torch, torchvision, transformers) --------------------------------------------------------------------

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()

    import torch
    import torchvision
    import transformers
    from torchvision.transforms.v2 import functional as tvF
    from transformers.models.smolvlm.video_processing_smolvlm import SmolVLMVideoProcessor, get_resize_output_image_size
    from transformers.video_utils import VideoMetadata

    lanczos = tvF.InterpolationMode.LANCZOS

    def tv_resize(x: np.ndarray, size: tuple[int, int], channels_last: bool = False) -> np.ndarray:
        t = torch.from_numpy(x).permute(0, 3, 1, 2)
        t = t.contiguous(memory_format=torch.channels_last) if channels_last else t.contiguous()
        return tvF.resize(t, list(size), interpolation=lanczos, antialias=True).permute(0, 2, 3, 1).numpy()

    resize = []
    for seed, (name, shape, size, kind) in enumerate(RESIZE_CASES):
        x = frames(shape, kind, seed)
        out = tv_resize(x, size)
        assert np.array_equal(out, tv_resize(x, size, channels_last=True)), name
        resize.append({"name": name, "shape": list(shape), "size": list(size), "kind": kind, "seed": seed,
                       "out_shape": list(out.shape), "sha256": sha256(out)})

    vp = SmolVLMVideoProcessor(**json.loads(json.dumps(REAL_SETTINGS)))
    sampling = []
    for total, duration, video_fps, fps, max_frames, skip in SAMPLING_CASES:
        meta = VideoMetadata(total_num_frames=total, fps=video_fps, duration=duration)
        indices = vp.sample_frames(meta, num_frames=max_frames, fps=fps, skip_secs=skip)
        meta.frames_indices = indices
        sampling.append({"total_num_frames": total, "duration": duration, "video_fps": video_fps, "fps": fps,
                         "max_frames": max_frames, "skip_secs": skip, "indices": [int(i) for i in indices],
                         "timestamps": [float(t) for t in meta.timestamps]})

    settings = []
    for name, config in SETTINGS_CASES:
        p = SmolVLMVideoProcessor(**json.loads(json.dumps(config)))
        settings.append({"name": name, "config": config, "fps": p.fps, "num_frames": p.num_frames,
                         "size": dict(p.size), "max_image_size": dict(p.max_image_size),
                         "image_mean": list(p.image_mean), "image_std": list(p.image_std),
                         "rescale_factor": p.rescale_factor, "resample": int(p.resample)})

    stage1 = []
    for h, w, longest in STAGE1_CASES:
        dummy = torch.empty_strided((1, 3, h, w), (0, 0, 0, 0), dtype=torch.uint8)
        stage1.append({"height": h, "width": w, "longest_edge": longest,
                       "size": list(get_resize_output_image_size(dummy, resolution_max_side=longest))})

    normalize = []
    for seed, (name, shape, kind, mean, std, rescale) in enumerate(NORMALIZE_CASES):
        x = frames(shape, kind, seed)
        video = torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()[None]  # (1, T, C, H, W) as _preprocess has it
        kwargs = {"image_mean": mean or vp.image_mean, "image_std": std or vp.image_std,
                  "rescale_factor": rescale or vp.rescale_factor}
        out = vp.rescale_and_normalize(video, True, kwargs["rescale_factor"], True, tuple(kwargs["image_mean"]),
                                       tuple(kwargs["image_std"]))[0].numpy()
        assert out.dtype == np.float32
        normalize.append({"name": name, "shape": list(shape), "kind": kind, "seed": seed,
                          "image_mean": list(kwargs["image_mean"]), "image_std": list(kwargs["image_std"]),
                          "rescale_factor": kwargs["rescale_factor"], "sha256": sha256(out)})

    processor = []
    for seed, (name, shape, kind) in enumerate(PROCESSOR_CASES):
        x = frames(shape, kind, seed)
        result = vp(videos=[x], do_sample_frames=False, return_tensors="pt")
        pixel_values = result["pixel_values"][0].numpy()
        assert bool(result["pixel_attention_mask"].all())
        from transformers.image_utils import SizeDict
        resized = vp.resize(torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()[None],
                            size=SizeDict(**vp.size), resample=vp.resample)
        resized = resized[0].permute(0, 2, 3, 1).numpy()
        processor.append({"name": name, "shape": list(shape), "kind": kind, "seed": seed,
                          "resized_shape": list(resized.shape), "resized_sha256": sha256(resized),
                          "pixel_values_shape": list(pixel_values.shape), "pixel_values_sha256": sha256(pixel_values)})

    goldens = {
        "made_by": "scripts/make_lanczos_goldens.py",
        "versions": {"torch": torch.__version__, "torchvision": torchvision.__version__,
                     "transformers": transformers.__version__, "numpy": np.__version__,
                     "cpu_capability": torch.backends.cpu.get_cpu_capability(), "machine": platform.machine(),
                     "ATEN_CPU_CAPABILITY": os.environ.get("ATEN_CPU_CAPABILITY", "")},
        "calibration_picture": {"path": str(CALIBRATION_PICTURE.relative_to(ROOT)),
                                "sha256": file_sha256(CALIBRATION_PICTURE)},
        "processor_settings": REAL_SETTINGS,
        "resize": resize, "sampling": sampling, "settings": settings, "stage1": stage1, "normalize": normalize,
        "processor": processor,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(goldens, indent=1) + "\n")
    print(f"wrote {args.out}: {len(resize)} resizes, {len(sampling)} samplings, {len(settings)} settings, "
          f"{len(stage1)} stage-1 sizes, {len(normalize)} normalisations, {len(processor)} processor runs")


if __name__ == "__main__":
    main()

"""The video pipeline against transformers' goldens, with nothing from the host: run as
``python tests/support/video_board_path.py BUNDLE`` by test_video_parity.py. torch, transformers, onnx,
onnxruntime and rknn are blocked before anything else is imported; then for every golden case the board
path (probe_video → sample_indices → frame_timestamps → read_frames → resize_frames → normalize_frames)
and the runner's prompt (fake engines, the bundle's tokenizer and video template) are compared with
``tests/data/video/processor_goldens.json``. Prints one JSON line: the cases checked, the mismatches
(empty when everything is identical) and the host-only modules that got loaded (must be none).

The helpers here (no torch at module level) are shared with test_video_parity.py.
"""

from __future__ import annotations

import hashlib
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
CLIPS_DIR = ROOT / "tests" / "data" / "video"
GOLDENS_PATH = CLIPS_DIR / "processor_goldens.json"
# Cases whose prompt follows the runtime's own rule where transformers is not self-consistent
# (DESIGN.md §8): their ids are checked against the golden's per-part reference.
PER_PART = ("two_videos", "video_image")


def load_goldens() -> dict:
    return json.loads(GOLDENS_PATH.read_text())


def sha256(array) -> str:
    return hashlib.sha256(array if isinstance(array, bytes) else np.ascontiguousarray(array).tobytes()).hexdigest()


def synthetic_image(width: int, height: int, seed: int) -> np.ndarray:
    """The picture of the video+image case (scripts/make_video_goldens.py draws the same one)."""
    rng = np.random.RandomState(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 // max(width - 1, 1), y * 255 // max(height - 1, 1), (x * y) % 256], -1)
    return ((base + rng.randint(0, 40, base.shape)) % 256).astype(np.uint8)


def case_messages(case: dict, goldens: dict) -> list[dict]:
    """A golden case's conversation as the runtime takes it: video parts carry their path and the
    request's sampling (transformers' num_frames is our max_frames), the image part its pixels."""
    from PIL import Image

    sampling = case["sampling"]
    out = []
    for m in case["messages"]:
        content = []
        for p in m["content"]:
            if p["type"] == "video":
                content.append({"type": "video", "video": str(CLIPS_DIR / p["clip"]), "fps": sampling.get("fps"),
                                "max_frames": sampling.get("num_frames")})
            elif p["type"] == "image":
                image = goldens_image(case)
                content.append({"type": "image", "image": Image.fromarray(image)})
            else:
                content.append(p)
        out.append({"role": m["role"], "content": content})
    return out


def goldens_image(case: dict) -> np.ndarray:
    spec = case["image"]
    image = synthetic_image(spec["width"], spec["height"], spec["seed"])
    if sha256(image) != spec["rgb_sha256"]:
        raise AssertionError("the synthetic image differs from the one the goldens were made with")
    return image


@dataclass
class Frames:
    """One video through the board's frame pipeline."""

    info: object  # VideoInfo
    indices: list[int]
    timestamps: list[float]
    decoded: np.ndarray  # (n, H, W, 3) uint8
    resized: np.ndarray  # (n, S, S, 3) uint8
    pixel_values: np.ndarray  # (n, 3, S, S) float32


def frame_pipeline(path: Path, settings, fps: float | None = None, max_frames: int | None = None) -> Frames:
    """probe → sample → timestamps → decode → resize → normalise, with ``settings`` (VideoSettings)
    and the request's sampling (None: the settings')."""
    from rksmolvlm.processing.video import VideoLimits, probe_video, read_frames
    from rksmolvlm.processing.video_frames import frame_timestamps, normalize_frames, resize_frames, sample_indices

    limits = VideoLimits()
    info = probe_video(str(path), limits)
    indices = sample_indices(info.total_num_frames, info.duration, info.fps, fps or settings.fps,
                             max_frames or settings.max_frames, settings.skip_secs)
    timestamps = frame_timestamps(indices, info.fps)
    decoded = read_frames(str(path), [int(i) for i in indices], limits)
    resized = resize_frames(decoded, settings)
    return Frames(info, [int(i) for i in indices], [float(t) for t in timestamps], decoded, resized,
                  normalize_frames(resized, settings))


def compare_frames(golden: dict, frames: Frames) -> list[str]:
    """Where ``frames`` differ from a golden video: empty when indices, timestamps, decoded frames,
    resized frames and pixel values are all identical; else the first differing frame of each stage."""
    problems = []
    if frames.indices != golden["indices"]:
        return [f"indices {frames.indices} != transformers' {golden['indices']}"]
    if frames.timestamps != golden["timestamps"]:
        k = next(k for k, (a, b) in enumerate(zip(frames.timestamps, golden["timestamps"])) if a != b)
        problems.append(f"timestamp of frame {k}: {frames.timestamps[k]!r} != {golden['timestamps'][k]!r}")
    for stage, arrays, key in (("decoded", frames.decoded, "decoded_sha256"),
                               ("resized", frames.resized, "frame_u8_sha256"),
                               ("pixel values", frames.pixel_values, "frame_sha256")):
        if key not in golden:
            continue
        got = [sha256(a) for a in arrays]
        bad = [k for k, (a, b) in enumerate(zip(got, golden[key])) if a != b]
        if bad or len(got) != len(golden[key]):
            problems.append(f"{stage}: frames {bad} of {len(golden[key])} differ"
                            + (f" (first: frame {bad[0]})" if bad else f" (got {len(got)} frames)"))
    if frames.pixel_values.dtype != np.float32 or sha256(frames.pixel_values) != golden["pixel_sha256"]:
        problems.append(f"pixel values ({frames.pixel_values.dtype}, {frames.pixel_values.shape}) hash differs")
    return problems


def clip_metadata_problems(goldens: dict, clip: str, info) -> list[str]:
    want = goldens["clips"][clip]
    got = {"total_num_frames": info.total_num_frames, "fps": float(info.fps), "duration": float(info.duration),
           "width": info.width, "height": info.height}
    return [f"{clip} {k}: {got[k]!r} != transformers' {want[k]!r}" for k in got if got[k] != want[k]]


def video_runner(bundle, vision, llm):
    """A Runner that samples videos as transformers does (the checkpoint's fps and max_frames, not the
    board's latency defaults)."""
    from rksmolvlm.runtime.runner import Runner
    from rksmolvlm.runtime.video import VideoOptions

    return Runner(bundle, vision, llm, video=VideoOptions(max_frames=None))


def main(bundle_dir: str) -> None:
    from support.fakes import FakeLlm, FakeVision
    from rksmolvlm.runtime.engines import GenerationConfig
    from rksmolvlm.runtime.loader import RuntimeBundle

    goldens = load_goldens()
    bundle = RuntimeBundle.open(bundle_dir)
    settings = bundle.video_settings
    problems: list[str] = []
    checked = []
    for case in goldens["cases"]:
        for video in case["videos"]:
            frames = frame_pipeline(CLIPS_DIR / video["clip"], settings, case["sampling"].get("fps"),
                                    case["sampling"].get("num_frames"))
            problems += [f"{case['name']} {video['clip']}: {p}"
                         for p in clip_metadata_problems(goldens, video["clip"], frames.info)
                         + compare_frames(video, frames)]
        runner = video_runner(bundle, FakeVision.for_bundle(bundle), FakeLlm([bundle.stop_ids[0]]))
        generation = runner.generate(case_messages(case, goldens), GenerationConfig(max_new_tokens=1)).consume()
        runner.close()
        want = case["reference_ids"] if case["name"] in PER_PART else case["input_ids"]
        if generation.prefill_ids != want:
            k = next((k for k, (a, b) in enumerate(zip(generation.prefill_ids, want)) if a != b),
                     min(len(want), len(generation.prefill_ids)))
            problems.append(f"{case['name']}: prompt ids differ at {k} (lengths {len(generation.prefill_ids)}, "
                            f"{len(want)})")
        checked.append(case["name"])
    from support.board_path import HOST_ONLY

    loaded = sorted({m.split(".")[0] for m in sys.modules} & set(HOST_ONLY))
    print(json.dumps({"checked": checked, "problems": problems, "host_only_loaded": loaded}))


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: the support package
    from support.board_path import BlockHostOnly

    sys.meta_path.insert(0, BlockHostOnly())
    main(sys.argv[1])

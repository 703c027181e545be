#!/usr/bin/env python3
"""Write tests/data/video/decode_goldens.json: what transformers' default video backend (torchcodec)
gives for the test clips, for tests/processing/test_video_decode.py.

Runs in a reference environment with torch, torchvision, transformers and torchcodec (never in the
test suite, which has none of them)::

    /tmp/ref-venv/bin/python scripts/make_video_decode_goldens.py

Recorded:

- ``clips``: for every good clip, the metadata transformers' torchcodec loader reports
  (``read_video_torchcodec``: total_num_frames, fps, duration, width, height, kept as the JSON
  numbers torchcodec gives), the indices SmolVLM2's sampler picks (fps 1, max_frames 64,
  skip_secs 1), and the sha256 of each RGB frame (H×W×3 uint8, C order) the loader returns for the
  golden indices: every frame of the short clips, the 64 sampled frames of the 70 s clip.
- ``converter``: the yuv420p → rgb24 conversion over all 2^24 (Y, U, V) triples, per colour matrix
  and range. 64 frames of 512×512 hold every triple once (frame f, pixel (r, c): U = r // 2,
  V = c // 2, Y = 4f + 2(r % 2) + (c % 2)); they are encoded losslessly (x264 qp 0) with the matrix
  and range tags, decoded by torchcodec, and the RGB frames hashed in order (one sha256 per config).
  The script checks that the decoded planes are the synthetic ones before trusting a hash.
- ``reference``: the versions and CPU that produced the numbers.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parent.parent
VIDEO_DIR = REPO_ROOT / "tests" / "data" / "video"
OUT = VIDEO_DIR / "decode_goldens.json"

GOOD_CLIPS = [
    "h264_24fps_96x64.mp4", "h264_29.97fps_96x64.mp4", "h264_25fps_bframes_96x64.mp4", "h264_70s_25fps_64x48.mp4",
    "h264_bt709_96x64.mp4", "h264_bt709_80x48.mp4", "h264_fullrange_96x64.mp4", "h264_fullrange_bt709_80x48.mp4",
    "h264_portrait_48x96.mp4", "h264_90x50.mp4", "h264_rotate90_96x64.mp4", "h264_rotate180_96x64.mp4",
    "h264_rotate270_96x64.mp4", "hevc_96x64.mp4", "vp8_96x64.webm", "vp9_96x64.webm", "vp9_fullrange_96x64.webm",
    "vp9_fullrange_80x48.webm", "av1_96x64.webm",
]
ALL_FRAMES_UP_TO = 200  # clips with more frames get their sampled frames hashed, not all
SAMPLING = {"fps": 1, "max_frames": 64, "video_size": {"longest_edge": 512}}  # SmolVLM2-256M/500M-Video

# (AVColorSpace number, ffmpeg -colorspace name, full range)
CONVERTER_CONFIGS = [
    (2, None, False), (2, None, True), (1, "bt709", False), (1, "bt709", True), (4, "fcc", False),
    (7, "smpte240m", False), (9, "bt2020nc", False), (9, "bt2020nc", True),
]
SIDE = 512
FRAMES = 64


def frame_sha256(frame: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(frame, dtype=np.uint8).tobytes()).hexdigest()


def exhaustive_planes(f: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Frame f of the all-triples set (also built by tests/processing/test_video_decode.py)."""
    r = np.arange(SIDE)[:, None]
    c = np.arange(SIDE)[None, :]
    y = (4 * f + 2 * (r % 2) + (c % 2)).astype(np.uint8)
    u = np.repeat(np.arange(SIDE // 2, dtype=np.uint8)[:, None], SIDE // 2, axis=1)
    v = np.repeat(np.arange(SIDE // 2, dtype=np.uint8)[None, :], SIDE // 2, axis=0)
    return np.broadcast_to(y, (SIDE, SIDE)).copy(), u, v


def clip_goldens() -> dict:
    from transformers.models.smolvlm.video_processing_smolvlm import SmolVLMVideoProcessor
    from transformers.video_utils import load_video

    processor = SmolVLMVideoProcessor(video_sampling=SAMPLING)
    clips = {}
    for name in GOOD_CLIPS:
        path = str(VIDEO_DIR / name)
        sampled: list[int] = []

        def pick(metadata, sampled=sampled, **kwargs):
            sampled[:] = [int(i) for i in processor.sample_frames(metadata)]
            if metadata.total_num_frames <= ALL_FRAMES_UP_TO:
                return np.arange(metadata.total_num_frames)
            return np.asarray(sampled)

        video, metadata = load_video(path, backend="torchcodec", sample_indices_fn=pick)
        frames = video.permute(0, 2, 3, 1).contiguous().numpy()  # torchcodec gives N×C×H×W
        indices = [int(i) for i in metadata.frames_indices]
        clips[name] = {
            "total_num_frames": metadata.total_num_frames,
            "fps": metadata.fps,
            "duration": metadata.duration,
            "width": metadata.width,
            "height": metadata.height,
            "sampled_indices": sampled,
            "frame_indices": indices,
            "frame_sha256": [frame_sha256(frame) for frame in frames],
        }
        print(f"{name}: {metadata.total_num_frames} frames, fps {metadata.fps!r}, duration {metadata.duration!r}, "
              f"{metadata.width}x{metadata.height}, {len(indices)} hashed", flush=True)
    return clips


def converter_goldens() -> list[dict]:
    import av
    from torchcodec.decoders import VideoDecoder

    results = []
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "all.yuv"
        with raw.open("wb") as fh:
            for f in range(FRAMES):
                for plane in exhaustive_planes(f):
                    fh.write(plane.tobytes())
        for colorspace, tag, full in CONVERTER_CONFIGS:
            clip = Path(tmp) / f"cs{colorspace}_{'pc' if full else 'tv'}.mkv"
            cmd = ["ffmpeg", "-hide_banner", "-loglevel", "error", "-nostdin", "-y", "-f", "rawvideo",
                   "-pix_fmt", "yuv420p", "-s", f"{SIDE}x{SIDE}", "-r", "25", "-i", str(raw),
                   "-c:v", "libx264", "-preset", "ultrafast", "-qp", "0", "-pix_fmt", "yuv420p",
                   "-color_range", "pc" if full else "tv"]
            if tag:
                cmd += ["-colorspace", tag]
            subprocess.run([*cmd, str(clip)], check=True)
            with av.open(str(clip)) as container:  # lossless: the planes are the synthetic ones
                for f, frame in enumerate(container.decode(video=0)):
                    for index, want in enumerate(exhaustive_planes(f)):
                        plane = frame.planes[index]
                        rows = np.frombuffer(plane, np.uint8).reshape(-1, plane.line_size)
                        got = rows[:want.shape[0], :want.shape[1]]
                        if not np.array_equal(got, want):
                            raise SystemExit(f"{clip.name}: frame {f} plane {index} is not lossless")
                    if frame.colorspace != colorspace or frame.color_range != (2 if full else 1):
                        raise SystemExit(f"{clip.name}: tags came out as {frame.colorspace}/{frame.color_range}")
            decoder = VideoDecoder(str(clip), seek_mode="exact", num_ffmpeg_threads=0, device="cpu")
            frames = decoder.get_frames_at(indices=list(range(FRAMES))).data.permute(0, 2, 3, 1).contiguous().numpy()
            digest = hashlib.sha256()
            for frame in frames:
                digest.update(frame.tobytes())
            results.append({"colorspace": colorspace, "full_range": full, "sha256": digest.hexdigest()})
            print(f"converter colorspace {colorspace} {'pc' if full else 'tv'}: {digest.hexdigest()[:16]}", flush=True)
    return results


def reference() -> dict:
    import torch
    import torchcodec
    import transformers
    from torchcodec._core import get_ffmpeg_library_versions

    flags = set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    except OSError:
        pass
    return {
        "torchcodec": torchcodec.__version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "ffmpeg": get_ffmpeg_library_versions(),
        "machine": platform.machine(),
        "cpu_flags": sorted(flags & {"sse2", "ssse3", "sse4_2", "avx", "avx2", "avx512f"}),
    }


def main(argv: list[str] | None = None) -> int:
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args(argv)
    try:
        import torchcodec  # noqa: F401 - checked first: the goldens are torchcodec's answers
    except ImportError as exc:
        sys.exit(f"torchcodec is not importable here ({exc}): run this in the reference venv (see --help)")
    goldens = {"reference": reference(), "clips": clip_goldens(), "converter": converter_goldens()}
    OUT.write_text(json.dumps(goldens, indent=1) + "\n", encoding="utf-8")
    print(f"wrote {OUT} ({OUT.stat().st_size / 1024:.0f} KiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

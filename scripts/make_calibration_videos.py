#!/usr/bin/env python3
"""Generate the shipped calibration video clips from the shipped calibration images.

The decoder calibration set (``calibration/prompts.json``) has video samples so that SmolVLM2's
video-frame activations are covered when the decoder is quantized. The clips are made here from
images already in ``calibration/images/`` (public-domain / CC0 photos and this project's own
generated images, see ``calibration/LICENSES.md``), so they carry the same licences:

* ``video_astronaut_zoom_out.mp4`` — a slow zoom out from the astronaut's face to the whole
  portrait (flag on the left, Space Shuttle model on the right, helmet in front), then a hold.
* ``video_report_scroll.mp4`` — a scroll from the top to the bottom of the water-quality report
  page, with a short hold at the top and at the bottom.
* ``video_chart_drawing.mp4`` — the monthly temperature line chart drawn from left to right: title,
  axis and legend are there from the start, the four lines grow month by month from January to
  December, then the finished chart holds.

Usage::

    .venv/bin/python scripts/make_calibration_videos.py [--out DIR] [--only NAME ...]

Encoding uses PyAV (``pip install av``: the project's own video dependency; its wheels bundle FFmpeg
with libx264), not the ffmpeg command line: H.264 (High profile), 8-bit yuv420p tagged BT.601 limited
range, even frame sizes, constant frame rate, a keyframe at least every 10 s, one encoder thread, no
B-frames, in MP4 with the moov atom first. Frames are drawn with Pillow (LANCZOS crops and resizes)
and converted to yuv420p by FFmpeg's swscale in PyAV.
Frame content is deterministic; the bytes of the files also depend on the libx264/FFmpeg build
(the committed clips were made with PyAV 18.1.0 — see the size/sha256 lines the script prints).
"""

from __future__ import annotations

import argparse
import hashlib
import math
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

REPO_ROOT = Path(__file__).resolve().parent.parent
IMAGES = REPO_ROOT / "calibration" / "images"
DEFAULT_OUT = REPO_ROOT / "calibration" / "videos"
MAX_BYTES = 150_000  # each clip stays small: they ship in the wheel


@dataclass(frozen=True)
class Clip:
    name: str
    size: tuple[int, int]  # width, height (even)
    fps: int
    seconds: float
    crf: int
    frames: Callable[[Clip], Iterator[Image.Image]]

    @property
    def count(self) -> int:
        return round(self.fps * self.seconds)


def _ease(t: float) -> float:
    """Smooth start and stop (0 → 1)."""
    t = min(max(t, 0.0), 1.0)
    return 0.5 - 0.5 * math.cos(math.pi * t)


def _progress(i: int, clip: Clip, start: float, end: float) -> float:
    """Where frame ``i`` is in the move that runs from ``start`` to ``end`` seconds (0 → 1)."""
    return _ease((i / clip.fps - start) / (end - start))


def astronaut_zoom_out(clip: Clip) -> Iterator[Image.Image]:
    """From the face (a 150-pixel square around it) out to the whole 512×512 portrait in 8 s, then a
    2 s hold on the whole picture."""
    photo = Image.open(IMAGES / "photo_astronaut_square.jpg").convert("RGB")
    face_cx, face_cy, face_side = 226.0, 115.0, 150.0
    full_cx, full_cy, full_side = photo.width / 2, photo.height / 2, float(photo.width)
    for i in range(clip.count):
        p = _progress(i, clip, 0.0, 8.0)
        side = face_side + (full_side - face_side) * p
        cx = face_cx + (full_cx - face_cx) * p
        cy = face_cy + (full_cy - face_cy) * p
        box = (cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2)
        yield photo.resize(clip.size, Image.Resampling.LANCZOS, box=box)


def report_scroll(clip: Clip) -> Iterator[Image.Image]:
    """The report page at the clip's width; the view holds 1 s at the top, scrolls to the bottom in
    10 s, then holds 1 s."""
    page = Image.open(IMAGES / "doc_report_page_a4.png").convert("RGB")
    width, height = clip.size
    scale = width / page.width
    page = page.resize((width, round(page.height * scale)), Image.Resampling.LANCZOS)
    travel = page.height - height
    for i in range(clip.count):
        top = round(travel * _progress(i, clip, 1.0, 11.0))
        yield page.crop((0, top, width, top + height))


def chart_drawing(clip: Clip) -> Iterator[Image.Image]:
    """The line chart with its plot uncovered from left to right: title, y axis, legend and note are
    there from the first frame; the lines (and the month labels under them) are drawn from January
    (t = 0.5 s) to December (t = 8 s); the finished chart holds for the last 2 s."""
    chart = Image.open(IMAGES / "chart_line_temperature.png").convert("RGB")
    # the plot area and the month labels, from just right of the y axis to just past December
    left, top, right, bottom = 113, 95, 1125, 650
    background = chart.getpixel((1300, 650))
    for i in range(clip.count):
        p = _progress(i, clip, 0.5, 8.0)
        edge = round(left + (right - left) * p)
        frame = chart.copy()
        if edge < right:
            frame.paste(background, (edge, top, right, bottom))
        yield frame.resize(clip.size, Image.Resampling.LANCZOS)


CLIPS = [
    Clip("video_astronaut_zoom_out.mp4", (384, 384), 10, 10.0, 28, astronaut_zoom_out),
    Clip("video_report_scroll.mp4", (640, 360), 8, 12.0, 30, report_scroll),
    Clip("video_chart_drawing.mp4", (640, 320), 10, 10.0, 26, chart_drawing),
]


def encode(clip: Clip, path: Path) -> None:
    """Write ``clip`` as H.264 yuv420p MP4 with PyAV."""
    import av

    if clip.size[0] % 2 or clip.size[1] % 2:
        raise ValueError(f"{clip.name}: yuv420p needs even frame sizes, not {clip.size}")
    tmp = path.with_suffix(".tmp.mp4")
    with av.open(str(tmp), "w", options={"movflags": "+faststart"}) as container:
        stream = container.add_stream("libx264", rate=clip.fps)
        stream.width, stream.height = clip.size
        stream.pix_fmt = "yuv420p"
        stream.codec_context.thread_count = 1  # one thread: the same bytes on every machine with this build
        # tagged as what swscale's RGB → yuv420p conversion writes: BT.601 (SMPTE 170M), limited range
        context = stream.codec_context
        context.colorspace = context.color_primaries = context.color_trc = 6  # AVCOL_*_SMPTE170M
        context.color_range = 1  # AVCOL_RANGE_MPEG
        stream.options = {"crf": str(clip.crf), "preset": "veryslow", "profile": "high", "bf": "0",
                          "x264-params": f"threads=1:keyint={clip.fps * 10}:min-keyint={clip.fps}"}
        n = 0
        for image in clip.frames(clip):
            if image.size != clip.size:
                raise ValueError(f"{clip.name}: frame {n} is {image.size}, not {clip.size}")
            frame = av.VideoFrame.from_image(image)
            frame.pts = n
            for packet in stream.encode(frame):
                container.mux(packet)
            n += 1
        for packet in stream.encode(None):
            container.mux(packet)
    if n != clip.count:
        raise RuntimeError(f"{clip.name}: {n} frames drawn, {clip.count} expected")
    tmp.replace(path)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT,
                    help=f"output directory (default: {DEFAULT_OUT.relative_to(REPO_ROOT)})")
    ap.add_argument("--only", nargs="*", default=None, help="generate only these file names (or name prefixes)")
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    status = 0
    for clip in CLIPS:
        if args.only and not any(clip.name.startswith(o) for o in args.only):
            continue
        path = args.out / clip.name
        encode(clip, path)
        data = path.read_bytes()
        print(f"{clip.name:32s} {clip.size[0]}x{clip.size[1]} {clip.fps} fps {clip.count:4d} frames "
              f"{len(data) / 1024:7.1f} KiB sha256 {hashlib.sha256(data).hexdigest()[:16]}")
        if len(data) > MAX_BYTES:
            print(f"error: {clip.name} is over {MAX_BYTES} bytes: raise its crf", file=sys.stderr)
            status = 1
    return status


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""Generate the test clips in ``tests/data/video/`` (good clips and hostile/bad files).

Every clip is drawn by FFmpeg's lavfi sources (``testsrc2``: moving coloured patterns, a
running counter and a gradient, so frames differ and every colour region is exercised) and
encoded with the ffmpeg CLI; the hostile files are cut or filled from those clips with a
seeded ``random.Random``. Nothing is downloaded. The committed files were made with Debian
12's ffmpeg 5.1 (libx264 164, libvpx 1.12, libaom 3.6); other encoder versions give other
bytes, so after re-running regenerate the goldens too (scripts/make_video_decode_goldens.py).

Usage::

    python3 scripts/make_test_videos.py [--out DIR] [--only NAME ...]

``--only`` takes file names; ``broken`` stands for the files cut from the 24 fps clip (empty,
truncated, corrupt_payload, garbage).

See tests/data/video/README.md for what each file is for.
"""

from __future__ import annotations

import argparse
import random
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO_ROOT / "tests" / "data" / "video"
SEED = 20260911

FFMPEG = ["ffmpeg", "-hide_banner", "-loglevel", "error", "-nostdin", "-y"]
# x264 in one thread, no version-dependent metadata beyond x264's own SEI
X264 = ["-c:v", "libx264", "-preset", "medium", "-threads", "1", "-fflags", "+bitexact", "-map_metadata", "-1"]
MP4 = ["-movflags", "+faststart"]


def testsrc(size: str, rate: str, duration: float) -> list[str]:
    return ["-f", "lavfi", "-i", f"testsrc2=size={size}:rate={rate}:duration={duration}"]


# name -> ffmpeg arguments after FFMPEG (output path appended)
GOOD: dict[str, list[str]] = {
    # 24 fps, 3 s, no B-frames; width 96 is a multiple of 32 (torchcodec's swscale path)
    "h264_24fps_96x64.mp4": [*testsrc("96x64", "24", 3), *X264, "-crf", "30", "-bf", "0",
                             "-pix_fmt", "yuv420p", *MP4],
    # NTSC rate 30000/1001, 3 s
    "h264_29.97fps_96x64.mp4": [*testsrc("96x64", "30000/1001", 3), *X264, "-crf", "30", "-bf", "0",
                                "-pix_fmt", "yuv420p", *MP4],
    # 25 fps with B-frames (pyramid) and an edit list (the first pts is not 0 in the mp4)
    "h264_25fps_bframes_96x64.mp4": [*testsrc("96x64", "25", 3), *X264, "-crf", "30", "-bf", "3",
                                     "-x264-params", "b-pyramid=normal", "-g", "25", "-pix_fmt", "yuv420p", *MP4],
    # 70 s at 25 fps: sample_frames skips 1 s at each end and caps at 64 frames; GOP of 2 s
    "h264_70s_25fps_64x48.mp4": [*testsrc("64x48", "25", 70), *X264, "-crf", "40", "-bf", "0", "-g", "50",
                                 "-pix_fmt", "yuv420p", *MP4],
    # BT.709 tagged (matrix, primaries, transfer), limited range; swscale path
    "h264_bt709_96x64.mp4": [*testsrc("96x64", "25", 2), "-vf", "scale=out_color_matrix=bt709:out_range=tv",
                             *X264, "-crf", "30", "-bf", "0", "-pix_fmt", "yuv420p", "-colorspace", "bt709",
                             "-color_primaries", "bt709", "-color_trc", "bt709", "-color_range", "tv", *MP4],
    # BT.709 limited on torchcodec's filtergraph path (width 80 is not a multiple of 32)
    "h264_bt709_80x48.mp4": [*testsrc("80x48", "25", 2), "-vf", "scale=out_color_matrix=bt709:out_range=tv",
                             *X264, "-crf", "30", "-bf", "0", "-pix_fmt", "yuv420p", "-colorspace", "bt709",
                             "-color_primaries", "bt709", "-color_trc", "bt709", "-color_range", "tv", *MP4],
    # full range yuvj420p (color_range pc), BT.601 matrix (untagged); swscale path
    "h264_fullrange_96x64.mp4": [*testsrc("96x64", "25", 2), "-vf", "scale=out_range=pc", *X264, "-crf", "30",
                                 "-bf", "0", "-pix_fmt", "yuvj420p", "-color_range", "pc", *MP4],
    # full range + BT.709 on the filtergraph path
    "h264_fullrange_bt709_80x48.mp4": [*testsrc("80x48", "25", 2),
                                       "-vf", "scale=out_color_matrix=bt709:out_range=pc", *X264, "-crf", "30",
                                       "-bf", "0", "-pix_fmt", "yuvj420p", "-color_range", "pc",
                                       "-colorspace", "bt709", "-color_primaries", "bt709", "-color_trc", "bt709",
                                       *MP4],
    # portrait 48x96 (filtergraph path)
    "h264_portrait_48x96.mp4": [*testsrc("48x96", "25", 2), *X264, "-crf", "30", "-bf", "0",
                                "-pix_fmt", "yuv420p", *MP4],
    # even size whose width is not a multiple of 8 (the SIMD converter works in blocks of 8)
    "h264_90x50.mp4": [*testsrc("90x50", "25", 2), *X264, "-crf", "30", "-bf", "0", "-pix_fmt", "yuv420p", *MP4],
    # VP9 in WebM
    "vp9_96x64.webm": [*testsrc("96x64", "25", 2), "-c:v", "libvpx-vp9", "-crf", "40", "-b:v", "0",
                       "-threads", "1", "-pix_fmt", "yuv420p", "-fflags", "+bitexact", "-map_metadata", "-1"],
    # VP9 full range: yuv420p frames tagged pc (no yuvj format for VP9), on both conversion paths
    "vp9_fullrange_96x64.webm": [*testsrc("96x64", "25", 2), "-vf", "scale=out_range=pc", "-c:v", "libvpx-vp9",
                                 "-crf", "40", "-b:v", "0", "-threads", "1", "-pix_fmt", "yuv420p",
                                 "-color_range", "pc", "-fflags", "+bitexact", "-map_metadata", "-1"],
    "vp9_fullrange_80x48.webm": [*testsrc("80x48", "25", 2), "-vf", "scale=out_range=pc", "-c:v", "libvpx-vp9",
                                 "-crf", "40", "-b:v", "0", "-threads", "1", "-pix_fmt", "yuv420p",
                                 "-color_range", "pc", "-fflags", "+bitexact", "-map_metadata", "-1"],
    # HEVC (x265, default B-frames) in MP4
    "hevc_96x64.mp4": [*testsrc("96x64", "25", 2), "-c:v", "libx265", "-crf", "35", "-preset", "fast",
                       "-x265-params", "log-level=error:pools=none:frame-threads=1:wpp=0", "-tag:v", "hvc1",
                       "-pix_fmt", "yuv420p", "-fflags", "+bitexact", "-map_metadata", "-1", *MP4],
    # VP8 in WebM
    "vp8_96x64.webm": [*testsrc("96x64", "25", 2), "-c:v", "libvpx", "-crf", "30", "-b:v", "200k",
                       "-threads", "1", "-pix_fmt", "yuv420p", "-fflags", "+bitexact", "-map_metadata", "-1"],
    # AV1 in WebM (libaom encoder; decoded by dav1d on both sides)
    "av1_96x64.webm": [*testsrc("96x64", "25", 1), "-c:v", "libaom-av1", "-crf", "45", "-b:v", "0",
                       "-cpu-used", "8", "-threads", "1", "-pix_fmt", "yuv420p", "-fflags", "+bitexact",
                       "-map_metadata", "-1"],
}

# rotation clips are remuxed from this one with a display matrix (see make_rotated)
ROTATED = {"h264_rotate90_96x64.mp4": 90, "h264_rotate180_96x64.mp4": 180, "h264_rotate270_96x64.mp4": 270}

BAD: dict[str, list[str]] = {
    # 10-bit 4:2:0
    "h264_10bit_96x64.mp4": [*testsrc("96x64", "25", 1), *X264, "-crf", "35", "-bf", "0",
                             "-pix_fmt", "yuv420p10le", *MP4],
    # 4:4:4
    "h264_yuv444p_96x64.mp4": [*testsrc("96x64", "25", 1), *X264, "-crf", "35", "-bf", "0",
                               "-pix_fmt", "yuv444p", *MP4],
    # odd frame size: x264 refuses odd 4:2:0 sizes, VP9 takes them
    "vp9_odd_65x49.webm": [*testsrc("66x50", "25", 1), "-vf", "scale=65:49", "-c:v", "libvpx-vp9", "-crf", "45",
                           "-b:v", "0", "-threads", "1", "-pix_fmt", "yuv420p", "-fflags", "+bitexact",
                           "-map_metadata", "-1"],
    # extreme aspect 2x100000: H.264 (x264) and VP9 (libvpx, <= 65535) refuse it; FFV1 takes any size
    "ffv1_2x100000.mkv": ["-f", "lavfi", "-i", "color=c=gray:size=2x100000:rate=1:duration=1", "-c:v", "ffv1",
                          "-pix_fmt", "yuv420p", "-fflags", "+bitexact", "-map_metadata", "-1"],
    # ~10 hours claimed by the timestamps: 61 frames one every 600 s (tiny file)
    "h264_10h_32x32.mp4": ["-f", "lavfi", "-i", "testsrc2=size=32x32:rate=1:duration=61",
                           "-vf", "setpts=N*600/TB", "-fps_mode", "passthrough", *X264, "-crf", "40", "-bf", "0",
                           "-pix_fmt", "yuv420p", "-video_track_timescale", "1", *MP4],
    # a codec that is not decoded bit-exactly across CPUs (JPEG IDCT): refused
    "mjpeg_96x64.avi": [*testsrc("96x64", "25", 0.2), "-c:v", "mjpeg", "-q:v", "10", "-pix_fmt", "yuvj420p",
                        "-fflags", "+bitexact", "-map_metadata", "-1"],
    # audio only (AAC in MP4/M4A)
    "audio_only.m4a": ["-f", "lavfi", "-i", "sine=frequency=440:duration=1:sample_rate=16000", "-c:a", "aac",
                       "-b:a", "16k", "-fflags", "+bitexact", "-map_metadata", "-1"],
}


def run(args: list[str], out: Path) -> None:
    subprocess.run([*FFMPEG, *args, str(out)], check=True)


def make_rotated(out_dir: Path, name: str, degrees: int) -> None:
    """A 2 s clip remuxed with a display matrix (mp4 tkhd), as phones write portrait videos."""
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "src.mp4"
        run([*testsrc("96x64", "25", 2), *X264, "-crf", "30", "-bf", "0", "-pix_fmt", "yuv420p", *MP4], src)
        # ffmpeg 5.1 turns the 'rotate' tag into a display matrix on a stream copy
        run(["-i", str(src), "-c", "copy", "-metadata:s:v:0", f"rotate={degrees}", *MP4], out_dir / name)


def make_size_change(out_dir: Path) -> None:
    """1 s at 96x64 then 1 s at 128x96 in one H.264 stream (two MPEG-TS pieces concatenated, remuxed)."""
    with tempfile.TemporaryDirectory() as tmp:
        pieces = []
        for size in ("96x64", "128x96"):
            piece = Path(tmp) / f"{size}.ts"
            run([*testsrc(size, "25", 1), *X264, "-crf", "35", "-bf", "0", "-pix_fmt", "yuv420p"], piece)
            pieces.append(str(piece))
        run(["-i", "concat:" + "|".join(pieces), "-c", "copy", "-fflags", "+bitexact", "-map_metadata", "-1"],
            out_dir / "h264_size_change.mkv")


def make_subtitles_only(out_dir: Path) -> None:
    """An MP4 whose only track is a timed-text subtitle: a container with no video stream."""
    with tempfile.TemporaryDirectory() as tmp:
        srt = Path(tmp) / "s.srt"
        srt.write_text("1\n00:00:00,000 --> 00:00:01,000\nno video here\n", encoding="utf-8")
        run(["-i", str(srt), "-c:s", "mov_text", "-fflags", "+bitexact", "-map_metadata", "-1"],
            out_dir / "subtitles_only.mp4")


def make_broken(out_dir: Path) -> None:
    """Empty, truncated, corrupt-payload and garbage files cut from the 24 fps clip."""
    rng = random.Random(SEED)
    good = (out_dir / "h264_24fps_96x64.mp4").read_bytes()
    (out_dir / "empty.mp4").write_bytes(b"")
    mdat = good.find(b"mdat")
    if mdat < 4:
        raise SystemExit("h264_24fps_96x64.mp4 has no mdat box")
    payload_start = mdat + 4
    # faststart: moov precedes mdat, so the index claims samples that are cut away
    cut = payload_start + (len(good) - payload_start) // 2
    (out_dir / "truncated.mp4").write_bytes(good[:cut])
    # the same container with the H.264 payload replaced by noise
    corrupt = good[:payload_start] + rng.randbytes(len(good) - payload_start)
    (out_dir / "corrupt_payload.mp4").write_bytes(corrupt)
    # an mp4 'ftyp' header followed by noise
    ftyp_size = int.from_bytes(good[:4], "big")
    (out_dir / "garbage.mp4").write_bytes(good[:ftyp_size] + rng.randbytes(4096))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--only", nargs="*", help="file names to (re)make")
    args = parser.parse_args(argv)
    if shutil.which("ffmpeg") is None:
        print("ffmpeg not found on PATH: install it (Debian: apt-get install ffmpeg)", file=sys.stderr)
        return 1
    out_dir: Path = args.out
    out_dir.mkdir(parents=True, exist_ok=True)
    wanted = set(args.only or [])

    def want(name: str) -> bool:
        return not wanted or name in wanted

    for name, ff_args in {**GOOD, **BAD}.items():
        if want(name):
            run(ff_args, out_dir / name)
    for name, degrees in ROTATED.items():
        if want(name):
            make_rotated(out_dir, name, degrees)
    if want("subtitles_only.mp4"):
        make_subtitles_only(out_dir)
    if want("h264_size_change.mkv"):
        make_size_change(out_dir)
    if want("broken") or not wanted:
        make_broken(out_dir)
    total = sum(p.stat().st_size for p in out_dir.iterdir() if p.is_file())
    print(f"{out_dir}: {total / 1024:.0f} KiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The board-side video decoder (rksmolvlm/processing/video.py) against transformers' default backend.

References: ``tests/data/video/decode_goldens.json``, made once by scripts/make_video_decode_goldens.py in a
venv with torchcodec 0.17 / torch 2.14 / transformers 5.24 on x86 (system FFmpeg 5.1, SSSE3 swscale):
per clip the metadata transformers' torchcodec loader reports and the sha256 of every RGB frame it
returns; per colour matrix and range the hash of the conversion of all 2^24 (Y, U, V) triples.
The clips (tests/data/video/, scripts/make_test_videos.py) include the hostile files of the error matrix.
"""

from __future__ import annotations

import builtins
import hashlib
import json
import time
from pathlib import Path

import numpy as np
import pytest

from rksmolvlm.errors import (
    NoVideoStreamError,
    UnsupportedVideoError,
    VideoError,
    VideoTooComplexError,
    VideoTooLargeError,
    VideoTooLongError,
)
from rksmolvlm.processing.video import VideoInfo, VideoLimits, VideoReader, probe_video, read_frames, yuv420p_to_rgb

pytest.importorskip("av")

CLIPS = Path(__file__).resolve().parents[1] / "data" / "video"
GOLDENS = json.loads((CLIPS / "decode_goldens.json").read_text(encoding="utf-8"))
GOOD = sorted(GOLDENS["clips"])


def sha256(frame: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(frame).tobytes()).hexdigest()


class DecodeCounter:
    """Counts the decoder's frames and packet scans of every VideoReader (patched in by a fixture)."""

    def __init__(self, monkeypatch):
        self.frames = 0
        self.scans = 0
        next_decoded, scan = VideoReader._next_decoded, VideoReader._scan

        def counting_next_decoded(reader):
            frame = next_decoded(reader)
            self.frames += frame is not None
            return frame

        def counting_scan(reader):
            self.scans += 1
            return scan(reader)

        monkeypatch.setattr(VideoReader, "_next_decoded", counting_next_decoded)
        monkeypatch.setattr(VideoReader, "_scan", counting_scan)


@pytest.fixture
def decoded(monkeypatch) -> DecodeCounter:
    return DecodeCounter(monkeypatch)


# -- bit-exact with torchcodec / transformers ----------------------------------------------------


@pytest.mark.parametrize("clip", GOOD)
def test_metadata_equals_transformers_torchcodec_loader(clip):
    want = GOLDENS["clips"][clip]
    info = probe_video(CLIPS / clip)
    assert (info.total_num_frames, info.fps, info.duration, info.width, info.height) == (
        want["total_num_frames"], want["fps"], want["duration"], want["width"], want["height"])
    assert isinstance(info.fps, float) and isinstance(info.duration, float)


@pytest.mark.parametrize("clip", GOOD)
def test_frames_equal_torchcodec_bit_for_bit(clip):
    want = GOLDENS["clips"][clip]
    frames = read_frames((CLIPS / clip).read_bytes(), want["frame_indices"])
    assert frames.dtype == np.uint8 and frames.shape == (len(want["frame_indices"]), want["height"], want["width"], 3)
    mismatched = [index for index, frame, digest in zip(want["frame_indices"], frames, want["frame_sha256"])
                  if sha256(frame) != digest]
    assert not mismatched, f"{clip}: frames {mismatched} differ from torchcodec's"


def test_70s_clip_sampled_frames_and_skip_secs():
    """The 70 s clip: SmolVLM2's sampler (fps 1, 64 frames, skip 1 s) picks 25, 51, ..., 1725."""
    want = GOLDENS["clips"]["h264_70s_25fps_64x48.mp4"]
    assert want["sampled_indices"][:3] == [25, 51, 78] and want["sampled_indices"][-1] == 1725
    assert len(want["sampled_indices"]) == 64 and want["frame_indices"] == want["sampled_indices"]


def exhaustive_frame(f: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Frame f of the 64 512×512 frames that hold every (Y, U, V) triple once (as the goldens script)."""
    r = np.arange(512)[:, None]
    c = np.arange(512)[None, :]
    y = np.broadcast_to((4 * f + 2 * (r % 2) + (c % 2)).astype(np.uint8), (512, 512)).copy()
    u = np.repeat(np.arange(256, dtype=np.uint8)[:, None], 256, axis=1)
    return y, u, np.ascontiguousarray(u.T)


@pytest.mark.parametrize("case", GOLDENS["converter"],
                         ids=lambda c: f"cs{c['colorspace']}-{'pc' if c['full_range'] else 'tv'}")
def test_converter_matches_swscale_on_all_yuv_triples(case):
    digest = hashlib.sha256()
    out = np.empty((512, 512, 3), np.uint8)
    for f in range(64):
        y, u, v = exhaustive_frame(f)
        yuv420p_to_rgb(y, u, v, colorspace=case["colorspace"], full_range=case["full_range"], out=out)
        digest.update(out.tobytes())
    assert digest.hexdigest() == case["sha256"]


def test_converter_reference_points():
    """Hand-checked values: limited-range black/white/grey, full range is identity on grey."""
    y = np.array([[16, 235], [128, 128]], np.uint8)
    grey = np.array([[128]], np.uint8)
    rgb = yuv420p_to_rgb(y, grey, grey)
    assert rgb[0, 0].tolist() == [0, 0, 0] and rgb[0, 1].tolist() == [255, 255, 255]
    assert rgb[1, 0].tolist() == [130, 130, 130]  # (8·128 − 128)·9539 >> 16
    assert yuv420p_to_rgb(np.full((2, 2), 77, np.uint8), grey, grey, full_range=True)[0, 0].tolist() == [77, 77, 77]
    with pytest.raises(ValueError):
        yuv420p_to_rgb(np.zeros((3, 4), np.uint8), np.zeros((1, 2), np.uint8), np.zeros((1, 2), np.uint8))


# -- index semantics and inputs ------------------------------------------------------------------


def test_unsorted_and_repeated_indices_come_back_in_request_order():
    want = GOLDENS["clips"]["h264_25fps_bframes_96x64.mp4"]
    digest = dict(zip(want["frame_indices"], want["frame_sha256"]))
    indices = [70, 3, 3, 40, 0, 74, 40]
    frames = read_frames(CLIPS / "h264_25fps_bframes_96x64.mp4", np.array(indices))
    assert [sha256(frame) for frame in frames] == [digest[i] for i in indices]


def test_single_threaded_decoding_gives_the_same_frames():
    clip = "hevc_96x64.mp4"
    want = GOLDENS["clips"][clip]
    frames = read_frames(CLIPS / clip, want["frame_indices"], threads=1)
    assert [sha256(frame) for frame in frames] == want["frame_sha256"]


def test_reader_reads_again_backwards_and_forwards():
    clip = "h264_70s_25fps_64x48.mp4"
    want = GOLDENS["clips"][clip]
    digest = dict(zip(want["frame_indices"], want["frame_sha256"]))
    with VideoReader(CLIPS / clip) as reader:
        for indices in ([1725, 1698], [25], [969, 51, 1374], [25, 1725]):
            assert [sha256(f) for f in reader.read_frames(indices)] == [digest[i] for i in indices]


def test_bytes_and_path_input_agree():
    for clip in ("h264_25fps_bframes_96x64.mp4", "vp9_96x64.webm", "h264_rotate90_96x64.mp4"):
        path = CLIPS / clip
        data = path.read_bytes()
        infos = [probe_video(source) for source in (path, str(path), data, bytearray(data), memoryview(data))]
        assert all(info == infos[0] for info in infos)
        indices = [0, 7, 23]
        frames = [read_frames(source, indices) for source in (path, data)]
        assert np.array_equal(frames[0], frames[1])


def test_bytes_input_never_opens_a_file(monkeypatch):
    data = (CLIPS / "h264_24fps_96x64.mp4").read_bytes()

    def no_open(*args, **kwargs):
        raise AssertionError("bytes input opened a file")

    monkeypatch.setattr(builtins, "open", no_open)
    assert read_frames(data, [0, 71]).shape == (2, 64, 96, 3)


def test_info_names_format_colour_and_rotation():
    assert probe_video(CLIPS / "h264_fullrange_bt709_80x48.mp4") == VideoInfo(
        total_num_frames=50, duration=2.0, fps=25.0, width=80, height=48, codec="h264", pix_fmt="yuvj420p",
        color_range="pc", color_space="bt709", rotation=0)
    rotated = probe_video(CLIPS / "h264_rotate90_96x64.mp4")
    assert (rotated.width, rotated.height, rotated.rotation) == (64, 96, 90)
    assert probe_video(CLIPS / "av1_96x64.webm").codec == "av1"


def test_out_of_range_index_is_a_value_error():
    with VideoReader(CLIPS / "h264_24fps_96x64.mp4") as reader:
        with pytest.raises(ValueError, match=r"\[0, 72\)"):
            reader.read_frames([72])
        with pytest.raises(ValueError):
            reader.read_frames([-1])
        assert reader.read_frames([]).shape == (0, 64, 96, 3)


def test_decoding_stops_after_the_last_wanted_frame(decoded):
    with VideoReader(CLIPS / "h264_70s_25fps_64x48.mp4") as reader:
        reader.read_frames([0, 3])
    assert decoded.frames <= 5  # frames 0..3 (the first one decoded at open)


def test_decoding_seeks_to_the_keyframe_before_a_far_frame(decoded):
    with VideoReader(CLIPS / "h264_70s_25fps_64x48.mp4") as reader:
        reader.read_frames([1725])  # GOP of 50: decodes from the keyframe at 1700
    assert decoded.frames <= 30


# -- hostile and bad files -----------------------------------------------------------------------

BAD = [
    ("empty.mp4", VideoError, "invalid_video", None),
    ("garbage.mp4", VideoError, "invalid_video", None),
    ("truncated.mp4", VideoError, "invalid_video", None),
    ("corrupt_payload.mp4", VideoError, "invalid_video", None),
    ("audio_only.m4a", NoVideoStreamError, "no_video_stream", None),
    ("subtitles_only.mp4", NoVideoStreamError, "no_video_stream", None),
    ("h264_10bit_96x64.mp4", UnsupportedVideoError, "unsupported_video", None),
    ("h264_yuv444p_96x64.mp4", UnsupportedVideoError, "unsupported_video", None),
    ("vp9_odd_65x49.webm", UnsupportedVideoError, "unsupported_video", None),
    ("mjpeg_96x64.avi", UnsupportedVideoError, "unsupported_video", None),
    ("h264_size_change.mkv", UnsupportedVideoError, "unsupported_video", None),
    ("ffv1_2x100000.mkv", VideoTooLargeError, "video_too_large", "max_side"),
    ("h264_10h_32x32.mp4", VideoTooLongError, "video_too_long", "max_duration_seconds"),
]


@pytest.mark.parametrize(("clip", "error", "code", "limit"), BAD, ids=[case[0] for case in BAD])
def test_bad_files_give_named_errors(clip, error, code, limit):
    data = (CLIPS / clip).read_bytes()
    started = time.monotonic()
    with pytest.raises(error) as caught, VideoReader(data) as reader:
        reader.read_frames(range(reader.info.total_num_frames))
    assert type(caught.value) is error
    assert caught.value.code == code and caught.value.limit == limit
    assert time.monotonic() - started < 5
    message = str(caught.value)
    assert ": " in message and any(fix in message for fix in ("send", "re-encode", "remux", "check"))


@pytest.mark.parametrize("clip", ["h264_10bit_96x64.mp4", "h264_yuv444p_96x64.mp4", "vp9_odd_65x49.webm",
                                  "mjpeg_96x64.avi", "ffv1_2x100000.mkv", "h264_10h_32x32.mp4"])
def test_refusals_from_the_header_come_before_scan_and_decode(clip, decoded):
    with pytest.raises(VideoError):
        probe_video(CLIPS / clip)
    assert decoded.scans == 0 and decoded.frames == 0


def test_missing_file_and_wrong_source_type():
    with pytest.raises(VideoError, match="cannot be read"):
        probe_video(CLIPS / "no_such_clip.mp4")
    with pytest.raises(TypeError):
        probe_video(12345)


# -- limits trip before the step they protect ------------------------------------------------------


def test_max_bytes_refuses_before_opening(monkeypatch):
    monkeypatch.setattr(VideoReader, "_open", lambda self, threads: pytest.fail("opened"))
    with pytest.raises(VideoTooLargeError) as caught:
        probe_video((CLIPS / "h264_24fps_96x64.mp4").read_bytes(), VideoLimits(max_bytes=1000))
    assert caught.value.limit == "max_bytes"


def test_header_frame_count_refuses_the_70s_clip_without_scanning(decoded):
    started = time.monotonic()
    with pytest.raises(VideoTooLongError) as caught:
        read_frames(CLIPS / "h264_70s_25fps_64x48.mp4", [25], VideoLimits(max_stream_frames=100))
    assert caught.value.limit == "max_stream_frames"
    assert decoded.scans == 0 and decoded.frames == 0 and time.monotonic() - started < 1


def test_header_duration_refuses_the_70s_clip_without_scanning(decoded):
    with pytest.raises(VideoTooLongError) as caught:
        probe_video(CLIPS / "h264_70s_25fps_64x48.mp4", VideoLimits(max_duration_seconds=60))
    assert caught.value.limit == "max_duration_seconds" and decoded.scans == 0 and decoded.frames == 0


def test_packet_scan_stops_at_max_stream_frames_without_decoding(decoded):
    """WebM has no frame count in its header: the scan itself stops at the limit."""
    with pytest.raises(VideoTooLongError) as caught:
        probe_video(CLIPS / "vp9_96x64.webm", VideoLimits(max_stream_frames=10))
    assert caught.value.limit == "max_stream_frames" and decoded.scans == 1 and decoded.frames == 0


@pytest.mark.parametrize(("limits", "limit"), [(VideoLimits(max_frame_pixels=96 * 64 - 1), "max_frame_pixels"),
                                               (VideoLimits(max_side=95), "max_side")])
def test_frame_size_refused_from_the_header(limits, limit, decoded):
    with pytest.raises(VideoTooLargeError) as caught:
        probe_video(CLIPS / "h264_24fps_96x64.mp4", limits)
    assert caught.value.limit == limit and decoded.scans == 0 and decoded.frames == 0


def test_time_budget_gives_too_complex():
    with pytest.raises(VideoTooComplexError) as caught:
        probe_video(CLIPS / "h264_70s_25fps_64x48.mp4", VideoLimits(max_decode_seconds=0))
    assert caught.value.code == "video_too_complex" and caught.value.limit == "max_decode_seconds"


def test_time_budget_checked_between_packets(monkeypatch):
    with VideoReader(CLIPS / "h264_70s_25fps_64x48.mp4") as reader:
        monkeypatch.setattr(reader, "_deadline", time.monotonic() - 1)
        with pytest.raises(VideoTooComplexError):
            reader.read_frames([1725])


def test_output_size_limit_refuses_before_decoding(decoded):
    with VideoReader(CLIPS / "h264_24fps_96x64.mp4", VideoLimits(max_output_bytes=96 * 64 * 3 * 4)) as reader:
        assert reader.read_frames([0, 1, 2, 3]).shape[0] == 4
        before = decoded.frames
        with pytest.raises(VideoTooLargeError) as caught:
            reader.read_frames(range(5))
        assert caught.value.limit == "max_output_bytes" and decoded.frames == before


def test_mutated_files_give_frames_or_video_errors_only():
    """Seeded byte flips, cuts, overwritten blocks and repeats of good clips: every outcome is frames or a
    VideoError (never a raw PyAV/FFmpeg exception), each quickly."""
    rng = np.random.default_rng(20260911)
    names = ["h264_25fps_bframes_96x64.mp4", "vp9_96x64.webm", "hevc_96x64.mp4", "av1_96x64.webm",
             "h264_rotate90_96x64.mp4"]
    originals = [(CLIPS / name).read_bytes() for name in names]
    outcomes = {"frames": 0, "refused": 0}
    for trial in range(120):
        data = bytearray(originals[trial % len(originals)])
        at = int(rng.integers(len(data)))
        kind = trial % 4
        if kind == 0:
            for spot in rng.integers(len(data), size=int(rng.integers(1, 20))):
                data[spot] = int(rng.integers(256))
        elif kind == 1:
            data = data[:at]
        elif kind == 2:
            block = rng.integers(256, size=int(rng.integers(1, 500)), dtype=np.uint8).tobytes()
            data[at:at + len(block)] = block
        else:
            data = data[:at] + data[at:at + 2000] + data[at:]
        started = time.monotonic()
        try:
            with VideoReader(bytes(data)) as reader:
                count = reader.info.total_num_frames
                reader.read_frames(np.unique(rng.integers(count, size=min(count, 6))))
            outcomes["frames"] += 1
        except VideoError:
            outcomes["refused"] += 1
        assert time.monotonic() - started < 5
    assert outcomes["frames"] and outcomes["refused"]

"""`rksmolvlm bench --engine host` on a tiny bundle: every field present and sensible; SmolVLM2
bundles add the video section (frames/s one core vs all, decode + resize cost, 16-frame TTFT)."""

import functools
import json

import pytest

from rksmolvlm.cli import main

FIELDS = {"engine", "model", "target", "repeats", "warmup", "vision_ms_per_tile_one_core",
          "vision_ms_per_tile_all_cores", "vision_split_image_tiles", "vision_split_image_ms", "prompt_tokens",
          "new_tokens", "ttft_ms", "prefill_tokens_per_s", "decode_tokens_per_s", "engine_perf", "peak_rss_mb",
          "clocks", "video"}
VIDEO_FIELDS = {"frame_size", "frames", "clip", "probe_ms", "decode_ms_per_frame", "resize_ms_per_frame",
                "decode_resize_ms_per_frame", "one_core_frames",
                "frames_per_s_one_core", "frames_per_s_all_cores", "ttft_frames", "ttft_prompt_tokens", "ttft_ms",
                "ttft_parts_ms"}
SMALL_CLIP = {"size": (160, 96), "fps": 5}  # the generated clip's shape, small enough for a test


def _sane(summary, n):
    return summary["n"] == n and 0 < summary["min"] <= summary["median"] <= summary["max"]


@pytest.fixture(scope="module")
def small_clip(tmp_path_factory):
    from rksmolvlm.tools.bench import make_bench_clip

    return make_bench_clip(tmp_path_factory.mktemp("clip") / "clip.mp4", seconds=17, **SMALL_CLIP)


def test_bench_json_has_every_field(preview_bundles, capsys, monkeypatch):
    from rksmolvlm.tools import bench

    monkeypatch.setattr(bench, "make_bench_clip", functools.partial(bench.make_bench_clip, **SMALL_CLIP))
    assert main(["bench", str(preview_bundles["smolvlm2"]), "--engine", "host", "--repeats", "2", "--warmup", "1",
                 "--prompt-tokens", "40", "--new-tokens", "6", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert FIELDS <= set(result)
    assert result["engine"] == "host" and result["new_tokens"] == 6
    assert result["vision_split_image_tiles"] == 17  # a square image at the longest edge: 4×4 + global
    for key in ("vision_ms_per_tile_one_core", "vision_ms_per_tile_all_cores", "ttft_ms", "prefill_tokens_per_s",
                "decode_tokens_per_s"):
        assert _sane(result[key], 2), key
    assert result["prompt_tokens"] >= 40
    assert result["peak_rss_mb"] > 0

    video = result["video"]
    assert set(video) == VIDEO_FIELDS
    # the generated clip: one second more than 16 frames at the model's 1 fps need
    assert video["clip"] == {"source": "generated", "width": 160, "height": 96, "fps": 5.0, "duration_s": 17.0,
                             "total_frames": 85}
    assert video["frames"] == video["ttft_frames"] == 16 and video["one_core_frames"] == 4
    assert video["frame_size"] == 64  # the tiny SmolVLM2's tile
    for key in ("probe_ms", "decode_ms_per_frame", "resize_ms_per_frame", "decode_resize_ms_per_frame",
                "frames_per_s_one_core", "frames_per_s_all_cores", "ttft_ms"):
        assert _sane(video[key], 2), key
    assert video["decode_resize_ms_per_frame"]["min"] >= video["decode_ms_per_frame"]["min"]
    # 16 frames of image_seq_len 4, each in its own block with a timestamp line, plus the question
    assert video["ttft_prompt_tokens"] > 16 * 4
    assert set(video["ttft_parts_ms"]) == {"video_decode_ms", "vision_ms", "prefill_ms"}
    assert all(v > 0 for v in video["ttft_parts_ms"].values())  # no cached frames: each run decodes and encodes


def test_bench_table_shows_the_video_rows(preview_bundles, small_clip, capsys):
    assert main(["bench", str(preview_bundles["smolvlm2"]), "--engine", "host", "--repeats", "1", "--warmup", "0",
                 "--new-tokens", "2", "--video-clip", str(small_clip), "--video-frames", "8"]) == 0
    out = capsys.readouterr().out
    assert "video frames/s, one core (4)" in out and "video frames/s, all cores (8)" in out
    assert "video decode+resize ms/frame" in out and "video TTFT ms (8 frames)" in out
    assert f"8 frames at 64² from a 160x96 5 fps 17.0 s clip ({small_clip})" in out


def test_bench_table(preview_bundles, capsys):
    assert main(["bench", str(preview_bundles["idefics3-2b"]), "--engine", "host", "--repeats", "1",
                 "--warmup", "0", "--new-tokens", "3"]) == 0
    out = capsys.readouterr().out
    assert "decode tokens/s" in out and "TTFT ms" in out and "governors:" in out
    assert "video" not in out  # an Idefics3 bundle takes no video


def test_bench_without_video(preview_bundles, capsys):
    assert main(["bench", str(preview_bundles["smolvlm2"]), "--engine", "host", "--repeats", "1", "--warmup", "0",
                 "--new-tokens", "2", "--no-video", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["video"] is None


def test_bench_refuses_a_missing_clip(preview_bundles, tmp_path, capsys):
    assert main(["bench", str(preview_bundles["smolvlm2"]), "--engine", "host",
                 "--video-clip", str(tmp_path / "nope.mp4")]) == 2
    assert "--video-clip" in capsys.readouterr().err


def test_generated_clip_gives_the_frames_asked(small_clip):
    from rksmolvlm.processing.video import probe_video
    from rksmolvlm.processing.video_frames import sample_indices

    info = probe_video(small_clip)
    assert (info.width, info.height, info.codec, info.pix_fmt) == (160, 96, "h264", "yuv420p")
    assert len(sample_indices(info.total_num_frames, info.duration, info.fps, 1.0, 16, 1.0)) == 16

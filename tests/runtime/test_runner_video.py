"""The runner with videos: frames planned before decoding, encoded in one call as unsplit tiles,
features cached per frame (a second question decodes nothing), per-request sampling bounded by the
checkpoint's, sessions, and the named errors."""

from pathlib import Path

import numpy as np
import pytest

from support.fakes import fake_runner
from rksmolvlm.errors import VideoError
from rksmolvlm.processing.content import Message, TextPart, VideoPart
from rksmolvlm.processing.video import VideoReader, probe_video, read_frames
from rksmolvlm.processing.video_frames import resize_frames, sample_indices
from rksmolvlm.runtime.engines import GenerationConfig
from rksmolvlm.runtime.runner import ContextError, InputError
from rksmolvlm.runtime.video import ENCODE_BATCH, VideoOptions

CLIPS = Path(__file__).resolve().parents[1] / "data" / "video"
CLIP = CLIPS / "h264_29.97fps_96x64.mp4"
LONG = CLIPS / "h264_70s_25fps_64x48.mp4"
EOU = 49279


@pytest.fixture
def bundle(runtime_bundles):
    return runtime_bundles["smolvlm2"]


def _ask(video: VideoPart, text: str = "What happens?") -> list[Message]:
    return [Message("user", (video, TextPart(text)))]


@pytest.fixture
def decodes(monkeypatch):
    """Counts the frames the runner decodes."""
    counted: list[int] = []
    real = VideoReader.read_frames

    def counting(self, indices):
        counted.append(len(indices))
        return real(self, indices)

    monkeypatch.setattr(VideoReader, "read_frames", counting)
    return counted


def test_frames_reach_the_decoder_at_their_positions(bundle, decodes):
    runner = fake_runner(bundle, [5, 6, EOU])
    result = runner.generate(_ask(VideoPart(CLIP)), GenerationConfig(max_new_tokens=8)).consume()
    decoded = sum(decodes)
    settings = bundle.video_settings
    info = probe_video(CLIP)
    indices = sample_indices(info.total_num_frames, info.duration, info.fps, settings.fps, 16, settings.skip_secs)
    frames = resize_frames(read_frames(CLIP, indices), settings)
    assert runner.images.encoder.calls == [len(indices)]  # one call: the NPU engine spreads it over its cores
    assert decoded == len(indices) and result.stats.video_frames == len(indices) == 3
    prefill = runner.llm.prefills[0].embeddings
    ids = np.asarray(result.prefill_ids)
    rows = prefill[ids == bundle.image_id]
    _, seq, hidden = bundle.manifest.vision.output_shape
    expected = type(runner.images.encoder)(seq, hidden).encode(frames).reshape(-1, hidden)
    np.testing.assert_array_equal(rows, expected)
    assert result.token_ids == [5, 6, EOU]


def test_a_second_question_about_the_clip_decodes_nothing(bundle, decodes):
    runner = fake_runner(bundle, [5, EOU])
    first = runner.generate(_ask(VideoPart(CLIP))).consume()
    again = runner.generate(_ask(VideoPart(CLIP.read_bytes()), "Any people?")).consume()  # same bytes, other form
    assert sum(decodes) == first.stats.video_frames
    assert again.stats.video_frames == 0 and again.stats.video_cached_frames == first.stats.video_frames
    assert runner.images.encoder.calls == [first.stats.video_frames]


def test_a_session_prefills_only_the_new_turn(bundle, decodes):
    runner = fake_runner(bundle, [5, EOU])
    session = runner.session()
    messages = _ask(VideoPart(CLIP))
    first = session.generate(messages).consume()
    messages += [Message.text("assistant", first.text), Message.text("user", "And then?")]
    second = session.generate(messages).consume()
    assert second.reused_tokens > 0 and bundle.image_id not in second.prefill_ids
    assert sum(decodes) == first.stats.video_frames


def test_sampling_per_request_is_bounded_by_the_checkpoint(bundle):
    checkpoint_max = bundle.video_settings.max_frames
    runner = fake_runner(bundle, [EOU])
    two = runner.generate(_ask(VideoPart(LONG, max_frames=2))).consume()
    default = runner.generate(_ask(VideoPart(LONG))).consume()
    capped = runner.generate(_ask(VideoPart(LONG, max_frames=10 * checkpoint_max))).consume()
    frames = lambda g: (g.stats.video_frames + g.stats.video_cached_frames)  # noqa: E731
    assert frames(two) == 2 and frames(default) == 16 and frames(capped) == checkpoint_max
    dense = runner.generate(_ask(VideoPart(CLIP, fps=2))).consume()
    assert frames(dense) == 6  # 3 s at 2 fps
    wide = fake_runner(bundle, [EOU], video=VideoOptions(max_frames=None))  # the checkpoint's own limit
    assert frames(wide.generate(_ask(VideoPart(LONG))).consume()) == checkpoint_max


def test_too_many_frames_for_the_context_is_a_context_error(bundle):
    runner = fake_runner(bundle, [EOU], video=VideoOptions(max_frames=None))
    with pytest.raises(ContextError, match="over the context"):
        runner.generate(_ask(VideoPart(LONG)), GenerationConfig(max_new_tokens=bundle.max_context - 50)).consume()


def test_a_model_without_video_names_it(runtime_bundles):
    runner = fake_runner(runtime_bundles["idefics3-256m"], [EOU])
    with pytest.raises(InputError, match="does not take video"):
        runner.generate(_ask(VideoPart(CLIP))).consume()


@pytest.mark.parametrize("name, code", [("empty.mp4", "invalid_video"), ("audio_only.m4a", "no_video_stream"),
                                        ("h264_10h_32x32.mp4", "video_too_long")])
def test_bad_videos_are_named_video_errors(bundle, name, code):
    runner = fake_runner(bundle, [EOU])
    with pytest.raises(VideoError) as caught:
        runner.generate(_ask(VideoPart(CLIPS / name))).consume()
    assert caught.value.code == code
    assert runner.generate([Message.text("user", "still there?")]).consume().token_ids == [EOU]


def test_a_missing_file_is_a_video_error(bundle, tmp_path):
    runner = fake_runner(bundle, [EOU])
    with pytest.raises(VideoError, match="nope.mp4"):
        runner.generate(_ask(VideoPart(tmp_path / "nope.mp4"))).consume()


def test_frames_go_to_the_tower_in_batches_and_an_abort_is_heard_between_them(bundle):
    from support.fakes import VisionWrapper

    runner = fake_runner(bundle, [5, EOU], video=VideoOptions(max_frames=None))
    wanted = bundle.video_settings.max_frames
    assert wanted > ENCODE_BATCH  # the checkpoint's own limit (64 on SmolVLM2) spans several batches

    class AbortingVision(VisionWrapper):
        def encode_frames(self, frames):
            runner.abort()  # the request is cancelled while the tower works on the first batch
            return super().encode_frames(frames)

    inner = runner.images.encoder
    runner.videos.encoder = AbortingVision(inner)
    got = runner.generate(_ask(VideoPart(LONG))).consume()
    assert got.finish_reason == "abort" and runner.llm.prefills == []
    assert inner.frame_calls == [ENCODE_BATCH]  # the rest of the frames never reached the tower
    runner.videos.encoder = inner
    whole = runner.generate(_ask(VideoPart(LONG))).consume()  # the first batch was cached, the rest encoded
    assert whole.finish_reason == "stop" and inner.frame_calls[1:] == [
        min(ENCODE_BATCH, wanted - k) for k in range(ENCODE_BATCH, wanted, ENCODE_BATCH)]
    assert whole.stats.video_cached_frames == ENCODE_BATCH

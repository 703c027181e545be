"""Video prompts: the assembler's expansion of a video (intro, timestamps, unsplit frame blocks, outro)
and the video chat template give transformers' own text and ids. transformers' SmolVLMProcessor needs
torchvision for its video processor, which this environment cannot import (DESIGN §8); its text side is
called here directly: ``replace_video_token`` with the processor's attributes, the DEFAULT_CHAT_TEMPLATE
through the tokenizer, and the tokenizer on the expanded text. Frame pixels are covered by
test_video_parity.py against goldens of the full processor."""

from types import SimpleNamespace

import numpy as np
import pytest
from num2words import num2words

from support.images import rng_image

from support.parity import HfProcessor
from rksmolvlm.processing.assembler import FrameChunk, Layout, PromptError, VideoLayout
from rksmolvlm.processing.content import ImagePart, Message, TextPart, VideoPart, conversation
from rksmolvlm.processing.image import load_image, tile_image
from rksmolvlm.processing.prompt import number_words

TOKENS = ("<fake_token_around_image>", "<image>", "<global-img>")


@pytest.fixture(scope="module")
def reference(tiny_checkpoints):
    return HfProcessor(tiny_checkpoints["smolvlm2"])


@pytest.fixture(scope="module")
def bundle(runtime_bundles):
    return runtime_bundles["smolvlm2"]


def _hf_video_text(reference, layout: VideoLayout) -> str:
    """transformers' replacement text for one video (its own function, its processor's attributes)."""
    from transformers.models.smolvlm.processing_smolvlm import SmolVLMProcessor
    from transformers.video_utils import VideoMetadata

    metadata = VideoMetadata(total_num_frames=10_000, fps=1.0, duration=layout.duration,
                             frames_indices=list(layout.timestamps))  # timestamps = indices / fps
    owner = SimpleNamespace(image_seq_len=reference.seq_len, fake_image_token=TOKENS[0], image_token=TOKENS[1],
                            global_image_token=TOKENS[2])
    inputs = {"pixel_values": np.zeros((1, layout.frames, 1, 1, 1)), "video_metadata": [metadata]}
    return SmolVLMProcessor.replace_video_token(owner, inputs, 0)


def _hf_ids(reference, messages: list[dict], videos: list[VideoLayout], images: list) -> tuple[str, list[int]]:
    """The prompt transformers renders for ``messages`` with videos: its default video template, each
    ``<video>`` and ``<image>`` replaced in order, then its tokenizer."""
    from transformers.models.smolvlm.processing_smolvlm import DEFAULT_CHAT_TEMPLATE, get_image_prompt_string

    plain = [{"role": m["role"], "content": [{"type": p["type"], **({"text": p["text"]} if p["type"] == "text" else {})}
                                             for p in m["content"]]} for m in messages]
    text = reference.tokenizer.apply_chat_template(plain, chat_template=DEFAULT_CHAT_TEMPLATE, tokenize=False,
                                                   add_generation_prompt=True)
    video_texts = iter([_hf_video_text(reference, v) for v in videos])
    image_texts = iter([get_image_prompt_string(r, c, reference.seq_len, *TOKENS) for r, c in images])
    import re

    expanded = re.sub("<video>|<image>", lambda m: next(video_texts) if m.group(0) == "<video>" else next(image_texts),
                      text)
    return expanded, reference.tokenizer(expanded, add_special_tokens=False)["input_ids"]


def _messages(*content, role="user"):
    return [{"role": role, "content": [{"type": "text", "text": c} if isinstance(c, str) else c for c in content]}]


SEVENTY = VideoLayout(tuple((25 + i * 1700 // 63) / 25 for i in range(64)), 70.0)
CASES = {
    "video then text": (_messages({"type": "video"}, "What happens in this video?"),
                        [VideoLayout((0.0, 1.0, 2.0), 3.04)]),
    "text then video": (_messages("Describe", {"type": "video"}), [VideoLayout((0.0, 1.001, 2.002), 2.97)]),
    "70 s, 64 frames": (_messages({"type": "video"}, "Summarise."), [SEVENTY]),
    "one frame": (_messages({"type": "video"}, "What is it?"), [VideoLayout((0.0,), 0.2)]),
    "system and two turns": (
        [{"role": "system", "content": [{"type": "text", "text": "Answer briefly."}]}]
        + _messages({"type": "video"}, "Who enters?")
        + [{"role": "assistant", "content": [{"type": "text", "text": "A cat."}]}]
        + _messages("And then?"), [VideoLayout((0.0, 61.5, 3725.0), 3726.9)]),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_video_prompt_equals_transformers(case, bundle, reference):
    messages, layouts = CASES[case]
    typed = [Message(m["role"], tuple(VideoPart(b"video") if p["type"] == "video" else TextPart(p["text"])
                                      for p in m["content"])) for m in messages]
    prompt = bundle.assembler.assemble(typed, layouts)
    text, ids = _hf_ids(reference, messages, layouts, [])
    assert prompt.ids == ids
    assert bundle.assembler.expanded_text(prompt) == text
    frames = prompt.frames
    assert [f.frame for f in frames] == [k for layout in layouts for k in range(layout.frames)]
    assert prompt.ids.count(bundle.image_id) == sum(layout.frames for layout in layouts) * reference.seq_len


def test_two_videos_each_announce_their_own_frames(bundle, reference):
    """transformers announces the padded batch's frame count for every video; ours equal each video's
    own single-video expansion (decided in the assembler's docstring)."""
    a, b = VideoLayout((0.0, 1.0, 2.0, 3.0, 4.0), 5.2), VideoLayout((0.0, 1.0), 2.5)
    messages = _messages({"type": "video"}, "and", {"type": "video"}, "Compare them.")
    typed = [Message("user", (VideoPart(b"a"), TextPart("and"), VideoPart(b"b"), TextPart("Compare them.")))]
    prompt = bundle.assembler.assemble(typed, [a, b])
    text, ids = _hf_ids(reference, messages, [a, b], [])
    assert "series of five frames" in text and "series of two frames" in text
    assert prompt.ids == ids
    assert [f.video.source for f in prompt.frames] == [b"a"] * 5 + [b"b"] * 2


def test_video_and_image_keep_their_own_parts(bundle, reference):
    """An image beside a video keeps its own split (transformers would give it the video's pixels)."""
    image = rng_image(500, 300, seed=7)
    tiled = tile_image(load_image(image), bundle.settings)
    video = VideoLayout((0.0, 1.0), 2.0)
    messages = _messages({"type": "image"}, {"type": "video"}, "What differs?")
    typed = [Message("user", (ImagePart(image), VideoPart(b"v"), TextPart("What differs?")))]
    prompt = bundle.assembler.assemble(typed, [Layout(tiled.rows, tiled.cols), video])
    _, ids = _hf_ids(reference, messages, [video], [(tiled.rows, tiled.cols)])
    assert prompt.ids == ids
    assert [type(c).__name__ for c in prompt.media] == ["ImageChunk", "FrameChunk"]
    # embed takes one array per image / video: tiles then frames
    seq, hidden = reference.seq_len, bundle.manifest.llm.embed_shape[1]
    table = bundle.embedding_table()
    features = [np.full((tiled.count, seq, hidden), 1.0, np.float32), np.full((2, seq, hidden), 2.0, np.float32)]
    embedded = bundle.assembler.embed(prompt, table, features)
    rows = embedded[np.asarray(prompt.ids) == bundle.image_id]
    assert (rows[:tiled.count * seq] == 1).all() and (rows[tiled.count * seq:] == 2).all()
    with pytest.raises(PromptError, match="features for 1"):
        bundle.assembler.embed(prompt, table, features[:1])


def test_user_text_cannot_forge_a_video(bundle):
    """'<video>' typed by a user is text: no frames are expanded for it."""
    typed = [Message("user", (TextPart("what is <video> and <image>?"),))]
    prompt = bundle.assembler.assemble(typed, [])
    assert not prompt.frames and bundle.image_id not in prompt.ids


def test_layout_mismatches_are_prompt_errors(bundle):
    typed = [Message("user", (VideoPart(b"v"), TextPart("?")))]
    with pytest.raises(PromptError, match="layouts"):
        bundle.assembler.assemble(typed, [])
    with pytest.raises(PromptError, match="Layout"):
        bundle.assembler.assemble(typed, [Layout(0, 0)])


def test_a_model_without_video_refuses_it_by_name(runtime_bundles):
    typed = [Message("user", (VideoPart(b"v"), TextPart("?")))]
    with pytest.raises(PromptError, match="does not take video"):
        runtime_bundles["idefics3-256m"].assembler.assemble(typed, [VideoLayout((0.0,), 1.0)])


def test_number_words_equal_num2words():
    rng = np.random.default_rng(0)
    for n in [*range(0, 2100), *rng.integers(2100, 10**9, 3000).tolist()]:
        assert number_words(n) == num2words(n), n


def test_video_parts_from_dicts_and_their_checks(tmp_path):
    clip = tmp_path / "clip.mp4"
    clip.write_bytes(b"not read here")
    [message] = conversation([{"role": "user", "content": [
        {"type": "video", "video": "clip.mp4", "fps": 2, "max_frames": 8}, {"type": "text", "text": "?"}]}],
        resolve=lambda name: tmp_path / name)
    part = message.parts[0]
    assert isinstance(part, VideoPart) and (part.fps, part.max_frames) == (2, 8) and part.source == clip
    for bad in ({"fps": 0}, {"fps": "1"}, {"max_frames": 0}, {"max_frames": 2.5}, {"fps": True}):
        with pytest.raises(ValueError, match="message 0 part 0"):
            conversation([{"role": "user", "content": [{"type": "video", "video": b"x", **bad}]}])
    with pytest.raises(ValueError, match="source under 'video'"):
        conversation([{"role": "user", "content": [{"type": "video"}]}])
    assert len({VideoPart(b"same").key, VideoPart(b"same").key, VideoPart(b"other").key}) == 2


def test_frame_chunks_are_unsplit_image_blocks(bundle):
    typed = [Message("user", (VideoPart(b"v"), TextPart("?")))]
    prompt = bundle.assembler.assemble(typed, [VideoLayout((0.0, 1.0), 2.0)])
    image_only = bundle.assembler.assemble([Message("user", (ImagePart(rng_image(20, 20)), TextPart("?")))],
                                           [Layout(0, 0)])
    assert all(isinstance(f, FrameChunk) and f.ids == image_only.images[0].ids for f in prompt.frames)

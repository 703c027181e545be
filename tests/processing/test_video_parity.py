"""SmolVLM2 video parity with transformers: the board path gives transformers' own frames, prompt ids
and (host preview) greedy tokens.

The references are goldens computed once by ``scripts/make_video_goldens.py`` in a venv with
torchvision and torchcodec (which this venv cannot have: see README, "How the video reference is
produced"), shipped in ``tests/data/video/processor_goldens.json``: per case the prompt ids, sampled
frame indices, timestamps and sha256 hashes of the decoded frames, the resized frames and the float32
pixel values. Greedy tokens and the decoder input come from transformers'
``SmolVLMForConditionalGeneration.generate`` run here on the golden ids and our pixel values
(byte-identical to transformers' by their hash).

Where transformers is not self-consistent (two videos, a video and an image: DESIGN.md §8) the prompt
is checked against a per-part reference made of each video's and image's own expansion.
"""

from __future__ import annotations

import dataclasses
import json
import re
import subprocess
import sys

import numpy as np
import pytest
from support.video_board_path import (
    CLIPS_DIR,
    PER_PART,
    ROOT,
    case_messages,
    clip_metadata_problems,
    compare_frames,
    frame_pipeline,
    goldens_image,
    load_goldens,
    sha256,
    video_runner,
)

GOLDENS = load_goldens()
CASES = {case["name"]: case for case in GOLDENS["cases"]}
# greedy-token parity on the host preview (the pixel values of every case are proven identical by
# hash; the tokens depend only on ids and pixels): a short clip, the 64-frame clip, per-request
# overrides, a multi-turn conversation and the per-part cases
GREEDY = ["plain/h264_24fps_96x64.mp4", "plain/h264_70s_25fps_64x48.mp4", "multi_turn", "num_frames_8", "fps_2",
          "two_videos", "video_image"]
MAX_NEW_TOKENS = 10


@pytest.fixture(scope="module")
def bundle(runtime_bundles):
    return runtime_bundles["smolvlm2"]


@pytest.fixture(scope="module")
def frames(bundle) -> dict:
    """Every golden video through the board's frame pipeline, once: {(case, video ordinal): Frames}."""
    out = {}
    for case in GOLDENS["cases"]:
        for k, video in enumerate(case["videos"]):
            out[case["name"], k] = frame_pipeline(CLIPS_DIR / video["clip"], bundle.video_settings,
                                                  case["sampling"].get("fps"), case["sampling"].get("num_frames"))
    return out


# -- the goldens belong to this checkout --------------------------------------------------------------
def test_goldens_were_made_from_these_clips_and_this_checkpoint(tiny_checkpoints):
    checkpoint = tiny_checkpoints["smolvlm2"]
    assert sha256((checkpoint / "tokenizer.json").read_bytes()) == GOLDENS["checkpoint"]["tokenizer_sha256"], \
        "the tiny checkpoint's tokenizer changed: regenerate the goldens (scripts/make_video_goldens.py)"
    for clip, info in GOLDENS["clips"].items():
        assert sha256((CLIPS_DIR / clip).read_bytes()) == info["sha256"], \
            f"{clip} changed: regenerate the goldens (scripts/make_video_goldens.py)"
        assert info["backend"] == "torchcodec"  # transformers' default backend made the references


def test_bundle_video_settings_are_the_processors(bundle):
    settings, processor = bundle.video_settings, GOLDENS["video_processor"]
    assert (settings.fps, settings.max_frames, settings.longest_edge, settings.frame_size) == \
        (processor["fps"], processor["num_frames"], processor["size"], processor["max_image_size"])
    assert list(settings.image_mean) == processor["image_mean"] and list(settings.image_std) == processor["image_std"]
    assert settings.rescale_factor == processor["rescale_factor"] and settings.skip_secs == 1
    assert bundle.manifest.video.chat_template == GOLDENS["chat_template"]


# -- frames ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("clip", sorted(GOLDENS["clips"]))
def test_probe_gives_transformers_metadata(frames, clip):
    name, k = next((c["name"], k) for c in GOLDENS["cases"] for k, v in enumerate(c["videos"]) if v["clip"] == clip)
    assert clip_metadata_problems(GOLDENS, clip, frames[name, k].info) == []


@pytest.mark.parametrize("name", list(CASES))
def test_frames_and_pixel_values_are_transformers(frames, name):
    for k, video in enumerate(CASES[name]["videos"]):
        assert compare_frames(video, frames[name, k]) == [], video["clip"]
        assert video["pixel_attention_mask_all_ones"]  # frames are whole tiles: the mask can be dropped


def test_real_256m_settings_pixel_values(bundle):
    """SmolVLM2-256M/500M's own video settings: stage 1 to a 2048 longest edge, frames 512×512."""
    real = GOLDENS["real_settings"]
    assert real["settings"]["size"]["longest_edge"] == 2048
    settings = dataclasses.replace(bundle.video_settings, longest_edge=real["settings"]["size"]["longest_edge"],
                                   frame_size=real["settings"]["max_image_size"]["longest_edge"],
                                   fps=real["settings"]["video_sampling"]["fps"],
                                   max_frames=real["settings"]["video_sampling"]["max_frames"])
    for clip, golden in real["clips"].items():
        got = frame_pipeline(CLIPS_DIR / clip, settings)
        assert got.pixel_values.shape == tuple(golden["pixel_values_shape"])
        assert compare_frames(golden, got) == [], clip


# -- prompts --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def fake_runner(bundle):
    from support.fakes import FakeLlm, FakeVision

    return lambda: video_runner(bundle, FakeVision.for_bundle(bundle), FakeLlm([bundle.stop_ids[0]]))


def _prompt(fake_runner, name):
    from rksmolvlm.runtime.engines import GenerationConfig

    runner = fake_runner()
    try:
        return runner.generate(case_messages(CASES[name], GOLDENS), GenerationConfig(max_new_tokens=1)).consume()
    finally:
        runner.close()


@pytest.mark.parametrize("name", [n for n in CASES if n not in PER_PART])
def test_prompt_ids_are_transformers(fake_runner, bundle, name):
    case = CASES[name]
    got = _prompt(fake_runner, name)
    assert got.prefill_ids == case["input_ids"]
    assert bundle.assembler.render(_conversation(case)).text == case["rendered"]


def _conversation(case):
    from rksmolvlm.processing.content import conversation

    return conversation(case_messages(case, GOLDENS))


ANNOUNCED = re.compile(r"series of ([a-z\- ,]+) frames from a (\d+:\d\d:\d\d) \[H:MM:SS\] video")


def test_two_videos_each_announce_their_own_frames(fake_runner, bundle):
    """transformers announces the longest video's frame count for both ("three" for a 2-frame video);
    ours equals the per-part reference: each video announces its own count and its frames are those
    of its single-video golden."""
    case = CASES["two_videos"]
    assert case["transformers_differs"] and [v["announced"][0] for v in case["videos"]] == ["three", "three"]
    got = _prompt(fake_runner, "two_videos").prefill_ids
    assert got == case["reference_ids"]
    text = bundle.tokenizer.decode(got, skip_special_tokens=False)
    singles = [CASES[f"plain/{video['clip']}"] for video in case["videos"]]
    assert ANNOUNCED.findall(text) == [tuple(s["videos"][0]["announced"]) for s in singles] == \
        [("three", "0:00:03"), ("two", "0:00:02")]
    blocks = [_frame_block(bundle, s["input_ids"], len(s["videos"][0]["indices"])) for s in singles]
    first = _find(got, blocks[0])
    assert first >= 0 and _find(got, blocks[1], first + len(blocks[0])) > first


def test_video_beside_an_image_keeps_the_images_split_and_pixels(fake_runner, bundle):
    """transformers replaces the image's pixel values by the video's; ours keeps the image's own
    expansion (its split as the image-only processor makes it) and its own tiles."""
    from rksmolvlm.processing.image import normalize, tile_image
    from rksmolvlm.processing.prompt import expand_image

    case = CASES["video_image"]
    assert case["transformers_pixel_values_are_the_videos"]
    got = _prompt(fake_runner, "video_image").prefill_ids
    assert got == case["reference_ids"]
    image = case["image"]
    tiled = tile_image(_pil(goldens_image(case)), bundle.settings)
    assert (tiled.rows, tiled.cols) == (image["rows"], image["cols"]) == (3, 4)
    assert [sha256(t) for t in normalize(tiled.tiles, bundle.settings)] == image["tile_sha256"]
    single = CASES["plain/h264_24fps_96x64.mp4"]
    video_at = _find(got, _frame_block(bundle, single["input_ids"], len(single["videos"][0]["indices"])))
    assert video_at >= 0
    image_block = bundle.tokenizer.encode_trusted(expand_image(image["rows"], image["cols"],
                                                               bundle.assembler.tokens))
    assert _find(got, image_block, video_at) > video_at


def _pil(array):
    from PIL import Image

    return Image.fromarray(array)


def _frame_block(bundle, ids: list[int], frames: int) -> list[int]:
    """The frames of a single-video prompt: from the first frame's timestamp line to the last frame's
    closing token (the intro and the blank line after the frames merge with the text around them)."""
    fake = bundle.tokenizer.token_id("<fake_token_around_image>")
    newline = bundle.tokenizer.encode_text("\n")
    first = ids.index(fake)
    last = len(ids) - 1 - ids[::-1].index(fake)
    start = max(i for i in range(first) if ids[i:i + len(newline)] == newline)
    block = ids[start:last + 1]
    assert block.count(bundle.assembler.tokens.image_id) == frames * GOLDENS["video_processor"]["image_seq_len"]
    return block


def _find(haystack: list[int], needle: list[int], start: int = 0) -> int:
    """Where ``needle`` first occurs in ``haystack`` at or after ``start``; -1 if nowhere."""
    n = len(needle)
    return next((i for i in range(start, len(haystack) - n + 1) if haystack[i:i + n] == needle), -1)


# -- greedy tokens on the host preview ------------------------------------------------------------------
@pytest.fixture(scope="module")
def host_runner(bundle):
    from rksmolvlm.runners import open_engines

    runner = video_runner(bundle, *open_engines(bundle, "host"))
    yield runner
    runner.close()


@pytest.fixture(scope="module")
def hf_model(tiny_checkpoints):
    import transformers as tf

    return tf.SmolVLMForConditionalGeneration.from_pretrained(tiny_checkpoints["smolvlm2"]).eval()


def _reference_pixels(name: str, frames, bundle) -> np.ndarray:
    """The pixel values transformers' model is fed: ours (byte-identical to transformers', checked by
    test_frames_and_pixel_values_are_transformers), videos and the image in prompt order."""
    from rksmolvlm.processing.image import normalize, tile_image

    case = CASES[name]
    parts = [p for m in case["messages"] for p in m["content"] if p["type"] in ("video", "image")]
    out, k = [], 0
    for p in parts:
        if p["type"] == "video":
            assert sha256(frames[name, k].pixel_values) == case["videos"][k]["pixel_sha256"]
            out.append(frames[name, k].pixel_values)
            k += 1
        else:
            tiled = tile_image(_pil(goldens_image(case)), bundle.settings)
            out.append(normalize(tiled.tiles, bundle.settings))
    return np.concatenate(out)


def _hf_generate(model, ids: list[int], pixels: np.ndarray, new_tokens: int = MAX_NEW_TOKENS
                 ) -> tuple[list[int], np.ndarray]:
    """transformers' greedy tokens for ``ids`` and ``pixels`` (frames and tiles in prompt order, all
    valid), and the decoder input its first forward pass built (token embeddings with the image
    features spliced in)."""
    import torch

    captured = []
    hook = model.model.text_model.register_forward_pre_hook(
        lambda module, args, kwargs: captured.append(kwargs["inputs_embeds"][0].detach().numpy().copy()),
        with_kwargs=True)
    pixel_values = torch.from_numpy(pixels)[None]
    mask = torch.ones((1, pixels.shape[0], pixels.shape[2], pixels.shape[3]), dtype=torch.bool)
    try:
        with torch.no_grad():
            out = model.generate(input_ids=torch.tensor([ids]),
                                 attention_mask=torch.ones((1, len(ids)), dtype=torch.long),
                                 pixel_values=pixel_values, pixel_attention_mask=mask, max_new_tokens=new_tokens,
                                 do_sample=False)
    finally:
        hook.remove()
    return out[0, len(ids):].tolist(), captured[0]


@pytest.fixture
def prefills(host_runner, monkeypatch) -> list[np.ndarray]:
    """The decoder inputs the host runner's LLM engine is given, one per generate call."""
    llm, seen = host_runner.llm, []
    generate = llm.generate

    def recording(embeddings, *args, **kwargs):
        seen.append(np.array(embeddings, dtype=np.float32, copy=True))
        return generate(embeddings, *args, **kwargs)

    monkeypatch.setattr(llm, "generate", recording)
    return seen


# onnxruntime's vision tower against torch's: float32 reassociation only
FEATURE_TOLERANCE = 2e-5


@pytest.mark.parametrize("name", GREEDY)
def test_greedy_tokens_are_transformers(host_runner, hf_model, frames, bundle, prefills, name):
    """Same prompt ids, the same decoder input (the features of the right frames at the right
    positions, within float tolerance of transformers' own vision tower) and the same tokens."""
    from rksmolvlm.runtime.engines import GenerationConfig

    case = CASES[name]
    ids = case["reference_ids"] if name in PER_PART else case["input_ids"]
    expected, embeds = _hf_generate(hf_model, ids, _reference_pixels(name, frames, bundle))
    got = host_runner.generate(case_messages(case, GOLDENS), GenerationConfig(max_new_tokens=MAX_NEW_TOKENS)).consume()
    assert got.prefill_ids == ids
    image = np.asarray(ids) == bundle.assembler.tokens.image_id
    assert np.array_equal(prefills[0][~image], embeds[~image])  # the text positions: the same table
    assert np.abs(prefills[0][image] - embeds[image]).max() < FEATURE_TOLERANCE
    assert got.token_ids == expected


def test_the_decoder_input_check_sees_the_frames(hf_model, frames, bundle):
    """The feature check has teeth (the tiny model's greedy tokens alone barely depend on the
    pixels): negated or reordered frames move the features far beyond the tolerance."""
    name = "fps_2"
    pixels = _reference_pixels(name, frames, bundle)
    ids = CASES[name]["input_ids"]
    image = np.asarray(ids) == bundle.assembler.tokens.image_id
    _, real = _hf_generate(hf_model, ids, pixels, 1)
    for other in (-pixels, pixels[::-1].copy()):  # (all-zero frames would be dropped as padding)
        _, embeds = _hf_generate(hf_model, ids, other, 1)
        assert np.abs(embeds[image] - real[image]).max() > 1000 * FEATURE_TOLERANCE


# -- the board path -------------------------------------------------------------------------------------
def test_board_path_without_torch_gives_the_goldens(preview_bundles):
    """In a process where torch, transformers, onnx, onnxruntime and rknn cannot be imported, every
    golden case gives transformers' indices, timestamps, frames, pixel values and prompt ids."""
    script = ROOT / "tests" / "support" / "video_board_path.py"
    out = subprocess.run([sys.executable, str(script), str(preview_bundles["smolvlm2"])], check=False,
                         capture_output=True, text=True, timeout=300, cwd=ROOT / "tests")
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["checked"] == list(CASES)
    assert report["problems"] == []
    assert report["host_only_loaded"] == []

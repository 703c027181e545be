"""Image detail (OpenAI's image_url.detail): "low" is one unsplit tile exactly as transformers'
processors with do_image_splitting=False (pixels byte for byte, prompt ids, greedy tokens), "high"
the full split, "auto" the runner's default; low and high mix in one request; images that do not
fit the context split are unsplit, the costliest first, before a request is refused; the feature
cache keeps split modes apart; the server takes detail from image_url and answers 12 low images."""

from __future__ import annotations

import base64
import io
import json
import math
from dataclasses import replace

import numpy as np
import openai
import pytest
from PIL import Image

from support.fakes import fake_runner, FakeVision

from support.images import rng_image

from support.parity import HfProcessor
from rksmolvlm.runners import RUNNERS
from rksmolvlm.processing.assembler import Layout
from rksmolvlm.processing.content import ImagePart, Message, TextPart, conversation
from rksmolvlm.processing.image import ImageSettings, image_size, load_image, normalize, split_layout, tile_image
from rksmolvlm.runtime.engines import GenerationConfig
from rksmolvlm.runtime.runner import ContextError, InputError, Runner, choose_unsplit
from rksmolvlm.runtime.vision import FeatureCache, ImageEncoder

NAMES = ["idefics3-256m", "idefics3-2b", "smolvlm2"]
CONFIG = GenerationConfig(max_new_tokens=12)


def _ask(*images, text="What is it?"):
    """One user message: image parts (a PIL image, or (image, detail)) then the text."""
    parts = []
    for image in images:
        source, detail = image if isinstance(image, tuple) else (image, None)
        parts.append({"type": "image", "image": source, **({"detail": detail} if detail else {})})
    return [{"role": "user", "content": [*parts, {"type": "text", "text": text}]}]


# -- pixels: "low" is transformers' do_image_splitting=False, byte for byte -----------------------
GEOMETRIES = {  # processor class name, tile, longest edge: the published ones and the fixtures'
    "idefics3-512": ("Idefics3ImageProcessorPil", 512, 2048),
    "idefics3-384": ("Idefics3ImageProcessorPil", 384, 1536),
    "smolvlm-512": ("SmolVLMImageProcessorPil", 512, 2048),
    "smolvlm-64": ("SmolVLMImageProcessorPil", 64, 256),
}
CASES = [(640, 480, "RGB"), (480, 640, "RGB"), (512, 512, "RGB"), (100, 60, "RGB"), (7, 300, "RGB"),
         (2100, 900, "RGB"), (4100, 300, "RGB"), (333, 222, "L"), (300, 200, "RGBA"), (257, 129, "P")]


@pytest.mark.parametrize("geometry", sorted(GEOMETRIES))
@pytest.mark.parametrize("width,height,mode", CASES)
def test_low_pixels_equal_the_unsplit_processor(geometry, width, height, mode):
    import transformers as tf

    name, tile, longest = GEOMETRIES[geometry]
    processor = getattr(tf, name)(size={"longest_edge": longest}, max_image_size={"longest_edge": tile},
                                  do_image_splitting=False)
    image = rng_image(width, height, mode, seed=width + 3 * height)
    reference = processor(images=[[image]], return_tensors="np", return_row_col_info=True)
    settings = ImageSettings(tile_size=tile, longest_edge=longest)  # a splitting checkpoint, asked for low
    encoder = ImageEncoder(FakeVision(4, 8), settings)
    [prepared] = encoder.prepare([ImagePart(image, "low")], [False])
    assert prepared.layout == Layout(0, 0) == Layout(reference["rows"][0][0], reference["cols"][0][0])
    assert prepared.tiles.shape == (1, tile, tile, 3) and prepared.tiles.dtype == np.uint8
    ours = normalize(prepared.tiles, settings)
    assert ours.shape == reference["pixel_values"][0].shape
    assert ours.tobytes() == reference["pixel_values"][0].tobytes()


@pytest.mark.parametrize("width,height,mode", CASES)
def test_predicted_layouts_equal_the_tiles(width, height, mode, tmp_path):
    """The runner plans from image headers: the predicted size and layout are the decoded ones."""
    image = rng_image(width, height, mode, seed=1)
    path = tmp_path / "x.png"
    image.save(path, compress_level=0)
    for source in (image, path, path.read_bytes()):
        assert image_size(source) == load_image(source).size
    loaded = load_image(image)
    for settings in (ImageSettings(64, 256), ImageSettings(512, 2048), ImageSettings(128, 512)):
        tiled = tile_image(loaded, settings)
        assert split_layout(width, height, settings) == (tiled.rows, tiled.cols)
        assert ImageEncoder(FakeVision(4, 8), settings).layout(ImagePart(path), True) == Layout(tiled.rows, tiled.cols)


def test_predicted_size_follows_exif_orientation(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise to display
    path = tmp_path / "rot.jpg"
    rng_image(300, 100).save(path, format="JPEG", exif=exif, quality=95)
    assert image_size(path) == load_image(path).size == (100, 300)
    assert image_size(b"not an image") is None


def test_a_png_orientation_after_the_pixels_is_caught_when_tiled(runtime_bundles):
    """A PNG's eXIf chunk after the pixel data is not in the header: the prediction is off, and the
    prompt is assembled with the layout of the decoded image all the same."""
    import zlib

    buffer = io.BytesIO()
    rng_image(300, 100).save(buffer, format="PNG")
    png = buffer.getvalue()
    exif = Image.Exif()
    exif[0x0112] = 6
    body = exif.tobytes().removeprefix(b"Exif\x00\x00")
    chunk = len(body).to_bytes(4, "big") + b"eXIf" + body + zlib.crc32(b"eXIf" + body).to_bytes(4, "big")
    end = png.rindex(b"IEND") - 4
    png = png[:end] + chunk + png[end:]
    assert image_size(png) == (300, 100) and load_image(png).size == (100, 300)
    bundle = runtime_bundles["idefics3-256m"]
    runner = fake_runner(bundle, [5])
    tiled = tile_image(load_image(png), bundle.settings)
    assert runner.images.layout(ImagePart(png), True) != Layout(tiled.rows, tiled.cols)
    got = runner.generate(_ask(png), CONFIG).consume()
    expected = runner.assembler.assemble(conversation(_ask(png)), [Layout(tiled.rows, tiled.cols)])
    assert got.prefill_ids == expected.ids and runner.images.encoder.calls == [tiled.count]


# -- prompt ids and greedy tokens equal transformers -----------------------------------------------
class Reference(HfProcessor):
    """transformers' processor (per image split mode) and model for one checkpoint."""

    def __init__(self, path):
        import transformers as tf

        super().__init__(path)
        self.model = tf.AutoModelForImageTextToText.from_pretrained(path).eval()

    def split_inputs(self, text: str, images: list, splits: list[bool], piecewise: bool = False):
        """(ids, pixel values) with image i tiled as ``splits[i]`` says. When every image is tiled the
        same way on an Idefics3 checkpoint, the processor itself is called with do_image_splitting;
        otherwise its image processor per image and transformers' own image prompt strings."""
        import torch
        from transformers.models.smolvlm.processing_smolvlm import get_image_prompt_string

        if not self.smolvlm and len(set(splits)) == 1 and not piecewise:
            out = self.processor(text=text, images=[images], do_image_splitting=splits[0], return_tensors="pt")
            return out["input_ids"][0].tolist(), out["pixel_values"]
        image_processor = self.images if self.smolvlm else self.processor.image_processor
        seq_len = self.seq_len if self.smolvlm else self.processor.image_seq_len
        pieces, pixels = text.split("<image>"), []
        text = pieces[0]
        for image, split, piece in zip(images, splits, pieces[1:]):
            out = image_processor(images=[[image]], do_image_splitting=split, return_tensors="np",
                                  return_row_col_info=True)
            pixels.append(out["pixel_values"][0])
            text += get_image_prompt_string(out["rows"][0][0], out["cols"][0][0], seq_len,
                                            "<fake_token_around_image>", "<image>", "<global-img>") + piece
        return self.tokenizer(text, add_special_tokens=False)["input_ids"], torch.from_numpy(
            np.concatenate(pixels)[None])

    def generate(self, ids, pixel_values, max_new_tokens):
        import torch

        with torch.no_grad():
            out = self.model.generate(input_ids=torch.tensor([ids]), pixel_values=pixel_values,
                                      max_new_tokens=max_new_tokens, do_sample=False)
        return out[0, len(ids):].tolist()


@pytest.fixture(scope="module")
def setups(preview_bundles, runtime_bundles, tiny_checkpoints):
    from rksmolvlm.runners import open_engines

    out = {}
    for name in NAMES:
        bundle = runtime_bundles[name]
        out[name] = (Runner(bundle, *open_engines(bundle, "host")), Reference(tiny_checkpoints[name]))
    yield out
    for runner, _ in out.values():
        runner.close()


def _parity(runner, reference, messages, splits, config=CONFIG):
    images = [p["image"] for m in messages for p in m["content"] if p["type"] == "image"]
    ids, pixel_values = reference.split_inputs(reference.template(messages), images, splits)
    got = runner.generate(messages, config).consume()
    assert got.prefill_ids == ids and got.prompt_tokens == len(ids)
    assert got.stats.vision_tiles + got.stats.vision_cached_images > 0
    assert got.token_ids == reference.generate(ids, pixel_values, config.max_new_tokens)
    return got


@pytest.mark.parametrize("name", NAMES)
def test_low_detail_equals_transformers_unsplit(setups, name):
    runner, reference = setups[name]
    images = [rng_image(500, 300, seed=21), rng_image(90, 160, "L", seed=22)]
    messages = _ask(*((i, "low") for i in images))
    got = _parity(runner, reference, messages, [False, False])
    assert got.stats.vision_tiles == 2  # one tile each
    if not reference.smolvlm:  # the per-image reference (for mixed requests) is the processor's own
        whole = reference.split_inputs(reference.template(messages), images, [False, False])
        pieces = reference.split_inputs(reference.template(messages), images, [False, False], piecewise=True)
        assert whole[0] == pieces[0] and whole[1].numpy().tobytes() == pieces[1].numpy().tobytes()


@pytest.mark.parametrize("name", NAMES)
def test_low_and_high_mix_in_one_request(setups, name):
    runner, reference = setups[name]
    a, b, c = rng_image(320, 200, seed=24), rng_image(200, 320, seed=25), rng_image(150, 150, seed=26)
    _parity(runner, reference, _ask((a, "low"), (b, "high"), (c, "low"), text="Compare them."), [False, True, False])


@pytest.mark.parametrize("name", ["idefics3-2b", "smolvlm2"])  # both classes, both token layouts
def test_images_over_the_context_split_are_unsplit_first_come_first(setups, name):
    """26 images of one size do not fit 2048 tokens split: the fewest are unsplit to fit, the
    earliest first (equal costs), and the answer is exact with transformers on that mix."""
    runner, reference = setups[name]
    n = 26
    images = [rng_image(300, 200, seed=100 + i) for i in range(n)]
    messages = _ask(*images, text="Which one is brightest?")
    text = reference.template(messages)
    split_ids, _ = reference.split_inputs(text, images, [True] * n)
    unsplit_ids, _ = reference.split_inputs(text, images, [False] * n)
    context = runner.bundle.max_context
    assert len(split_ids) + CONFIG.max_new_tokens > context >= len(unsplit_ids) + CONFIG.max_new_tokens
    saving, rest = divmod(len(split_ids) - len(unsplit_ids), n)
    assert rest == 0
    k = math.ceil((len(split_ids) + CONFIG.max_new_tokens - context) / saving)
    assert 0 < k < n
    got = _parity(runner, reference, messages, [False] * k + [True] * (n - k))
    assert got.prompt_tokens + CONFIG.max_new_tokens <= context


# -- the fallback plan, on fake engines ----------------------------------------------------------
def test_choose_unsplit_takes_the_largest_savings_first():
    assert choose_unsplit([10, 50, 0, 50, 20], 0) == set()
    assert choose_unsplit([10, 50, 0, 50, 20], 40) == {1}
    assert choose_unsplit([10, 50, 0, 50, 20], 60) == {1, 3}
    assert choose_unsplit([10, 50, 0, 50, 20], 125) == {1, 3, 4, 0}
    assert choose_unsplit([10, 50, 0, 50, 20], 131) is None
    assert choose_unsplit([0, 0], 1) is None


def test_the_costliest_images_are_unsplit_first(runtime_bundles):
    bundle = runtime_bundles["idefics3-256m"]  # tile 128, longest edge 512
    runner = fake_runner(bundle, [5, 6, 7])
    wide, square, small = rng_image(512, 128, seed=1), rng_image(500, 500, seed=2), rng_image(120, 90, seed=3)
    images = [wide, square, small] * 8  # 24 images: 5, 17 and 13 tiles split
    full = runner.generate(_ask(*images), GenerationConfig(max_new_tokens=1)).consume()
    assert runner.images.encoder.calls == [5, 17, 13]  # repeated images are encoded once
    room = bundle.max_context - full.prompt_tokens  # what the split prompt leaves
    # ask for 60 tokens more than that room: unsplitting one square (16 tiles) saves enough
    runner.images.encoder.calls.clear()
    config = GenerationConfig(max_new_tokens=room + 60)
    got = runner.generate(_ask(*images), config).consume()
    assert runner.images.encoder.calls == [1]  # the first square unsplit; the rest from the cache
    assert got.stats.vision_cached_images == 23
    assert got.prompt_tokens < full.prompt_tokens and got.prompt_tokens + config.max_new_tokens <= bundle.max_context
    saving = full.prompt_tokens - got.prompt_tokens
    one_square = (runner.generate(_ask((square, "high")), CONFIG).consume().prompt_tokens
                  - runner.generate(_ask((square, "low")), CONFIG).consume().prompt_tokens)
    assert saving == one_square  # exactly one square was unsplit
    # more room: every square, then the small ones (13 tiles) — never before all squares
    runner.images.encoder.calls.clear()
    config = GenerationConfig(max_new_tokens=room + 8 * saving + 1)
    got = runner.generate(_ask(*images), config).consume()
    assert runner.images.encoder.calls == [1]  # the first small image unsplit (the squares are cached)
    assert got.prompt_tokens + config.max_new_tokens <= bundle.max_context


def test_unsplit_images_that_still_do_not_fit_are_refused_before_any_vision_work(runtime_bundles):
    runner = fake_runner(runtime_bundles["idefics3-256m"], [5])
    images = [rng_image(300, 200, seed=i) for i in range(32)]
    with pytest.raises(ContextError, match="context of 2048"):
        runner.generate(_ask(*images, text="word " * 1900), CONFIG).consume()
    assert runner.images.encoder.calls == [] and runner.llm.prefills == []
    # explicit "high" is never unsplit
    with pytest.raises(ContextError):
        runner.generate(_ask(*((i, "high") for i in images)), CONFIG).consume()
    got = runner.generate(_ask(*images), CONFIG).consume()  # the same images, detail auto: answered
    assert got.finish_reason is not None


def test_default_detail_decides_what_auto_means(runtime_bundles):
    bundle = runtime_bundles["smolvlm2"]
    images = [rng_image(300, 200, seed=i) for i in range(40)]
    high = fake_runner(bundle, [5], default_detail="high")
    with pytest.raises(ContextError):  # 40 split images are over the context
        high.generate(_ask(*images), CONFIG).consume()
    high.generate(_ask(*((i, "low") for i in images)), CONFIG).consume()  # "low" asked: obeyed
    low = fake_runner(bundle, [5], default_detail="low")
    low.generate(_ask(*images), CONFIG).consume()
    assert low.images.encoder.calls == [1] * 40
    fit = fake_runner(bundle, [5], default_detail="auto-fit")
    fit.generate(_ask(*images), CONFIG).consume()
    assert 1 in fit.images.encoder.calls and max(fit.images.encoder.calls) > 1  # some unsplit, some not
    with pytest.raises(ValueError, match="default_detail"):
        fake_runner(bundle, default_detail="medium")


def test_a_capped_answer_keeps_images_split_for_fit_answer_tokens(runtime_bundles):
    """max_tokens larger than anything fits (the server's "until the context ends"): images are
    fitted for fit_answer_tokens, and the answer is capped to the room left."""
    bundle = runtime_bundles["idefics3-256m"]
    images = [rng_image(300, 200, seed=i) for i in range(20)]
    runner = fake_runner(bundle, [5] * 3000, fit_answer_tokens=500)
    whole = runner.generate(_ask(*images), GenerationConfig(max_new_tokens=1)).consume().prompt_tokens
    assert whole + 500 > bundle.max_context > whole  # fits split with less room than 500
    runner.images.encoder.calls.clear()
    config = GenerationConfig(max_new_tokens=16384, cap_to_context=True)
    got = runner.generate(_ask(*images), config).consume()
    unsplit = runner.images.encoder.calls.count(1)
    assert 0 < unsplit < 20
    room = bundle.max_context - got.prompt_tokens
    assert 500 <= room and len(got.token_ids) == room and got.finish_reason == "length"


# -- the feature cache keeps split modes apart ---------------------------------------------------
def test_the_feature_cache_keys_split_modes_apart(runtime_bundles):
    runner = fake_runner(runtime_bundles["idefics3-256m"], [5])
    image = rng_image(400, 300, seed=31)
    part = ImagePart(image)
    assert FeatureCache.key(part, True) != FeatureCache.key(part, False)
    low = runner.generate(_ask((image, "low")), CONFIG).consume()
    high = runner.generate(_ask((image, "high")), CONFIG).consume()
    assert runner.images.encoder.calls == [1, 13]  # both encoded: different tiles
    assert high.prompt_tokens > low.prompt_tokens
    again = runner.generate(_ask((image, "low"), (image, "high")), CONFIG).consume()
    assert runner.images.encoder.calls == [1, 13] and again.stats.vision_cached_images == 2


def test_a_bundle_that_does_not_split_tiles_every_detail_alike(runtime_bundles):
    bundle = runtime_bundles["idefics3-256m"]
    runner = fake_runner(bundle)
    runner.images = ImageEncoder(runner.images.encoder, replace(bundle.settings, do_image_splitting=False))
    image = rng_image(400, 300, seed=32)
    runner.generate(_ask((image, "high")), CONFIG).consume()
    runner.generate(_ask((image, "low")), CONFIG).consume()
    assert runner.images.encoder.calls == [1]  # one tile, one cache entry


# -- the typed input --------------------------------------------------------------------------------
def test_detail_travels_on_the_image_part(runtime_bundles):
    [message] = conversation(_ask((b"png", "low"), b"png"))
    assert [p.detail for p in message.parts[:2]] == ["low", "auto"]
    with pytest.raises(ValueError, match="detail 'medium'"):
        conversation(_ask((b"png", "medium")))
    with pytest.raises(ValueError, match="detail"):
        ImagePart(b"png", "ultra")
    with pytest.raises(InputError, match="detail"):
        fake_runner(runtime_bundles["smolvlm2"]).generate(_ask((rng_image(10, 10), "HIGH")), CONFIG)


def test_a_session_continues_with_low_images_and_starts_over_when_a_detail_changes(runtime_bundles):
    eou = runtime_bundles["idefics3-256m"].tokenizer.token_id("<end_of_utterance>")
    runner = fake_runner(runtime_bundles["idefics3-256m"], [5, eou])
    session = runner.session()
    image, second = rng_image(300, 200, seed=41), rng_image(200, 300, seed=42)
    turn1 = _ask((image, "low"))
    g1 = session.generate(turn1, CONFIG).consume()
    turn2 = turn1 + [{"role": "assistant", "content": g1.text}, *_ask((second, "low"), text="And this?")]
    g2 = session.generate(turn2, CONFIG).consume()
    assert g2.reused_tokens > 0 and runner.images.encoder.calls == [1, 1]
    changed = [_ask((image, "high"))[0], *turn2[1:]]
    g3 = session.generate(changed, CONFIG).consume()
    assert g3.reused_tokens == 0


def test_ask_takes_detail(preview_bundles, tmp_path, capsys):
    from rksmolvlm.cli import main

    path = tmp_path / "photo.png"
    rng_image(300, 200, seed=5).save(path)
    answers = {}
    for detail in ("low", "high"):
        assert main(["ask", str(preview_bundles["smolvlm2"]), "--engine", "host", "--image", str(path), "--detail",
                     detail, "--prompt", "What is it?", "--max-new-tokens", "2", "--json"]) == 0
        answers[detail] = json.loads(capsys.readouterr().out)
    assert answers["low"]["timings"]["vision_tiles"] == 1
    assert answers["high"]["prompt_tokens"] > answers["low"]["prompt_tokens"]


# -- the server ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def server(preview_bundles):
    from rksmolvlm.runtime.server import BackgroundServer, build_app
    from rksmolvlm.runtime.server.config import ServerConfig, with_overrides

    config = with_overrides(ServerConfig(), {"bundle": str(preview_bundles["idefics3-256m"]), "engine": "host"})
    assert config.limits.max_images >= 20 and config.images.default_detail == "auto-fit"
    app = build_app(config, RUNNERS)
    with BackgroundServer(app, config) as served:
        yield served


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0, timeout=120)


def _png_uri(image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def _image_messages(images, detail=None, text="Which camera shows a person?"):
    parts = [{"type": "image_url", "image_url": {"url": _png_uri(i), **({"detail": detail} if detail else {})}}
             for i in images]
    return [{"role": "user", "content": [*parts, {"type": "text", "text": text}]}]


def test_server_answers_twelve_low_images(client, runtime_bundles):
    images = [rng_image(320, 240, seed=200 + i) for i in range(12)]
    reply = client.chat.completions.create(model="any", messages=_image_messages(images, "low"), max_tokens=8)
    assert reply.choices[0].finish_reason in ("stop", "length")
    timings = reply.model_extra["rksmolvlm"]["timings"]
    assert timings["vision_tiles"] + timings["vision_cached_images"] == 12
    runner = fake_runner(runtime_bundles["idefics3-256m"])
    expected = runner.generate([Message("user", (*(ImagePart(i, "low") for i in images),
                                                 TextPart("Which camera shows a person?")))], CONFIG).consume()
    assert reply.usage.prompt_tokens == expected.prompt_tokens


def test_server_unsplits_auto_images_that_do_not_fit(client, runtime_bundles):
    images = [rng_image(320, 240, seed=300 + i) for i in range(26)]
    runner = fake_runner(runtime_bundles["idefics3-256m"])
    split = runner.assembler.assemble(conversation(_ask(*images, text="Which camera shows a person?")),
                                      [runner.images.layout(ImagePart(i), True) for i in images])
    assert len(split) > runner.bundle.max_context  # split, they do not fit at all
    reply = client.chat.completions.create(model="any", messages=_image_messages(images), max_tokens=8)
    assert reply.choices[0].finish_reason in ("stop", "length")
    assert reply.usage.prompt_tokens < len(split) and reply.usage.prompt_tokens + 8 <= runner.bundle.max_context
    with pytest.raises(openai.BadRequestError) as refused:  # "high" is obeyed: they cannot fit
        client.chat.completions.create(model="any", messages=_image_messages(images, "high"), max_tokens=8)
    assert refused.value.body["code"] == "context_length_exceeded"


def test_server_refuses_an_unknown_detail(client):
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(model="any", messages=_image_messages([rng_image(32, 32)], "medium"))
    assert refused.value.body["code"] == "invalid_value"
    assert refused.value.body["param"] == "messages[0].content[0].image_url.detail"
    reply = client.chat.completions.create(model="any", messages=_image_messages([rng_image(32, 32)], "auto"),
                                           max_tokens=2)
    assert reply.choices[0].finish_reason in ("stop", "length")


def test_the_detail_keys_are_checked():
    from rksmolvlm.runtime.server.config import ConfigError, config_from_dict

    with pytest.raises(ConfigError, match="images.default_detail = 'medium' is not one of"):
        config_from_dict({"images": {"default_detail": "medium"}})
    with pytest.raises(ConfigError, match="images.fit_answer_tokens"):
        config_from_dict({"images": {"fit_answer_tokens": 0}})
    assert config_from_dict({"images": {"default_detail": "low"}}).images.default_detail == "low"

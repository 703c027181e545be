"""Resolution budgets (issue 12 item 1): ``--image-size N`` (the processor's size longest_edge),
``--max-tiles N`` and ``--no-split``, the server's images.longest_edge / max_tiles and a request's
mm_processor_kwargs — each equal to transformers' processor with the matching settings (pixels byte
for byte, rows/cols, prompt ids, greedy tokens on the host preview); the feature cache keeps
resolutions apart; bad values are clear errors; the chosen tiles are in the timings."""

from __future__ import annotations

import argparse
import base64
import io
import json

import numpy as np
import pytest

from support.fakes import FakeLlm, FakeVision, fake_runner

from support.images import rng_image
from rksmolvlm.processing.assembler import Layout
from rksmolvlm.processing.content import ImagePart, Message, TextPart
from rksmolvlm.processing.image import ImageSettings, Resolution, load_image, normalize, valid_longest_edges
from rksmolvlm.runtime.engines import GenerationConfig
from rksmolvlm.runtime.runner import InputError, Runner
from rksmolvlm.runtime.vision import FeatureCache, ImageEncoder

CONFIG = GenerationConfig(max_new_tokens=6)
GEOMETRIES = {  # processor class, tile, the checkpoint's longest edge: published ones and the fixtures'
    "idefics3-512": ("Idefics3ImageProcessorPil", 512, 2048),
    "idefics3-384": ("Idefics3ImageProcessorPil", 384, 1536),
    "smolvlm-512": ("SmolVLMImageProcessorPil", 512, 2048),
    "idefics3-128": ("Idefics3ImageProcessorPil", 128, 512),
    "smolvlm-64": ("SmolVLMImageProcessorPil", 64, 256),
}
# 2100×900 takes transformers' processor seconds per geometry: the full suite runs it, the fast lane does not
SHAPES = [(640, 480, "RGB"), (300, 700, "RGB"), pytest.param(2100, 900, "RGB", marks=pytest.mark.slow), (100, 60, "L"),
          (333, 222, "RGBA")]


def _hf(geometry: str, longest: int, split: bool = True):
    import transformers as tf

    name, tile, _ = GEOMETRIES[geometry]
    return getattr(tf, name)(size={"longest_edge": longest}, max_image_size={"longest_edge": tile},
                             do_image_splitting=split)


def _reference(geometry: str, image, longest: int, split: bool = True):
    out = _hf(geometry, longest, split)(images=[[image]], return_tensors="np", return_row_col_info=True)
    return out["pixel_values"][0], Layout(int(out["rows"][0][0]), int(out["cols"][0][0]))


def _ours(geometry: str, image, resolution: Resolution):
    _, tile, longest = GEOMETRIES[geometry]
    settings = ImageSettings(tile_size=tile, longest_edge=longest)
    [prepared] = ImageEncoder(FakeVision(4, 8), settings).prepare([ImagePart(image)], [resolution])
    return normalize(prepared.tiles, settings), prepared


def _same(ours, reference) -> bool:
    return ours.shape == reference.shape and ours.tobytes() == reference.tobytes()


# -- pixels and layouts: each mode is transformers' processor with the matching settings ---------------
@pytest.mark.parametrize("geometry", sorted(GEOMETRIES))
@pytest.mark.parametrize("width,height,mode", SHAPES)
def test_image_size_equals_the_processor_with_that_longest_edge(geometry, width, height, mode):
    _, tile, _ = GEOMETRIES[geometry]
    image = rng_image(width, height, mode, seed=width + height)
    for k in (1, 2, 3):
        ours, prepared = _ours(geometry, image, Resolution(longest_edge=k * tile))
        pixels, layout = _reference(geometry, image, k * tile)
        assert prepared.layout == layout and prepared.settings.longest_edge == k * tile
        assert prepared.tile_count == len(pixels)
        assert _same(ours, pixels), (geometry, k)
        # --no-split at that size: do_image_splitting=False with size longest_edge k·T
        ours, prepared = _ours(geometry, image, Resolution(longest_edge=k * tile, split=False))
        pixels, layout = _reference(geometry, image, k * tile, split=False)
        assert prepared.layout == layout == Layout(0, 0) and _same(ours, pixels)


@pytest.mark.parametrize("geometry", ["idefics3-512", "idefics3-384", "smolvlm-64"])
@pytest.mark.parametrize("width,height,mode", SHAPES[:3])
def test_max_tiles_is_the_largest_longest_edge_within_the_budget(geometry, width, height, mode):
    """The chosen longest_edge k·T gives at most N tiles in transformers' own split, k+1 (up to the
    model's longest edge) gives more, and the pixels are the processor's at k·T."""
    _, tile, longest = GEOMETRIES[geometry]
    image = rng_image(width, height, mode, seed=7 * width + height)
    for budget in (1, 4, 9):
        ours, prepared = _ours(geometry, image, Resolution(max_tiles=budget))
        edge = prepared.settings.longest_edge
        assert edge % tile == 0 and tile <= edge <= longest
        pixels, layout = _reference(geometry, image, edge)
        assert prepared.layout == layout and layout.rows * layout.cols <= budget and _same(ours, pixels)
        if edge < longest:
            _, bigger = _reference(geometry, image, edge + tile)
            assert bigger.rows * bigger.cols > budget
        if budget == 1:
            assert layout == Layout(0, 0) and edge == tile  # one tile: no split is possible within 1
    # max_tiles under an --image-size: k·T at most that size
    _, prepared = _ours(geometry, image, Resolution(longest_edge=2 * tile, max_tiles=100))
    assert prepared.settings.longest_edge == 2 * tile


# -- prompt ids and greedy tokens equal transformers -------------------------------------------------
class Reference:
    """transformers' tokenizer, processor pieces and model for one tiny checkpoint, at a given size."""

    def __init__(self, path):
        from support.parity import HfProcessor
        import transformers as tf

        self.hf = HfProcessor(path)
        self.model = tf.AutoModelForImageTextToText.from_pretrained(path).eval()

    def inputs(self, messages, images, **kwargs):
        """(ids, pixel values): the processor (Idefics3) or its image processor and transformers'
        image prompt strings (SmolVLM, whose processor needs torchvision) called with ``kwargs``."""
        import torch
        from transformers.models.smolvlm.processing_smolvlm import get_image_prompt_string

        hf = self.hf
        text = hf.template(messages)
        if not hf.smolvlm:
            out = hf.processor(text=text, images=[images], return_tensors="pt", **kwargs)
            return out["input_ids"][0].tolist(), out["pixel_values"]
        out = hf.images(images=[images], return_tensors="np", return_row_col_info=True, **kwargs)
        pieces = text.split("<image>")
        text = pieces[0] + "".join(
            get_image_prompt_string(r, c, hf.seq_len, "<fake_token_around_image>", "<image>", "<global-img>") + p
            for r, c, p in zip(out["rows"][0], out["cols"][0], pieces[1:]))
        return hf.tokenizer(text, add_special_tokens=False)["input_ids"], torch.from_numpy(out["pixel_values"])

    def generate(self, ids, pixel_values, max_new_tokens):
        import torch

        with torch.no_grad():
            out = self.model.generate(input_ids=torch.tensor([ids]), pixel_values=pixel_values,
                                      max_new_tokens=max_new_tokens, do_sample=False)
        return out[0, len(ids):].tolist()


def _ask(*images, text="Describe it."):
    return [{"role": "user", "content": [*({"type": "image", "image": i} for i in images),
                                         {"type": "text", "text": text}]}]


@pytest.fixture(scope="module")
def references(tiny_checkpoints):
    return {name: Reference(tiny_checkpoints[name]) for name in ("idefics3-256m", "idefics3-2b", "smolvlm2")}


@pytest.mark.parametrize("name", ["idefics3-256m", "idefics3-2b", "smolvlm2"])
def test_prompt_ids_equal_the_processor_in_every_mode(references, runtime_bundles, name):
    reference = references[name]
    bundle = runtime_bundles[name]
    tile, longest = bundle.settings.tile_size, bundle.settings.longest_edge
    images = [rng_image(3 * tile, 2 * tile, seed=41), rng_image(tile + 10, 3 * tile, seed=42)]
    messages = _ask(*images)
    modes = [(Resolution(longest_edge=k * tile), {"size": {"longest_edge": k * tile}}) for k in (1, 2, 3)]
    modes.append((Resolution(split=False), {"do_image_splitting": False}))
    modes.append((Resolution(longest_edge=2 * tile, split=False),
                  {"size": {"longest_edge": 2 * tile}, "do_image_splitting": False}))
    for resolution, kwargs in modes:
        runner = fake_runner(bundle, [5], resolution=resolution)
        got = runner.generate(messages, CONFIG).consume()
        ids, pixels = reference.inputs(messages, images, **kwargs)
        assert got.prefill_ids == ids, resolution
        assert [t["tiles"] for t in got.stats.image_tiling] == runner.images.encoder.calls
        assert sum(runner.images.encoder.calls) == pixels.shape[1]  # tiles per image, all images
    # max_tiles: per image, the processor at the longest_edge our rule picked for it
    runner = fake_runner(bundle, [5], resolution=Resolution(max_tiles=4))
    got = runner.generate(messages, CONFIG).consume()
    edges = [t["longest_edge"] for t in got.stats.image_tiling]
    assert all(e % tile == 0 and e <= longest for e in edges) and all(t["rows"] * t["cols"] <= 4
                                                                     for t in got.stats.image_tiling)
    for image, edge in zip(images, edges):
        own, _ = reference.inputs(_ask(image), [image], size={"longest_edge": edge})
        alone = fake_runner(bundle, [5], resolution=Resolution(longest_edge=edge)).generate(_ask(image), CONFIG)
        assert alone.consume().prefill_ids == own
    assert got.stats.to_dict()["image_tiling"] == got.stats.image_tiling


@pytest.mark.parametrize("name", ["idefics3-256m", "smolvlm2"])
def test_greedy_tokens_equal_transformers_at_a_smaller_size(references, runtime_bundles, name):
    from rksmolvlm.runners import open_engines

    reference = references[name]
    bundle = runtime_bundles[name]
    tile = bundle.settings.tile_size
    images = [rng_image(3 * tile, 2 * tile, seed=51)]
    runner = Runner(bundle, *open_engines(bundle, "host"), resolution=Resolution(longest_edge=2 * tile))
    try:
        config = GenerationConfig(max_new_tokens=10)
        got = runner.generate(_ask(*images), config).consume()
        ids, pixels = reference.inputs(_ask(*images), images, size={"longest_edge": 2 * tile})
        assert got.prefill_ids == ids
        assert got.token_ids == reference.generate(ids, pixels, config.max_new_tokens)
        assert got.stats.vision_tiles == pixels.shape[1] == 5  # 3:2 image at 2·T: 2×2 tiles + global
    finally:
        runner.close()


# -- the feature cache keeps resolutions apart -------------------------------------------------------
def test_the_feature_cache_keeps_resolutions_apart(runtime_bundles):
    bundle = runtime_bundles["idefics3-256m"]  # tile 128, longest edge 512
    image = rng_image(400, 300, seed=61)
    runner = fake_runner(bundle, [5] * 20)
    part = ImagePart(image)
    keys = {FeatureCache.key(part, runner.images.settings_for(part, r))
            for r in (Resolution(), Resolution(longest_edge=256), Resolution(split=False),
                      Resolution(longest_edge=256, split=False))}
    assert len(keys) == 4
    for resolution in (None, Resolution(longest_edge=256), Resolution(split=False), Resolution(max_tiles=4)):
        message = Message("user", (ImagePart(image, resolution=resolution), TextPart("What?")))
        runner.generate([message], CONFIG).consume()
    assert runner.images.encoder.calls == [13, 5, 1]  # max_tiles=4 picks 256: the same tiles, cached
    again = runner.generate([Message("user", (ImagePart(image, resolution=Resolution(longest_edge=256)),
                                              TextPart("What?")))], CONFIG).consume()
    assert again.stats.vision_cached_images == 1 and runner.images.encoder.calls == [13, 5, 1]
    assert again.stats.image_tiling == [{"tiles": 5, "rows": 2, "cols": 2, "longest_edge": 256}]


def test_a_parts_resolution_takes_over_the_runners_field_by_field(runtime_bundles):
    bundle = runtime_bundles["idefics3-256m"]
    image = rng_image(500, 500, seed=62)
    runner = fake_runner(bundle, [5] * 9, resolution=Resolution(longest_edge=384))
    runner.generate(_ask(image), CONFIG).consume()
    runner.generate([Message("user", (ImagePart(image, resolution=Resolution(max_tiles=4)), TextPart("?")))],
                    CONFIG).consume()
    runner.generate([Message("user", (ImagePart(image, "low"), TextPart("?")))], CONFIG).consume()
    assert runner.images.encoder.calls == [10, 5, 1]  # 3×3+1 at 384; 2×2+1 at 256; low: one tile


# -- bad values are clear errors ---------------------------------------------------------------------
def test_bad_values_are_clear_errors(runtime_bundles):
    bundle = runtime_bundles["idefics3-256m"]
    for bad in (0, -512, 1.5, True, "512"):
        with pytest.raises(ValueError, match="at least 1"):
            Resolution(longest_edge=bad)
        with pytest.raises(ValueError, match="at least 1"):
            Resolution(max_tiles=bad)
    with pytest.raises(ValueError, match=r"not a multiple of this model's tile size 128: use one of 128, 256, 384"):
        fake_runner(bundle, resolution=Resolution(longest_edge=300))
    assert valid_longest_edges(512) == [512, 1024, 1536, 2048, 2560, 3072, 3584, 4096]
    with pytest.raises(ValueError, match="5120"):
        Resolution(longest_edge=5120).check(512)
    runner = fake_runner(bundle, [5])
    with pytest.raises(InputError, match="tile size 128"):
        runner.generate([Message("user", (ImagePart(rng_image(64, 64), resolution=Resolution(longest_edge=200)),
                                          TextPart("?")))], CONFIG).consume()
    with pytest.raises(ValueError, match="must be a Resolution"):
        ImagePart(rng_image(8, 8), resolution={"longest_edge": 256})


def _cli_args(*flags):
    from rksmolvlm.cli.options import add_runtime_arguments

    parser = argparse.ArgumentParser()
    add_runtime_arguments(parser)
    return parser.parse_args(["bundle", *flags])


def test_cli_flags(capsys, preview_bundles, tmp_path):
    from rksmolvlm.cli.options import resolution_choice
    from rksmolvlm.errors import RkSmolVLMError

    assert resolution_choice(_cli_args()) == Resolution()
    assert resolution_choice(_cli_args("--image-size", "1024", "--max-tiles", "6", "--no-split")) == \
        Resolution(1024, 6, False)
    with pytest.raises(RkSmolVLMError, match="max tiles 0 must be a whole number"):
        resolution_choice(_cli_args("--max-tiles", "0"))
    # ask on the host preview: the flag reaches the runner, the tiles are in the JSON timings
    from rksmolvlm.cli import main

    path = tmp_path / "photo.png"
    rng_image(400, 300, seed=71).save(path)
    bundle = str(preview_bundles["idefics3-256m"])
    assert main(["ask", bundle, "--engine", "host", "--image", str(path), "--prompt", "What?", "--json",
                 "--max-new-tokens", "2", "--image-size", "256"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["timings"]["image_tiling"] == [{"tiles": 5, "rows": 2, "cols": 2, "longest_edge": 256}]
    assert main(["ask", bundle, "--engine", "host", "--image", str(path), "--prompt", "What?",
                 "--image-size", "200"]) != 0
    assert "use one of 128, 256" in capsys.readouterr().err


# -- the server: config defaults reach the runner; a request's mm_processor_kwargs -------------------
def test_server_config_reaches_the_runner(runtime_bundles, monkeypatch, tmp_path):
    import rksmolvlm.runners as engines
    from rksmolvlm.runtime.server.service import open_runner
    from rksmolvlm.runtime.server.config import ConfigError, ServerConfig, load_config, with_overrides

    bundle = runtime_bundles["idefics3-256m"]
    monkeypatch.setattr(engines, "open_engines", lambda b, e, o, s=None: (FakeVision.for_bundle(b), FakeLlm()))
    config = with_overrides(ServerConfig(), {"images.longest_edge": 256, "images.max_tiles": 2})
    runner = open_runner(bundle, config, "npu", engines.RUNNERS)
    assert runner.resolution == Resolution(longest_edge=256, max_tiles=2)
    runner.close()
    assert open_runner(bundle, ServerConfig(), "npu", engines.RUNNERS).resolution == Resolution()
    with pytest.raises(ConfigError, match=r"images.longest_edge = 300: .* use one of 128, 256"):
        open_runner(bundle, with_overrides(ServerConfig(), {"images.longest_edge": 300}), "npu", engines.RUNNERS)
    path = tmp_path / "config.toml"
    path.write_text("[images]\nlongest_edge = 0\nmax_tiles = \"4\"\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert "images.longest_edge" in str(info.value) and "images.max_tiles" in str(info.value)
    path.write_text("[images]\nlongest_edge = 1024\nmax_tiles = 6\n")
    assert (load_config(path).images.longest_edge, load_config(path).images.max_tiles) == (1024, 6)


def _png_uri(image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def test_a_request_sets_its_resolution_in_mm_processor_kwargs(runtime_bundles):
    from rksmolvlm.runtime.server import ApiError, RequestReader, ServedModel
    from rksmolvlm.runtime.server.config import ServerConfig

    bundle = runtime_bundles["idefics3-256m"]
    reader = RequestReader(ServerConfig(), ServedModel.from_bundle(bundle, None, "host"))
    image = rng_image(500, 400, seed=81)

    def body(kwargs):
        payload = {"messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": _png_uri(image)}}, {"type": "text", "text": "?"}]}]}
        if kwargs is not None:
            payload["mm_processor_kwargs"] = kwargs
        return json.dumps(payload).encode()

    [message] = reader.read(body(None)).messages
    assert message.parts[0].resolution is None
    request = reader.read(body({"size": {"longest_edge": 256}, "max_tiles": 3, "do_image_splitting": False}))
    assert request.messages[0].parts[0].resolution == Resolution(256, 3, False)
    for bad, param in (({"size": 256}, "size"), ({"size": {"longest_edge": 0}}, "size"),
                       ({"max_tiles": 0}, "max_tiles"), ({"do_image_splitting": "no"}, "do_image_splitting")):
        with pytest.raises(ApiError) as info:
            reader.read(body(bad))
        assert info.value.status == 400 and info.value.param == f"mm_processor_kwargs.{param}"
    # the runner: the request's size over the config's, the tiles it chose
    runner = fake_runner(bundle, [5] * 4, resolution=Resolution(longest_edge=512))
    request = reader.read(body({"size": {"longest_edge": 256}}))
    got = runner.generate(request.messages, CONFIG).consume()
    assert got.stats.image_tiling == [{"tiles": 5, "rows": 2, "cols": 2, "longest_edge": 256}]
    bad = reader.read(body({"size": {"longest_edge": 300}}))
    with pytest.raises(InputError, match="use one of 128, 256"):
        runner.generate(bad.messages, CONFIG).consume()


def test_pixels_through_load_image_equal_for_every_mode_on_a_file(tmp_path):
    """The runner decodes a file through load_image: the same bytes as transformers on the PIL image."""
    image = rng_image(1300, 700, seed=91)
    path = tmp_path / "p.png"
    image.save(path)
    loaded = load_image(path)
    for resolution in (Resolution(longest_edge=1024), Resolution(max_tiles=3), Resolution(split=False)):
        ours, prepared = _ours("idefics3-512", str(path), resolution)
        pixels, layout = _reference("idefics3-512", loaded, prepared.settings.longest_edge,
                                    prepared.settings.do_image_splitting)
        assert prepared.layout == layout and _same(ours, pixels)
        assert np.array_equal(ours, _ours("idefics3-512", loaded, resolution)[0])

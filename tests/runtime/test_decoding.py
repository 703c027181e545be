"""The runner's decoder seam (runtime/decoding.py): every decode goes through the MediaDecoder it is
given; a prompt that cannot fit is refused from the headers before a tile is made; a request
cancelled while its images decode ends "abort" without touching the LLM."""

from collections import Counter

import numpy as np
import pytest

from support.fakes import fake_runner
from support.images import rng_image
from rksmolvlm.processing.content import ImagePart
from rksmolvlm.processing.image import load_image, tile_image
from rksmolvlm.processing.image_safety import DecodeLimits
from rksmolvlm.runtime.decoding import InlineDecoder
from rksmolvlm.runtime.engines import GenerationConfig
from rksmolvlm.runtime.runner import ContextError


class CountingDecoder(InlineDecoder):
    """The in-process decoder, counting each call; ``on_tile`` runs before each tile."""

    def __init__(self, on_tile=None):
        self.calls: Counter = Counter()
        self.on_tile = on_tile

    def image_size(self, part, limits):
        self.calls["image_size"] += 1
        return super().image_size(part, limits)

    def tile(self, part, settings, limits, aborted=lambda: False):
        self.calls["tile"] += 1
        if self.on_tile:
            self.on_tile()
        return super().tile(part, settings, limits, aborted)


@pytest.fixture
def bundle(runtime_bundles):
    return runtime_bundles["idefics3-256m"]


def _ask(*images, text="What is in the pictures?", detail="high"):
    return [{"role": "user", "content": [*({"type": "image", "image": i, "detail": detail} for i in images),
                                         {"type": "text", "text": text}]}]


def test_every_image_is_sized_and_tiled_by_the_decoder_given(bundle):
    decoder = CountingDecoder()
    images = [rng_image(500, 300, seed=1), rng_image(300, 700, seed=2)]
    runner = fake_runner(bundle, [5, bundle.stop_ids[0]], decoder=decoder)
    got = runner.generate(_ask(*images)).consume()
    assert got.finish_reason == "stop"
    assert decoder.calls == Counter(image_size=2, tile=2)
    again = runner.generate(_ask(*images)).consume()  # the features are cached: nothing is decoded again
    assert again.finish_reason == "stop" and decoder.calls["tile"] == 2


def test_over_context_is_refused_from_the_headers_before_any_tile(bundle):
    decoder = CountingDecoder()
    runner = fake_runner(bundle, [5], decoder=decoder)
    # "high" is never unsplit: 32 images and 1,900 words cannot fit the tiny bundle's context of 2,048
    images = [rng_image(300, 200, seed=k) for k in range(32)]
    with pytest.raises(ContextError, match="context of 2048"):
        runner.generate(_ask(*images, text="word " * 1900), GenerationConfig(max_new_tokens=8)).consume()
    assert decoder.calls["tile"] == 0 and decoder.calls["image_size"] == 32
    assert runner.llm.prefills == []


def test_a_request_cancelled_while_its_images_decode_ends_abort_before_the_llm(bundle):
    holder: dict = {"aborts": 1}

    def cancel_once():
        if holder["aborts"]:
            holder["aborts"] -= 1
            holder["runner"].abort()

    decoder = CountingDecoder(on_tile=cancel_once)
    runner = holder["runner"] = fake_runner(bundle, [5, bundle.stop_ids[0]], decoder=decoder)
    got = runner.generate(_ask(rng_image(500, 300, seed=3), rng_image(400, 400, seed=4))).consume()
    assert got.finish_reason == "abort" and got.token_ids == [] and got.text == ""
    assert decoder.calls["tile"] == 1  # the second image was never decoded
    assert runner.llm.prefills == []
    # the runner is usable afterwards: the next request decodes and answers
    after = runner.generate(_ask(rng_image(500, 300, seed=3))).consume()
    assert after.finish_reason == "stop"


def test_the_inline_decoder_tiles_as_the_processor_functions(bundle):
    image = rng_image(640, 480, seed=9)
    part = ImagePart(image)
    tiled = InlineDecoder().tile(part, bundle.settings, DecodeLimits())
    expected = tile_image(load_image(image), bundle.settings)
    assert (tiled.rows, tiled.cols) == (expected.rows, expected.cols)
    assert np.array_equal(tiled.tiles, expected.tiles)
    assert InlineDecoder().tile(part, bundle.settings, DecodeLimits(), aborted=lambda: True) is None

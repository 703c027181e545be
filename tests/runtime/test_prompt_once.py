"""The prompt is rendered, tokenized and assembled once per request: the cost of other image layouts
(auto-fit's unsplit images) is priced on the tokenized draft, and a layout that changes once the
image is decoded only changes the one assembly at the end. Counted per request — plain, auto-fit
that unsplits, a header that did not tell the decoded layout, a session's continuation — with the
prompt ids still the assembler's own for the layouts chosen."""

import io
import zlib
from collections import Counter

import pytest
from PIL import Image

from support.fakes import fake_runner
from support.images import rng_image
from rksmolvlm.processing.assembler import Assembler, Draft, Layout
from rksmolvlm.processing.content import conversation
from rksmolvlm.processing.image import image_size, load_image, tile_image
from rksmolvlm.runtime.engines import GenerationConfig

IMAGES = [rng_image(500, 300, seed=1), rng_image(300, 700, seed=2)]


@pytest.fixture
def bundle(runtime_bundles):
    return runtime_bundles["idefics3-256m"]


@pytest.fixture
def calls(monkeypatch) -> Counter:
    """How often the assembler rendered, drafted (tokenized) and assembled since the last clear()."""
    counts: Counter = Counter()
    for owner, name in ((Assembler, "render"), (Assembler, "draft"), (Assembler, "assemble"),
                        (Assembler, "assemble_rendered"), (Draft, "prompt")):
        original = getattr(owner, name)

        def counted(*args, _original=original, _name=name, **kwargs):
            counts[_name] += 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(owner, name, counted)
    return counts


def _ask(*images, text="What is in the pictures?"):
    return [{"role": "user", "content": [*({"type": "image", "image": i} for i in images),
                                         {"type": "text", "text": text}]}]


def _layouts(bundle, images, split=(True, True)):
    return [Layout(t.rows, t.cols) if s else Layout(0, 0)
            for t, s in ((tile_image(load_image(i), bundle.settings), s) for i, s in zip(images, split))]


ONCE = {"render": 1, "draft": 1, "prompt": 1}


def test_a_plain_request_assembles_once(bundle, calls):
    runner = fake_runner(bundle, [5, bundle.stop_ids[0]])
    got = runner.generate(_ask(*IMAGES)).consume()
    assert dict(calls) == ONCE
    calls.clear()
    expected = bundle.assembler.assemble(conversation(_ask(*IMAGES)), _layouts(bundle, IMAGES))
    assert got.prefill_ids == expected.ids


def test_auto_fit_prices_the_unsplit_images_without_assembling_them(bundle, calls):
    runner = fake_runner(bundle, [5])
    messages = conversation(_ask(*IMAGES))
    split = bundle.assembler.assemble(messages, _layouts(bundle, IMAGES))
    calls.clear()
    # one token short of room for the split prompt: the image whose split costs the most loses it
    config = GenerationConfig(max_new_tokens=bundle.max_context - len(split) + 1)
    got = runner.generate(_ask(*IMAGES), config).consume()
    assert dict(calls) == ONCE
    calls.clear()
    tiles = [t["tiles"] for t in got.stats.image_tiling]
    assert sorted(tiles)[0] == 1 and sorted(tiles)[1] > 1  # one image unsplit, the other still split
    kept = tuple(t > 1 for t in tiles)
    expected = bundle.assembler.assemble(messages, _layouts(bundle, IMAGES, kept))
    assert got.prefill_ids == expected.ids and len(expected) + config.max_new_tokens <= bundle.max_context


def test_a_header_that_did_not_tell_the_layout_still_assembles_once(bundle, calls):
    """A PNG's eXIf orientation after the pixel data: the header predicts 300×100, the decoded image
    is 100×300; the one assembly uses the decoded layout."""
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
    runner = fake_runner(bundle, [5])
    got = runner.generate(_ask(png)).consume()
    assert dict(calls) == ONCE
    calls.clear()
    expected = bundle.assembler.assemble(conversation(_ask(png)), _layouts(bundle, [png], (True,)))
    assert got.prefill_ids == expected.ids


def test_a_session_continuation_renders_and_assembles_once(bundle, calls):
    answer = bundle.tokenizer.encode_text(" Two pictures.") + [bundle.stop_ids[0]]
    runner = fake_runner(bundle, answer)
    session = runner.session()
    first = _ask(IMAGES[0])
    g1 = session.generate(first).consume()
    calls.clear()
    second = first + [{"role": "assistant", "content": g1.text}, *_ask(IMAGES[1], text="And this one?")]
    g2 = session.generate(second).consume()
    assert dict(calls) == ONCE
    assert g2.reused_tokens == g1.prompt_tokens + len(answer) and runner.llm.prefills[-1].keep_history


@pytest.mark.parametrize("name", ["idefics3-256m", "idefics3-2b", "smolvlm2"])
def test_the_draft_prices_every_layout_as_its_assembly_counts_it(runtime_bundles, name):
    """Drafted once, any layout of the images: its priced length is the assembled prompt's, and the
    prompt is the one the whole-conversation assembly gives (a video's frames fixed in the draft)."""
    from rksmolvlm.processing.assembler import VideoLayout
    from rksmolvlm.processing.content import VideoPart, media_parts

    bundle = runtime_bundles[name]
    assembler = bundle.assembler
    content = [{"type": "image", "image": IMAGES[0]}, {"type": "text", "text": "Compare"},
               {"type": "image", "image": IMAGES[1]}, {"type": "text", "text": "and say why."}]
    videos = []
    if bundle.video_settings is not None:
        content.insert(2, {"type": "video", "video": b"clip"})
        videos = [VideoLayout((0.0, 1.5, 3.0), 3.5)]
    messages = conversation([{"role": "user", "content": content}])
    media = media_parts(messages)
    draft = assembler.draft(assembler.render(messages), media, videos)
    for layouts in ([Layout(2, 2), Layout(1, 3)], [Layout(0, 0), Layout(3, 1)], [Layout(0, 0), Layout(0, 0)]):
        prompt = draft.prompt(layouts)
        laid = iter(layouts)
        whole = assembler.assemble(messages, [videos[0] if isinstance(p, VideoPart) else next(laid) for p in media])
        assert draft.length(layouts) == len(prompt) == len(whole) and prompt.ids == whole.ids
        assert [c.layout for c in prompt.images] == layouts
    with pytest.raises(ValueError, match="2 images but 1 layouts"):
        draft.length([Layout(0, 0)])

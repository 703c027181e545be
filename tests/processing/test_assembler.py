"""The assembler: messages → chunks (text ids; image slots with rows, cols and tiles) → one
embedding sequence. Prompt ids equal transformers' processor ids for every tiny layout."""

import json

import numpy as np
import pytest

from support import TINY_NAMES

from support.images import rng_image

from support.parity import HfProcessor, message_images
from rksmolvlm.processing.assembler import Assembler, ImageChunk, Layout, PromptError, TextChunk
from rksmolvlm.processing.content import conversation
from rksmolvlm.processing.embed import EmbeddingTable
from rksmolvlm.processing.image import load_image, tile_image
from rksmolvlm.processing.prompt import ChatTemplate, PromptTokens


@pytest.fixture(scope="module")
def references(tiny_checkpoints):
    return {name: HfProcessor(path) for name, path in tiny_checkpoints.items()}


def _layouts(bundle, messages):
    out = []
    for part in message_images(messages):
        tiled = tile_image(load_image(part), bundle.settings)
        out.append(Layout(tiled.rows, tiled.cols))
    return out


def _assemble(bundle, messages):
    return bundle.assembler.assemble(conversation(messages), _layouts(bundle, messages))


def _user(*content):
    return [{"role": "user", "content": [{"type": "image", "image": c} if not isinstance(c, str)
                                         else {"type": "text", "text": c} for c in content]}]


CASES = {
    "one image": _user(rng_image(500, 300, seed=1), "What is in the picture?"),
    "two images": _user("Compare", rng_image(200, 400, seed=2), " with ", rng_image(90, 60, "L", seed=3), "."),
    "text only": _user("Write a haiku about NPUs."),
    "two turns": _user(rng_image(300, 300, seed=4), "Describe.") + [
        {"role": "assistant", "content": [{"type": "text", "text": "A square."}]}] + _user(
        rng_image(130, 700, seed=5), "And this?"),
}


@pytest.mark.parametrize("name", TINY_NAMES)
@pytest.mark.parametrize("case", sorted(CASES))
def test_ids_equal_the_processor(name, case, runtime_bundles, references):
    bundle, reference = runtime_bundles[name], references[name]
    messages = CASES[case]
    prompt = _assemble(bundle, messages)
    ids, pixel_values = reference.inputs(reference.template(messages), message_images(messages))
    assert prompt.ids == ids
    assert prompt.text == reference.template(messages)
    tiles = sum(chunk.layout.tiles for chunk in prompt.images)
    assert tiles == (0 if pixel_values is None else pixel_values.shape[1])


@pytest.mark.parametrize("name", TINY_NAMES)
def test_chunks_carry_rows_cols_tiles_and_image_tokens(name, runtime_bundles):
    bundle = runtime_bundles[name]
    tokens = bundle.manifest.tokens.prompt
    messages = CASES["two images"]
    prompt = _assemble(bundle, messages)
    assert [type(c) for c in prompt.chunks] == [TextChunk, ImageChunk, TextChunk, ImageChunk, TextChunk]
    expected = _layouts(bundle, messages)
    assert [c.layout for c in prompt.images] == expected
    assert expected[0].rows * expected[0].cols > 1  # a split image …
    for chunk, part in zip(prompt.images, message_images(messages)):
        assert chunk.image.source is part
        assert chunk.layout.tiles == (chunk.layout.rows * chunk.layout.cols + 1 if chunk.layout.rows else 1)
        assert chunk.ids.count(tokens.image_id) == chunk.layout.tiles * tokens.image_seq_len
        assert chunk.ids[0] == bundle.tokenizer.token_id(tokens.fake_image)
        assert chunk.ids[-1] == bundle.tokenizer.token_id(tokens.fake_image)
    assert prompt.ids.count(tokens.image_id) == sum(c.layout.tiles for c in prompt.images) * tokens.image_seq_len
    assert prompt.ids == [i for c in prompt.chunks for i in c.ids] and len(prompt) == len(prompt.ids)
    # text chunks hold no image token
    assert all(tokens.image_id not in c.ids for c in prompt.chunks if isinstance(c, TextChunk))


def test_an_unsplit_image_is_the_global_block_only(runtime_bundles):
    bundle = runtime_bundles["idefics3-256m"]
    tokens = bundle.manifest.tokens.prompt
    prompt = bundle.assembler.assemble(conversation(_user(b"x", "Hi")), [Layout(0, 0)])
    chunk = prompt.images[0]
    assert chunk.layout.tiles == 1
    assert bundle.tokenizer.decode(chunk.ids, skip_special_tokens=False) == \
        "<fake_token_around_image><global-img>" + "<image>" * tokens.image_seq_len + "<fake_token_around_image>"


@pytest.mark.parametrize("name", TINY_NAMES)
def test_expanded_text_tokenizes_to_the_prompt(name, runtime_bundles):
    bundle = runtime_bundles[name]
    prompt = _assemble(bundle, CASES["two turns"])
    assert bundle.tokenizer.encode_trusted(bundle.assembler.expanded_text(prompt)) == prompt.ids


@pytest.mark.parametrize("name", TINY_NAMES)
def test_a_user_typing_the_image_placeholder_gets_a_normal_prompt(name, runtime_bundles):
    bundle = runtime_bundles[name]
    tokens = bundle.manifest.tokens.prompt
    image = rng_image(300, 200, seed=8)
    layouts = _layouts(bundle, _user(image))
    typed = bundle.assembler.assemble(conversation(_user(image, "What is <image> here?")), layouts)
    plain = bundle.assembler.assemble(conversation(_user(image, "What is here?")), layouts)
    assert len(typed.images) == 1
    assert typed.ids.count(tokens.image_id) == plain.ids.count(tokens.image_id)
    text_ids = [i for c in typed.chunks if isinstance(c, TextChunk) for i in c.ids]
    assert bundle.tokenizer.decode(text_ids, skip_special_tokens=False).count("<image>") == 1  # as text
    assert tokens.image_id not in text_ids
    with pytest.raises(PromptError, match="user text holds an image or video placeholder"):
        bundle.assembler.expanded_text(typed)


def test_template_and_images_must_agree(runtime_bundles):
    bundle = runtime_bundles["idefics3-256m"]
    real = bundle.assembler
    messages = conversation(_user(b"x", "Hi"))
    text_only = ChatTemplate("{% for m in messages %}{% for p in m['content'] %}{% if p['type'] == 'text' %}"
                             "{{ p['text'] }}{% endif %}{% endfor %}{% endfor %}")
    no_images = Assembler(text_only, real.tokenizer, real.tokens)
    with pytest.raises(PromptError, match="wrote 0 image placeholders for 1 images"):
        no_images.assemble(messages, [Layout(0, 0)])
    twice = Assembler(ChatTemplate("{% for m in messages %}<image><image>{{ m['content'][1]['text'] }}{% endfor %}"),
                      real.tokenizer, real.tokens)
    with pytest.raises(PromptError, match="more image placeholders than the 1 images"):
        twice.assemble(messages, [Layout(0, 0)])
    with pytest.raises(PromptError, match="1 images and videos but 2 layouts"):
        real.assemble(messages, [Layout(0, 0), Layout(1, 1)])


def test_a_template_that_refuses_the_conversation_is_a_prompt_error(runtime_bundles):
    real = runtime_bundles["idefics3-256m"].assembler
    strict = ChatTemplate("{% if messages[0]['role'] != 'system' %}"
                          "{{ raise_exception('a system message comes first') }}{% endif %}")
    with pytest.raises(PromptError, match="refused the conversation: a system message comes first"):
        Assembler(strict, real.tokenizer, real.tokens).assemble(conversation(_user("Hi")), [])


def test_tokens_that_disagree_with_the_tokenizer_raise(runtime_bundles):
    real = runtime_bundles["idefics3-256m"].assembler
    wrong = PromptTokens(image="<image>", image_id=42, fake_image="<fake_token_around_image>",
                         global_image="<global-img>", image_seq_len=real.tokens.image_seq_len)
    with pytest.raises(PromptError, match="does not encode '<image>' as id 42"):
        Assembler(real.template, real.tokenizer, wrong).assemble(conversation(_user(b"x", "Hi")), [Layout(1, 1)])


def test_embed_puts_features_at_the_image_token_positions(runtime_bundles):
    bundle = runtime_bundles["idefics3-2b"]
    messages = CASES["two images"]
    prompt = _assemble(bundle, messages)
    table = bundle.embedding_table()
    seq, hidden = bundle.manifest.model.image_seq_len, bundle.manifest.model.text_hidden_size
    rng = np.random.default_rng(0)
    features = [rng.standard_normal((c.layout.tiles, seq, hidden)).astype(np.float32) for c in prompt.images]
    out = bundle.assembler.embed(prompt, table, features)
    assert out.dtype == np.float32 and out.shape == (len(prompt), hidden)
    positions = [i for i, t in enumerate(prompt.ids) if t == bundle.image_id]
    assert np.array_equal(out[positions], np.concatenate([f.reshape(-1, hidden) for f in features]))
    others = [i for i, t in enumerate(prompt.ids) if t != bundle.image_id]
    expected = np.asarray(np.load(bundle.file(bundle.manifest.llm.embed_tokens))[np.asarray(prompt.ids)[others]],
                          dtype=np.float32)
    assert np.array_equal(out[others], expected)
    with pytest.raises(PromptError, match="2 images and videos in the prompt but features for 1"):
        bundle.assembler.embed(prompt, table, features[:1])
    with pytest.raises(ValueError, match="image tokens but .* image feature rows"):
        bundle.assembler.embed(prompt, table, [features[0], features[1][:, :1]])


def test_embed_of_a_text_prompt_is_the_table_rows(runtime_bundles):
    bundle = runtime_bundles["smolvlm2"]
    prompt = _assemble(bundle, CASES["text only"])
    array = np.arange(bundle.manifest.llm.embed_shape[0] * 4, dtype=np.float32).reshape(-1, 4)
    out = bundle.assembler.embed(prompt, EmbeddingTable.from_array(array), [])
    assert np.array_equal(out, array[prompt.ids])


def test_the_manifest_tokens_are_the_checkpoint_s(tiny_checkpoints, runtime_bundles):
    for name, path in tiny_checkpoints.items():
        tokens = runtime_bundles[name].manifest.tokens.prompt
        config = json.loads((path / "config.json").read_text())
        assert tokens.image_id == config["image_token_id"]
        assert runtime_bundles[name].tokenizer.token_id(tokens.image) == tokens.image_id

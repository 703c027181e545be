"""The host-preview runner is token-exact with transformers: prompt ids equal the processor's, and
greedy tokens equal ``model.generate`` for one image, several images, text only, and a multi-turn
session with a new image in turn two (prefilling only the new turn)."""

import pytest
import torch
import transformers as tf

from support.images import rng_image

from support.parity import message_images, template_messages, HfProcessor
from rksmolvlm.runtime.engines import GenerationConfig
from rksmolvlm.runners import open_engines
from rksmolvlm.runtime.loader import RuntimeBundle
from rksmolvlm.runtime.runner import Runner

NAMES = ["idefics3-256m", "idefics3-2b", "smolvlm2"]


class Reference(HfProcessor):
    """transformers' own processor and model for one checkpoint."""

    def __init__(self, path):
        super().__init__(path)
        self.model = tf.AutoModelForImageTextToText.from_pretrained(path).eval()

    def generate(self, ids, pixel_values, max_new_tokens):
        kwargs = {"input_ids": torch.tensor([ids]), "max_new_tokens": max_new_tokens, "do_sample": False}
        if pixel_values is not None:
            kwargs["pixel_values"] = pixel_values
        with torch.no_grad():
            out = self.model.generate(**kwargs)
        return out[0, len(ids):].tolist()


@pytest.fixture(scope="module")
def setups(preview_bundles, tiny_checkpoints):
    out = {}
    for name in NAMES:
        bundle = RuntimeBundle.open(preview_bundles[name])
        out[name] = (Runner(bundle, *open_engines(bundle, "host")), Reference(tiny_checkpoints[name]))
    yield out
    for runner, _ in out.values():
        runner.close()


CONFIG = GenerationConfig(max_new_tokens=12)


def _check(runner, reference, messages):
    ids, pixel_values = reference.inputs(reference.template(messages), message_images(messages))
    expected = reference.generate(ids, pixel_values, CONFIG.max_new_tokens)
    got = runner.generate(messages, CONFIG).consume()
    assert got.prefill_ids == ids and got.prompt_tokens == len(ids)
    assert got.token_ids == expected
    return got


@pytest.mark.parametrize("name", NAMES)
def test_single_image(setups, name):
    runner, reference = setups[name]
    _check(runner, reference, [{"role": "user", "content": [
        {"type": "image", "image": rng_image(500, 300, seed=1)}, {"type": "text", "text": "What is in the picture?"}]}])


@pytest.mark.parametrize("name", NAMES)
def test_several_images(setups, name):
    runner, reference = setups[name]
    _check(runner, reference, [{"role": "user", "content": [
        {"type": "text", "text": "Compare"}, {"type": "image", "image": rng_image(200, 400, seed=2)},
        {"type": "text", "text": " with "}, {"type": "image", "image": rng_image(90, 60, "L", seed=3)},
        {"type": "text", "text": "."}]}])


@pytest.mark.parametrize("name", NAMES)
def test_text_only(setups, name):
    runner, reference = setups[name]
    _check(runner, reference, [{"role": "user", "content": [{"type": "text", "text": "Write a haiku about NPUs."}]}])


@pytest.mark.parametrize("name", NAMES)
def test_multi_turn_with_a_new_image_in_turn_two(setups, name):
    runner, reference = setups[name]
    session = runner.session()
    first, second = rng_image(400, 300, seed=4), rng_image(300, 500, seed=5)
    turn1 = [{"role": "user", "content": [{"type": "image", "image": first}, {"type": "text", "text": "Describe."}]}]
    g1 = session.generate(turn1, CONFIG).consume()
    turn2 = turn1 + [{"role": "assistant", "content": [{"type": "text", "text": g1.text}]},
                     {"role": "user", "content": [{"type": "image", "image": second},
                                                  {"type": "text", "text": "And this one?"}]}]
    g2 = session.generate(turn2, CONFIG).consume()

    # transformers, from scratch, on exactly what the KV cache holds (turn one's prompt and the
    # model's own tokens) followed by the template's text after the answer, with both images
    ids1, pixels1 = reference.inputs(reference.template(turn1), [first])
    assert g1.token_ids == reference.generate(ids1, pixels1, CONFIG.max_new_tokens)
    marked = template_messages(turn2)
    marked[1]["content"][0]["text"] = "@@ANSWER@@"
    after = reference.tokenizer.apply_chat_template(marked, tokenize=False,
                                                    add_generation_prompt=True).split("@@ANSWER@@")[1]
    if g1.token_ids[-1] == reference.tokenizer.convert_tokens_to_ids("<end_of_utterance>"):
        after = after.removeprefix("<end_of_utterance>")
    suffix_ids, _ = reference.inputs(after, [second])
    _, pixel_values = reference.inputs(reference.template(turn2), [first, second])
    expected = reference.generate(ids1 + g1.token_ids + suffix_ids, pixel_values, CONFIG.max_new_tokens)
    assert g2.reused_tokens == len(ids1) + len(g1.token_ids)  # only the new turn was prefilled
    assert g2.prefill_ids == suffix_ids and g2.stats.prefill_tokens == len(suffix_ids)
    assert g2.stats.vision_tiles == len(pixel_values[0]) - len(pixels1[0])  # only the new image was encoded
    assert g2.token_ids == expected


@pytest.mark.parametrize("name", ["idefics3-256m"])
def test_a_changed_history_starts_over(setups, name):
    runner, reference = setups[name]
    image = rng_image(300, 300, seed=6)
    turn1 = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "Hi"}]}]
    other = [{"role": "user", "content": [{"type": "image", "image": rng_image(300, 300, seed=7)},
                                          {"type": "text", "text": "Hi"}]}]
    g = _check(runner, reference, other)  # a fresh request is exact
    session = runner.session()
    g1 = session.generate(turn1, CONFIG).consume()
    again = session.generate(other + [{"role": "assistant", "content": g1.text},
                                      {"role": "user", "content": "More"}], CONFIG).consume()
    assert again.reused_tokens == 0
    again = session.generate(other, CONFIG).consume()
    assert again.reused_tokens == 0 and again.token_ids == g.token_ids


def test_host_prefill_keeps_only_the_last_logits_and_the_supported_cache_keyword(setups):
    """The host decoder's prefill runs lm_head on the last position only, and passes its KV cache
    under the keyword this transformers takes (no deprecation warning): still token-exact."""
    import inspect
    import warnings

    from rksmolvlm.preview.host_engines import cache_keyword

    runner, reference = setups["smolvlm2"]
    llm = runner.llm
    assert cache_keyword(llm.model) in inspect.signature(llm.model.forward).parameters
    rows = []
    hook = llm.model.lm_head.register_forward_hook(lambda module, args, out: rows.append(args[0].shape[1]))
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            got = _check(runner, reference, [{"role": "user", "content": [
                {"type": "image", "image": rng_image(300, 200, seed=7)}, {"type": "text", "text": "Describe."}]}])
    finally:
        hook.remove()
    assert got.prompt_tokens > 1 and rows and set(rows) == {1}
    assert not [w for w in caught if "past_key_values" in str(w.message)]

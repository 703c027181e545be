"""The host-preview pipeline is token-exact with transformers: prompt ids equal the processor's,
and greedy tokens equal ``model.generate`` for one image, several images, text only, and a
multi-turn chat with a new image in turn two (prefilling only the new turn)."""

import pytest
import torch
import transformers as tf
from transformers.models.smolvlm.processing_smolvlm import get_image_prompt_string

from conftest import rng_image
from rksmolvlm.runtime.engines import GenerationConfig
from rksmolvlm.runtime.loader import RuntimeBundle
from rksmolvlm.runtime.pipeline import Pipeline

NAMES = ["idefics3-256m", "idefics3-2b", "smolvlm2"]


class Reference:
    """transformers' own processor and model for one checkpoint."""

    def __init__(self, path):
        self.path = path
        self.model = tf.AutoModelForImageTextToText.from_pretrained(path).eval()
        self.smolvlm = self.model.config.model_type == "smolvlm"
        if self.smolvlm:  # SmolVLMProcessor needs torchvision for its video part: use its pieces
            self.tokenizer = tf.AutoTokenizer.from_pretrained(path)
            self.images = tf.SmolVLMImageProcessorPil.from_pretrained(path)
            import json

            self.seq_len = json.loads((path / "processor_config.json").read_text())["image_seq_len"]
        else:
            self.processor = tf.AutoProcessor.from_pretrained(path)
            self.tokenizer = self.processor.tokenizer

    def template(self, messages, add_generation_prompt=True):
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)

    def inputs(self, text, images):
        if not self.smolvlm:
            out = self.processor(text=text, images=[images] if images else None, return_tensors="pt")
            return out["input_ids"][0].tolist(), out.get("pixel_values")
        pixel_values = None
        if images:
            processed = self.images(images=[images], return_tensors="np", return_row_col_info=True)
            pieces = text.split("<image>")
            text = pieces[0] + "".join(
                get_image_prompt_string(r, c, self.seq_len, "<fake_token_around_image>", "<image>", "<global-img>") + p
                for r, c, p in zip(processed["rows"][0], processed["cols"][0], pieces[1:]))
            pixel_values = torch.from_numpy(processed["pixel_values"])
        return self.tokenizer(text, add_special_tokens=False)["input_ids"], pixel_values

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
        vision, llm = bundle.make_engines("host")
        out[name] = (Pipeline(bundle, vision, llm), Reference(tiny_checkpoints[name]))
    return out


def _template_messages(messages):
    return [{"role": m["role"], "content": [{"type": p["type"], **({"text": p["text"]} if p["type"] == "text" else {})}
                                            for p in m["content"]]} for m in messages]


def _images(messages):
    return [p["image"] for m in messages for p in m["content"] if p["type"] == "image"]


CONFIG = GenerationConfig(max_new_tokens=12)


def _check(pipeline, reference, messages):
    text = reference.template(_template_messages(messages))
    ids, pixel_values = reference.inputs(text, _images(messages))
    expected = reference.generate(ids, pixel_values, CONFIG.max_new_tokens)
    got = pipeline.generate(messages, CONFIG, keep_history=False).consume()
    assert got.prefill_ids == ids and got.prompt_tokens == len(ids)
    assert got.token_ids == expected
    return got


@pytest.mark.parametrize("name", NAMES)
def test_single_image(setups, name):
    pipeline, reference = setups[name]
    _check(pipeline, reference, [{"role": "user", "content": [
        {"type": "image", "image": rng_image(500, 300, seed=1)}, {"type": "text", "text": "What is in the picture?"}]}])


@pytest.mark.parametrize("name", NAMES)
def test_several_images(setups, name):
    pipeline, reference = setups[name]
    _check(pipeline, reference, [{"role": "user", "content": [
        {"type": "text", "text": "Compare"}, {"type": "image", "image": rng_image(200, 400, seed=2)},
        {"type": "text", "text": " with "}, {"type": "image", "image": rng_image(90, 60, "L", seed=3)},
        {"type": "text", "text": "."}]}])


@pytest.mark.parametrize("name", NAMES)
def test_text_only(setups, name):
    pipeline, reference = setups[name]
    _check(pipeline, reference, [{"role": "user", "content": [{"type": "text", "text": "Write a haiku about NPUs."}]}])


@pytest.mark.parametrize("name", NAMES)
def test_multi_turn_with_a_new_image_in_turn_two(setups, name):
    pipeline, reference = setups[name]
    first, second = rng_image(400, 300, seed=4), rng_image(300, 500, seed=5)
    turn1 = [{"role": "user", "content": [{"type": "image", "image": first}, {"type": "text", "text": "Describe."}]}]
    g1 = pipeline.generate(turn1, CONFIG).consume()
    answer = g1.text[1:] if g1.text.startswith(" ") else g1.text
    turn2 = turn1 + [{"role": "assistant", "content": [{"type": "text", "text": answer}]},
                     {"role": "user", "content": [{"type": "image", "image": second},
                                                  {"type": "text", "text": "And this one?"}]}]
    g2 = pipeline.generate(turn2, CONFIG).consume()

    # transformers, from scratch, on exactly what the KV cache holds (turn one's prompt and the
    # model's own tokens) followed by the template's text after the answer, with both images
    ids1, pixels1 = reference.inputs(reference.template(_template_messages(turn1)), [first])
    assert g1.token_ids == reference.generate(ids1, pixels1, CONFIG.max_new_tokens)
    marked = _template_messages(turn2)
    marked[1]["content"][0]["text"] = "@@ANSWER@@"
    after = reference.template(marked).split("@@ANSWER@@")[1]
    if g1.token_ids[-1] == reference.tokenizer.convert_tokens_to_ids("<end_of_utterance>"):
        after = after.removeprefix("<end_of_utterance>")
    suffix_ids, _ = reference.inputs(after, [second])
    _, pixel_values = reference.inputs(reference.template(_template_messages(turn2)), [first, second])
    expected = reference.generate(ids1 + g1.token_ids + suffix_ids, pixel_values, CONFIG.max_new_tokens)
    assert g2.reused_tokens == len(ids1) + len(g1.token_ids)  # only the new turn was prefilled
    assert g2.prefill_ids == suffix_ids and g2.stats.prefill_tokens == len(suffix_ids)
    assert g2.stats.vision_tiles == len(pixel_values[0]) - len(pixels1[0])  # only the new image was encoded
    assert g2.token_ids == expected


@pytest.mark.parametrize("name", ["idefics3-256m"])
def test_a_changed_history_starts_over(setups, name):
    pipeline, reference = setups[name]
    image = rng_image(300, 300, seed=6)
    turn1 = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "Hi"}]}]
    pipeline.generate(turn1, CONFIG).consume()
    other = [{"role": "user", "content": [{"type": "image", "image": rng_image(300, 300, seed=7)},
                                          {"type": "text", "text": "Hi"}]}]
    g = _check(pipeline, reference, other)  # keep_history=False path is exact
    again = pipeline.generate(other, CONFIG, keep_history=True).consume()
    assert again.reused_tokens == 0 and again.token_ids == g.token_ids

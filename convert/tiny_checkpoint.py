"""Tiny random SmolVLM checkpoints, written offline exactly like hub checkpoints.

Used by `rksmolvlm demo` and by the test suite. Three layouts mirror the real families:

* ``idefics3-256m``: Idefics3 class, SmolVLM-256M/500M token layout (row/col and global-image
  tokens are added tokens, vocab 49280, image token 49190), SigLIP-B/16 geometry (patch 16,
  scale factor 4), at toy widths.
* ``idefics3-2b``: Idefics3 class, SmolVLM-Instruct 2.2B layout (only fake/image/eou are added,
  ``<row_i_col_j>`` and ``<global-img>`` are plain BPE text, vocab 49155), so400m/14 geometry
  (patch 14, scale factor 3, a tile of 90 = 6 patches + 6 pixels the convolution drops, as 384 with 14).
* ``smolvlm2``: SmolVLM class (SmolVLM2), 256M token layout, patch 16 with scale factor 2.

The checkpoint files are those a hub checkpoint has: config.json, generation_config.json,
model.safetensors, tokenizer.json, tokenizer_config.json, special_tokens_map.json,
preprocessor_config.json, processor_config.json and chat_template.json.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

__all__ = ["CHAT_TEMPLATE", "TinySpec", "TINY_SPECS", "build_tiny_checkpoint", "build_tiny_tokenizer"]

# The chat template published with SmolVLM-256M/500M-Instruct, SmolVLM-Instruct and SmolVLM2.
CHAT_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{message['role'] | capitalize}}"
    "{% if message['content'][0]['type'] == 'image' %}{{':'}}{% else %}{{': '}}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{line['text']}}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% elif line['type'] == 'video' %}{{ '<video>' }}"
    "{% endif %}{% endfor %}<end_of_utterance>\n{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)

_BASE_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
_ROW_COL = [f"<row_{r}_col_{c}>" for r in range(1, 7) for c in range(1, 7)]


@dataclass(frozen=True)
class TinySpec:
    """One tiny checkpoint layout: model class, geometry and token layout."""

    name: str
    family: str  # "idefics3" | "smolvlm"
    patch_size: int
    tile_size: int
    scale_factor: int
    longest_edge: int
    vocab_size: int
    # Added tokens above the BPE vocabulary, id → content.
    added_tokens: dict[int, str] = field(default_factory=dict)
    vision_hidden: int = 32
    text_hidden: int = 64
    tie_word_embeddings: bool = False

    @property
    def image_token_id(self) -> int:
        return next(i for i, t in self.added_tokens.items() if t == "<image>")

    @property
    def eos_token_id(self) -> int:
        return next(i for i, t in self.added_tokens.items() if t == "<end_of_utterance>")

    @property
    def image_seq_len(self) -> int:
        return (self.tile_size // self.patch_size) ** 2 // self.scale_factor**2


def _layout_256m() -> dict[int, str]:
    tokens = {49152: "<global-img>"}
    tokens.update({49153 + i: t for i, t in enumerate(_ROW_COL)})
    tokens.update({49189: "<fake_token_around_image>", 49190: "<image>", 49279: "<end_of_utterance>"})
    return tokens


def _layout_2b() -> dict[int, str]:
    return {49152: "<fake_token_around_image>", 49153: "<image>", 49154: "<end_of_utterance>"}


TINY_SPECS: dict[str, TinySpec] = {
    "idefics3-256m": TinySpec("idefics3-256m", "idefics3", 16, 128, 4, 512, 49280, _layout_256m()),
    # 90 = 6·14 + 6, like the real so400m/14 at 384 (27 patches a side, 6 pixels the convolution drops)
    "idefics3-2b": TinySpec("idefics3-2b", "idefics3", 14, 90, 3, 360, 49155, _layout_2b(),
                            tie_word_embeddings=True),
    "smolvlm2": TinySpec("smolvlm2", "smolvlm", 16, 64, 2, 256, 49280, _layout_256m()),
}

_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Describe this image in detail. What is written on the sign?",
    "User: Can you read the text in this document? Assistant: Yes, it says the invoice total is 42.50.",
    "A chart showing revenue by quarter: Q1 12, Q2 15, Q3 9, Q4 21 million dollars.",
    "There is a cat sitting on a red chair next to a window with green curtains.",
    "How many people are in the picture? Three people are standing near a bus stop.",
    "row col global img fake token around image frame video seconds minutes",
    "0123456789 + - * / = ( ) [ ] { } < > _ : ; , . ! ? ' \" # @ & % $",
    "Hello world! Bonjour le monde. Hola mundo. Hallo Welt.",
]


def build_tiny_tokenizer(spec: TinySpec):
    """A byte-level BPE trained in memory, with the spec's special-token ids; returns a
    ``transformers.PreTrainedTokenizerFast``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600,
        special_tokens=_BASE_SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(_CORPUS * 20, trainer=trainer)

    # Re-home the BPE vocabulary into the real id space: fill ids up to the first added token
    # with reserved entries that no merge can produce, then the added tokens at their real ids.
    data = json.loads(bpe.to_str())
    vocab: dict[str, int] = data["model"]["vocab"]
    first_added = min(spec.added_tokens)
    next_id = max(vocab.values()) + 1
    while next_id < first_added:
        vocab[f"<|reserved_{next_id}|>"] = next_id
        next_id += 1
    added = [
        {"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
         "normalized": False, "special": True}
        for i, t in enumerate(_BASE_SPECIALS)
    ]
    for token_id in range(first_added, spec.vocab_size):
        content = spec.added_tokens.get(token_id, f"<|reserved_{token_id}|>")
        vocab[content] = token_id
        if token_id in spec.added_tokens:
            added.append({"id": token_id, "content": content, "single_word": False, "lstrip": False,
                          "rstrip": False, "normalized": False, "special": True})
    data["added_tokens"] = added
    tokenizer = Tokenizer.from_str(json.dumps(data))

    extra = [t for t in spec.added_tokens.values() if t != "<end_of_utterance>"] + ["<end_of_utterance>"]
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<|im_start|>",
        eos_token="<end_of_utterance>",
        pad_token="<|im_end|>",
        unk_token="<|endoftext|>",
        additional_special_tokens=extra,
        model_input_names=["input_ids", "attention_mask"],
        chat_template=CHAT_TEMPLATE,
        model_max_length=2048,
    )


def _configs(spec: TinySpec):
    vision = dict(
        hidden_size=spec.vision_hidden, intermediate_size=spec.vision_hidden * 2, num_hidden_layers=2,
        num_attention_heads=2, image_size=spec.tile_size, patch_size=spec.patch_size,
    )
    text = dict(
        model_type="llama", vocab_size=spec.vocab_size, hidden_size=spec.text_hidden,
        intermediate_size=spec.text_hidden * 2, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=2048, rope_theta=100000.0, rms_norm_eps=1e-5,
        bos_token_id=1, eos_token_id=2, pad_token_id=2, tie_word_embeddings=spec.tie_word_embeddings,
    )
    return vision, text


def build_tiny_checkpoint(name: str | TinySpec, out_dir: str | os.PathLike, seed: int = 0,
                          init: Callable | None = None) -> Path:
    """Write the tiny checkpoint ``name`` (a key of TINY_SPECS, or a TinySpec) into ``out_dir`` and
    return it. ``init(model)``, when given, sets the weights after the random init (the demo model)."""
    import torch
    import transformers as tf

    tf.utils.logging.disable_progress_bar()
    tf.utils.logging.set_verbosity_error()
    spec = name if isinstance(name, TinySpec) else TINY_SPECS[name]
    out = Path(out_dir)
    torch.manual_seed(seed)
    vision, text = _configs(spec)
    tokenizer = build_tiny_tokenizer(spec)
    if spec.family == "idefics3":
        config = tf.Idefics3Config(vision_config=vision, text_config=text, scale_factor=spec.scale_factor,
                                   image_token_id=spec.image_token_id,
                                   tie_word_embeddings=spec.tie_word_embeddings)
        model = tf.Idefics3ForConditionalGeneration(config)
        image_processor = tf.Idefics3ImageProcessorPil(
            size={"longest_edge": spec.longest_edge}, max_image_size={"longest_edge": spec.tile_size})
        processor_class = "Idefics3Processor"
    else:
        config = tf.SmolVLMConfig(vision_config=vision, text_config=text, scale_factor=spec.scale_factor,
                                  image_token_id=spec.image_token_id,
                                  tie_word_embeddings=spec.tie_word_embeddings)
        model = tf.SmolVLMForConditionalGeneration(config)
        image_processor = tf.SmolVLMImageProcessorPil(
            size={"longest_edge": spec.longest_edge}, max_image_size={"longest_edge": spec.tile_size})
        processor_class = "SmolVLMProcessor"
    # Random init gives near-uniform logits; a wider spread makes greedy decoding decisive.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.08)
        if init is not None:
            init(model)
    model.generation_config.eos_token_id = [spec.eos_token_id]
    model.generation_config.bos_token_id = 1
    model.generation_config.pad_token_id = 2

    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    image_processor.save_pretrained(out)
    pre = json.loads((out / "preprocessor_config.json").read_text())
    pre["processor_class"] = processor_class
    if spec.family == "smolvlm":
        pre["video_sampling"] = {"fps": 1, "max_frames": 64,
                                 "video_size": {"longest_edge": spec.tile_size}}
    (out / "preprocessor_config.json").write_text(json.dumps(pre, indent=2))
    (out / "processor_config.json").write_text(
        json.dumps({"image_seq_len": spec.image_seq_len, "processor_class": processor_class}, indent=2))
    (out / "chat_template.json").write_text(json.dumps({"chat_template": CHAT_TEMPLATE}, indent=2))
    return out


def main() -> None:  # pragma: no cover - a developer helper
    import argparse

    parser = argparse.ArgumentParser(description="write a tiny random SmolVLM checkpoint")
    parser.add_argument("name", choices=sorted(TINY_SPECS))
    parser.add_argument("out", nargs="?", default=None)
    args = parser.parse_args()
    print(build_tiny_checkpoint(args.name, args.out or tempfile.mkdtemp(prefix=f"tiny-{args.name}-")))


if __name__ == "__main__":  # pragma: no cover
    main()

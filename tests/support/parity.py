"""transformers' side of parity checks."""

from __future__ import annotations

from pathlib import Path


# -- transformers' side of parity checks ------------------------------------------------------------
class HfProcessor:
    """transformers' own chat template, tokenizer and processor for one checkpoint: the reference
    the prompt ids are compared with."""

    def __init__(self, path: Path):
        import json

        import transformers as tf

        self.path = path
        config = json.loads((path / "config.json").read_text())
        self.smolvlm = config["model_type"] == "smolvlm"
        if self.smolvlm:  # SmolVLMProcessor needs torchvision for its video part: use its pieces
            self.tokenizer = tf.AutoTokenizer.from_pretrained(path)
            self.images = tf.SmolVLMImageProcessorPil.from_pretrained(path)
            self.seq_len = json.loads((path / "processor_config.json").read_text())["image_seq_len"]
        else:
            self.processor = tf.AutoProcessor.from_pretrained(path)
            self.tokenizer = self.processor.tokenizer

    def template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        return self.tokenizer.apply_chat_template(template_messages(messages), tokenize=False,
                                                  add_generation_prompt=add_generation_prompt)

    def inputs(self, text: str, images: list):
        """(input ids, pixel values or None) of a rendered prompt and its images."""
        if not self.smolvlm:
            out = self.processor(text=text, images=[images] if images else None, return_tensors="pt")
            return out["input_ids"][0].tolist(), out.get("pixel_values")
        import torch
        from transformers.models.smolvlm.processing_smolvlm import get_image_prompt_string

        pixel_values = None
        if images:
            processed = self.images(images=[images], return_tensors="np", return_row_col_info=True)
            pieces = text.split("<image>")
            text = pieces[0] + "".join(
                get_image_prompt_string(r, c, self.seq_len, "<fake_token_around_image>", "<image>", "<global-img>") + p
                for r, c, p in zip(processed["rows"][0], processed["cols"][0], pieces[1:]))
            pixel_values = torch.from_numpy(processed["pixel_values"])
        return self.tokenizer(text, add_special_tokens=False)["input_ids"], pixel_values


def template_messages(messages: list[dict]) -> list[dict]:
    """Dict messages as transformers' chat template takes them (image parts without their source)."""
    out = []
    for m in messages:
        content = m["content"]
        if isinstance(content, str):
            content = [{"type": "text", "text": content}]
        out.append({"role": m["role"], "content": [{"type": p["type"], **({"text": p["text"]} if p["type"] == "text"
                                                                          else {})} for p in content]})
    return out


def message_images(messages: list[dict]) -> list:
    return [p["image"] for m in messages if not isinstance(m["content"], str) for p in m["content"]
            if p["type"] == "image"]

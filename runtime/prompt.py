"""Chat messages → SmolVLM prompt text → token ids, as transformers' processors build them.

The checkpoint's own chat template (from the manifest) is rendered with a sandboxed Jinja2
environment configured like transformers'; every ``<image>`` the template emits is expanded into
the image's tile blocks (``Idefics3Processor.replace_image_token``); the text is tokenized with the
``tokenizers`` library from the bundle's tokenizer.json. No transformers on this path.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

__all__ = ["PromptTokens", "PromptBuilder", "normalize_messages", "expand_image", "assistant_content"]


@dataclass(frozen=True)
class PromptTokens:
    """The special-token strings and ids a prompt needs (from the manifest's ``tokens``)."""

    image: str
    image_id: int
    fake_image: str
    global_image: str
    image_seq_len: int
    end_of_utterance: str = "<end_of_utterance>"

    @classmethod
    def from_manifest(cls, manifest: dict) -> "PromptTokens":
        t = manifest["tokens"]
        return cls(t["image"], int(t["image_id"]), t["fake_image"], t["global_image"],
                   int(manifest["processor"]["image_seq_len"]), t["end_of_utterance"])


def expand_image(rows: int, cols: int, tokens: PromptTokens) -> str:
    """The text that replaces one ``<image>``: tile blocks row by row, then the global image."""
    run = tokens.image * tokens.image_seq_len
    global_block = f"{tokens.fake_image}{tokens.global_image}{run}{tokens.fake_image}"
    if rows == 0 and cols == 0:
        return global_block
    parts = []
    for r in range(rows):
        parts.extend(f"{tokens.fake_image}<row_{r + 1}_col_{c + 1}>{run}" for c in range(cols))
        parts.append("\n")
    return "".join(parts) + "\n" + global_block


def assistant_content(generated: str) -> str:
    """A generated answer as an assistant message's content: the template writes "Assistant: " +
    content while the model generates after "Assistant:", so its one leading space is dropped and
    the rendered history reads as what the model produced."""
    return generated[1:] if generated.startswith(" ") else generated


def normalize_messages(messages: Sequence[dict]) -> list[dict]:
    """OpenAI-style messages → the form SmolVLM's template expects: ``content`` is a list of
    ``{"type": "text", "text": …}`` and ``{"type": "image"}`` items."""
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message:
            raise ValueError(f"message {i} needs a 'role' and a 'content'")
        content = message.get("content")
        if content is None:
            content = []
        if isinstance(content, str):
            items = [{"type": "text", "text": content}]
        elif isinstance(content, list):
            items = []
            for part in content:
                kind = part.get("type") if isinstance(part, dict) else None
                if kind == "text":
                    items.append({"type": "text", "text": str(part.get("text", ""))})
                elif kind in ("image", "image_url", "input_image"):
                    items.append({"type": "image"})
                else:
                    raise ValueError(f"message {i}: content part of type {kind!r} is not supported "
                                     "(use 'text' or 'image_url')")
        else:
            raise ValueError(f"message {i}: content must be a string or a list of parts")
        if not items:
            items = [{"type": "text", "text": ""}]
        out.append({"role": str(message["role"]), "content": items})
    return out


def _environment():
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(value, indent=None, **_: Any):
        return json.dumps(value, indent=indent, ensure_ascii=False)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    return env


class PromptBuilder:
    """Renders and tokenizes prompts for one bundle."""

    def __init__(self, tokenizer_file: str | Path, chat_template: str, tokens: PromptTokens):
        from tokenizers import Tokenizer

        self.tokenizer = Tokenizer.from_file(str(tokenizer_file))
        self.template = _environment().from_string(chat_template)
        self.tokens = tokens

    def render(self, messages: Sequence[dict], add_generation_prompt: bool = True) -> str:
        """The chat template's text, with one ``<image>`` per image part."""
        return self.template.render(messages=normalize_messages(messages),
                                    add_generation_prompt=add_generation_prompt)

    def expand(self, text: str, layouts: Sequence[tuple[int, int]]) -> str:
        """Replace the n-th ``<image>`` with the tile blocks of the n-th image (rows, cols)."""
        pieces = text.split(self.tokens.image)
        if len(pieces) - 1 != len(layouts):
            raise ValueError(f"the prompt has {len(pieces) - 1} image placeholders but {len(layouts)} images "
                             "were given")
        out = [pieces[0]]
        for (rows, cols), piece in zip(layouts, pieces[1:]):
            out.append(expand_image(rows, cols, self.tokens))
            out.append(piece)
        return "".join(out)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def build(self, messages: Sequence[dict], layouts: Sequence[tuple[int, int]],
              add_generation_prompt: bool = True) -> list[int]:
        """Messages and the (rows, cols) of each image, in order → token ids."""
        return self.encode(self.expand(self.render(messages, add_generation_prompt), layouts))

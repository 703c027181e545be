"""The one assembler: messages → chunks (text ids; image slots with rows, cols, tiles) → one
embedding sequence. The runtime, the converter's decoder calibration set and the benchmarks all
build their decoder input here, so calibration sees exactly what the board sees.

Each ``<image>`` the chat template writes becomes an image chunk: its tile blocks
(``Idefics3Processor.replace_image_token`` / ``SmolVLMProcessor._prompt_split_image``) tokenized
once per (rows, cols). The image blocks start and end with an added token, so tokenizing the text
between them separately gives the same ids as tokenizing the whole prompt.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence, Union

import numpy as np

from rksmolvlm.processing.content import ImagePart, Message, VideoPart, image_parts
from rksmolvlm.processing.embed import EmbeddingTable, splice
from rksmolvlm.processing.prompt import (ChatTemplate, PromptTokens, Rendered, Segment, TextTokenizer,
                                         expand_image)

__all__ = ["Assembler", "Prompt", "TextChunk", "ImageChunk", "Layout", "PromptError"]


class PromptError(ValueError):
    """The conversation cannot be turned into a prompt (a template/images mismatch, video, …)."""


@dataclass(frozen=True)
class Layout:
    """How an image was split: rows × cols tiles plus the global image; 0 × 0 when unsplit."""

    rows: int
    cols: int

    @property
    def tiles(self) -> int:
        return self.rows * self.cols + 1 if self.rows or self.cols else 1


@dataclass(frozen=True)
class TextChunk:
    ids: tuple[int, ...]


@dataclass(frozen=True)
class ImageChunk:
    image: ImagePart
    layout: Layout
    ids: tuple[int, ...]  # the expansion: wrapper tokens, row/col markers and image tokens


Chunk = Union[TextChunk, ImageChunk]


@dataclass
class Prompt:
    """A prompt as chunks; ``ids`` is their concatenation."""

    chunks: list[Chunk]
    text: str = ""  # the rendered prompt before image expansion (for history checks and logs)
    ids: list[int] = field(init=False)

    def __post_init__(self):
        self.ids = [i for chunk in self.chunks for i in chunk.ids]

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def images(self) -> list[ImageChunk]:
        return [c for c in self.chunks if isinstance(c, ImageChunk)]


class Assembler:
    """Renders, expands and tokenizes prompts for one model, and splices image features in."""

    def __init__(self, template: ChatTemplate, tokenizer: TextTokenizer, tokens: PromptTokens):
        self.template = template
        self.tokenizer = tokenizer
        self.tokens = tokens
        self._expansions: dict[Layout, tuple[int, ...]] = {}

    def render(self, messages: Sequence[Message], add_generation_prompt: bool = True) -> Rendered:
        if any(isinstance(p, VideoPart) for m in messages for p in m.parts):
            raise PromptError("video input is not supported by this version of rksmolvlm: send frames as images")
        import jinja2

        try:
            return self.template.render(messages, add_generation_prompt)
        except jinja2.TemplateError as exc:  # the template's own raise_exception, or a template bug
            raise PromptError(f"the chat template refused the conversation: {exc}") from exc

    def assemble(self, messages: Sequence[Message], layouts: Sequence[Layout],
                 add_generation_prompt: bool = True) -> Prompt:
        """The prompt of a whole conversation; ``layouts`` holds one Layout per image part, in order."""
        return self.assemble_rendered(self.render(messages, add_generation_prompt), image_parts(messages), layouts)

    def assemble_rendered(self, rendered: Rendered, images: Sequence[ImagePart], layouts: Sequence[Layout]) -> Prompt:
        """Chunks of an already rendered prompt whose image placeholders belong to ``images``."""
        if len(images) != len(layouts):
            raise PromptError(f"{len(images)} images but {len(layouts)} layouts")
        placeholder = self.tokens.image
        chunks: list[Chunk] = []
        run: list[Segment] = []
        n = 0
        for segment in rendered.segments:
            if not segment.trusted:
                run.append(segment)
                continue
            pieces = segment.text.split(placeholder)
            for k, piece in enumerate(pieces):
                if k:  # a placeholder stood before this piece
                    if n >= len(images):
                        raise PromptError(f"the chat template wrote more image placeholders than the "
                                          f"{len(images)} images of the conversation")
                    chunks.append(TextChunk(tuple(self.tokenizer.encode(Rendered(tuple(run))))))
                    run = []
                    chunks.append(ImageChunk(images[n], layouts[n], self._expansion(layouts[n])))
                    n += 1
                if piece:
                    run.append(Segment(piece))
        if n != len(images):
            raise PromptError(f"the chat template wrote {n} image placeholders for {len(images)} images: the "
                              "bundle's chat template does not render image parts")
        chunks.append(TextChunk(tuple(self.tokenizer.encode(Rendered(tuple(run))))))
        return Prompt([c for c in chunks if c.ids], rendered.text)

    def expanded_text(self, prompt: Prompt) -> str:
        """The prompt as one text with every image placeholder replaced by its tile blocks (what a
        text-only consumer such as rkllm-toolkit's text calibration format reads)."""
        pieces = prompt.text.split(self.tokens.image)
        layouts = [chunk.layout for chunk in prompt.images]
        if len(pieces) - 1 != len(layouts):
            raise PromptError("user text holds the image placeholder: the prompt has no single-text form")
        return pieces[0] + "".join(expand_image(l.rows, l.cols, self.tokens) + piece
                                   for l, piece in zip(layouts, pieces[1:]))

    def _expansion(self, layout: Layout) -> tuple[int, ...]:
        ids = self._expansions.get(layout)
        if ids is None:
            ids = tuple(self.tokenizer.encode_trusted(expand_image(layout.rows, layout.cols, self.tokens)))
            expected = layout.tiles * self.tokens.image_seq_len
            if sum(1 for i in ids if i == self.tokens.image_id) != expected:
                raise PromptError(f"the tokenizer does not encode {self.tokens.image!r} as id {self.tokens.image_id}: "
                                  "the bundle's tokens and tokenizer.json disagree; convert it again")
            self._expansions[layout] = ids
        return ids

    def embed(self, prompt: Prompt, table: EmbeddingTable, features: Sequence[np.ndarray]) -> np.ndarray:
        """The decoder input: token embeddings (float32) with each image's features ((tiles, seq,
        hidden), one array per image chunk, in order) at its image-token positions."""
        images = prompt.images
        if len(features) != len(images):
            raise PromptError(f"{len(images)} images in the prompt but features for {len(features)}")
        stacked = np.concatenate([np.asarray(f, dtype=np.float32).reshape(-1, table.hidden_size)
                                  for f in features]) if features else None
        return splice(table.lookup(prompt.ids), prompt.ids, self.tokens.image_id, stacked, in_place=True)

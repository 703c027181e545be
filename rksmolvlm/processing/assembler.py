"""The one assembler: messages → chunks (text ids; image slots with rows, cols, tiles) → one
embedding sequence. The runtime, the converter's decoder calibration set and the benchmarks all
build their decoder input here, so calibration sees exactly what the board sees.

Each ``<image>`` the chat template writes becomes an image chunk: its tile blocks
(``Idefics3Processor.replace_image_token`` / ``SmolVLMProcessor._prompt_split_image``) tokenized
once per (rows, cols). The image blocks start and end with an added token, so tokenizing the text
between them separately gives the same ids as tokenizing the whole prompt.

Each ``<video>`` (SmolVLM2; conversations with a video are rendered with the bundle's video chat
template, as transformers renders them with its DEFAULT_CHAT_TEMPLATE) becomes what
``SmolVLMProcessor.replace_video_token`` writes: an intro sentence (frame count in words, duration),
then per frame a timestamp line and one unsplit image block (a frame chunk), then a blank line. The
intro and the blank line are plain text that the tokenizer merges with the text around them, so they
join the neighbouring text runs instead of being tokenized alone.

Where transformers is not self-consistent, each part is expanded on its own: two videos each announce
their own frame count (transformers announces the longest video's count for every video of a batch),
and images next to a video keep their own pixels and split (transformers replaces them by the video's).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence, Union

import numpy as np

import re

from rksmolvlm.processing.content import ImagePart, Message, VideoPart, media_parts
from rksmolvlm.processing.embed import EmbeddingTable, splice
from rksmolvlm.processing.prompt import (VIDEO_OUTRO, VIDEO_PLACEHOLDER, ChatTemplate, PromptTokens, Rendered, Segment,
                                         TextTokenizer, expand_image, frame_label, video_intro)

__all__ = ["Assembler", "Draft", "Prompt", "TextChunk", "ImageChunk", "FrameChunk", "Layout", "VideoLayout",
           "PromptError"]


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
class VideoLayout:
    """What a video's prompt needs: the sampled frames' timestamps (seconds) and the video's duration."""

    timestamps: tuple[float, ...]
    duration: float

    @property
    def frames(self) -> int:
        return len(self.timestamps)


@dataclass(frozen=True)
class TextChunk:
    ids: tuple[int, ...]


@dataclass(frozen=True)
class ImageChunk:
    image: ImagePart
    layout: Layout
    ids: tuple[int, ...]  # the expansion: wrapper tokens, row/col markers and image tokens


@dataclass(frozen=True)
class FrameChunk:
    video: VideoPart
    layout: VideoLayout
    frame: int  # its place among the video's sampled frames
    ids: tuple[int, ...]  # one unsplit image block


Chunk = Union[TextChunk, ImageChunk, FrameChunk]


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

    @property
    def frames(self) -> list[FrameChunk]:
        return [c for c in self.chunks if isinstance(c, FrameChunk)]

    @property
    def media(self) -> list[Union[ImageChunk, FrameChunk]]:
        """One chunk per image and per video (its first frame), in prompt order: what ``embed`` takes
        one feature array for."""
        return [c for c in self.chunks if isinstance(c, ImageChunk) or (isinstance(c, FrameChunk) and c.frame == 0)]


class Assembler:
    """Renders, expands and tokenizes prompts for one model, and splices image features in."""

    def __init__(self, template: ChatTemplate, tokenizer: TextTokenizer, tokens: PromptTokens,
                 video_template: ChatTemplate | None = None):
        self.template = template
        self.video_template = video_template  # None: the model takes no video
        self.tokenizer = tokenizer
        self.tokens = tokens
        self._expansions: dict[Layout, tuple[int, ...]] = {}
        self._placeholders = re.compile("|".join(map(re.escape, (tokens.image, VIDEO_PLACEHOLDER))))

    def render(self, messages: Sequence[Message], add_generation_prompt: bool = True) -> Rendered:
        template = self.template
        if any(isinstance(p, VideoPart) for m in messages for p in m.parts):
            if self.video_template is None:
                raise PromptError("this bundle's model does not take video (only SmolVLM2 checkpoints do, converted "
                                  "by rksmolvlm 0.1 with video support): send frames as images, or convert a "
                                  "SmolVLM2 checkpoint")
            template = self.video_template
        import jinja2

        try:
            return template.render(messages, add_generation_prompt)
        except jinja2.TemplateError as exc:  # the template's own raise_exception, or a template bug
            raise PromptError(f"the chat template refused the conversation: {exc}") from exc

    def assemble(self, messages: Sequence[Message], layouts: Sequence[Layout | VideoLayout],
                 add_generation_prompt: bool = True) -> Prompt:
        """The prompt of a whole conversation; ``layouts`` holds one Layout per image part and one
        VideoLayout per video part, in prompt order."""
        return self.assemble_rendered(self.render(messages, add_generation_prompt), media_parts(messages), layouts)

    def assemble_rendered(self, rendered: Rendered, media: Sequence[ImagePart | VideoPart],
                          layouts: Sequence[Layout | VideoLayout]) -> Prompt:
        """Chunks of an already rendered prompt whose placeholders belong to ``media`` (image and
        video parts in prompt order), laid out as ``layouts`` say."""
        if len(media) != len(layouts):
            raise PromptError(f"{len(media)} images and videos but {len(layouts)} layouts")
        for part, layout in zip(media, layouts):
            if isinstance(part, VideoPart) != isinstance(layout, VideoLayout):
                raise PromptError(f"a {'video' if isinstance(part, VideoPart) else 'image'} part was given a "
                                  f"{type(layout).__name__}")
        videos = [layout for layout in layouts if isinstance(layout, VideoLayout)]
        images = [layout for layout in layouts if isinstance(layout, Layout)]
        return self.draft(rendered, media, videos).prompt(images)

    def draft(self, rendered: Rendered, media: Sequence[ImagePart | VideoPart],
              videos: Sequence[VideoLayout]) -> "Draft":
        """The prompt of ``rendered`` tokenized once, its images not laid out yet: ``media`` are its
        image and video parts in prompt order, ``videos`` one VideoLayout per video part (a video's
        frame count and timestamps are text the tokenizer merges with its neighbours, so they are
        fixed here; an image's block stands alone, so its layout can wait)."""
        images = [p for p in media if isinstance(p, ImagePart)]
        video_parts = [p for p in media if isinstance(p, VideoPart)]
        if len(video_parts) != len(videos):
            raise PromptError(f"{len(video_parts)} videos but {len(videos)} video layouts")
        pieces: list[Chunk | ImagePart] = []
        run: list[Segment] = []
        n_images = n_videos = 0

        def flush():
            ids = tuple(self.tokenizer.encode(Rendered(tuple(run))))
            if ids:
                pieces.append(TextChunk(ids))
            run.clear()

        for segment in rendered.segments:
            if not segment.trusted:
                run.append(segment)
                continue
            position = 0
            for match in self._placeholders.finditer(segment.text):
                if match.start() > position:
                    run.append(Segment(segment.text[position:match.start()]))
                position = match.end()
                if match.group(0) == VIDEO_PLACEHOLDER:
                    if n_videos >= len(video_parts):
                        raise PromptError(f"the chat template wrote more video placeholders than the "
                                          f"{len(video_parts)} videos of the conversation")
                    video, layout = video_parts[n_videos], videos[n_videos]
                    n_videos += 1
                    if not layout.frames:
                        raise PromptError("a video with no sampled frames")
                    label = video_intro(layout.frames, layout.duration)
                    for k, seconds in enumerate(layout.timestamps):
                        run.append(Segment(label + frame_label(seconds)))
                        label = ""
                        flush()
                        pieces.append(FrameChunk(video, layout, k, self.expansion(Layout(0, 0))))
                    run.append(Segment(VIDEO_OUTRO))
                else:
                    if n_images >= len(images):
                        raise PromptError(f"the chat template wrote more image placeholders than the "
                                          f"{len(images)} images of the conversation")
                    flush()
                    pieces.append(images[n_images])
                    n_images += 1
            if position < len(segment.text):
                run.append(Segment(segment.text[position:]))
        if n_images != len(images):
            raise PromptError(f"the chat template wrote {n_images} image placeholders for {len(images)} images: "
                              "the bundle's chat template does not render image parts")
        if n_videos != len(video_parts):
            raise PromptError(f"the chat template wrote {n_videos} video placeholders for {len(video_parts)} "
                              "videos: the bundle's video chat template does not render video parts")
        flush()
        return Draft(self, pieces, rendered.text)

    def image_tokens(self, layout: Layout) -> int:
        """The length of an image's block laid out as ``layout`` (wrapper, row/col and image tokens)."""
        return len(self.expansion(layout))

    def expansion(self, layout: Layout) -> tuple[int, ...]:
        """The ids of an image's block laid out as ``layout``, tokenized once per layout."""
        ids = self._expansions.get(layout)
        if ids is None:
            ids = tuple(self.tokenizer.encode_trusted(expand_image(layout.rows, layout.cols, self.tokens)))
            expected = layout.tiles * self.tokens.image_seq_len
            if sum(1 for i in ids if i == self.tokens.image_id) != expected:
                raise PromptError(f"the tokenizer does not encode {self.tokens.image!r} as id {self.tokens.image_id}: "
                                  "the bundle's tokens and tokenizer.json disagree; convert it again")
            self._expansions[layout] = ids
        return ids

    def expanded_text(self, prompt: Prompt) -> str:
        """The prompt as one text with every image and video placeholder replaced by its expansion
        (what a text-only consumer such as rkllm-toolkit's text calibration format reads)."""
        media = [c.layout for c in prompt.media]
        pieces = self._placeholders.split(prompt.text)
        if len(pieces) - 1 != len(media):
            raise PromptError("user text holds an image or video placeholder: the prompt has no single-text form")
        out = [pieces[0]]
        for layout, piece in zip(media, pieces[1:]):
            if isinstance(layout, VideoLayout):
                block = expand_image(0, 0, self.tokens)
                out.append(video_intro(layout.frames, layout.duration)
                           + "".join(frame_label(t) + block for t in layout.timestamps) + VIDEO_OUTRO)
            else:
                out.append(expand_image(layout.rows, layout.cols, self.tokens))
            out.append(piece)
        return "".join(out)

    def embed(self, prompt: Prompt, table: EmbeddingTable, features: Sequence[np.ndarray]) -> np.ndarray:
        """The decoder input: token embeddings (float32) with the features of each image ((tiles, seq,
        hidden)) and each video ((frames, seq, hidden)) — one array per ``prompt.media`` entry, in
        order — at the image-token positions."""
        media = prompt.media
        if len(features) != len(media):
            raise PromptError(f"{len(media)} images and videos in the prompt but features for {len(features)}")
        stacked = np.concatenate([np.asarray(f, dtype=np.float32).reshape(-1, table.hidden_size)
                                  for f in features]) if features else None
        return splice(table.lookup(prompt.ids), prompt.ids, self.tokens.image_id, stacked, in_place=True)


class Draft:
    """A prompt tokenized once with its images' layouts still open (``Assembler.draft``): ``length``
    prices a layout of the images without building anything, ``prompt`` builds the prompt once the
    layouts are chosen."""

    def __init__(self, assembler: Assembler, pieces: list[Chunk | ImagePart], text: str):
        self._assembler = assembler
        self._pieces = pieces  # text and frame chunks, and an ImagePart where each image's block goes
        self.images = [p for p in pieces if isinstance(p, ImagePart)]
        self.text = text
        self.fixed_tokens = sum(len(p.ids) for p in pieces if not isinstance(p, ImagePart))

    def length(self, layouts: Sequence[Layout]) -> int:
        """Tokens of the prompt with image i laid out as ``layouts[i]``."""
        self._check(layouts)
        return self.fixed_tokens + sum(self._assembler.image_tokens(layout) for layout in layouts)

    def prompt(self, layouts: Sequence[Layout]) -> Prompt:
        """The prompt with image i laid out as ``layouts[i]``."""
        self._check(layouts)
        blocks = iter(ImageChunk(part, layout, self._assembler.expansion(layout))
                      for part, layout in zip(self.images, layouts))
        return Prompt([next(blocks) if isinstance(p, ImagePart) else p for p in self._pieces], self.text)

    def _check(self, layouts: Sequence[Layout]) -> None:
        if len(layouts) != len(self.images):
            raise PromptError(f"{len(self.images)} images but {len(layouts)} layouts")

"""Chat template and tokenizer: messages → prompt text → token ids, as transformers builds them,
with user text kept apart from the template's structure.

The checkpoint's chat template (from the manifest) is rendered in a sandboxed Jinja2 environment
configured like transformers'. Every text part enters the template as a private marker, so the
rendered prompt comes back as segments that are either the template's own text (trusted: its
special tokens count) or a user's text (untrusted: ``<end_of_utterance>`` or ``<image>`` typed by a
user stay plain text). Tokenization splits at the added tokens of trusted text only and BPE-encodes
the runs between them whole, which is what the ``tokenizers`` library does for the whole string
when nobody types a special token. No transformers on this path.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from rksmolvlm.processing.content import ImagePart, Message, TextPart, VideoPart

__all__ = ["PromptTokens", "ChatTemplate", "Rendered", "Segment", "TextTokenizer", "expand_image", "VIDEO_PLACEHOLDER",
           "number_words", "video_intro", "frame_label", "VIDEO_OUTRO"]

# What a chat template writes for a video part (transformers' processor: the tokenizer's video_token,
# "<video>" for every SmolVLM2 tokenizer); the assembler replaces it by the frames.
VIDEO_PLACEHOLDER = "<video>"
VIDEO_OUTRO = "\n\n"  # after a video's last frame (transformers' DEFAULT_MEDIA_OUTTRO)


@dataclass(frozen=True)
class PromptTokens:
    """The special-token strings and ids a prompt needs (from the manifest's ``tokens``)."""

    image: str
    image_id: int
    fake_image: str
    global_image: str
    image_seq_len: int
    end_of_utterance: str = "<end_of_utterance>"


def expand_image(rows: int, cols: int, tokens: PromptTokens) -> str:
    """The text that replaces one ``<image>``: tile blocks row by row, then the global image."""
    run = tokens.image * tokens.image_seq_len
    global_block = f"{tokens.fake_image}{tokens.global_image}{run}{tokens.fake_image}"
    if rows == 0 and cols == 0:
        return global_block
    parts: list[str] = []
    for r in range(rows):
        parts.extend(f"{tokens.fake_image}<row_{r + 1}_col_{c + 1}>{run}" for c in range(cols))
        parts.append("\n")
    return "".join(parts) + "\n" + global_block


_ONES = ("zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
         "sixteen seventeen eighteen nineteen").split()
_TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()


def _below_thousand(n: int) -> str:
    hundreds, rest = divmod(n, 100)
    if rest < 20:
        tail = _ONES[rest]
    else:
        tens, ones = divmod(rest, 10)
        tail = _TENS[tens] + (f"-{_ONES[ones]}" if ones else "")
    if not hundreds:
        return tail
    return f"{_ONES[hundreds]} hundred" + (f" and {tail}" if rest else "")


def number_words(n: int) -> str:
    """``n`` (0 ≤ n < 10⁹) in English words as num2words writes it ("sixty-four", "one hundred and
    one", "one thousand, two hundred and thirty-four"): the frame count of a video's intro."""
    if not 0 <= n < 10**9:
        raise ValueError(f"{n} is out of the range number_words spells (0 to 999,999,999)")
    if n < 1000:
        return _below_thousand(n)
    groups = []
    for scale in ("", " thousand", " million"):
        n, group = divmod(n, 1000)
        groups.append((group, scale))
        if not n:
            break
    words = [f"{_below_thousand(g)}{scale}" for g, scale in reversed(groups) if g]
    last = groups[0][0]
    if 0 < last < 100 and len(words) > 1:  # "one thousand and one": the last group joins with "and"
        return ", ".join(words[:-1]) + " and " + words[-1]
    return ", ".join(words)


def video_intro(frames: int, duration: float) -> str:
    """The sentence before a video's frames (transformers' DEFAULT_VIDEO_INTRO): the frame count in
    words and the duration in whole seconds as H:MM:SS."""
    from datetime import timedelta

    return (f"You are provided the following series of {number_words(frames)} frames from a "
            f"{timedelta(seconds=int(duration))} [H:MM:SS] video.\n")


def frame_label(seconds: float) -> str:
    """The text before one frame (transformers' FRAME_TIMESTAMP_MESSAGE): minutes and seconds."""
    return f"\nFrame from {int(seconds // 60):02d}:{int(seconds % 60):02d}:"


@dataclass(frozen=True)
class Segment:
    """A piece of the rendered prompt: the template's own text (``source`` None) or the text part
    ``source`` = (message index, part index) of the conversation."""

    text: str
    source: tuple[int, int] | None = None

    @property
    def trusted(self) -> bool:
        return self.source is None


@dataclass(frozen=True)
class Rendered:
    """A rendered prompt as segments, in order."""

    segments: tuple[Segment, ...]

    @property
    def text(self) -> str:
        return "".join(s.text for s in self.segments)

    def split_at(self, source: tuple[int, int]) -> tuple["Rendered", "Rendered"] | None:
        """(before, after) the segment of text part ``source``; None when the template dropped it."""
        for i, segment in enumerate(self.segments):
            if segment.source == source:
                return Rendered(self.segments[:i]), Rendered(self.segments[i + 1:])
        return None

    def removeprefix(self, prefix: str) -> "Rendered":
        """Without ``prefix`` at the start of its first (template) segment, if it is there."""
        if self.segments and self.segments[0].trusted and self.segments[0].text.startswith(prefix):
            first = Segment(self.segments[0].text[len(prefix):])
            return Rendered((first, *self.segments[1:]))
        return self


_MARK = re.compile("\ue000(\\d+)\ue001")


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


class ChatTemplate:
    """The checkpoint's chat template. Image parts render as the template writes them (``<image>``)."""

    def __init__(self, source: str):
        self.source = source
        self.template = _environment().from_string(source)

    def render(self, messages: Sequence[Message], add_generation_prompt: bool = True) -> Rendered:
        marks: list[tuple[int, int, str]] = []  # (message, part, its text) per marker
        payload = []
        for i, message in enumerate(messages):
            items = []
            for j, part in enumerate(message.parts):
                if isinstance(part, TextPart):
                    items.append({"type": "text", "text": f"\ue000{len(marks)}\ue001"})
                    marks.append((i, j, part.text))
                elif isinstance(part, ImagePart):
                    items.append({"type": "image"})
                elif isinstance(part, VideoPart):
                    items.append({"type": "video"})
            if not items:  # the template reads content[0]
                items.append({"type": "text", "text": ""})
            payload.append({"role": message.role, "content": items})
        text = self.template.render(messages=payload, add_generation_prompt=add_generation_prompt)
        segments, position = [], 0
        for match in _MARK.finditer(text):
            if match.start() > position:
                segments.append(Segment(text[position:match.start()]))
            index = int(match.group(1))
            if index >= len(marks):
                raise ValueError("the chat template wrote a marker it was not given")
            i, j, part_text = marks[index]
            segments.append(Segment(part_text, (i, j)))
            position = match.end()
        if position < len(text):
            segments.append(Segment(text[position:]))
        return Rendered(tuple(segments))


class TextTokenizer:
    """The bundle's tokenizer.json through the ``tokenizers`` library. Special tokens are found in
    trusted text only; user text is encoded as plain text."""

    def __init__(self, tokenizer_file: str | Path):
        from tokenizers import Tokenizer

        data = json.loads(Path(tokenizer_file).read_text(encoding="utf-8"))
        self.tokenizer = Tokenizer.from_str(json.dumps(data))
        # Runs of text are encoded with every added token marked special and special tokens not
        # parsed: an added token typed as text stays text (added tokens are split out below).
        for token in data.get("added_tokens") or []:
            token["special"] = True
        self._plain = Tokenizer.from_str(json.dumps(data))
        self._plain.encode_special_tokens = True
        added = self.tokenizer.get_added_tokens_decoder()
        self._added = {token.content: (token_id, token.lstrip, token.rstrip) for token_id, token in added.items()}
        self.special_ids = frozenset(token_id for token_id, token in added.items() if token.special)
        contents = sorted(self._added, key=len, reverse=True)  # leftmost-longest, like the added vocabulary
        self._pattern = re.compile("|".join(map(re.escape, contents))) if contents else None

    def encode_text(self, text: str) -> list[int]:
        """Plain text: any special-token string in it is text."""
        return self._plain.encode(text, add_special_tokens=False).ids if text else []

    def encode_trusted(self, text: str) -> list[int]:
        """Template text: its special-token strings are the special tokens."""
        return self.encode(Rendered((Segment(text),)))

    def encode(self, rendered: Rendered) -> list[int]:
        ids: list[int] = []
        run: list[str] = []
        strip_next = False
        for segment in rendered.segments:
            text = segment.text
            if strip_next and text:
                text, strip_next = text.lstrip(), not text.strip()
            if not segment.trusted or self._pattern is None:
                run.append(text)
                continue
            position = 0
            for match in self._pattern.finditer(text):
                token_id, lstrip, rstrip = self._added[match.group(0)]
                run.append(text[position:match.start()])
                pending = "".join(run)
                ids += self.encode_text(pending.rstrip() if lstrip else pending)
                ids.append(token_id)
                run = []
                position = match.end()
                if rstrip:
                    rest = text[position:]
                    position += len(rest) - len(rest.lstrip())
                    strip_next = position == len(text)
            run.append(text[position:])
        ids += self.encode_text("".join(run))
        return ids

    def token_id(self, content: str) -> int | None:
        return self.tokenizer.token_to_id(content)

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

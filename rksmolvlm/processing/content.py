"""The typed input of every request: messages made of text, image and video parts.

``Message``/``TextPart``/``ImagePart``/``VideoPart`` are what the assembler, the runner, the
calibration builder and the server pass around. ``conversation`` is the one place that reads the
dict form (``{"role", "content": str | [{"type": "text"|"image", …}]}``) used by the command line,
the calibration chats and tests; the HTTP server builds these records itself while it checks a
request.
"""

from __future__ import annotations

import hashlib
import io
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence, Union

from PIL import Image

__all__ = ["TextPart", "ImagePart", "VideoPart", "Part", "Message", "ROLES", "DETAILS", "conversation",
           "image_parts", "media_parts"]

ROLES = ("system", "user", "assistant")
# OpenAI's image detail: "low" = one unsplit tile, "high" = the processor's full split, "auto" = the
# runner's default (see runtime/runner.py: split, unsplit when the images would not fit the context).
DETAILS = ("auto", "low", "high")

ImageSource = Union[str, os.PathLike, bytes, Image.Image]


@dataclass(frozen=True)
class TextPart:
    text: str


def _source_bytes(source, what: str) -> bytes:
    """The bytes of a media source: bytes as they are, a file read whole."""
    if isinstance(source, (bytes, bytearray)):
        return bytes(source)
    path = Path(source)
    try:
        return path.read_bytes()
    except OSError as exc:
        from rksmolvlm.errors import ImageError, VideoError

        error = ImageError if what == "image" else VideoError
        raise error(f"cannot read the {what} file {path} ({exc.strerror or exc}): check the path") from None


class _Keyed:
    """``key``: the sha256 of the part's bytes (``data()``), computed once."""

    _key: list

    @property
    def key(self) -> str:
        if not self._key:
            self._key.append(hashlib.sha256(self.data()).hexdigest())
        return self._key[0]

    def data(self) -> bytes:
        raise NotImplementedError


@dataclass(frozen=True, eq=False)
class ImagePart(_Keyed):
    """An image as the user gave it: a file path, the file's bytes or a PIL image, and how much
    detail it wants (``DETAILS``). Its ``key`` is the sha256 of the bytes (of the PNG encoding for
    a PIL image): equal images share features (per split mode and resolution: the feature cache adds
    them). ``resolution`` is the image's own budget (``processing.image.Resolution``), over the runner's."""

    source: ImageSource
    detail: str = "auto"
    resolution: Any = None  # a processing.image.Resolution of its own (None: the runner's)
    _key: list = field(default_factory=list, repr=False, compare=False)

    def __post_init__(self):
        if self.detail not in DETAILS:
            raise ValueError(f"image detail {self.detail!r} is not one of {', '.join(DETAILS)}")
        if self.resolution is not None and type(self.resolution).__name__ != "Resolution":
            raise ValueError(f"image resolution {self.resolution!r} must be a Resolution")

    def data(self) -> bytes:
        source = self.source
        if isinstance(source, Image.Image):
            buffer = io.BytesIO()
            source.save(buffer, format="PNG")
            return buffer.getvalue()
        return _source_bytes(source, "image")


@dataclass(frozen=True, eq=False)
class VideoPart(_Keyed):
    """A video (SmolVLM2 checkpoints): a file path or the file's bytes, with optional sampling
    settings of its own (frames per second to sample, the most frames to take; None: the runner's
    defaults, bounded by the checkpoint's). Its ``key`` is the sha256 of the bytes."""

    source: Union[str, os.PathLike, bytes]
    fps: float | None = None
    max_frames: int | None = None
    _key: list = field(default_factory=list, repr=False, compare=False)

    def __post_init__(self):
        if isinstance(self.source, Image.Image) or self.source is None:
            raise ValueError("a video part needs a file path or the file's bytes")
        if self.fps is not None and (isinstance(self.fps, bool) or not isinstance(self.fps, (int, float))
                                     or not 0 < self.fps <= 1000):
            raise ValueError(f"video fps {self.fps!r} must be a number above 0 (frames sampled per second)")
        if self.max_frames is not None and (isinstance(self.max_frames, bool) or not isinstance(self.max_frames, int)
                                            or self.max_frames < 1):
            raise ValueError(f"video max_frames {self.max_frames!r} must be a whole number of at least 1")

    def data(self) -> bytes:
        return _source_bytes(self.source, "video")


Part = Union[TextPart, ImagePart, VideoPart]


@dataclass(frozen=True)
class Message:
    role: str  # system | user | assistant
    parts: tuple[Part, ...]

    @classmethod
    def text(cls, role: str, text: str) -> "Message":
        return cls(role, (TextPart(text),))

    @property
    def joined_text(self) -> str:
        return "".join(p.text for p in self.parts if isinstance(p, TextPart))


def conversation(messages: Sequence[Any], resolve: Callable[[Any], ImageSource] | None = None) -> list[Message]:
    """Dict messages (or Message records, kept as they are) → Message records. Image parts carry
    their source under ``image`` (``resolve`` maps it, e.g. a file name to a path) and optionally
    ``detail`` ("auto", "low" or "high")."""
    out = []
    for i, message in enumerate(messages):
        if isinstance(message, Message):
            out.append(message)
            continue
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise ValueError(f"message {i} needs a 'role' (system, user or assistant) and a 'content'")
        role = message["role"]
        if role not in ROLES:
            raise ValueError(f"message {i}: role {role!r} is not one of {', '.join(ROLES)}")
        content = message.get("content")
        if content is None or isinstance(content, str):
            out.append(Message.text(role, content or ""))
            continue
        if not isinstance(content, (list, tuple)):
            raise ValueError(f"message {i}: content must be a string or a list of parts")
        parts: list[Part] = []
        for j, part in enumerate(content):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text":
                text = part.get("text")
                if text is not None and not isinstance(text, str):
                    raise ValueError(f"message {i} part {j}: 'text' must be a string")
                parts.append(TextPart(text or ""))
            elif kind == "image":
                if "image" not in part:
                    raise ValueError(f"message {i} part {j}: an image part needs its source under 'image' "
                                     "(a path, bytes or PIL image)")
                detail = part.get("detail", "auto")
                if detail not in DETAILS:
                    raise ValueError(f"message {i} part {j}: detail {detail!r} is not one of {', '.join(DETAILS)}")
                parts.append(ImagePart(resolve(part["image"]) if resolve else part["image"], detail))
            elif kind == "video":
                source = part.get("video", part.get("path"))
                if source is None:
                    raise ValueError(f"message {i} part {j}: a video part needs its source under 'video' "
                                     "(a path or bytes)")
                video: Any = resolve(source) if resolve else source  # VideoPart refuses a resolved Image
                try:
                    parts.append(VideoPart(video, part.get("fps"),
                                           part.get("max_frames")))
                except ValueError as exc:
                    raise ValueError(f"message {i} part {j}: {exc}") from None
            else:
                raise ValueError(f"message {i} part {j} has type {kind!r}: use 'text', 'image' or 'video'")
        out.append(Message(role, tuple(parts)))
    return out


def image_parts(messages: Sequence[Message]) -> list[ImagePart]:
    """Every image part, in prompt order."""
    return [p for m in messages for p in m.parts if isinstance(p, ImagePart)]


def media_parts(messages: Sequence[Message]) -> list[ImagePart | VideoPart]:
    """Every image and video part, in prompt order."""
    return [p for m in messages for p in m.parts if isinstance(p, (ImagePart, VideoPart))]

"""Media references → bytes: what an ``image_url`` or ``video_url`` part names, read within its byte
limit, for images and videos alike.

A reference is one of
- a ``data:`` URI with base64 bytes (an image's generic type, ``application/octet-stream``, is
  replaced by the type its first bytes show; a video's container is read from the bytes later);
- a local file (``/path`` or ``file:///path``) under ``images.local_dir``, when that is set;
- an http(s) URL when ``images.allow_remote``, fetched by ``runtime/server/remote.py`` (public
  addresses only unless ``images.allow_private_networks``, checked redirects, one deadline).

What differs between the two kinds is data (``IMAGE``, ``VIDEO``: the byte limit's config key, the
accepted types, the words of the messages); every refusal is an ApiError whose code names the kind
(``invalid_image_url``, ``video_too_large``, ``remote_images_disabled``, ``video_path_not_allowed``, …).
Nothing here decodes: the header checks and the video probe are ``runtime/server/media_checks.py``.
"""

from __future__ import annotations

import base64
import binascii
import os
import re
import stat
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

from rksmolvlm import __version__
from rksmolvlm.runtime.server.bulk import bulk
from rksmolvlm.runtime.server.config import ServerConfig
from rksmolvlm.runtime.server.errors import ApiError

__all__ = ["IMAGE", "IMAGE_TYPES", "GENERIC_TYPES", "MediaKind", "MediaRef", "MediaSource", "VIDEO"]

# MIME type → Pillow format; nothing else is ever handed to the decoder.
IMAGE_TYPES = {"image/png": "PNG", "image/jpeg": "JPEG", "image/jpg": "JPEG", "image/webp": "WEBP",
               "image/gif": "GIF", "image/bmp": "BMP", "image/x-ms-bmp": "BMP", "image/tiff": "TIFF"}
# Types that say nothing of the content: an image's is replaced by its sniffed type, a video's is taken as is.
GENERIC_TYPES = ("application/octet-stream", "binary/octet-stream", "")


@dataclass(frozen=True)
class MediaKind:
    """What differs between an image and a video reference, as data: the name in error codes and
    messages, the byte limit's config key, the accepted MIME types and the hints of the refusals."""

    name: str  # "image" | "video": error codes are invalid_{name}_url, {name}_too_large, …
    example: str  # the data: URI a client should send
    limit_key: str  # the config key of the byte limit ("section.key"): read from the config and named in messages
    shrink: str  # the fix for a reference over its byte limit
    exact_types: tuple[str, ...]  # MIME types accepted as they are
    type_prefix: str | None  # any MIME type under it accepted (video/*)
    generic_ok: bool  # GENERIC_TYPES accepted as they are (a video's container is read from its bytes)
    send_types: str  # the fix for a data: URI of another type
    remote_types: str  # what a remote server must answer with
    other_prefix: str  # the other kind's MIME types ...
    other_hint: str  # ... and where they go instead
    article: str  # "an image" | "a video"

    def accepts(self, mime: str) -> bool:
        """Is ``mime`` (lower case, no parameters) a type of this kind?"""
        return (mime in self.exact_types or (self.type_prefix is not None and mime.startswith(self.type_prefix))
                or (self.generic_ok and mime in GENERIC_TYPES))

    def limit(self, config: ServerConfig) -> int:
        """The byte limit, read from the config key that messages name."""
        section, key = self.limit_key.split(".")
        return getattr(getattr(config, section), key)

    def too_large(self, config: ServerConfig, size: int | str, param: str) -> ApiError:
        """The 413 of a reference over the byte limit (``size`` a byte count or words such as "over 1,024")."""
        shown = size if isinstance(size, str) else f"{size:,}"
        return ApiError(413, f"{param} is {shown} bytes, over {self.limit_key} = {self.limit(config):,}: {self.shrink}",
                        f"{self.name}_too_large", param)


IMAGE = MediaKind(
    name="image", example="data:image/png;base64,…", limit_key="limits.max_image_bytes",
    shrink="send a smaller image (downscale or compress it)", exact_types=tuple(IMAGE_TYPES), type_prefix=None,
    generic_ok=False, send_types="send image/png, image/jpeg, image/webp, image/gif, image/bmp or image/tiff",
    remote_types="an image type (PNG, JPEG, WebP, GIF, BMP or TIFF)", other_prefix="video/",
    other_hint="a video goes in a video_url part, {\"type\": \"video_url\", \"video_url\": {\"url\": "
               "\"data:video/mp4;base64,…\"}}", article="an image")
VIDEO = MediaKind(
    name="video", example="data:video/mp4;base64,…", limit_key="video.max_bytes",
    shrink="send a shorter or more compressed video", exact_types=(), type_prefix="video/", generic_ok=True,
    send_types="send a video (data:video/mp4;base64,…; any video/* type)", remote_types="a video type (video/*)",
    other_prefix="image/", other_hint="an image goes in an image_url part (data:video/mp4;base64,…; any video/* type)",
    article="a video")


@dataclass(frozen=True)
class MediaRef:
    """An image or video as a request names it, checked to be fit to read (no control characters;
    an image's generic data: type replaced by the type its bytes show) but not yet read."""

    kind: MediaKind
    url: str
    param: str  # where the request holds it, e.g. messages[0].content[1].image_url

    @classmethod
    def parse(cls, kind: MediaKind, url: str, param: str) -> "MediaRef":
        if url.startswith("data:"):  # its base64 may be wrapped in lines: CR/LF are allowed there, NUL is not
            if "\x00" in url:
                raise ApiError(400, f"{param} holds a NUL character: send the {kind.name}'s standard base64",
                               f"invalid_{kind.name}_url", param)
            # a kind that does not take generic types as they are (images) gets them typed from its first bytes
            return cls(kind, url if kind.generic_ok else _typed_data_uri(url, param), param)
        if _URL_CONTROL.search(url):
            raise ApiError(400, f"{param} holds control characters (NUL, CR, LF, …) or invalid Unicode: send a plain "
                           "URL or path", f"invalid_{kind.name}_url", param)
        return cls(kind, url, param)


class MediaSource:
    """Reads references into bytes under the server's config: data: URIs always, local files under
    ``images.local_dir``, remote URLs when ``images.allow_remote``; each within its kind's byte limit."""

    def __init__(self, config: ServerConfig):
        self.config = config

    def read(self, ref: MediaRef) -> bytes:
        """The bytes ``ref`` names (possibly empty: the checks refuse that with the kind's words)."""
        url, kind = ref.url, ref.kind
        if url.startswith("data:"):
            return self._from_data_uri(ref)
        if url.startswith(("http://", "https://")):
            return self._from_remote(ref)
        if url.startswith("file://") or url.startswith("/"):
            return self._from_local(ref)
        scheme = url.split(":", 1)[0][:16] if ":" in url else "a relative path"
        raise ApiError(400, f"{ref.param}: {scheme!r} {kind.name}s are not supported: send a data: URI "
                       f"({kind.example})", f"invalid_{kind.name}_url", ref.param)

    def _from_data_uri(self, ref: MediaRef) -> bytes:
        kind, param = ref.kind, ref.param
        header, comma, payload = ref.url[5:].partition(",")
        template = kind.example.replace("…", "<base64 bytes>")
        if not comma:
            raise ApiError(400, f"{param} is not a valid data: URI: write {template}", f"invalid_{kind.name}_url",
                           param)
        fields = [f.strip().lower() for f in header.split(";")]
        mime = fields[0]
        if not kind.accepts(mime):
            hint = kind.other_hint if mime.startswith(kind.other_prefix) else kind.send_types
            raise ApiError(400, f"{param} has the type {(mime or 'text/plain')[:64]!r}: {hint}",
                           f"unsupported_{kind.name}_type", param)
        if "base64" not in fields[1:]:
            shown = mime if mime not in GENERIC_TYPES else kind.example[5:].split(";")[0]
            raise ApiError(400, f"{param} must be base64-encoded: write data:{shown};base64,<base64 bytes>",
                           f"invalid_{kind.name}_url", param)
        if len(payload) // 4 * 3 > kind.limit(self.config) + 3:
            raise kind.too_large(self.config, f"about {len(payload) // 4 * 3:,}", param)
        with bulk(len(payload)):  # one multi-megabyte decode at a time (runtime/server/bulk.py)
            return _base64(payload, param, kind.name)

    def _from_local(self, ref: MediaRef) -> bytes:
        """A file under images.local_dir (images and videos alike), read up to the kind's byte limit."""
        kind, param, what = ref.kind, ref.param, ref.kind.name
        root = self.config.images.local_dir
        if not root:
            raise ApiError(400, f"{param}: local {what} paths are off: send the {what} as a data: URI "
                           f"({kind.example}), or set images.local_dir in the server config to the directory they "
                           "may come from",
                           f"local_{what}s_disabled", param)
        if ref.url.startswith("file://"):
            parsed = urllib.parse.urlparse(ref.url)
            if parsed.netloc not in ("", "localhost"):
                raise ApiError(400, f"{param}: file URLs must name this machine (file:///path)", f"invalid_{what}_url",
                               param)
            text = urllib.parse.unquote(parsed.path)
        else:
            text = ref.url
        if "\x00" in text:  # %00 in a file URL: the OS cannot take it (ValueError, not OSError)
            raise ApiError(400, f"{param} holds a NUL character: send a plain path", f"invalid_{what}_url", param)
        path = Path(text).resolve()
        if not path.is_relative_to(Path(root).resolve()):
            raise ApiError(400, f"{param} is outside images.local_dir ({root}): only {what}s under it may be read",
                           f"{what}_path_not_allowed", param)
        limit = kind.limit(self.config)
        try:  # O_NONBLOCK: a FIFO under local_dir must not block the reader; only regular files are read
            with open(os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC), "rb") as f:
                if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                    raise ApiError(400, f"{param} is not a regular file: name {kind.article} file under "
                                   "images.local_dir", f"invalid_{what}", param)
                data = f.read(limit + 1)
        except FileNotFoundError:
            raise ApiError(400, f"{param}: no such file under images.local_dir", f"invalid_{what}", param) from None
        except OSError as exc:
            raise ApiError(400, f"{param}: cannot read the file ({exc.strerror})", f"invalid_{what}", param) from None
        if len(data) > limit:
            raise kind.too_large(self.config, f"over {limit:,}", param)
        return data

    def _from_remote(self, ref: MediaRef) -> bytes:
        """An http(s) reference, fetched within images.remote_timeout_s in all (runtime/server/remote.py)."""
        from rksmolvlm.runtime.server.remote import FetchError, fetch

        kind, param = ref.kind, ref.param
        images = self.config.images
        if not images.allow_remote:
            raise ApiError(400, f"{param}: remote {kind.name} URLs are off (images.allow_remote = false): send the "
                           f"{kind.name} as a data: URI ({kind.example})", f"remote_{kind.name}s_disabled", param)
        limit = kind.limit(self.config)
        try:
            fetched = fetch(ref.url, timeout_s=images.remote_timeout_s, max_bytes=limit, what=kind.name,
                            allow_private=images.allow_private_networks, user_agent=f"rksmolvlm/{__version__}")
        except FetchError as exc:
            raise ApiError(exc.status, f"{param}: {exc}", exc.code, param) from None
        if not kind.accepts(fetched.content_type):
            raise ApiError(400, f"{param}: the remote server did not answer with {kind.remote_types}",
                           f"unsupported_{kind.name}_type", param)
        if fetched.content_length is not None and fetched.content_length > limit:
            raise kind.too_large(self.config, fetched.content_length, param)
        if len(fetched.data) > limit:
            raise kind.too_large(self.config, f"over {limit:,}", param)
        return fetched.data


# ==============================================================================================
# Private helpers
# ==============================================================================================
_B64_SLICE = 1 << 20  # characters, a multiple of 4: every slice but the last decodes to whole bytes
_URL_CONTROL = re.compile("[\x00-\x1f\x7f\ud800-\udfff]")
_MAGIC = ((b"\x89PNG\r\n\x1a\n", "image/png"), (b"\xff\xd8\xff", "image/jpeg"), (b"GIF87a", "image/gif"),
          (b"GIF89a", "image/gif"), (b"BM", "image/bmp"), (b"II*\x00", "image/tiff"), (b"MM\x00*", "image/tiff"))


def _base64(payload: str, param: str, kind: str) -> bytes:
    """A data URI's base64 payload (also when a client wrapped it in lines)."""
    try:
        return _b64decode(payload)
    except (binascii.Error, ValueError):
        try:
            return _b64decode("".join(payload.split()))
        except (binascii.Error, ValueError):
            raise ApiError(400, f"{param} is not valid base64: encode the {kind} file's bytes with standard base64",
                           f"invalid_{kind}", param) from None


def _b64decode(text: str) -> bytes:
    """Strict base64, a slice at a time: one call over 14 MB holds the GIL for 40–200 ms (the event loop
    and /health wait), a 1 MiB slice for about 2 ms. Padding may only end the whole text."""
    if len(text) <= _B64_SLICE:
        return base64.b64decode(text, validate=True)
    if text.find("=", 0, len(text) - 2) != -1:
        raise binascii.Error("padding inside the data")
    return b"".join(base64.b64decode(text[start:start + _B64_SLICE], validate=True)
                    for start in range(0, len(text), _B64_SLICE))


def _typed_data_uri(url: str, param: str) -> str:
    """An image data: URI whose generic type (application/octet-stream, none) is replaced by the type its
    first bytes show; refused when they show no supported image."""
    comma = url.find(",", 5, 512)
    first = url[5:comma].split(";", 1)[0] if comma > 0 else ""
    if comma < 0 or first.strip().lower() not in GENERIC_TYPES:
        return url
    head = "".join(url[comma + 1:comma + 65].split())[:16]
    try:
        start = base64.b64decode(head[:len(head) // 4 * 4], validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(400, f"{param} is not valid base64: encode the image file's bytes with standard base64",
                       "invalid_image", param) from None
    kind = next((mime for magic, mime in _MAGIC if start.startswith(magic)), None)
    if kind is None and start[:4] == b"RIFF" and start[8:12] == b"WEBP":
        kind = "image/webp"
    if kind is None:
        raise ApiError(400, f"{param} is {first.strip()[:40] or 'untyped'} data whose first bytes are not a PNG, "
                       "JPEG, WebP, GIF, BMP or TIFF image: send an image", "unsupported_image_type", param)
    return "data:" + kind + url[5 + len(first):]

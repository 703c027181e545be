"""What decoding an image will cost, judged before a pixel is decoded, and the limits it must fit.

An image can be small on the wire and ruinous to decode: a progressive JPEG makes the decoder walk
every block of the image once per scan (134,000 scans: 11 minutes), a 97 KB 16-bit PNG decodes to
gigabytes, a 1×50,000,000 PNG gives the resizer a 2.4 GB coefficient table. So before decoding:
the JPEG's segment structure is walked and its scans counted (``inspect_jpeg``), and the memory the
decode takes is computed from the mode, the size and the format (``decode_bytes``: measured per
format, e.g. 16 bytes a pixel for WebP); ``check_decodable`` refuses what is over the limits with an
ImageError subclass whose ``code`` names the refusal. JPEG frame types other than 8-bit Huffman are
refused by name, and a TIFF's strips are counted from its directory entry (``tiff_strips``) before
the arrays are read. While
decoding, ``DeadlineReader`` stops a decode that outlives its time budget (it is checked whenever
the decoder asks for more input, every 64 KiB). Depends on Pillow only.
"""

from __future__ import annotations

import io
import re
import struct
import time
from dataclasses import dataclass

from PIL import Image

from rksmolvlm.errors import ImageDecodeTooLargeError, ImageError, ImageTooComplexError, ImageTooManyPixelsError

__all__ = ["DecodeLimits", "JpegStructure", "DeadlineReader", "DEFAULT_MAX_PIXELS", "DEFAULT_MAX_DECODE_BYTES",
           "DEFAULT_MAX_JPEG_SCANS", "DEFAULT_MAX_DECODE_SECONDS", "MAX_IMAGE_SIDE", "MAX_JPEG_SEGMENTS",
           "DEFAULT_MAX_TIFF_STRIPS", "inspect_jpeg", "jpeg_scan_limit", "decode_bytes", "check_decodable",
           "check_jpeg", "check_tiff_jpeg", "tiff_strips"]

DEFAULT_MAX_PIXELS = 100_000_000
DEFAULT_MAX_DECODE_BYTES = 512 * 1024 * 1024
# Encoders write about 10 scans (libjpeg's default script) and rarely more than 20; every scan costs a
# pass over the whole image (up to 64 coefficient visits per 8×8 block for a refinement scan:
# about 2 ns a pixel on a desktop core, more on the board's). Above SCAN_REFERENCE_PIXELS an image may
# have proportionally fewer scans (never fewer than MIN_JPEG_SCANS), so the scans of one image cost
# at most about max_jpeg_scans passes over 10 megapixels.
DEFAULT_MAX_JPEG_SCANS = 100
SCAN_REFERENCE_PIXELS = 10_000_000
MIN_JPEG_SCANS = 16
DEFAULT_MAX_DECODE_SECONDS = 30.0
# Strips (or tiles) of a TIFF's first image: one a row of a 65,535-row image is the most a writer makes
# (tiles: 100 Mpixels in 256² tiles is 1,526). Each is a libtiff read and, JPEG-compressed, a check here.
DEFAULT_MAX_TIFF_STRIPS = 65_536
# The largest side JPEG and GIF can hold. A longer side buys nothing (the processor resizes to ≤ 4096)
# and costs the Lanczos resizer 48 bytes of coefficients per source pixel along it.
MAX_IMAGE_SIDE = 65_535
# Marker segments (RSTn excluded) before the first EOI: real files have a few dozen (ICC profiles and
# extended XMP split into 64 KiB APPn chunks included); the walk stops here to stay cheap.
MAX_JPEG_SEGMENTS = 4096

_HIGH_DEPTH = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")
_RESIZE_BYTES_PER_SIDE_PIXEL = 48  # Pillow's Lanczos: 6 taps × 8-byte doubles per source pixel, per axis
# Pillow decodes every WebP through libwebp's animation decoder, which keeps two RGBA canvases (the frame
# and the previous one) while the image is open; the frame is then copied into a bytes object and into
# Pillow's image (4 bytes a pixel, RGB or RGBA). Measured peak of Image.load: 16.0 bytes a pixel for
# lossless, lossy, RGB, RGBA and animated files alike; 12 stay resident until the image is closed.
_WEBP_BYTES_PER_PIXEL = 16
# libwebp's own decoder state and Python's copy bookkeeping beside the canvases: a 3000² RGB WebP peaked
# 138 MB against 16 bytes a pixel's 137.3 MiB (an estimate must bound the real peak, not meet it).
_WEBP_FIXED_BYTES = 8 * 1024 * 1024
# load_image composites a transparent image on white a band of 2^20 pixels at a time: the band's RGBA,
# background and result copies (measured: a 3000² RGBA WebP peaks 20 MB above 16 bytes a pixel).
_BAND_WORK_BYTES = 24 * 1024 * 1024
# JPEG frame types libjpeg decodes that we take: baseline, extended and progressive Huffman (SOF0-2).
# Arithmetic (SOF9-11), lossless (SOF3, 11) and hierarchical (SOF5-7, 13-15) frames are refused: no
# camera or browser writes them and they are the decoder's least-used code.
_SUPPORTED_SOF = frozenset((0xC0, 0xC1, 0xC2))


@dataclass(frozen=True)
class DecodeLimits:
    """The limits one image must fit before and while it is decoded."""

    max_pixels: int = DEFAULT_MAX_PIXELS
    max_decode_bytes: int = DEFAULT_MAX_DECODE_BYTES
    max_jpeg_scans: int = DEFAULT_MAX_JPEG_SCANS
    max_decode_seconds: float = DEFAULT_MAX_DECODE_SECONDS
    max_tiff_strips: int = DEFAULT_MAX_TIFF_STRIPS


@dataclass(frozen=True)
class JpegStructure:
    """What the marker segments of a JPEG's first image say: scans (SOS markers), segments (markers
    other than RSTn), the frame (SOF) size, components and whether it is progressive; the frame's
    marker (0xC0 baseline … 0xCF) and sample precision in bits. ``complete`` is false when the walk
    stopped early (past ``stop_after`` scans or ``MAX_JPEG_SEGMENTS``)."""

    scans: int
    segments: int
    progressive: bool = False
    components: int = 0
    width: int = 0
    height: int = 0
    complete: bool = True
    sof: int = 0
    precision: int = 0


# A marker: 0xFF then a code that is neither a stuffed zero, a fill byte (0xFF) nor RSTn (0xD0–0xD7,
# which only occur inside entropy-coded data). Entropy-coded data holds no other 0xFF pair (the
# encoder stuffs a zero after every 0xFF data byte), so searching for this pattern skips it exactly.
_MARKER = re.compile(rb"\xff[\x01-\xcf\xd8-\xfe]")
_PARAMETERLESS = frozenset((0x01, 0xD8, 0xD9))  # TEM, SOI, EOI (RSTn never match _MARKER)
_PROGRESSIVE_SOF = frozenset((0xC2, 0xC6, 0xCA, 0xCE))
_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}  # not DHT, JPG, DAC


def inspect_jpeg(data: bytes, stop_after: int | None = None) -> JpegStructure:
    """Walk a JPEG's marker segments from SOI to the first EOI, skipping each segment by its length
    and each scan's entropy-coded data by the marker rule; count the scans. Stops early (``complete``
    false) once more than ``stop_after`` scans or ``MAX_JPEG_SEGMENTS`` segments are seen, so a
    hostile file costs at most that many steps. Data that does not start with SOI gives 0 scans."""
    if not data.startswith(b"\xff\xd8"):
        return JpegStructure(0, 0)
    scans = segments = components = width = height = sof = precision = 0
    progressive = False
    pos, size = 2, len(data)
    while True:
        found = _MARKER.search(data, pos)
        if found is None:
            break  # truncated: the decoder stops here too
        code, pos = data[found.start() + 1], found.end()
        if code == 0xD9:
            break
        segments += 1
        if segments > MAX_JPEG_SEGMENTS or (stop_after is not None and scans > stop_after):
            return JpegStructure(scans, segments, progressive, components, width, height, False, sof, precision)
        if code in _PARAMETERLESS:
            continue
        if pos + 2 > size:
            break
        length = int.from_bytes(data[pos:pos + 2], "big")
        if length < 2:
            break  # the decoder refuses a bad length
        if code == 0xDA:
            scans += 1
        elif code in _SOF and pos + 8 <= size and not components:  # the first frame header counts
            progressive, sof, precision = code in _PROGRESSIVE_SOF, code, data[pos + 2]
            height, width = int.from_bytes(data[pos + 3:pos + 5], "big"), int.from_bytes(data[pos + 5:pos + 7], "big")
            components = data[pos + 7]
        pos += length
    complete = stop_after is None or scans <= stop_after
    return JpegStructure(scans, segments, progressive, components, width, height, complete, sof, precision)


def jpeg_scan_limit(max_scans: int, pixels: int) -> int:
    """The scans a JPEG of ``pixels`` may have: ``max_scans`` up to SCAN_REFERENCE_PIXELS, then
    proportionally fewer (at least MIN_JPEG_SCANS, never more than ``max_scans``)."""
    if pixels <= SCAN_REFERENCE_PIXELS:
        return max_scans
    return min(max_scans, max(MIN_JPEG_SCANS, max_scans * SCAN_REFERENCE_PIXELS // pixels))


def decode_bytes(mode: str, size: tuple[int, int], *, transparency: bool = False,
                 progressive_components: int = 0, image_format: str | None = None, animated: bool = False) -> int:
    """Peak memory of decoding an image of this mode and size and turning it into the RGB image the
    processor tiles, in bytes (``load_image``'s path; every term is a buffer that exists at once):

    - the decoded image as Pillow stores it: 1 byte a pixel for 1/L/P, 2 for 16-bit, 4 for the rest
      (Pillow keeps RGB in 4 bytes);
    - during a progressive JPEG decode, libjpeg's whole-image coefficient buffer (2 bytes a sample);
    - then the larger of: the EXIF-rotated copy, and the conversion to RGB (4 bytes a pixel; 16-bit,
      float and transparent images are converted in bands of rows, so their work buffers are small);
    - the Lanczos resize to the processor's size: coefficient tables of 48 bytes a source pixel along
      each side (a 50,000,000-pixel side alone needs 2.4 GB).

    Per format (``image_format``, Pillow's name), measured: a WebP takes 16 bytes a pixel whatever its
    mode (libwebp's two canvases beside Pillow's image and a transient copy; the RGB conversion fits in
    the transient's place, plus the band work of compositing a transparent one); an animated PNG or GIF
    (``animated``) keeps one more copy of the canvas (the previous frame, for disposal). The tiles and
    resized copies are not counted: their size follows the processor's longest edge (at most 4096), not
    the input."""
    width, height = size
    pixels = width * height
    resize = _RESIZE_BYTES_PER_SIDE_PIXEL * (width + height)
    if image_format == "WEBP":
        bands = _BAND_WORK_BYTES if transparency or "A" in mode else 0
        return pixels * _WEBP_BYTES_PER_PIXEL + _WEBP_FIXED_BYTES + bands + resize
    stored = pixels * (1 if mode in ("1", "L", "P") else 2 if mode.startswith("I;16") else 4)
    converted = 0 if mode == "RGB" and not transparency else pixels * 4
    coefficients = pixels * 2 * progressive_components
    previous = stored if animated else 0
    return stored + previous + max(coefficients, stored, converted) + resize


def check_jpeg(data: bytes, limits: DecodeLimits) -> JpegStructure | None:
    """The structure of ``data`` if it is a JPEG, after refusing one with more scans than
    ``limits.max_jpeg_scans`` (or a segment count no encoder writes); None for other formats."""
    if not data.startswith(b"\xff\xd8"):
        return None
    jpeg = inspect_jpeg(data, stop_after=limits.max_jpeg_scans)
    if jpeg.sof and jpeg.sof not in _SUPPORTED_SOF:
        kind = {0xC3: "lossless", 0xC9: "arithmetic-coded", 0xCA: "arithmetic-coded progressive",
                0xCB: "arithmetic-coded lossless"}.get(jpeg.sof, "hierarchical")
        raise ImageError(f"the JPEG is {kind} (frame marker 0xFF{jpeg.sof:02X}), which cameras and browsers do not "
                         "write: re-encode it as a baseline or progressive JPEG, or send a PNG")
    if jpeg.sof and jpeg.precision != 8:
        raise ImageError(f"the JPEG has {jpeg.precision}-bit samples (only 8-bit JPEG is decoded): re-encode it with "
                         "8 bits a sample, or send a 16-bit PNG")
    if jpeg.segments > MAX_JPEG_SEGMENTS:
        raise ImageTooComplexError(f"the JPEG has more than {MAX_JPEG_SEGMENTS:,} marker segments (encoders write a "
                                   "few dozen): re-encode it")
    allowed = jpeg_scan_limit(limits.max_jpeg_scans, jpeg.width * jpeg.height)
    if jpeg.scans > allowed:
        count = f"{jpeg.scans:,}" if jpeg.complete else f"more than {jpeg.scans - 1:,}"
        size = f" for its {jpeg.width}×{jpeg.height} pixels" if allowed < limits.max_jpeg_scans else ""
        raise ImageTooComplexError(f"the JPEG has {count} scans, over the {allowed:,} allowed{size} (encoders write "
                                   "about 10; each scan is a pass over the whole image), refused before decoding: "
                                   "re-encode it (e.g. as a baseline JPEG)", limit="max_jpeg_scans")
    return jpeg


def check_decodable(image: Image.Image, limits: DecodeLimits, jpeg: JpegStructure | None = None,
                    data: bytes | None = None) -> int:
    """Refuse an opened, not yet decoded image whose pixel count, side or decode memory is over
    ``limits`` (or, given its ``data``, a TIFF hiding progressive JPEG strips); the decode bytes
    otherwise. ``jpeg`` is ``check_jpeg``'s answer for its bytes."""
    width, height = image.size
    if width < 1 or height < 1:
        raise ImageError(f"image has no pixels ({width}×{height})")
    if width * height > limits.max_pixels:
        raise ImageTooManyPixelsError(
            f"image is {width}×{height} = {width * height:,} pixels, over the limit of {limits.max_pixels:,}: "
            "downscale it first or raise the pixel limit", limit="max_pixels")
    if max(width, height) > MAX_IMAGE_SIDE:
        raise ImageDecodeTooLargeError(
            f"image is {width}×{height}: a side over {MAX_IMAGE_SIDE:,} pixels only costs memory (the model sees at "
            "most 4096): crop or downscale it")
    if data is not None and image.format == "TIFF":
        check_tiff_jpeg(image, data, limits)
    progressive = jpeg.components if jpeg is not None and jpeg.progressive else 0
    if jpeg is None and image.format in ("JPEG", "MPO") and image.info.get("progressive"):
        progressive = len(image.getbands())
    transparency = image.info.get("transparency") is not None
    # APNG's frame count is in its header (acTL); a GIF's is not, and counting walks every frame: assumed
    animated = image.format == "GIF" or (image.format == "PNG" and int(getattr(image, "n_frames", 1)) > 1)
    cost = decode_bytes(image.mode, image.size, transparency=transparency, progressive_components=progressive,
                        image_format=image.format, animated=animated)
    if cost > limits.max_decode_bytes:
        fix = "send it with 8 bits a channel or downscale it" if image.mode in _HIGH_DEPTH else "downscale it"
        raise ImageDecodeTooLargeError(
            f"image is {width}×{height} in mode {image.mode}: decoding it takes about {_mib(cost)} of memory, over the "
            f"decode budget of {_mib(limits.max_decode_bytes)}: {fix}", limit="max_decode_bytes")
    return cost


def check_tiff_jpeg(image: Image.Image, data: bytes, limits: DecodeLimits | None = None) -> None:
    """Refuse a TIFF whose first image has more strips (or tiles) than ``limits.max_tiff_strips``
    (counted from the directory entry, not the array: 1.3 M strips in a 10 MB file), and a
    JPEG-compressed one whose strips overlap (each may claim the whole file) or hold progressive JPEG:
    libtiff decodes up to 100 scans a strip, each a pass over it, and no TIFF writer makes them (TIFF's
    JPEG compression is baseline)."""
    limits = limits or DecodeLimits()
    tags = getattr(image, "tag_v2", None)
    if tags is None:  # not a TIFF
        return
    strips = tiff_strips(data)
    if strips is not None and strips[0] > limits.max_tiff_strips:
        raise ImageTooComplexError(
            f"the TIFF has {strips[0]:,} strips or tiles, over the {limits.max_tiff_strips:,} allowed (a writer makes "
            "one a row at most): re-save it with fewer, larger strips, or send a PNG", limit="max_tiff_strips")
    compression = tags.get(259)
    if compression not in (6, 7):  # old-style and new-style JPEG
        return
    offsets, counts = tags.get(273) or tags.get(324) or (), tags.get(279) or tags.get(325) or ()
    if compression == 6 and 513 in tags:  # old-style: one JPEG interchange stream
        offsets, counts = (tags[513],), (tags.get(514, len(data)),)
    if sum(int(count) for count in counts) > len(data):
        raise ImageTooComplexError(
            f"the TIFF's {len(counts):,} JPEG strips claim more bytes than the file holds (they overlap, so each "
            "would be decoded from the same data): re-save it", limit="max_tiff_strips")
    for offset, count in zip(offsets, counts):
        strip = inspect_jpeg(data[offset:offset + count], stop_after=4)  # sequential: a scan a component at most
        if strip.progressive or not strip.complete:
            raise ImageTooComplexError("the TIFF's JPEG-compressed strips are progressive (multi-scan), which no TIFF "
                                       "writer makes and each scan costs a pass over the strip: re-encode it")


def tiff_strips(data: bytes) -> tuple[int, int] | None:
    """(strip or tile offsets, byte counts) entries declared by the first directory of a TIFF or
    BigTIFF, read from the directory entries alone (not the arrays they point to); None when the
    bytes are not a TIFF or the directory is out of the file."""
    if data[:4] in (b"II*\x00", b"MM\x00*"):
        big = False
    elif data[:4] in (b"II+\x00", b"MM\x00+"):
        big = True
    else:
        return None
    order = "<" if data[:2] == b"II" else ">"
    try:
        if big:
            ifd = struct.unpack_from(order + "Q", data, 8)[0]
            entries = struct.unpack_from(order + "Q", data, ifd)[0]
            first, size, layout = ifd + 8, 20, order + "HHQ"
        else:
            ifd = struct.unpack_from(order + "I", data, 4)[0]
            entries = struct.unpack_from(order + "H", data, ifd)[0]
            first, size, layout = ifd + 2, 12, order + "HHI"
        offsets = counts = 0
        for i in range(min(entries, 4096)):
            tag, _, count = struct.unpack_from(layout, data, first + size * i)
            if tag in (273, 324):
                offsets = max(offsets, count)
            elif tag in (279, 325):
                counts = max(counts, count)
    except struct.error:
        return None
    return offsets, counts


class DeadlineReader(io.BytesIO):
    """Image bytes for ``Image.open`` that stop the decode once ``seconds`` have passed since
    ``start()``: Pillow asks for input every 64 KiB, so a decode stops within one block's work."""

    def __init__(self, data: bytes, seconds: float):
        super().__init__(data)
        self.seconds = seconds
        self.deadline: float | None = None

    def start(self) -> None:
        self.deadline = time.monotonic() + self.seconds

    def read(self, size: int | None = -1) -> bytes:
        if self.deadline is not None and time.monotonic() > self.deadline:
            raise ImageTooComplexError(f"decoding the image took over {self.seconds:g} s, its time budget: send a "
                                       "smaller or simpler image", limit="max_decode_seconds")
        return super().read(size)


def _mib(size: int) -> str:
    return f"{size / (1024 * 1024):,.0f} MiB"

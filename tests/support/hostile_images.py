"""Images that are small on the wire and costly to decode, made in the test (never shipped):
a progressive JPEG with thousands of scans, PNGs of any bit depth and shape compressed from
zeros, a float TIFF."""

from __future__ import annotations

import io
import struct
import zlib

from PIL import Image

__all__ = ["scan_bomb", "zero_png", "float_tiff", "jpeg_tiff", "jpeg_segments"]


def jpeg_segments(data: bytes) -> list[tuple[int, int, int]]:
    """(marker, start, end) of each segment of a well-formed JPEG (a scan's end includes its data)."""
    pos, out = 2, []
    while pos < len(data):
        code = data[pos + 1]
        if code == 0xD9:
            out.append((code, pos, pos + 2))
            break
        end = pos + 2 + int.from_bytes(data[pos + 2:pos + 4], "big")
        if code == 0xDA:  # entropy-coded data runs to the next marker other than RSTn
            while not (data[end] == 0xFF and data[end + 1] not in (0x00, *range(0xD0, 0xD8))):
                end += 1
        out.append((code, pos, end))
        pos = end
    return out


def _bits_to_bytes(bits: str) -> bytes:
    bits += "1" * (-len(bits) % 8)
    out = bytearray()
    for i in range(0, len(bits), 8):
        out.append(int(bits[i:i + 8], 2))
        if out[-1] == 0xFF:
            out.append(0)  # byte stuffing
    return bytes(out)


def scan_bomb(width: int = 2000, height: int = 2000, scans: int = 5000) -> bytes:
    """A valid gray progressive JPEG followed by ``scans`` AC refinement scans, each a few bytes of
    end-of-band runs that make the decoder visit all 63 AC coefficients of every block: about
    2.5 ms a scan for 4 MP on a desktop core (5,000 scans: 12 s; 134,000: minutes)."""
    buffer = io.BytesIO()
    Image.new("L", (width, height), 128).save(buffer, "JPEG", progressive=True, quality=80)
    data = buffer.getvalue()
    eoi = jpeg_segments(data)[-1][1]
    # AC table 0 with a single 1-bit code for EOB14 (0xE0): an end-of-band run of 16,384 + 14 bits.
    dht = b"\xff\xc4" + (2 + 1 + 16 + 1).to_bytes(2, "big") + b"\x10" + bytes([1] + [0] * 15) + b"\xe0"
    blocks, bits = -(-width // 8) * -(-height // 8), ""
    while blocks >= 16384:
        run = min(blocks, 32767)
        bits += "0" + format(run - 16384, "014b")
        blocks -= run
    # SOS: one component (id 1), tables 0/0, spectral 1..63, successive approximation Ah=1, Al=0.
    scan = b"\xff\xda\x00\x08\x01\x01\x00\x01\x3f\x10" + _bits_to_bytes(bits)
    return data[:eoi] + dht + scan * scans + data[eoi:]


def zero_png(width: int, height: int, bit_depth: int = 8, color_type: int = 0) -> bytes:
    """A PNG of zeros (color_type 0 gray, 2 RGB, 4 gray+alpha, 6 RGBA), built from one compressed
    block, so that a 100 MB image costs the test neither the memory nor the time to compress it."""
    channels = {0: 1, 2: 3, 4: 2, 6: 4}[color_type]
    row = 1 + (width * channels * bit_depth + 7) // 8
    total = row * height

    def chunk(kind: bytes, body: bytes) -> bytes:
        return len(body).to_bytes(4, "big") + kind + body + zlib.crc32(kind + body).to_bytes(4, "big")

    # Raw deflate of one block of zeros, flushed so that it stands alone: the same bytes repeated are
    # the deflate stream of the whole image (the zlib header and checksum are written around them).
    block = bytes(1 << 20)
    compressor = zlib.compressobj(9, zlib.DEFLATED, -15)
    piece = compressor.compress(block) + compressor.flush(zlib.Z_FULL_FLUSH)
    tail = zlib.compressobj(9, zlib.DEFLATED, -15)
    count, rest = divmod(total, len(block))
    checksum = 1
    for _ in range(count):
        checksum = zlib.adler32(block, checksum)
    checksum = zlib.adler32(bytes(rest), checksum)
    stream = b"\x78\xda" + piece * count + tail.compress(bytes(rest)) + tail.flush() + checksum.to_bytes(4, "big")
    header = width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes([bit_depth, color_type, 0, 0, 0])
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", stream) + chunk(b"IEND", b"")


def float_tiff(width: int, height: int) -> bytes:
    """A 32-bit float grayscale TIFF of zeros, deflate-compressed (mode F: 4 bytes a pixel decoded)."""
    buffer = io.BytesIO()
    Image.new("F", (width, height)).save(buffer, "TIFF", compression="tiff_adobe_deflate")
    return buffer.getvalue()


def jpeg_tiff(width: int, height: int, strip: bytes | None = None) -> bytes:
    """A gray JPEG-compressed TIFF in one strip; ``strip`` replaces its JPEG data (e.g. a
    ``scan_bomb``: libtiff decodes up to 100 scans of it)."""
    buffer = io.BytesIO()
    Image.new("L", (width, height), 128).save(buffer, "TIFF", compression="jpeg", strip_size=width * height * 2)
    data = bytearray(buffer.getvalue())
    if strip is None:
        return bytes(data)
    assert data[:4] == b"II*\x00"
    ifd = struct.unpack_from("<I", data, 4)[0]
    for i in range(struct.unpack_from("<H", data, ifd)[0]):
        entry = ifd + 2 + 12 * i
        tag, _, count = struct.unpack_from("<HHI", data, entry)
        if tag in (273, 279):  # StripOffsets, StripByteCounts: one strip, so the value is in the entry
            assert count == 1
            struct.pack_into("<I", data, entry + 8, len(data) if tag == 273 else len(strip))
    return bytes(data) + strip

"""The hostile media of issue 21, made in code (never stored): small files that cost a decoder far more
than their size. Each generator says what it attacks and what the code did with it before and after issue 21's
hardening (x86 dev box, 2 shared cores, one child process per file under RLIMIT_AS 6 GiB: wall time of
probe_video / VideoReader.read_frames / load_image and the child's peak RSS, VmHWM).

Videos: ``multi_track_mkv`` (many tiny 4K tracks), ``edit_list_mp4`` (an edit list repeating the
packets), ``long_gop_webm`` (one keyframe then many frames), ``size_switch_h264`` (a new SPS at
8192×4320 mid-stream). Images: ``strip_bomb_tiff`` (a JPEG-compressed TIFF with very many strips),
``webp_canvas`` (7071² lossless or lossy, RGBA), ``avif_canvas``, ``apng_frames`` / ``gif_frames``
(many frames on a large canvas), ``jpeg_12bit`` and ``jpeg_arithmetic`` (hand-written frame headers).
"""

from __future__ import annotations

import io
import struct
from fractions import Fraction

from PIL import Image

__all__ = ["multi_track_mkv", "edit_list_mp4", "long_gop_webm", "size_switch_h264", "size_switch_mkv",
           "strip_bomb_tiff", "webp_canvas", "avif_canvas", "apng_frames", "gif_frames", "jpeg_12bit",
           "jpeg_arithmetic", "mp4_boxes"]


# ---------------------------------------------------------------------------------------------- video


def multi_track_mkv(tracks: int = 16, width: int = 3840, height: int = 2160, frames: int = 8) -> bytes:
    """An MKV of ``tracks`` H.264 video tracks, each ``frames`` black frames of ``width``×``height`` with
    16 reference frames (so every decoder keeps a full 4K picture buffer). Attacks the stream probe
    (avformat_find_stream_info decodes ~7 frames of every track before any limit applies) and a demuxer
    that buffers the other tracks' packets. 16 tracks: 409 KB, 0.7 s to make. Before (probe_video, child
    process): 16 tracks 6.1 s / 1.94 GB peak, 48 tracks 21.9 s / 5.7 GB, 4 tracks 528 MB; after: 16 and
    48 refused (video_too_complex, > MAX_VIDEO_STREAMS) in 0.3 s / < 100 MB, 4 tracks probed at 177 MB."""

    packets, template = _h264_packets(width, height, frames, x264="ref=16:keyint=1000:bframes=0")
    return _muxed("matroska", packets, template, tracks)


def edit_list_mp4(repeats: int = 100_000, frames: int = 10, width: int = 64, height: int = 64,
                  tracks: int = 1) -> bytes:
    """An MP4 of ``frames`` small H.264 frames whose edit list (elst) has ``repeats`` entries, each
    playing the whole media again. FFmpeg's mov demuxer expands the sample index at open (entries ×
    samples index entries) and the packet scan then walks every repeat. ``tracks`` copies the video
    track. 1.2 MB, 0.01 s to make. Before: 100,000 repeats of 10 frames 1.1 s / 87 MB, of 300 frames
    1.4 s / 751 MB before the scan's frame limit (issue 21: 60 s, +3.1 GB with longer media); after:
    refused from the box headers (video_too_complex, max_stream_frames) in 0.2 s / 56 MB."""

    packets, template = _h264_packets(width, height, frames, x264="keyint=1000:bframes=0")
    return _with_edit_list(_muxed("mp4", packets, template, tracks), repeats)


def long_gop_webm(width: int = 3840, height: int = 2160, frames: int = 600, codec: str = "libvpx",
                  fps: int = 30) -> bytes:
    """A WebM of one keyframe then ``frames`` − 1 inter frames at ``width``×``height`` (VP8 by default,
    "libvpx-vp9" for VP9): a few hundred bytes a frame, yet a frame near the end can only be reached
    by decoding every frame before it (seeking lands on the one keyframe). Three frames are encoded
    (black), the last inter frame's packet is then repeated: each copy is a valid "no change" frame
    the decoder still has to run at full size. 107 KB, 1.6 s to make (VP9: 64 KB, 1.3 s). Before: 8 evenly
    spaced frames read in 5.4 s / 379 MB (VP9 8.6 s / 388 MB) — every frame decoded; after: the same unless
    the planned decodes exceed ``max_decoded_pixels`` (refused before decoding, video_too_complex)."""
    import av
    import numpy as np

    out_buf = io.BytesIO()
    with av.open(out_buf, "w", format="webm") as out:
        stream = out.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"kf-max-dist": "100000", "deadline": "realtime", "lag-in-frames": "0", "auto-alt-ref": "0",
                          "g": "100000", "crf": "63", "b": "10k", "cpu-used": "16" if codec == "libvpx" else "8"}
        stream.codec_context.gop_size = 100000
        black = np.zeros((height, width, 3), np.uint8)
        frame = av.VideoFrame.from_ndarray(black, format="rgb24").reformat(format="yuv420p")
        # encode a few frames for real, then repeat the last inter packet: every copy is a valid
        # "no change" frame that the decoder must still decode in order
        inter = None
        for i in range(min(frames, 3)):
            frame.pts = i
            for packet in stream.encode(frame):
                if not packet.is_keyframe:
                    inter = packet
                out.mux(packet)
        for packet in stream.encode(None):
            if not packet.is_keyframe:
                inter = packet
            out.mux(packet)
        if inter is not None:
            payload, base = bytes(inter), stream.time_base
            for i in range(3, frames):
                packet = av.Packet(payload)
                packet.pts = packet.dts = int(Fraction(i, fps) / base)
                packet.time_base, packet.stream = base, stream
                out.mux(packet)
    return out_buf.getvalue()


def size_switch_h264(width: int = 640, height: int = 360, big: tuple[int, int] = (8192, 4320),
                     frames: int = 4) -> bytes:
    """A raw H.264 Annex-B stream: ``frames`` frames at ``width``×``height``, then a new SPS/PPS and an
    IDR at ``big`` (8192×4320, 35 Mpixel). Attacks a size check made only on the stream header: the
    big frame is decoded and converted (≈ 240 MB of planes and RGB) before ``max_side`` refuses it.
    The raw .h264 demuxer is not in CONTAINER_FORMATS: ``size_switch_mkv`` wraps the same packets."""
    small, _ = _h264_packets(width, height, frames, x264="keyint=1000:bframes=0", annexb=True)
    large, _ = _h264_packets(big[0], big[1], 1, x264="keyint=1000:bframes=0:level=6.2", annexb=True)
    return b"".join(p[2] for p in small) + b"".join(p[2] for p in large)


def size_switch_mkv(width: int = 640, height: int = 360, big: tuple[int, int] = (8192, 4320), frames: int = 30,
                    fps: int = 25) -> bytes:
    """An MKV whose header (CodecPrivate SPS) and first ``frames`` frames are ``width``×``height``, then one
    IDR at ``big`` carrying its own SPS/PPS in-band (length-prefixed NAL units, as MKV stores H.264): the
    stream probe stops long before it, so only the decoder sees the new size. 107 KB, 1.5 s to make.
    Before: the 8192×4320 frame was decoded, then refused as a size change (unsupported_video) at 0.55 s /
    169 MB; after: refused by ``max_side`` (video_too_large) before conversion, 0.6 s / 170 MB (the
    decoder's own frame; its max_pixels caps it at 8× max_frame_pixels)."""
    import av

    small, template = _h264_packets(width, height, frames, x264="keyint=1000:bframes=0")
    large, _ = _h264_packets(big[0], big[1], 1, x264="keyint=1000:bframes=0:level=6.2", annexb=True)
    out_buf = io.BytesIO()
    with av.open(out_buf, "w", format="matroska") as out:
        stream = out.add_stream_from_template(template)
        base = template.time_base
        step = int(Fraction(1, fps) / base)
        payloads = [(data, key) for _, _, data, key in small] + [(_annexb_to_avcc(large[0][2]), True)]
        for i, (data, key) in enumerate(payloads):
            packet = av.Packet(data)
            packet.pts = packet.dts = i * step
            packet.time_base, packet.stream, packet.is_keyframe = base, stream, key
            out.mux(packet)
    return out_buf.getvalue()


def mp4_boxes(data: bytes, start: int = 0, end: int | None = None) -> list[tuple[bytes, int, int]]:
    """(type, start, end) of the boxes of ``data[start:end]`` (one level)."""
    end = len(data) if end is None else end
    out, pos = [], start
    while pos + 8 <= end:
        size, kind = struct.unpack_from(">I4s", data, pos)
        if size == 1:
            size = struct.unpack_from(">Q", data, pos + 8)[0]
        elif size == 0:
            size = end - pos
        out.append((kind, pos, pos + size))
        pos += size
    return out


# ---------------------------------------------------------------------------------------------- images


def strip_bomb_tiff(strips: int = 1_300_000, width: int = 64, height: int = 64, overlap: bool = True) -> bytes:
    """A JPEG-compressed gray TIFF whose StripOffsets/StripByteCounts hold ``strips`` entries (8 bytes
    each: 1.3 M strips ≈ 10 MB), every one pointing at the same JPEG strip; with ``overlap`` each
    strip's byte count claims the whole file. Attacks a check that walks every strip (a 10 MB slice
    copied per strip: ≈ 43 min per request by the issue's count; over 100 s here, killed) and the
    decoder's strip table. 10.4 MB, 0.15 s to make. After: refused from the directory entry's count
    (image_too_complex, max_tiff_strips) in 0.4 s / 67 MB; fewer, overlapping strips as overlapping."""
    buffer = io.BytesIO()
    Image.new("L", (width, height), 128).save(buffer, "TIFF", compression="jpeg", strip_size=width * height * 2)
    data = bytearray(buffer.getvalue())
    assert data[:4] == b"II*\x00"
    ifd = struct.unpack_from("<I", data, 4)[0]
    entries = struct.unpack_from("<H", data, ifd)[0]
    strip_offset = strip_count = None
    for i in range(entries):
        tag, _, count, value = struct.unpack_from("<HHII", data, ifd + 2 + 12 * i)
        if tag == 273:
            strip_offset = value
        elif tag == 279:
            strip_count = value
    assert strip_offset is not None and strip_count is not None
    offsets_at = len(data)
    counts_at = offsets_at + 4 * strips
    total = counts_at + 4 * strips
    claimed = total if overlap else strip_count
    for i in range(entries):
        entry = ifd + 2 + 12 * i
        tag = struct.unpack_from("<H", data, entry)[0]
        if tag in (273, 279):  # now LONG arrays held out of line
            struct.pack_into("<HHII", data, entry, tag, 4, strips, offsets_at if tag == 273 else counts_at)
    table = struct.pack("<I", strip_offset) * strips + struct.pack("<I", claimed) * strips
    return bytes(data) + table


def webp_canvas(side: int = 7071, lossless: bool = True, mode: str = "RGBA") -> bytes:
    """A ``side``² WebP of one colour (a 7071² lossless RGBA one is ≈ 2 KB): 50 Mpixels, 200 MB as RGBA.
    Attacks the decode-memory estimate: Pillow decodes WebP through libwebp's animation decoder, which
    keeps its own canvases beside Pillow's image. 7071² lossless: 38 bytes, 1.2 s to make (lossy: 132 KB,
    3.6 s). Before: accepted (estimate 400 MB), 2.1 s / 825 MB peak against a 512 MiB budget; after:
    refused before decoding (image_decode_too_large, 16 bytes a pixel: 788 MiB) in 0.4 s / 42 MB."""
    buffer = io.BytesIO()
    fill = (10, 20, 30, 40) if mode == "RGBA" else (10, 20, 30)
    Image.new(mode, (side, side), fill).save(buffer, "WEBP", lossless=lossless, quality=0 if not lossless else 100,
                                             method=0)
    return buffer.getvalue()


def avif_canvas(side: int = 4096, mode: str = "RGBA") -> bytes | None:
    """A ``side``² AVIF of one colour, or None when this Pillow cannot write AVIF. AVIF is not among the
    formats load_image opens (IMAGE_FORMATS): refused unopened (invalid_image) before and after, 0.2 s."""
    from PIL import features

    if not features.check("avif"):
        return None
    buffer = io.BytesIO()
    fill = (10, 20, 30, 40) if mode == "RGBA" else (10, 20, 30)
    Image.new(mode, (side, side), fill).save(buffer, "AVIF", quality=0, speed=10)
    return buffer.getvalue()


def apng_frames(frames: int = 1000, side: int = 4096) -> bytes:
    """An animated PNG of ``frames`` 1×1 frames on a ``side``² canvas (≈ 80 bytes a frame). Attacks a
    decoder that composes every frame on the full canvas (and n_frames walks). load_image decodes frame
    0 only: 1000 frames on 4096²: 0.35 s / 119 MB before and after (6.4 bytes a pixel: the estimate now
    counts the previous-frame copy)."""
    return _png_animation(frames, side)


def gif_frames(frames: int = 1000, side: int = 4096) -> bytes:
    """An animated GIF of ``frames`` 1×1 frames on a ``side``² logical screen. Pillow's GIF reader
    walks the frames to count them (never asked here) and composes later frames on an RGB/RGBA canvas.
    load_image decodes frame 0 only: 1000 frames on 4096²: 0.32 s / 106 MB before and after."""
    head = b"GIF89a" + struct.pack("<HHBBB", side, side, 0x80, 0, 0) + b"\x00\x00\x00\xff\xff\xff"
    netscape = b"\x21\xff\x0bNETSCAPE2.0\x03\x01\x00\x00\x00"
    frame = (b"\x21\xf9\x04\x00\x01\x00\x00\x00"  # graphic control: 10 ms, no disposal
             + b"\x2c" + struct.pack("<HHHHB", 0, 0, 1, 1, 0)  # 1×1 image at 0,0
             + b"\x02\x02\x44\x01\x00")  # LZW min code 2, one sub-block, terminator
    return head + netscape + frame * frames + b"\x3b"


def jpeg_12bit(width: int = 64, height: int = 64) -> bytes:
    """A baseline-structured JPEG whose frame header (SOF1) says 12-bit samples. Pillow's libjpeg is
    built for 8 bits; the point is a clean, named refusal before any decode. Before: "cannot identify
    image file" from Image.open; after: refused by check_jpeg naming the 12-bit samples."""
    return _rewrite_sof(_gray_jpeg(width, height), code=0xC1, precision=12)


def jpeg_arithmetic(width: int = 64, height: int = 64, progressive: bool = False) -> bytes:
    """A JPEG whose frame header says arithmetic coding (SOF9, or SOF10 progressive) with a DAC
    segment; the scans are the Huffman ones (the decoder errors or produces noise). libjpeg-turbo
    decodes arithmetic JPEG ~2× slower than Huffman and no camera or browser writes it. Before: decoded
    (0.2 s); after: refused by check_jpeg naming the frame marker, before opening."""
    data = _rewrite_sof(_gray_jpeg(width, height), code=0xCA if progressive else 0xC9, precision=8)
    dac = b"\xff\xcc\x00\x04\x00\x10"  # class 0 table 0, conditioning 0x10
    at = data.index(b"\xff\xda")
    return data[:at] + dac + data[at:]


# ---------------------------------------------------------------------------------------------- private helpers


def _h264_packets(width: int, height: int, frames: int, *, x264: str, annexb: bool = False, fps: int = 25):
    """Encode ``frames`` black frames with libx264 ultrafast; (pts, dts, bytes, keyframe) per packet
    and the encoder's stream (a template for add_stream_from_template)."""
    import av
    import numpy as np

    buffer = io.BytesIO()
    with av.open(buffer, "w", format="h264" if annexb else "matroska") as out:
        stream = out.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"preset": "ultrafast", "x264-params": x264, "crf": "51"}
        frame = av.VideoFrame.from_ndarray(np.zeros((height, width, 3), np.uint8), format="rgb24")
        frame = frame.reformat(format="yuv420p")
        for i in range(frames):
            frame.pts = i
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    if annexb:
        data = buffer.getvalue()
        return [(None, None, data, True)], None
    buffer.seek(0)
    container = av.open(buffer)
    stream = container.streams.video[0]
    packets = [(p.pts, p.dts, bytes(p), p.is_keyframe) for p in container.demux(stream) if p.size]
    return packets, stream


def _with_edit_list(mp4: bytes, repeats: int) -> bytes:
    """Insert (or replace) an edts/elst in every trak of ``mp4``: ``repeats`` entries each playing the
    whole media from time 0; the moov (and, when it follows it, the mdat's chunk offsets) grows."""
    top = mp4_boxes(mp4)
    moov = next(b for b in top if b[0] == b"moov")
    mdat = next(b for b in top if b[0] == b"mdat")
    body = mp4[moov[1] + 8:moov[2]]
    mvhd = next(b for b in mp4_boxes(body) if b[0] == b"mvhd")
    version = body[mvhd[1] + 8]
    movie_duration = struct.unpack_from(">I", body, mvhd[1] + 8 + 4 + 12)[0] if version == 0 else \
        struct.unpack_from(">Q", body, mvhd[1] + 8 + 4 + 20)[0]
    parts = []
    grown = 0
    for kind, start, end in mp4_boxes(body):
        if kind != b"trak":
            parts.append(body[start:end])
            continue
        children = [(k, body[s:e]) for k, s, e in mp4_boxes(body, start + 8, end) if k != b"edts"]
        mdia = next(c for c in children if c[0] == b"mdia")[1]
        mdhd = next(body2 for k, body2 in [(k, mdia[s:e]) for k, s, e in mp4_boxes(mdia, 8)] if k == b"mdhd")
        media_duration = struct.unpack_from(">I", mdhd, 8 + 4 + 12)[0] if mdhd[8] == 0 else \
            struct.unpack_from(">Q", mdhd, 8 + 4 + 20)[0]
        entry = struct.pack(">IiHH", max(movie_duration, 1), 0, 1, 0)
        elst = _box(b"elst", b"\x00\x00\x00\x00" + struct.pack(">I", repeats) + entry * repeats)
        edts = _box(b"edts", elst)
        del media_duration
        new = [c[1] for c in children]
        new.insert(1, edts)  # after tkhd
        trak = _box(b"trak", b"".join(new))
        grown += len(trak) - (end - start)
        parts.append(trak)
    new_moov = _box(b"moov", b"".join(parts))
    if moov[1] < mdat[1]:  # the media moves: shift every chunk offset
        new_moov = _shift_chunk_offsets(new_moov, len(new_moov) - (moov[2] - moov[1]))
    return mp4[:moov[1]] + new_moov + mp4[moov[2]:]


def _shift_chunk_offsets(moov: bytes, delta: int) -> bytes:
    data = bytearray(moov)
    pos = 0
    while True:
        pos = data.find(b"stco", pos)
        if pos < 0:
            break
        count = struct.unpack_from(">I", data, pos + 8)[0]
        for i in range(count):
            at = pos + 12 + 4 * i
            struct.pack_into(">I", data, at, struct.unpack_from(">I", data, at)[0] + delta)
        pos += 12
    return bytes(data)


def _annexb_to_avcc(data: bytes) -> bytes:
    """Annex-B (start codes) → 4-byte length-prefixed NAL units."""
    import re

    starts = [m.end() for m in re.finditer(b"\x00\x00\x01", data)]
    out = []
    for i, at in enumerate(starts):
        stop = starts[i + 1] - 3 if i + 1 < len(starts) else len(data)
        nal = data[at:stop].rstrip(b"\x00") if i + 1 < len(starts) else data[at:stop]
        out.append(struct.pack(">I", len(nal)) + nal)
    return b"".join(out)


def _box(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I4s", 8 + len(payload), kind) + payload


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    import zlib

    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def _png_animation(frames: int, side: int) -> bytes:
    import zlib

    ihdr = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)  # 8-bit gray
    # the default image (not part of the animation) is the full canvas of zeros, compressed
    rows = zlib.compress(b"\x00" * (side + 1) * side, 9)
    out = [b"\x89PNG\r\n\x1a\n", _png_chunk(b"IHDR", ihdr), _png_chunk(b"acTL", struct.pack(">II", frames, 0)),
           _png_chunk(b"IDAT", rows)]
    pixel = zlib.compress(b"\x00\x80")
    seq = 0
    for _ in range(frames):
        out.append(_png_chunk(b"fcTL", struct.pack(">IIIIIHHBB", seq, 1, 1, 0, 0, 1, 100, 0, 0)))
        out.append(_png_chunk(b"fdAT", struct.pack(">I", seq + 1) + pixel))
        seq += 2
    out.append(_png_chunk(b"IEND", b""))
    return b"".join(out)


def _gray_jpeg(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("L", (width, height), 100).save(buffer, "JPEG", quality=50)
    return buffer.getvalue()


def _rewrite_sof(data: bytes, *, code: int, precision: int) -> bytes:
    at = data.index(b"\xff\xc0")
    out = bytearray(data)
    out[at + 1] = code
    out[at + 4] = precision
    return bytes(out)


def _muxed(container: str, packets, template, tracks: int) -> bytes:
    """``packets`` written into ``tracks`` copies of the ``template`` stream of a ``container`` file."""
    import av

    out_buf = io.BytesIO()
    with av.open(out_buf, "w", format=container) as out:
        streams = [out.add_stream_from_template(template) for _ in range(tracks)]
        for pts, dts, data, key in packets:
            for stream in streams:
                packet = av.Packet(data)
                packet.pts, packet.dts, packet.time_base, packet.stream = pts, dts, template.time_base, stream
                packet.is_keyframe = key
                out.mux(packet)
    return out_buf.getvalue()

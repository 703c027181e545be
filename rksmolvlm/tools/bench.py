"""``rksmolvlm bench``: vision ms per tile (one core, all cores), a fully split image, TTFT,
prefill and decode tokens/s and peak RSS, with warm-up and repeats, plus the engine's own perf
counters and the board's clocks and governors, so figures compare with published ones.

Bundles with video (SmolVLM2) get a video section too: frames/s through the vision engine (one core,
all cores) for the frames of a 16-frame clip, the board CPU's probe and decode + resize cost per
frame, and the TTFT of a question about that clip through the runner (probe, decode, resize, tower,
prefill). The clip is the user's (``video_clip``) or one made here with PyAV: a pan over a shipped
calibration photo, H.264 1280×720 at 30 fps (a phone-like clip), long enough for the frames asked.
"""

from __future__ import annotations

import math
import resource
import statistics
import tempfile
import time
from importlib import resources
from pathlib import Path

import numpy as np

from rksmolvlm.processing.content import Message, TextPart, VideoPart
from rksmolvlm.runners import open_runner, open_vision, resolve_engine
from rksmolvlm.runtime.engines import EngineOptions, GenerationConfig, VisionEncoder
from rksmolvlm.runtime.loader import RuntimeBundle
from rksmolvlm.runtime.runner import Runner

__all__ = ["ONE_CORE_FRAMES", "VIDEO_FRAMES", "clock_report", "format_table", "make_bench_clip", "run_bench"]

VIDEO_FRAMES = 16  # the clip's frames for the video TTFT and the all-cores throughput (the board default)
ONE_CORE_FRAMES = 4  # frames timed on one core: its rate is steady after one, and each costs ~2 s on the NPU


def _summary(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def clock_report(root: str = "/") -> dict:
    """CPU/NPU/DDR governors and current frequencies (empty off a board)."""
    base = Path(root)
    out: dict = {"cpu": {}, "devfreq": {}}
    for policy in sorted(base.glob("sys/devices/system/cpu/cpufreq/policy*")):
        out["cpu"][policy.name] = {k: _read(policy / f) for k, f in (("governor", "scaling_governor"),
                                                                      ("cur_khz", "scaling_cur_freq"))}
    for dev in sorted(base.glob("sys/class/devfreq/*")):
        out["devfreq"][dev.name] = {"governor": _read(dev / "governor"), "cur_hz": _read(dev / "cur_freq")}
    return out


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def _split_image(bundle: RuntimeBundle):
    """A square image: the most tiles the processor makes (4×4 + global at 4× the tile size)."""
    from PIL import Image

    side = bundle.settings.longest_edge
    rng = np.random.RandomState(0)
    return Image.fromarray(rng.randint(0, 256, (side, side, 3), dtype=np.uint8))


def run_bench(bundle: RuntimeBundle, engine: str = "auto", repeats: int = 3, warmup: int = 1,
              prompt_tokens: int = 128, new_tokens: int = 32, library: str | None = None, *,
              video: bool = True, video_frames: int = VIDEO_FRAMES, video_clip: Path | None = None,
              threads: int | None = None) -> dict:
    """Time the vision encoder (one core or thread, then all) and the runner (TTFT, prefill and
    decode speed) ``repeats`` times after ``warmup`` runs; ``engine`` is host, npu or auto. Bundles
    with video also get ``results["video"]`` (None otherwise): ``video_frames`` frames of
    ``video_clip`` (default: a generated clip) through the tower and through the runner."""
    from rksmolvlm.processing.image import tile_image

    if video_frames < 1:
        raise ValueError(f"video_frames {video_frames} must be at least 1")
    engine = resolve_engine(engine)
    manifest = bundle.manifest
    with_video = video and bundle.video_settings is not None
    runner = open_runner(bundle, engine, EngineOptions(threads=threads, library=library,
                                                       max_new_tokens=max(new_tokens, 256)),
                         video=_uncached_video_options() if with_video else None)
    vision = runner.vision
    results: dict = {"engine": engine, "bundle": str(bundle.path), "model": manifest.source.model_id,
                     "target": manifest.target.platform, "repeats": repeats, "warmup": warmup, "video": None}
    single = None
    try:
        tiles = tile_image(_split_image(bundle), bundle.settings).tiles
        single = _single_core_encoder(bundle, engine)
        times_one, times_all = [], []
        for i in range(warmup + repeats):
            start = time.perf_counter()
            single.encode(tiles[:1])
            t1 = (time.perf_counter() - start) * 1000
            start = time.perf_counter()
            vision.encode(tiles)
            t_all = (time.perf_counter() - start) * 1000
            if i >= warmup:
                times_one.append(t1)
                times_all.append(t_all)
        results["vision_ms_per_tile_one_core"] = _summary(times_one)
        results["vision_split_image_tiles"] = len(tiles)
        results["vision_split_image_ms"] = _summary(times_all)
        results["vision_ms_per_tile_all_cores"] = _summary([t / len(tiles) for t in times_all])

        words = " ".join(["hello world"] * prompt_tokens)
        text = bundle.tokenizer.decode(bundle.tokenizer.encode_text(words)[:prompt_tokens])
        messages = [Message.text("user", text)]
        ttft, prefill, decode, engine_stats = [], [], [], []
        config = GenerationConfig(max_new_tokens=new_tokens, stop_ids=(-1,))  # never stop early
        for i in range(warmup + repeats):
            g = runner.generate(messages, config).consume()
            s = g.stats.to_dict()
            if i >= warmup:
                ttft.append(s["first_token_ms"])
                prefill.append(s["prefill_tokens_per_s"] or 0.0)
                decode.append(s["decode_tokens_per_s"] or 0.0)
                engine_stats.append(s["engine"])
        results["prompt_tokens"] = g.prompt_tokens
        results["new_tokens"] = len(g.token_ids)
        results["ttft_ms"] = _summary(ttft)
        results["prefill_tokens_per_s"] = _summary(prefill)
        results["decode_tokens_per_s"] = _summary(decode)
        results["engine_perf"] = engine_stats[-1] if engine_stats else {}
        if with_video:
            with tempfile.TemporaryDirectory(prefix="rksmolvlm-bench-") as work:
                results["video"] = _bench_video(bundle, runner, vision, single, repeats, warmup, video_frames,
                                                Path(video_clip) if video_clip else None, Path(work))
    finally:
        try:
            if single is not None:
                single.close()
        finally:
            runner.close()
    results["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    results["clocks"] = clock_report()
    return results


def _uncached_video_options():
    """The runner's video defaults without the frame-feature cache: every repeat encodes its frames."""
    from rksmolvlm.runtime.video import VideoOptions

    return VideoOptions(cache_frames=0)


def _bench_video(bundle: RuntimeBundle, runner: Runner, vision: VisionEncoder, single: VisionEncoder, repeats: int,
                 warmup: int, frames: int,
                 clip: Path | None, work: Path) -> dict:
    """The video section: the board CPU's cost per frame, the tower's frames/s and the runner's TTFT
    for ``frames`` frames of ``clip`` (made here when None)."""
    from rksmolvlm.processing.video import probe_video, read_frames
    from rksmolvlm.processing.video_frames import resize_frames, sample_indices

    settings = bundle.video_settings
    fps = settings.fps
    generated = clip is None
    if clip is None:  # a clip whose default sampling gives ``frames`` frames (no skipped edges)
        clip = make_bench_clip(work / "bench_clip.mp4", seconds=math.ceil(frames / fps) + 1)
    limits = runner.videos.options.limits
    probe_ms, decode_ms, resize_ms = [], [], []
    for i in range(warmup + repeats):  # what VideoEncoder.plan and .encode do on the CPU
        start = time.perf_counter()
        info = probe_video(clip, limits)
        indices = sample_indices(info.total_num_frames, info.duration, info.fps, fps, min(frames, settings.max_frames),
                                 settings.skip_secs)
        probed = time.perf_counter()
        decoded = read_frames(clip, [int(k) for k in indices], limits)
        read = time.perf_counter()
        tiles = resize_frames(decoded, settings)
        done = time.perf_counter()
        if i >= warmup:
            probe_ms.append((probed - start) * 1000)
            decode_ms.append((read - probed) * 1000 / len(tiles))
            resize_ms.append((done - read) * 1000 / len(tiles))
    out: dict = {"frame_size": int(settings.frame_size), "frames": len(tiles),
                 "clip": {"source": "generated" if generated else str(clip), "width": int(info.width),
                          "height": int(info.height), "fps": float(info.fps), "duration_s": float(info.duration),
                          "total_frames": int(info.total_num_frames)},
                 "probe_ms": _summary(probe_ms), "decode_ms_per_frame": _summary(decode_ms),
                 "resize_ms_per_frame": _summary(resize_ms),
                 "decode_resize_ms_per_frame": _summary([d + r for d, r in zip(decode_ms, resize_ms)])}

    one = tiles[:min(ONE_CORE_FRAMES, len(tiles))]
    rate_one, rate_all = [], []
    for i in range(warmup + repeats):
        start = time.perf_counter()
        single.encode_frames(one)
        t1 = time.perf_counter() - start
        start = time.perf_counter()
        vision.encode_frames(tiles)  # as the runtime's VideoEncoder sends them
        t_all = time.perf_counter() - start
        if i >= warmup:
            rate_one.append(len(one) / t1)
            rate_all.append(len(tiles) / t_all)
    out["one_core_frames"] = len(one)
    out["frames_per_s_one_core"] = _summary(rate_one)
    out["frames_per_s_all_cores"] = _summary(rate_all)

    messages = [Message("user", (VideoPart(clip, max_frames=frames), TextPart("Describe this video.")))]
    config = GenerationConfig(max_new_tokens=1, stop_ids=(-1,))  # the first token is all TTFT needs
    ttft, parts = [], []
    for i in range(warmup + repeats):
        g = runner.generate(messages, config).consume()
        s = g.stats
        if i >= warmup:
            ttft.append(s.first_token_ms)
            parts.append({"video_decode_ms": s.video_decode_ms, "vision_ms": s.vision_ms, "prefill_ms": s.prefill_ms})
    out["ttft_frames"] = int(s.video_frames)
    out["ttft_prompt_tokens"] = int(g.prompt_tokens)
    out["ttft_ms"] = _summary(ttft)
    out["ttft_parts_ms"] = {k: statistics.median(p[k] for p in parts) for k in parts[0]}
    return out


def make_bench_clip(path: Path, seconds: float, size: tuple[int, int] = (1280, 720), fps: int = 30) -> Path:
    """A phone-like test clip: a slow vertical pan over the shipped Hubble photo, H.264 (libx264,
    veryfast, crf 23, default GOP) in yuv420p MP4, written with PyAV."""
    import av
    from PIL import Image

    width, height = size
    if width % 2 or height % 2 or width < 2 or height < 2 or fps < 1 or seconds <= 0:
        raise ValueError(f"a bench clip needs even sizes, fps ≥ 1 and a duration: {size}, {fps} fps, {seconds} s")
    if "libx264" not in av.codecs_available:
        raise RuntimeError("this PyAV build has no libx264 encoder to make the bench clip: pass your own clip "
                           "(rksmolvlm bench --video-clip FILE)")
    photo = Image.open(Path(str(resources.files("rksmolvlm.calibration") / "images" / "photo_hubble_deep_field.jpg")))
    scaled = photo.convert("RGB").resize((width, max(height + 2, round(photo.height * width / photo.width))),
                                         Image.Resampling.BILINEAR)
    pixels = np.asarray(scaled)
    count = round(seconds * fps)
    travel = pixels.shape[0] - height
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"preset": "veryfast", "crf": "23"}
        for n in range(count):
            top = round(travel * n / max(count - 1, 1))
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(pixels[top:top + height]), format="rgb24")
            frame.pts = n
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    return path


def _single_core_encoder(bundle: RuntimeBundle, engine: str) -> VisionEncoder:
    """The vision model on one NPU core (npu) or one CPU thread (host)."""
    return open_vision(bundle, engine, EngineOptions(threads=1, cores=(0,)))


def format_table(r: dict) -> str:
    rows = [("vision ms/tile, one core", r["vision_ms_per_tile_one_core"]),
            ("vision ms/tile, all cores", r["vision_ms_per_tile_all_cores"]),
            (f"split image ({r['vision_split_image_tiles']} tiles) ms", r["vision_split_image_ms"]),
            (f"TTFT ms ({r['prompt_tokens']}-token prompt)", r["ttft_ms"]),
            ("prefill tokens/s", r["prefill_tokens_per_s"]),
            ("decode tokens/s", r["decode_tokens_per_s"])]
    lines = [(f"rksmolvlm bench — {r['model']} on {r['engine']} ({r['target']} bundle), "
              f"{r['repeats']} repeats after {r['warmup']} warm-up"),
             f"{'measure':<34} {'median':>10} {'min':>10} {'max':>10}"]
    lines += [f"{name:<34} {s['median']:10.1f} {s['min']:10.1f} {s['max']:10.1f}" for name, s in rows]
    v = r.get("video")
    if v:
        clip = v["clip"]
        lines.append(f"video: {v['frames']} frames at {v['frame_size']}² from a {clip['width']}x{clip['height']} "
                     f"{clip['fps']:g} fps {clip['duration_s']:.1f} s clip ({clip['source']})")
        video_rows = [(f"video frames/s, one core ({v['one_core_frames']})", v["frames_per_s_one_core"]),
                      (f"video frames/s, all cores ({v['frames']})", v["frames_per_s_all_cores"]),
                      ("video probe ms", v["probe_ms"]),
                      ("video decode ms/frame", v["decode_ms_per_frame"]),
                      ("video resize ms/frame", v["resize_ms_per_frame"]),
                      ("video decode+resize ms/frame", v["decode_resize_ms_per_frame"]),
                      (f"video TTFT ms ({v['ttft_frames']} frames)", v["ttft_ms"])]
        lines += [f"{name:<34} {s['median']:10.1f} {s['min']:10.1f} {s['max']:10.1f}" for name, s in video_rows]
        lines.append("video TTFT parts (median ms): " + ", ".join(f"{k.removesuffix('_ms')} {t:.1f}"
                                                                  for k, t in v["ttft_parts_ms"].items())
                     + f"; prompt {v['ttft_prompt_tokens']} tokens")
    lines.append(f"peak RSS {r['peak_rss_mb']:.0f} MB")
    if r.get("engine_perf"):
        lines.append("engine perf: " + ", ".join(f"{k} {v:.1f}" for k, v in r["engine_perf"].items()))
    governors = {v.get("governor") for v in r["clocks"]["cpu"].values()} | \
        {v.get("governor") for v in r["clocks"]["devfreq"].values()}
    lines.append("governors: " + (", ".join(sorted(g for g in governors if g)) or "unknown (not a board)"))
    return "\n".join(lines)

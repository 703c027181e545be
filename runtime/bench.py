"""``rksmolvlm bench``: vision ms per tile (one core, all cores), a fully split image, TTFT,
prefill and decode tokens/s and peak RSS, with warm-up and repeats, plus the engine's own perf
counters and the board's clocks and governors, so figures compare with published ones."""

from __future__ import annotations

import resource
import statistics
import time
from pathlib import Path

import numpy as np

from rksmolvlm.processing.content import Message
from rksmolvlm.runtime.engines import EngineOptions, GenerationConfig, open_engines, resolve_engine
from rksmolvlm.runtime.loader import RuntimeBundle
from rksmolvlm.runtime.runner import Runner

__all__ = ["run_bench", "clock_report", "format_table"]


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
              prompt_tokens: int = 128, new_tokens: int = 32, library: str | None = None) -> dict:
    """Time the vision encoder (one core or thread, then all) and the runner (TTFT, prefill and
    decode speed) ``repeats`` times after ``warmup`` runs; ``engine`` is host, npu or auto."""
    from rksmolvlm.processing.image import tile_image

    engine = resolve_engine(engine)
    manifest = bundle.manifest
    vision, llm = open_engines(bundle, engine, EngineOptions(library=library, max_new_tokens=max(new_tokens, 256)))
    runner = Runner(bundle, vision, llm)
    results: dict = {"engine": engine, "bundle": str(bundle.path), "model": manifest.source.model_id,
                     "target": manifest.target.platform, "repeats": repeats, "warmup": warmup}
    try:
        tiles = tile_image(_split_image(bundle), bundle.settings).tiles
        single = _single_core_encoder(bundle, engine)
        times_one, times_all = [], []
        try:
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
        finally:
            single.close()
        results["vision_ms_per_tile_one_core"] = _summary(times_one)
        results["vision_split_image_tiles"] = int(len(tiles))
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
    finally:
        runner.close()
    results["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    results["clocks"] = clock_report()
    return results


def _single_core_encoder(bundle: RuntimeBundle, engine: str):
    """The vision model on one NPU core (npu) or one CPU thread (host)."""
    vision = bundle.manifest.vision
    if engine == "npu":
        from rksmolvlm.runtime.npu_engines import RknnLiteVisionEncoder

        return RknnLiteVisionEncoder(bundle.file(vision.file), [1])
    from rksmolvlm.runtime.host_engines import OnnxVisionEncoder

    return OnnxVisionEncoder(bundle.file(vision.onnx), bundle.settings, threads=1)


def format_table(r: dict) -> str:
    rows = [("vision ms/tile, one core", r["vision_ms_per_tile_one_core"]),
            ("vision ms/tile, all cores", r["vision_ms_per_tile_all_cores"]),
            (f"split image ({r['vision_split_image_tiles']} tiles) ms", r["vision_split_image_ms"]),
            (f"TTFT ms ({r['prompt_tokens']}-token prompt)", r["ttft_ms"]),
            ("prefill tokens/s", r["prefill_tokens_per_s"]),
            ("decode tokens/s", r["decode_tokens_per_s"])]
    lines = [f"rksmolvlm bench — {r['model']} on {r['engine']} ({r['target']} bundle), "
             f"{r['repeats']} repeats after {r['warmup']} warm-up",
             f"{'measure':<34} {'median':>10} {'min':>10} {'max':>10}"]
    lines += [f"{name:<34} {s['median']:10.1f} {s['min']:10.1f} {s['max']:10.1f}" for name, s in rows]
    lines.append(f"peak RSS {r['peak_rss_mb']:.0f} MB")
    if r.get("engine_perf"):
        lines.append("engine perf: " + ", ".join(f"{k} {v:.1f}" for k, v in r["engine_perf"].items()))
    governors = {v.get("governor") for v in r["clocks"]["cpu"].values()} | \
        {v.get("governor") for v in r["clocks"]["devfreq"].values()}
    lines.append("governors: " + (", ".join(sorted(g for g in governors if g)) or "unknown (not a board)"))
    return "\n".join(lines)

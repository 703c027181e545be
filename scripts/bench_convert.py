#!/usr/bin/env python3
"""Benchmark the vision conversion on a SmolVLM-256M-shaped checkpoint (random weights, the real
SigLIP-B/16-512 tower: hidden 768, 12 layers, 12 heads; connector 12288 → 576).

Builds fp16 and int8 bundles side by side in one run, each in its own process, and prints wall
time, the step times, peak RSS, .rknn size and the simulator's cosine against torch, with the
ratio to the targets (fp16: ≤ 60 s, ≤ 4 GB peak RSS on a 2-core machine).

    .venv/bin/python scripts/bench_convert.py [--dtypes fp16,int8] [--json]

``--full 256m|2.2b`` instead converts everything (vision fp16 + decoder, the rkllm-toolkit contract
double from tests/doubles standing in for the toolkit) of a checkpoint at the real SmolVLM2 size
(random weights): 256m = SigLIP-B/16-512 + the 30-layer 576-wide decoder; 2.2b = SigLIP-so400m-384 +
SmolLM2-1.7B. ``--modes`` picks how the decoder calibration gets its image features, each mode in its
own process on the same checkpoint: ``cached`` (each distinct tile once, onnxruntime when it matches
torch — the converter's default), ``uncached`` (every tile each time, eager torch: the old way) and
``max-tiles-4`` (cached, the calibration images rendered at ``--llm-calibration-max-tiles 4``).
Prints wall time per step, peak RSS and the tower passes of each.

    .venv/bin/python scripts/bench_convert.py --full 256m [--modes cached,uncached,max-tiles-4] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TARGET_SECONDS, TARGET_RSS_GB = 60.0, 4.0


def make_checkpoint(out: Path) -> Path:
    """Tiny 256M-layout checkpoint re-shaped to the real 256M vision tower and connector."""
    import torch
    import transformers as tf

    from rksmolvlm.convert.tiny_checkpoint import build_tiny_checkpoint

    build_tiny_checkpoint("idefics3-256m", out)
    config = json.loads((out / "config.json").read_text())
    config["vision_config"].update(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                   num_attention_heads=12, image_size=512, patch_size=16)
    config["text_config"].update(hidden_size=576, intermediate_size=1536, num_hidden_layers=1,
                                 num_attention_heads=9, num_key_value_heads=3, head_dim=64)
    config["scale_factor"] = 4
    torch.manual_seed(0)
    model = tf.Idefics3ForConditionalGeneration(tf.Idefics3Config(**{k: v for k, v in config.items()
                                                                     if not k.startswith("_")}))
    for name in ("config.json", "model.safetensors"):
        (out / name).unlink()
    model.save_pretrained(out)
    pre = json.loads((out / "preprocessor_config.json").read_text())
    pre["size"], pre["max_image_size"] = {"longest_edge": 2048}, {"longest_edge": 512}
    (out / "preprocessor_config.json").write_text(json.dumps(pre))
    (out / "processor_config.json").write_text(json.dumps({"image_seq_len": 64,
                                                           "processor_class": "Idefics3Processor"}))
    return out


# SmolVLM2 sizes: vision tower, text decoder, connector scale, processor edges (image_seq_len = (T/p/s)²)
FULL_SIZES = {
    "256m": {"vision": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                            image_size=512, patch_size=16),
             "text": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                          num_key_value_heads=3, head_dim=64, max_position_embeddings=8192),
             "scale_factor": 4, "longest_edge": 2048, "tile": 512, "image_seq_len": 64},
    "2.2b": {"vision": dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
                            image_size=384, patch_size=14),
             "text": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=24, num_attention_heads=32,
                          num_key_value_heads=32, head_dim=64, max_position_embeddings=8192),
             "scale_factor": 3, "longest_edge": 1536, "tile": 384, "image_seq_len": 81},
}


def make_full_checkpoint(out: Path, size: str) -> Path:
    """A SmolVLM2 checkpoint at a real size with random weights (N(0, 0.02) matrices)."""
    import torch
    import transformers as tf

    from rksmolvlm.convert.tiny_checkpoint import build_tiny_checkpoint

    spec = FULL_SIZES[size]
    build_tiny_checkpoint("smolvlm2", out)
    config = json.loads((out / "config.json").read_text())
    config["vision_config"].update(spec["vision"])
    config["text_config"].update(spec["text"])
    config["scale_factor"] = spec["scale_factor"]
    torch.manual_seed(0)
    model = tf.SmolVLMForConditionalGeneration(tf.SmolVLMConfig(**{k: v for k, v in config.items()
                                                                   if not k.startswith("_")}))
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.02)
    for name in ("config.json", "model.safetensors"):
        (out / name).unlink()
    model.save_pretrained(out)
    del model
    pre = json.loads((out / "preprocessor_config.json").read_text())
    pre["size"], pre["max_image_size"] = {"longest_edge": spec["longest_edge"]}, {"longest_edge": spec["tile"]}
    pre["video_sampling"] = {"fps": 1, "max_frames": 64, "video_size": {"longest_edge": spec["tile"]}}
    (out / "preprocessor_config.json").write_text(json.dumps(pre))
    (out / "processor_config.json").write_text(json.dumps({"image_seq_len": spec["image_seq_len"],
                                                           "processor_class": "SmolVLMProcessor"}))
    return out


def full_child(checkpoint: str, mode: str, out: str) -> None:
    """One full conversion (vision fp16 + decoder with the toolkit double) in this process."""
    from rksmolvlm.convert.pipeline import ConvertOptions, TowerCache, convert
    from rksmolvlm.convert.progress import Progress
    from rksmolvlm.processing.image import Resolution

    TowerCache.memoize = TowerCache.prefer_onnx = mode != "uncached"
    budget = Resolution(max_tiles=4) if mode == "max-tiles-4" else None
    start = time.perf_counter()
    result = convert(ConvertOptions(model=checkpoint, output=Path(out), vision_dtype="fp16", force=True,
                                    llm_calibration_resolution=budget), Progress(0, quiet=True))
    wall = time.perf_counter() - start
    calibration = result.report["llm"]["calibration"]
    print(json.dumps({"mode": mode, "wall_s": wall, "steps": result.timings,
                      "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 ** 2,
                      "samples": calibration["samples"], "tokens": calibration["tokens"],
                      "image_features": calibration["image_features"],
                      "simulator_vs_torch": result.report["vision"]["simulator_vs_torch"]}))


def full_main(size: str, modes: list[str], as_json: bool) -> None:
    doubles = Path(__file__).resolve().parent.parent / "tests" / "doubles"
    env = dict(os.environ, HF_HUB_OFFLINE="1", RKLLM_DOUBLE_VERSION=os.environ.get("RKLLM_DOUBLE_VERSION", "1.3.0"),
               PYTHONPATH=os.pathsep.join(filter(None, [str(doubles), os.environ.get("PYTHONPATH")])))
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-convert-full-") as tmp:
        print(f"building a SmolVLM2-{size}-shaped checkpoint (random weights) …", file=sys.stderr, flush=True)
        start = time.perf_counter()
        checkpoint = make_full_checkpoint(Path(tmp) / f"smolvlm2-{size}-shaped", size)
        print(f"  {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
        for mode in modes:
            print(f"converting everything, image features {mode} …", file=sys.stderr, flush=True)
            proc = subprocess.run([sys.executable, __file__, "--full-child", str(checkpoint), mode,
                                   str(Path(tmp) / f"bundle-{mode}")], capture_output=True, text=True, env=env)
            if proc.returncode:
                sys.exit(f"{mode} conversion failed:\n{proc.stderr[-3000:]}")
            rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)  # partial results survive a later failure
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    for r in rows:
        f = r["image_features"]
        print(f"{size} {r['mode']}: wall {r['wall_s']:.0f} s, peak RSS {r['peak_rss_gb']:.2f} GB; calibration "
              f"{r['samples']} samples, {r['tokens']} tokens, {f['tiles']} tiles asked, {f['encoded']} encoded "
              f"({f['engine']})")
        for step, seconds in r["steps"].items():
            print(f"    {seconds:8.1f} s  {step}")


def child(checkpoint: str, dtype: str, out: str) -> None:
    """Run one conversion in this process and print its measurements as JSON."""
    from rksmolvlm.convert.pipeline import ConvertOptions, convert
    from rksmolvlm.convert.progress import Progress

    start = time.perf_counter()
    result = convert(ConvertOptions(model=checkpoint, output=Path(out), parts=("vision",), vision_dtype=dtype,
                                    force=True),
                     Progress(0, quiet=True))
    wall = time.perf_counter() - start
    vision = result.report["vision"]
    print(json.dumps({
        "dtype": dtype, "wall_s": wall, "steps": result.timings,
        "onnx_export_s": vision["seconds"]["onnx_export"],
        "rknn_build_s": vision["seconds"]["rknn_build"],
        "simulator_s": vision["seconds"]["simulator"],
        "simulated_tiles": vision["simulator_vs_torch"]["tiles"],
        "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 ** 2,
        "rknn_mb": result.manifest["files"]["vision.rknn"]["size"] / 1024 ** 2,
        "cosine": vision["simulator_vs_torch"]["cosine"],
        "min_tile_cosine": vision["simulator_vs_torch"]["min_tile_cosine"],
        "cpu_fallback_ops": len(vision["cpu_fallback_ops"]), "static_cycles": vision["static_cycles"],
    }))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtypes", default="fp16,int8")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--full", choices=sorted(FULL_SIZES), help="full conversion at a real size (see above)")
    parser.add_argument("--modes", default="cached,uncached",
                        help="with --full: any of cached, uncached, max-tiles-4 (comma-separated)")
    parser.add_argument("--child", nargs=3, metavar=("CHECKPOINT", "DTYPE", "OUT"), help=argparse.SUPPRESS)
    parser.add_argument("--full-child", nargs=3, metavar=("CHECKPOINT", "MODE", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return
    if args.full_child:
        full_child(*args.full_child)
        return
    if args.full:
        modes = args.modes.split(",")
        if not set(modes) <= {"cached", "uncached", "max-tiles-4"}:
            parser.error("--modes takes cached, uncached and/or max-tiles-4")
        full_main(args.full, modes, args.json)
        return
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-convert-") as tmp:
        print("building a SmolVLM-256M-shaped checkpoint (random weights) …", file=sys.stderr)
        checkpoint = make_checkpoint(Path(tmp) / "smolvlm-256m-shaped")
        for dtype in args.dtypes.split(","):
            print(f"converting the vision tower: {dtype} …", file=sys.stderr)
            proc = subprocess.run([sys.executable, __file__, "--child", str(checkpoint), dtype,
                                   str(Path(tmp) / f"bundle-{dtype}")], capture_output=True, text=True,
                                  env=dict(os.environ, HF_HUB_OFFLINE="1"))
            if proc.returncode:
                sys.exit(f"{dtype} conversion failed:\n{proc.stderr[-3000:]}")
            rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    print(f"{'dtype':<6} {'wall s':>7} {'export s':>9} {'build s':>8} {'sim s/tile':>10} {'peak RSS GB':>12} "
          f"{'.rknn MB':>9} {'cosine':>9} {'worst tile':>10} {'CPU ops':>8} {'cycles':>12}")
    for r in rows:
        print(f"{r['dtype']:<6} {r['wall_s']:7.1f} {r['onnx_export_s']:9.1f} {r['rknn_build_s']:8.1f} "
              f"{r['simulator_s'] / r['simulated_tiles']:10.1f} "
              f"{r['peak_rss_gb']:12.2f} {r['rknn_mb']:9.1f} {r['cosine']:9.6f} {r['min_tile_cosine']:10.6f} "
              f"{r['cpu_fallback_ops']:8d} {r['static_cycles']:12,d}")
    for r in rows:
        if r["dtype"] == "fp16":
            print(f"fp16 vs target: wall {r['wall_s'] / TARGET_SECONDS:.2f}× of {TARGET_SECONDS:.0f} s, "
                  f"peak RSS {r['peak_rss_gb'] / TARGET_RSS_GB:.2f}× of {TARGET_RSS_GB:.0f} GB")


if __name__ == "__main__":
    main()

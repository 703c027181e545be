#!/usr/bin/env python3
"""Benchmark the vision conversion on a SmolVLM-256M-shaped checkpoint (random weights, the real
SigLIP-B/16-512 tower: hidden 768, 12 layers, 12 heads; connector 12288 → 576).

Builds fp16 and int8 bundles side by side in one run, each in its own process, and prints wall
time, the step times, peak RSS, .rknn size and the simulator's cosine against torch, with the
ratio to the targets (fp16: ≤ 60 s, ≤ 4 GB peak RSS on a 2-core machine).

    .venv/bin/python scripts/bench_convert.py [--dtypes fp16,int8] [--json]
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
    parser.add_argument("--child", nargs=3, metavar=("CHECKPOINT", "DTYPE", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child)
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

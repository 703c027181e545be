"""``rksmolvlm convert MODEL -o BUNDLE``: a SmolVLM checkpoint → a bundle (x86 host)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from rksmolvlm.cli.options import add_resolution_arguments, resolution_choice

__all__ = ["add_parser", "add_convert_arguments", "run", "run_convert"]


def add_parser(verbs) -> None:
    p = verbs.add_parser("convert", help="convert a SmolVLM checkpoint into a bundle (x86 host)")
    add_convert_arguments(p)
    p.set_defaults(run=run)


def add_convert_arguments(p: argparse.ArgumentParser, with_model: bool = True) -> None:
    """The converter's flags (demo takes them too, without the model and output)."""
    if with_model:
        p.add_argument("model", help="checkpoint directory or hub id (e.g. HuggingFaceTB/SmolVLM-256M-Instruct)")
        p.add_argument("-o", "--output", required=True, type=Path, help="bundle directory to create")
        p.add_argument("--revision", help="hub revision (branch, tag or commit)")
    p.add_argument("--target", default="rk3588", help="rk3588 (default), rk3576 or rk3562")
    p.add_argument("--parts", default="vision,llm", help="comma-separated parts: vision, llm (default: both)")
    p.add_argument("--vision-dtype", default="fp16", choices=["fp16", "int8"],
                   help="fp16 (default) or int8 (w8a8, calibrated)")
    p.add_argument("--quant-algorithm", default="normal", help="int8 algorithm: normal, mmse, kl_divergence")
    p.add_argument("--calibration", type=Path, help="folder of your own calibration images (default: shipped set)")
    p.add_argument("--calibration-tiles", type=int, default=24, help="tiles used to calibrate int8 (default 24)")
    p.add_argument("--evaluation-tiles", type=int, default=3,
                   help="held-out tiles run in the simulator for the accuracy check (default 3)")
    p.add_argument("--min-cosine", type=float, default=0.99,
                   help="accuracy floor: worst held-out tile cosine vs torch (default 0.99)")
    p.add_argument("--accept-low-accuracy", action="store_true", help="keep a model below --min-cosine")
    p.add_argument("--host-preview", action="store_true",
                   help="also keep vision.onnx and the decoder directory for the x86 host preview")
    p.add_argument("--llm-dtype", help="decoder quantization (rk3588: w8a8 [default], w8a8_g128/256/512; "
                   "rk3576: w4a16 [default], w4a16_g32/64/128, w8a8; rk3562: w8a8 [default], w4a16_gN, w4a8_g32)")
    p.add_argument("--llm-algorithm", default="normal", help="normal (default) or grq (w4a16 only)")
    p.add_argument("--llm-npu-cores", type=int, help="NPU cores the decoder uses (default: all of the SoC's)")
    p.add_argument("--max-context", type=int,
                   help="decoder context (multiple of 32, ≤ 16384; default min(4096, the model's))")
    p.add_argument("--llm-optimization", type=int, default=1, choices=[0, 1], help="rkllm optimization level")
    p.add_argument("--llm-dataset-format", choices=["text", "embed", "multimodal"],
                   help="decoder calibration format (default: the one the installed rkllm-toolkit takes)")
    p.add_argument("--llm-prompts", type=Path,
                   help="your own decoder calibration chats (JSON like calibration/prompts.json; images are "
                        "looked up in --calibration)")
    p.add_argument("--llm-host-only", action="store_true",
                   help="build without rkllm-toolkit: no llm.rkllm, the bundle runs in the host preview only")
    p.add_argument("--no-goldens", action="store_true",
                   help="do not record golden answers (saves their float32 generation; 'rksmolvlm verify' then has "
                        "nothing to check)")
    p.add_argument("--force", action="store_true", help="replace an existing bundle")
    p.add_argument("-q", "--quiet", action="store_true", help="print only the summary")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    add_resolution_arguments(p, "llm-calibration-", "decoder calibration images: render them at the resolution budget "
                             "your service runs with (images.longest_edge / images.max_tiles; default: the model's "
                             "full split) — fewer tower passes, a faster conversion")


def run(args: argparse.Namespace) -> int:
    return run_convert(args, args.model)


def run_convert(args: argparse.Namespace, model: str) -> int:
    """Convert ``model`` with the converter flags in ``args`` and print the summary (or JSON)."""
    from rksmolvlm.convert.pipeline import convert
    from rksmolvlm.convert.progress import Progress

    result = convert(_options(args, model), Progress(0, quiet=args.quiet))
    if args.json:
        print(json.dumps({"bundle": str(result.bundle), "files": result.manifest["files"],
                          "report": result.report, "timings": result.timings}, indent=2))
    else:
        print(result.summary())
    return 0


def _options(args: argparse.Namespace, model: str):
    from rksmolvlm.convert.pipeline import ConvertOptions

    return ConvertOptions(
        model=model, output=args.output, target=args.target,
        parts=tuple(p.strip() for p in args.parts.split(",") if p.strip()),
        vision_dtype=args.vision_dtype, quant_algorithm=args.quant_algorithm, calibration=args.calibration,
        calibration_tiles=args.calibration_tiles, evaluation_tiles=args.evaluation_tiles,
        min_cosine=args.min_cosine, accept_low_accuracy=args.accept_low_accuracy,
        host_preview=args.host_preview, force=args.force, revision=getattr(args, "revision", None),
        llm_dtype=args.llm_dtype, llm_algorithm=args.llm_algorithm, llm_npu_cores=args.llm_npu_cores,
        max_context=args.max_context, llm_optimization=args.llm_optimization,
        llm_dataset_format=args.llm_dataset_format, llm_host_only=args.llm_host_only, llm_prompts=args.llm_prompts,
        llm_calibration_resolution=_calibration_resolution(args), goldens=not args.no_goldens)


def _calibration_resolution(args: argparse.Namespace):
    """The Resolution of the --llm-calibration-* flags, or None when none is given."""
    if args.llm_calibration_image_size is None and args.llm_calibration_max_tiles is None and \
            not args.llm_calibration_no_split:
        return None
    return resolution_choice(args, "llm-calibration-")

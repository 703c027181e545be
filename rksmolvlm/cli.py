"""The ``rksmolvlm`` command: verbs over the converter and the runtime.

Heavy imports (torch, transformers, rknn) happen inside the verbs, so ``--help`` is instant and
the board never imports host-only packages.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import tempfile
from pathlib import Path

from . import __version__
from .errors import RkSmolVLMError

__all__ = ["main", "build_parser"]


def _add_convert_args(p: argparse.ArgumentParser, with_model: bool = True) -> None:
    if with_model:
        p.add_argument("model", help="checkpoint directory or hub id (e.g. HuggingFaceTB/SmolVLM-256M-Instruct)")
        p.add_argument("-o", "--output", required=True, type=Path, help="bundle directory to create")
        p.add_argument("--revision", help="hub revision (branch, tag or commit)")
    p.add_argument("--target", default="rk3588", help="rk3588 (default), rk3576 or rk3562")
    p.add_argument("--parts", default="vision", help="comma-separated parts to convert (default: vision)")
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
    p.add_argument("--host-preview", action="store_true", help="also keep vision.onnx for the x86 host preview")
    p.add_argument("--force", action="store_true", help="replace an existing bundle")
    p.add_argument("-q", "--quiet", action="store_true", help="print only the summary")
    p.add_argument("--json", action="store_true", help="print the result as JSON")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rksmolvlm", description="SmolVLM on Rockchip NPUs")
    parser.add_argument("--version", action="version", version=f"rksmolvlm {__version__}")
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="VERB")
    convert = verbs.add_parser("convert", help="convert a SmolVLM checkpoint into a bundle (x86 host)")
    _add_convert_args(convert)
    demo = verbs.add_parser("demo", help="build a tiny SmolVLM offline and convert it (no download)")
    demo.add_argument("-o", "--output", type=Path, default=Path("demo-bundle"), help="bundle directory")
    demo.add_argument("--model", default="idefics3-256m", help="tiny layout: idefics3-256m, idefics3-2b, smolvlm2")
    _add_convert_args(demo, with_model=False)
    demo.set_defaults(force=True)
    return parser


def _options(args: argparse.Namespace, model: str):
    from .convert.pipeline import ConvertOptions

    return ConvertOptions(
        model=model, output=args.output, target=args.target,
        parts=tuple(p.strip() for p in args.parts.split(",") if p.strip()),
        vision_dtype=args.vision_dtype, quant_algorithm=args.quant_algorithm, calibration=args.calibration,
        calibration_tiles=args.calibration_tiles, evaluation_tiles=args.evaluation_tiles,
        min_cosine=args.min_cosine, accept_low_accuracy=args.accept_low_accuracy,
        host_preview=args.host_preview, force=args.force, revision=getattr(args, "revision", None))


def _run_convert(args: argparse.Namespace, model: str) -> int:
    from .convert.pipeline import convert
    from .convert.progress import Progress

    options = _options(args, model)
    result = convert(options, Progress(0, quiet=args.quiet))
    if args.json:
        print(json.dumps({"bundle": str(result.bundle), "files": result.manifest["files"],
                          "report": result.report, "timings": result.timings}, indent=2))
    else:
        print(result.summary())
    return 0


def _cmd_convert(args: argparse.Namespace) -> int:
    return _run_convert(args, args.model)


def _cmd_demo(args: argparse.Namespace) -> int:
    from .convert.tiny_checkpoint import TINY_SPECS, build_tiny_checkpoint

    if args.model not in TINY_SPECS:
        raise RkSmolVLMError(f"unknown demo model {args.model!r}: choose one of {', '.join(sorted(TINY_SPECS))}")
    with tempfile.TemporaryDirectory(prefix="rksmolvlm-demo-") as tmp:
        checkpoint = build_tiny_checkpoint(args.model, Path(tmp) / f"tiny-{args.model}")
        if not args.quiet:
            print(f"demo: built a tiny random {args.model} checkpoint at {checkpoint}", file=sys.stderr)
        return _run_convert(args, str(checkpoint))


def _terminate(signum, frame):  # SIGTERM → the same clean-up path as Ctrl-C
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    signal.signal(signal.SIGTERM, _terminate)
    handlers = {"convert": _cmd_convert, "demo": _cmd_demo}
    try:
        return handlers[args.verb](args)
    except RkSmolVLMError as exc:
        print(f"rksmolvlm {args.verb}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"rksmolvlm {args.verb}: interrupted; nothing was left behind", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

"""``rksmolvlm demo``: build a tiny random SmolVLM offline, convert it, and answer one question with
the host preview — the whole path without a download."""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from rksmolvlm.cli.convert import add_convert_arguments, run_convert
from rksmolvlm.errors import RkSmolVLMError

__all__ = ["add_parser", "run"]

QUESTION = "What is on the table?"
IMAGE = "photo_coffee_cup_table.jpg"  # from the shipped calibration set


def add_parser(verbs) -> None:
    p = verbs.add_parser("demo", help="build a tiny SmolVLM offline and convert it (no download)")
    p.add_argument("-o", "--output", type=Path, default=Path("demo-bundle"), help="bundle directory")
    p.add_argument("--model", default="idefics3-256m", help="tiny layout: idefics3-256m, idefics3-2b, smolvlm2")
    add_convert_arguments(p, with_model=False)
    p.set_defaults(run=run, force=True)


def run(args: argparse.Namespace) -> int:
    from rksmolvlm.convert.llm_rkllm import toolkit_info
    from rksmolvlm.convert.tiny_checkpoint import TINY_SPECS, build_tiny_checkpoint

    if args.model not in TINY_SPECS:
        raise RkSmolVLMError(f"unknown demo model {args.model!r}: choose one of {', '.join(sorted(TINY_SPECS))}")
    if "llm" in args.parts and not args.llm_host_only and toolkit_info() is None:
        args.llm_host_only = True
        if not args.quiet:
            print("demo: rkllm-toolkit is not installed, so the decoder is built for the host preview only "
                  "(no llm.rkllm)", file=sys.stderr)
    args.host_preview = True
    with tempfile.TemporaryDirectory(prefix="rksmolvlm-demo-") as tmp:
        checkpoint = build_tiny_checkpoint(args.model, Path(tmp) / f"tiny-{args.model}")
        if not args.quiet:
            print(f"demo: built a tiny random {args.model} checkpoint at {checkpoint}", file=sys.stderr)
        code = run_convert(args, str(checkpoint))
    if code or "llm" not in args.parts:
        return code
    return _answer(args.output)


def _answer(bundle_dir: Path) -> int:
    """Answer one question about a shipped image with the host preview of the demo bundle."""
    from rksmolvlm.calibration.vision_set import shipped_images_dir
    from rksmolvlm.processing.content import ImagePart, Message, TextPart
    from rksmolvlm.runtime.engines import GenerationConfig, open_engines
    from rksmolvlm.runtime.loader import RuntimeBundle
    from rksmolvlm.runtime.runner import Runner

    image = shipped_images_dir() / IMAGE
    bundle = RuntimeBundle.open(bundle_dir)
    runner = Runner(bundle, *open_engines(bundle, "host"))
    try:
        generation = runner.generate([Message("user", (ImagePart(image), TextPart(QUESTION)))],
                                     GenerationConfig(max_new_tokens=16)).consume()
    finally:
        runner.close()
    s = generation.stats
    print(f"\nhost preview: {image.name} + {QUESTION!r}\n"
          f"answer ({len(generation.token_ids)} tokens, random weights so it is noise): {generation.text!r}\n"
          f"token ids: {generation.token_ids}\n"
          f"{s.vision_tiles} tiles in {s.vision_ms:.0f} ms, prefill {s.prefill_tokens} tokens in {s.prefill_ms:.0f} ms, "
          f"first token after {s.first_token_ms:.0f} ms")
    return 0

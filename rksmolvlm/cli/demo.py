"""``rksmolvlm demo``: build the tiny SmolVLM trained on the shipped images (convert/demo_model.py)
offline, convert it, and ask it the same question about two shipped images with the host preview —
the whole path without a download, with answers that come from the image. ``--random`` builds an
untrained tiny checkpoint instead (any tiny layout; its answers are noise)."""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from rksmolvlm.cli.convert import add_convert_arguments, run_convert
from rksmolvlm.errors import RkSmolVLMError

__all__ = ["add_parser", "run", "DEMO_MODELS"]

# --model → the trained demo model's class (convert/demo_model.py); idefics3-2b exists only with --random
DEMO_MODELS = {"idefics3-256m": "idefics3", "smolvlm2": "smolvlm"}


def add_parser(verbs) -> None:
    p = verbs.add_parser("demo", help="build a tiny trained SmolVLM offline, convert it and ask it about two "
                                      "shipped images (no download)")
    p.add_argument("-o", "--output", type=Path, default=Path("demo-bundle"), help="bundle directory")
    p.add_argument("--model", default="idefics3-256m",
                   help="idefics3-256m (Idefics3 class, default) or smolvlm2 (SmolVLM class); with --random also "
                        "idefics3-2b")
    p.add_argument("--random", action="store_true",
                   help="an untrained tiny checkpoint instead of the trained demo model (answers are noise)")
    add_convert_arguments(p, with_model=False)
    p.set_defaults(run=run, force=True)


def run(args: argparse.Namespace) -> int:
    from rksmolvlm.convert.llm_rkllm import toolkit_info
    from rksmolvlm.convert.tiny_checkpoint import TINY_SPECS

    if args.random and args.model not in TINY_SPECS:
        raise RkSmolVLMError(f"unknown demo model {args.model!r}: choose one of {', '.join(sorted(TINY_SPECS))}")
    if not args.random and args.model not in DEMO_MODELS:
        hint = " (it has no trained weights: add --random for an untrained one)" if args.model in TINY_SPECS else ""
        raise RkSmolVLMError(f"unknown demo model {args.model!r}{hint}: choose one of {', '.join(DEMO_MODELS)}")
    if "llm" in args.parts and not args.llm_host_only and toolkit_info() is None:
        args.llm_host_only = True
        if not args.quiet:
            print("demo: rkllm-toolkit is not installed, so the decoder is built for the host preview only "
                  "(no llm.rkllm)", file=sys.stderr)
    args.host_preview = True
    answer_both = "llm" in args.parts and "vision" in args.parts
    with tempfile.TemporaryDirectory(prefix="rksmolvlm-demo-") as tmp:
        checkpoint = _build_checkpoint(args, Path(tmp))
        code = run_convert(args, str(checkpoint))
        reference = None
        if not code and answer_both and not args.random:
            from rksmolvlm.convert.demo_model import load_demo_qa, transformers_answers

            qa = load_demo_qa()
            reference = transformers_answers(checkpoint, _demo_items(qa), max_new_tokens=_NEW_TOKENS)
    if code or not answer_both:
        return code
    return _answer_random(args.output) if args.random else _answer(args.output, reference)


_NEW_TOKENS = 24


def _build_checkpoint(args: argparse.Namespace, tmp: Path) -> Path:
    if args.random:
        from rksmolvlm.convert.tiny_checkpoint import build_tiny_checkpoint

        checkpoint = build_tiny_checkpoint(args.model, tmp / f"tiny-{args.model}")
        what = f"a tiny random {args.model} checkpoint"
    else:
        from rksmolvlm.convert.demo_model import build_demo_checkpoint

        family = DEMO_MODELS[args.model]
        checkpoint = build_demo_checkpoint(tmp / f"demo-{family}", family)
        what = f"the tiny demo SmolVLM ({family} class, trained on the shipped images)"
    if not args.quiet:
        print(f"demo: built {what} at {checkpoint}", file=sys.stderr)
    return checkpoint


def _demo_items(qa):
    from rksmolvlm.convert.demo_model import QA

    return [QA((image,), qa.demo_question, qa.answer((image,), qa.demo_question)) for image in qa.demo_images]


def _answer(bundle_dir: Path, reference: list[list[int]] | None) -> int:
    """Ask the demo question about each demo image with the host preview of the bundle, next to
    transformers' answer from the same checkpoint and the answer the model was trained on."""
    from rksmolvlm.convert.demo_model import load_demo_qa

    qa = load_demo_qa()
    items = _demo_items(qa)
    generations = _host_answers(bundle_dir, [(item.images[0], item.question) for item in items], _NEW_TOKENS)
    lines, agree = [], True
    for i, (item, g) in enumerate(zip(items, generations)):
        same = reference is not None and g.token_ids == reference[i]
        agree = agree and same
        lines.append(f"  {item.images[0]}: {g.text.strip()!r}\n"
                     f"    transformers on the same checkpoint: {'same tokens' if same else 'DIFFERENT'}; "
                     f"trained answer: {item.answer!r}\n    {_stats_line(g.stats)}")
    print(f"\nhost preview (onnxruntime tower + torch decoder) of {bundle_dir}: {qa.demo_question!r}\n"
          + "\n".join(lines)
          + f"\nnext: rksmolvlm verify {bundle_dir.resolve()} --engine sim   (the RKNN tower in rknn-toolkit2's "
          "simulator)")
    if not agree:
        print("demo: the bundle's answers differ from transformers' on the same checkpoint", file=sys.stderr)
        return 1
    return 0


def _answer_random(bundle_dir: Path) -> int:
    """Answer one question about a shipped image with the host preview of a random-weights bundle."""
    image, question = "photo_coffee_cup_table.jpg", "What is on the table?"
    (generation,) = _host_answers(bundle_dir, [(image, question)], 16)
    print(f"\nhost preview: {image} + {question!r}\n"
          f"answer ({len(generation.token_ids)} tokens, random weights so it is noise): {generation.text!r}\n"
          f"token ids: {generation.token_ids}\n{_stats_line(generation.stats)}")
    return 0


def _host_answers(bundle_dir: Path, asks: list[tuple[str, str]], max_new_tokens: int) -> list:
    """Greedy answers of the bundle's host preview, one fresh question per (shipped image name, question)."""
    from rksmolvlm.calibration.vision_set import shipped_images_dir
    from rksmolvlm.processing.content import ImagePart, Message, TextPart
    from rksmolvlm.runners import open_runner
    from rksmolvlm.runtime.engines import GenerationConfig
    from rksmolvlm.runtime.loader import RuntimeBundle

    runner = open_runner(RuntimeBundle.open(bundle_dir), "host")
    try:
        return [runner.generate([Message("user", (ImagePart(shipped_images_dir() / image), TextPart(question)))],
                                GenerationConfig(max_new_tokens=max_new_tokens)).consume()
                for image, question in asks]
    finally:
        runner.close()


def _stats_line(s) -> str:
    return (f"{s.vision_tiles} tiles in {s.vision_ms:.0f} ms, prefill {s.prefill_tokens} tokens in "
            f"{s.prefill_ms:.0f} ms, first token after {s.first_token_ms:.0f} ms")

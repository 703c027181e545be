"""``rksmolvlm ask BUNDLE --image X --prompt Q``: one user message, one answer (streamed, or JSON)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from rksmolvlm.cli.options import add_runtime_arguments, open_runner

__all__ = ["add_parser", "run"]


def add_parser(verbs) -> None:
    p = verbs.add_parser("ask", help="answer one question about images (one user message)")
    add_runtime_arguments(p)
    p.add_argument("--image", action="append", default=[], type=Path, help="an image (repeat for several)")
    p.add_argument("--prompt", required=True, help="the question or instruction")
    p.add_argument("--detail", choices=("auto", "low", "high"), default="auto",
                   help="low = each image as one unsplit tile, high = split into tiles as the model's processor "
                        "does, auto (default) = split unless the images do not fit the context")
    p.add_argument("--json", action="store_true", help="print text, token ids and timings as JSON")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from rksmolvlm.processing.content import ImagePart, Message, TextPart

    runner, config = open_runner(args)
    try:
        message = Message("user", (*(ImagePart(path, args.detail) for path in args.image), TextPart(args.prompt)))
        generation = runner.generate([message], config)
        if args.json:
            generation.consume()
            print(json.dumps({"text": generation.text, "token_ids": generation.token_ids,
                              "finish_reason": generation.finish_reason, "prompt_tokens": generation.prompt_tokens,
                              "timings": generation.stats.to_dict()}, indent=2))
        else:
            for delta in generation:
                print(delta, end="", flush=True)
            print()
    finally:
        runner.close()
    return 0

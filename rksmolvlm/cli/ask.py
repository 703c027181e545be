"""``rksmolvlm ask BUNDLE --image X --prompt Q``: one user message, one answer (streamed, or JSON)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from rksmolvlm.cli.options import add_runtime_arguments, open_runner

__all__ = ["add_parser", "run"]


def add_parser(verbs) -> None:
    p = verbs.add_parser("ask", help="answer one question about images or videos (one user message)")
    add_runtime_arguments(p)
    p.add_argument("--image", action="append", default=[], type=Path, help="an image (repeat for several)")
    p.add_argument("--video", action="append", default=[], type=Path,
                   help="a video (SmolVLM2 bundles; repeat for several): frames are sampled, resized and "
                        "announced with their timestamps as transformers does")
    p.add_argument("--fps", type=float, help="video frames to sample per second (default: the model's, 1)")
    p.add_argument("--max-frames", type=int,
                   help="the most frames per video (default 16 on the board, at most the model's own limit)")
    p.add_argument("--prompt", required=True, help="the question or instruction")
    p.add_argument("--detail", choices=("auto", "low", "high"), default="auto",
                   help="low = each image as one unsplit tile, high = split into tiles as the model's processor "
                        "does, auto (default) = split unless the images do not fit the context")
    p.add_argument("--json", action="store_true", help="print text, token ids and timings as JSON")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from rksmolvlm.errors import RkSmolVLMError
    from rksmolvlm.processing.content import ImagePart, Message, TextPart, VideoPart

    try:
        videos = [VideoPart(path, args.fps, args.max_frames) for path in args.video]
    except ValueError as exc:  # before loading anything: a bad option fails fast
        raise RkSmolVLMError(f"invalid video option: {exc}") from exc
    runner, config = open_runner(args)
    try:
        message = Message("user", (*videos, *(ImagePart(path, args.detail) for path in args.image),
                                   TextPart(args.prompt)))
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

"""``rksmolvlm chat BUNDLE``: an interactive chat that streams its answers and keeps the KV cache
across turns (a runner session). /image PATH attaches an image, /video PATH a video (SmolVLM2
bundles), /reset starts over, /quit ends;
Ctrl-C stops the answer being written."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from rksmolvlm.cli.options import add_runtime_arguments, open_runner
from rksmolvlm.errors import RkSmolVLMError

__all__ = ["add_parser", "run"]


def add_parser(verbs) -> None:
    p = verbs.add_parser("chat", help="interactive chat with streaming (/image PATH, /video PATH, /reset, /quit)")
    add_runtime_arguments(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    runner, config = open_runner(args)
    try:
        return _repl(runner, config)
    finally:
        runner.close()


def _repl(runner, config) -> int:
    from rksmolvlm.processing.content import ImagePart, Message, TextPart, VideoPart

    session = runner.session()
    messages: list[Message] = []
    pending: list[ImagePart | VideoPart] = []
    print("rksmolvlm chat — /image PATH or /video PATH attaches an image or a video to your next message, /reset "
          "starts over, /quit ends", file=sys.stderr)
    while True:
        try:
            line = input("you> ").strip()
        except EOFError:
            print()
            return 0
        if not line:
            continue
        if line in ("/quit", "/exit"):
            return 0
        if line == "/reset":
            messages, pending = [], []
            session.reset()
            continue
        if line.startswith("/image "):
            path = Path(line[len("/image "):].strip()).expanduser()
            if not path.is_file():
                print(f"no such image: {path}", file=sys.stderr)
                continue
            pending.append(ImagePart(path))
            continue
        if line.startswith("/video "):
            path = Path(line[len("/video "):].strip()).expanduser()
            if not path.is_file():
                print(f"no such video: {path}", file=sys.stderr)
                continue
            pending.append(VideoPart(path))
            continue
        messages.append(Message("user", (*pending, TextPart(line))))
        pending = []
        print("assistant> ", end="", flush=True)
        generation = None
        try:
            generation = session.generate(messages, config)
            for delta in generation:
                print(delta, end="", flush=True)
        except KeyboardInterrupt:
            runner.abort()
            if generation is not None:
                generation.consume()  # let the aborted request finish so the engine is free again
            print(" [stopped]")
            messages.pop()
            continue
        except RkSmolVLMError as exc:
            print(f"\nerror: {exc}", file=sys.stderr)
            messages.pop()
            continue
        print()
        messages.append(Message.text("assistant", generation.text))

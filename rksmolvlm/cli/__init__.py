"""The ``rksmolvlm`` command: one module per verb, each parsing its own flags and calling the library.

Heavy imports (torch, transformers, rknn) happen inside the verbs, so ``--help`` is instant and
the board never imports host-only packages.
"""

from __future__ import annotations

import argparse
import signal
import sys

from rksmolvlm import __version__
from rksmolvlm.cli import ask, bench, chat, convert, demo, doctor, serve, verify
from rksmolvlm.errors import RkSmolVLMError

__all__ = ["main", "build_parser", "VERBS"]

VERBS = (convert, verify, demo, ask, chat, doctor, serve, bench)  # in --help order


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rksmolvlm", description="SmolVLM on Rockchip NPUs")
    parser.add_argument("--version", action="version", version=f"rksmolvlm {__version__}")
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="VERB")
    for verb in VERBS:
        verb.add_parser(verbs)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    signal.signal(signal.SIGTERM, _terminate)
    try:
        return args.run(args)
    except RkSmolVLMError as exc:
        print(f"rksmolvlm {args.verb}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"rksmolvlm {args.verb}: interrupted; nothing was left behind", file=sys.stderr)
        return 130


def _terminate(signum, frame):  # SIGTERM → the same clean-up path as Ctrl-C
    raise KeyboardInterrupt

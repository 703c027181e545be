"""``rksmolvlm serve [BUNDLE]``: the OpenAI-compatible HTTP server (run by systemd on the board).
Its flags belong to the server, which also reads them from its config file."""

from __future__ import annotations

import argparse

__all__ = ["add_parser", "run"]


def add_parser(verbs) -> None:
    from rksmolvlm.runtime.server import add_serve_arguments

    p = verbs.add_parser("serve", help="OpenAI-compatible HTTP server (run by systemd on the board)")
    add_serve_arguments(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from rksmolvlm.runners import RUNNERS
    from rksmolvlm.runtime.server import serve_command

    return serve_command(args, RUNNERS)  # the server opens its runner with the engines chosen here

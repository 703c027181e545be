"""OpenAI-compatible HTTP server over the pipeline (issue 6: being written)."""

from __future__ import annotations

import argparse

from ..errors import RkSmolVLMError

__all__ = ["add_serve_arguments", "serve_command"]


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("bundle", nargs="?", help="bundle directory (or bundle in the config file)")


def serve_command(args: argparse.Namespace) -> int:
    raise RkSmolVLMError("serve is not implemented yet")

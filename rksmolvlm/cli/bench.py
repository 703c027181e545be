"""``rksmolvlm bench BUNDLE``: vision, TTFT, prefill and decode speed of a bundle on this machine."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from rksmolvlm.cli.options import add_engine_arguments

__all__ = ["add_parser", "run"]


def add_parser(verbs) -> None:
    p = verbs.add_parser("bench", help="measure vision, TTFT, prefill and decode speed of a bundle")
    p.add_argument("bundle", type=Path)
    add_engine_arguments(p)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--json", action="store_true")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from rksmolvlm.runtime.bench import format_table, run_bench
    from rksmolvlm.runtime.loader import RuntimeBundle

    result = run_bench(RuntimeBundle.open(args.bundle), args.engine, repeats=args.repeats, warmup=args.warmup,
                       prompt_tokens=args.prompt_tokens, new_tokens=args.new_tokens, library=args.library)
    print(json.dumps(result, indent=2) if args.json else format_table(result))
    return 0

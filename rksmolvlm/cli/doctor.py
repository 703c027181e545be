"""``rksmolvlm doctor [BUNDLE]``: is this board ready (SoC, NPU driver, runtimes, permissions, memory)?
Exit 1 when any check fails."""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from pathlib import Path

__all__ = ["add_parser", "run"]

MARKS = {"ok": "ok  ", "warn": "WARN", "fail": "FAIL", "info": "info"}


def add_parser(verbs) -> None:
    p = verbs.add_parser("doctor", help="check this board (SoC, NPU driver, runtimes, permissions, memory)")
    p.add_argument("bundle", nargs="?", type=Path, help="also check this bundle against the board")
    p.add_argument("--root", default="/", help=argparse.SUPPRESS)
    p.add_argument("--json", action="store_true")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from rksmolvlm.bundle import read_manifest
    from rksmolvlm.tools.doctor import run_doctor

    manifest = read_manifest(args.bundle) if args.bundle else None
    findings = run_doctor(manifest, args.root)
    if args.json:
        print(json.dumps([asdict(f) for f in findings], indent=2))
    else:
        for f in findings:
            print(f"[{MARKS[f.status]}] {f.check}: {f.message}" + (f"\n       fix: {f.fix}" if f.fix else ""))
    return 1 if any(f.status == "fail" for f in findings) else 0

"""``rksmolvlm verify BUNDLE``: replay the golden answers recorded at conversion on the chosen engines
and report tower cosine per tile, tokens before the first divergence, token agreement and exact
match per case; exit 1 below the floors."""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
from pathlib import Path

__all__ = ["add_parser", "run"]

ENGINES = ("host", "npu", "sim")


def add_parser(verbs) -> None:
    p = verbs.add_parser("verify", help="check a bundle's answers against the original model's (golden answers)")
    p.add_argument("bundle", type=Path, help="bundle directory")
    p.add_argument("--engine", default="host", choices=ENGINES,
                   help="host = onnxruntime + torch (must agree 100 %%), npu = the board's RKNN + librkllmrt, "
                        "sim = the tower in rknn-toolkit2's simulator, the decoder in torch (x86)")
    p.add_argument("--library", help="path of librkllmrt.so for --engine npu")
    p.add_argument("--min-agreement", type=float,
                   help="token agreement each case needs, 0–1 (default: 1.0 on host, 0.5 on npu and sim)")
    p.add_argument("--min-cosine", type=float, default=None, help="tower cosine each reference tile needs "
                   "(default 0.99)")
    p.add_argument("--threads", type=int, help="CPU threads of the host engines")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--no-verify", action="store_true", help="skip the sha256 check of the bundle files")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from rksmolvlm.errors import RkSmolVLMError
    from rksmolvlm.runners import engine_notes
    from rksmolvlm.runtime.engines import EngineOptions
    from rksmolvlm.runtime.loader import RuntimeBundle
    from rksmolvlm.tools.verify import DEFAULT_MIN_COSINE, load_goldens, open_verify_runner, verify_bundle

    if args.min_agreement is not None and not 0.0 <= args.min_agreement <= 1.0:
        raise RkSmolVLMError(f"--min-agreement {args.min_agreement} must be between 0 and 1")
    bundle = RuntimeBundle.open(args.bundle, verify=not args.no_verify)
    load_goldens(bundle)  # no goldens: say how to get them before starting any engine
    # stdout holds only the result: toolkits' own messages go to stderr
    with tempfile.TemporaryDirectory(prefix="rksmolvlm-verify-") as work, contextlib.redirect_stdout(sys.stderr):
        runner = open_verify_runner(bundle, args.engine, EngineOptions(threads=args.threads, library=args.library,
                                                                       max_new_tokens=256), Path(work))
        try:
            quiet = args.json
            result = verify_bundle(runner, args.engine, args.min_agreement,
                                   DEFAULT_MIN_COSINE if args.min_cosine is None else args.min_cosine,
                                   engine_notes(bundle, args.engine),
                                   progress=None if quiet else lambda name: print(f"case {name} …", file=sys.stderr))
        finally:
            runner.close()
    print(json.dumps(result.to_dict(), indent=2) if args.json else result.summary())
    return 0 if result.passed else 1

#!/usr/bin/env python3
"""mypy over the board package (the ``packages`` of ``[tool.mypy]`` in pyproject.toml).

mypy finds modules by folder, and pyproject maps folders into ``rksmolvlm`` (``runtime/`` →
``rksmolvlm.runtime``), so mypy runs inside a symlink tree of the installed namespace
(``scripts/namespace_tree.py``, kept in .mypy_cache/ so the cache stays warm) and its findings are
reported back under the checkout's own paths (``runtime/runner.py``, not ``rksmolvlm/runtime/runner.py``).
Exits with mypy's status. Extra arguments go to mypy.

    .venv/bin/python scripts/typecheck.py [MYPY ARGS...]
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from namespace_tree import build

__all__ = ["main"]

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / ".mypy_cache"
FINDING = re.compile(r"^(?P<path>[^:\s][^:]*\.pyi?)(?P<rest>:.*)$")


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if {"-h", "--help"} & set(args):
        print(__doc__)
        return 0
    tree = build(ROOT, CACHE / "namespace")
    done = subprocess.run([sys.executable, "-m", "mypy", "--config-file", str(ROOT / "pyproject.toml"),
                           "--cache-dir", str(CACHE), *args], cwd=tree, capture_output=True, text=True)
    for line in (done.stdout + done.stderr).splitlines():
        print(_checkout_path(line, tree))
    return done.returncode


def _checkout_path(line: str, tree: Path) -> str:
    """``rksmolvlm/runtime/x.py:3: …`` (inside the tree) → ``runtime/x.py:3: …`` (inside the checkout)."""
    match = FINDING.match(line)
    if not match:
        return line
    real = Path(os.path.realpath(tree / match["path"]))
    if not real.is_relative_to(ROOT):
        return line  # a library's stub: keep mypy's path
    return f"{real.relative_to(ROOT)}{match['rest']}"


if __name__ == "__main__":
    sys.exit(main())

"""Helpers the tests share (fixtures stay in the conftest files): fake engines, image makers,
transformers' side of parity checks, loopback HTTP, hostile inputs. Nothing here imports torch or
transformers at module level: the board-path scripts import the fakes where those are blocked."""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DOUBLES = ROOT / "tests" / "doubles"
DATA = ROOT / "tests" / "data"
TINY_NAMES = ("idefics3-256m", "idefics3-2b", "smolvlm2")  # the tiny checkpoints (convert/tiny_checkpoint.py)


def purge_modules(*names: str) -> None:
    """Forget the named top-level modules and their submodules (a contract double re-imports fresh)."""
    for name in [m for m in sys.modules if m.split(".")[0] in names]:
        del sys.modules[name]

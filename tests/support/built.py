"""The fixtures that need torch and transformers to build (tiny checkpoints, host-preview bundles, the
demo model's bundle), as plain functions: tests/conftest.py builds them per session, and the board
check builds them once on the x86 host (scripts/board_check/fixtures.py) and hands the folder to the
arm64 rootfs, where ``RKSMOLVLM_TEST_FIXTURES`` points the same fixtures at it (read-only)."""

from __future__ import annotations

import os
from pathlib import Path

from support import TINY_NAMES

# the handed-in folder's layout: one sub-folder per fixture
CHECKPOINTS, PREVIEW_BUNDLES, DEMO_PREVIEW = "checkpoints", "preview-bundles", "demo-preview"


def handed_in(part: str) -> Path | None:
    """The handed-in folder of ``part`` when RKSMOLVLM_TEST_FIXTURES is set (it must hold it), else None."""
    root = os.environ.get("RKSMOLVLM_TEST_FIXTURES")
    if not root:
        return None
    path = Path(root) / part
    if not path.is_dir():
        raise FileNotFoundError(f"RKSMOLVLM_TEST_FIXTURES={root} has no {part}/: build the folder with "
                                "scripts/board_check/fixtures.py on the host, or unset the variable")
    return path


def build_tiny_checkpoints(root: Path) -> dict[str, Path]:
    from rksmolvlm.convert.tiny_checkpoint import build_tiny_checkpoint

    return {name: build_tiny_checkpoint(name, root / name) for name in TINY_NAMES}


def build_preview_bundles(checkpoints: dict[str, Path], root: Path) -> dict[str, Path]:
    """Host-preview bundles (vision.onnx + decoder/) of the tiny checkpoints."""
    from rksmolvlm.convert.pipeline import ConvertOptions, convert
    from rksmolvlm.convert.progress import Progress

    out = {}
    for name, path in checkpoints.items():
        out[name] = root / name
        convert(ConvertOptions(model=str(path), output=out[name], host_preview=True, llm_host_only=True,
                               llm_dataset_format="text"), Progress(0, quiet=True))
    return out


def build_demo_preview_bundle(root: Path) -> Path:
    """The trained demo model (Idefics3 class) converted as ``rksmolvlm demo`` does; returns the bundle."""
    from rksmolvlm.convert.demo_model import build_demo_checkpoint
    from rksmolvlm.convert.pipeline import ConvertOptions, convert
    from rksmolvlm.convert.progress import Progress

    checkpoint = build_demo_checkpoint(root / "demo-idefics3", "idefics3")
    convert(ConvertOptions(model=str(checkpoint), output=root / "bundle", host_preview=True, llm_host_only=True,
                           llm_dataset_format="text"), Progress(0, quiet=True))
    return root / "bundle"

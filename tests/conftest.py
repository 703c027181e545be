"""Fixtures shared by every part: tiny random SmolVLM checkpoints (both classes, both token layouts),
built offline once per session, host-preview bundles of them, the trained demo model's bundle, a small
set of calibration images, and the vendor contract doubles. Helpers that are not fixtures live in
``tests/support/``."""

from __future__ import annotations

import functools
import os
from pathlib import Path

import numpy as np
import pytest

from support import DOUBLES, ROOT, TINY_NAMES, built, purge_modules

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory) -> dict[str, Path]:
    given = built.handed_in(built.CHECKPOINTS)
    if given is not None:
        return {name: given / name for name in TINY_NAMES}
    return built.build_tiny_checkpoints(tmp_path_factory.mktemp("checkpoints"))


@pytest.fixture(scope="session")
def calibration_dir(tmp_path_factory) -> Path:
    """Five small synthetic photos-like images of varied shapes (fast to tile)."""
    from PIL import Image

    root = tmp_path_factory.mktemp("calibration")
    rng = np.random.RandomState(7)
    for i, (w, h) in enumerate([(640, 480), (300, 800), (900, 700), (200, 200), (1024, 300)]):
        ramp = np.linspace(0, 255, w)[None, :, None] * np.ones((h, 1, 3))
        pixels = (ramp * 0.6 + rng.randint(0, 100, (h, w, 3))).clip(0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(root / f"image_{i}.png")
    return root


@pytest.fixture
def rkllm_double(monkeypatch):
    """Install the rkllm-toolkit contract double at a given version; returns its RKLLM class
    (whose ``calls`` list records every call)."""
    import sys

    def install(version: str = "1.3.0"):
        purge_modules("rkllm")
        monkeypatch.setenv("RKLLM_DOUBLE_VERSION", version)
        monkeypatch.setattr(sys, "path", [str(DOUBLES), *sys.path])
        from rkllm.api import RKLLM

        RKLLM.calls = []
        return RKLLM

    yield install
    purge_modules("rkllm")




@pytest.fixture(scope="session")
def preview_bundles(tiny_checkpoints, tmp_path_factory) -> dict[str, Path]:
    """Host-preview bundles (vision.onnx + decoder/) of the three tiny checkpoints, built once."""
    given = built.handed_in(built.PREVIEW_BUNDLES)
    if given is not None:
        return {name: given / name for name in tiny_checkpoints}
    return built.build_preview_bundles(tiny_checkpoints, tmp_path_factory.mktemp("preview-bundles"))


@pytest.fixture(scope="session")
def runtime_bundles(preview_bundles) -> dict:
    """The preview bundles opened for inference (RuntimeBundle), by tiny layout name."""
    from rksmolvlm.runtime.loader import RuntimeBundle

    return {name: RuntimeBundle.open(path) for name, path in preview_bundles.items()}




@pytest.fixture(scope="session")
def demo_preview_bundle(tmp_path_factory) -> Path:
    """The trained tiny demo model (convert/demo_model.py, Idefics3 class) converted as ``rksmolvlm demo``
    does (host preview, decoder for the host only), built once on first use (~20 s). Asked "What is on
    the table?" it answers "A coffee cup." about the shipped coffee photo and "There is no table." about
    the cat."""
    given = built.handed_in(built.DEMO_PREVIEW)
    if given is not None:
        return given / "bundle"
    return built.build_demo_preview_bundle(tmp_path_factory.mktemp("demo-preview"))


@pytest.fixture
def rknnlite_double(monkeypatch):
    """The rknn-toolkit-lite2 contract double on sys.path; returns its RKNNLite class."""
    import sys

    purge_modules("rknnlite")
    monkeypatch.setattr(sys, "path", [str(DOUBLES), *sys.path])
    from rknnlite.api import RKNNLite

    RKNNLite.instances = []
    yield RKNNLite
    purge_modules("rknnlite")


# Fixtures that build checkpoints or bundles (torch, transformers, a conversion): a test that uses one,
# directly or through another fixture, is slow. ``./scripts/test.sh --fast`` runs the rest.
BUNDLE_FIXTURES = {"tiny_checkpoints", "tiny_checkpoint", "preview_bundles", "runtime_bundles", "demo_preview_bundle"}


def pytest_collection_modifyitems(config, items):
    host_only = _board_host_only()
    for item in items:
        if BUNDLE_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)
        reason = host_only.get(item.nodeid.split("[", 1)[0])
        if reason is not None:
            item.add_marker(pytest.mark.skip(reason=f"host only (board slice): {reason}"))


# The board slice (RKSMOLVLM_BOARD_SLICE=1, set by scripts/board_check/ in the arm64 rootfs): the suite minus
# what needs the x86 host's torch, transformers or rknn-toolkit2, listed with the reason in tests/board_slice.txt.
# A listed file is not collected (its imports need the host); a listed test is skipped with its reason.
BOARD_SLICE_LIST = Path(__file__).parent / "board_slice.txt"


def pytest_ignore_collect(collection_path, config):
    files = {node for node in _board_host_only() if "::" not in node}
    if files and collection_path.is_file():
        relative = collection_path.relative_to(ROOT).as_posix()
        return True if any(relative == f or relative.startswith(f.rstrip("/") + "/") for f in files) else None
    return None


@functools.cache
def _board_host_only() -> dict[str, str]:
    """Node id (or file/folder) → reason, from tests/board_slice.txt; empty outside the board slice."""
    if os.environ.get("RKSMOLVLM_BOARD_SLICE") != "1":
        return {}
    emulated = os.environ.get("RKSMOLVLM_BOARD_EMULATED") == "1"  # run.sh: qemu-user, not a board
    out, reason = {}, ""
    for line in BOARD_SLICE_LIST.read_text().splitlines():
        line = line.strip()
        if line.startswith("## "):
            reason = line[3:]
        elif line and not line.startswith("#") and (emulated or not reason.startswith("qemu-user")):
            out[line] = reason
    return out

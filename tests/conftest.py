"""Shared fixtures: tiny random SmolVLM checkpoints (both classes, both token layouts), built
offline once per session, and a small set of calibration images."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

ROOT = Path(__file__).resolve().parents[1]
TINY_NAMES = ("idefics3-256m", "idefics3-2b", "smolvlm2")


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory) -> dict[str, Path]:
    from rksmolvlm.convert.tiny_checkpoint import build_tiny_checkpoint

    root = tmp_path_factory.mktemp("checkpoints")
    return {name: build_tiny_checkpoint(name, root / name) for name in TINY_NAMES}


@pytest.fixture(scope="session", params=TINY_NAMES)
def tiny_checkpoint(request, tiny_checkpoints) -> Path:
    return tiny_checkpoints[request.param]


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


def rng_image(width: int, height: int, mode: str = "RGB", seed: int = 0):
    """A random image in any PIL mode, built from smooth gradients plus noise."""
    from PIL import Image

    rng = np.random.RandomState(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 / max(width - 1, 1), y * 255 / max(height - 1, 1),
                     (x + y) * 127 / max(width + height - 2, 1), rng.randint(0, 256, (height, width))], -1)
    noisy = (base * 0.8 + rng.randint(0, 50, base.shape)).clip(0, 255).astype(np.uint8)
    return Image.fromarray(noisy, "RGBA").convert(mode)


DOUBLES = ROOT / "tests" / "doubles"


def _purge_rkllm():
    import sys

    for name in [m for m in sys.modules if m == "rkllm" or m.startswith("rkllm.")]:
        del sys.modules[name]


@pytest.fixture
def rkllm_double(monkeypatch):
    """Install the rkllm-toolkit contract double at a given version; returns its RKLLM class
    (whose ``calls`` list records every call)."""
    import sys

    def install(version: str = "1.3.0"):
        _purge_rkllm()
        monkeypatch.setenv("RKLLM_DOUBLE_VERSION", version)
        monkeypatch.setattr(sys, "path", [str(DOUBLES), *sys.path])
        from rkllm.api import RKLLM

        RKLLM.calls = []
        return RKLLM

    yield install
    _purge_rkllm()


@pytest.fixture
def no_rkllm(monkeypatch):
    """Make ``import rkllm`` fail, whatever is installed."""
    import builtins

    _purge_rkllm()
    real_import = builtins.__import__

    def guarded(name, *args, **kwargs):
        if name == "rkllm" or name.startswith("rkllm."):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", guarded)
    yield
    _purge_rkllm()


@pytest.fixture(scope="session")
def preview_bundles(tiny_checkpoints, tmp_path_factory) -> dict[str, Path]:
    """Host-preview bundles (vision.onnx + decoder/) of the three tiny checkpoints, built once."""
    from rksmolvlm.cli import main

    root = tmp_path_factory.mktemp("preview-bundles")
    out = {}
    for name, path in tiny_checkpoints.items():
        out[name] = root / name
        code = main(["convert", str(path), "-o", str(out[name]), "--host-preview", "--llm-host-only",
                     "--llm-dataset-format", "text", "-q"])
        assert code == 0
    return out


@pytest.fixture
def rknnlite_double(monkeypatch):
    """The rknn-toolkit-lite2 contract double on sys.path; returns its RKNNLite class."""
    import sys

    for name in [m for m in sys.modules if m == "rknnlite" or m.startswith("rknnlite.")]:
        del sys.modules[name]
    monkeypatch.setattr(sys, "path", [str(DOUBLES), *sys.path])
    from rknnlite.api import RKNNLite

    RKNNLite.instances = []
    yield RKNNLite
    for name in [m for m in sys.modules if m == "rknnlite" or m.startswith("rknnlite.")]:
        del sys.modules[name]

"""Fixtures of the converter's tests: each tiny checkpoint in turn, and an rkllm-toolkit that is absent."""

from __future__ import annotations

from pathlib import Path

import pytest

from support import TINY_NAMES, purge_modules


@pytest.fixture(scope="session", params=TINY_NAMES)
def tiny_checkpoint(request, tiny_checkpoints) -> Path:
    return tiny_checkpoints[request.param]


@pytest.fixture
def no_rkllm(monkeypatch):
    """Make ``import rkllm`` fail, whatever is installed."""
    import builtins

    purge_modules("rkllm")
    real_import = builtins.__import__

    def guarded(name, *args, **kwargs):
        if name == "rkllm" or name.startswith("rkllm."):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", guarded)
    yield
    purge_modules("rkllm")

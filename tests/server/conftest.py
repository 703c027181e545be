"""Fixtures of the server's tests: the trained demo model's bundle (the web page shows its answers)."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def demo_preview_bundle(tmp_path_factory) -> Path:
    """The trained tiny demo model (convert/demo_model.py, Idefics3 class) converted as ``rksmolvlm demo``
    does (host preview, decoder for the host only), built once on first use (~20 s). Asked "What is on
    the table?" it answers "A coffee cup." about the shipped coffee photo and "There is no table." about
    the cat."""
    from rksmolvlm.convert.demo_model import build_demo_checkpoint
    from rksmolvlm.convert.pipeline import ConvertOptions, convert
    from rksmolvlm.convert.progress import Progress

    root = tmp_path_factory.mktemp("demo-preview")
    checkpoint = build_demo_checkpoint(root / "demo-idefics3", "idefics3")
    convert(ConvertOptions(model=str(checkpoint), output=root / "bundle", host_preview=True, llm_host_only=True,
                           llm_dataset_format="text"), Progress(0, quiet=True))
    return root / "bundle"

"""Manifests for tests, built from the bundle contract's records (never written by hand)."""

from __future__ import annotations

from pathlib import Path

from rksmolvlm.bundle.manifest import (SCHEMA_VERSION, Manifest, ModelInfo, ProcessorInfo, SourceInfo, TargetInfo,
                                       TextDecoderInfo, TokenInfo, VisionTowerInfo)
from rksmolvlm.processing.image import ImageSettings
from rksmolvlm.processing.prompt import PromptTokens

IMAGE_SEQ_LEN = 4


def minimal_record(root: Path = Path("bundle")) -> Manifest:
    """The smallest manifest the reader accepts: no parts, no files (the bundle writer lists them)."""
    return Manifest(
        root=root, schema_version=SCHEMA_VERSION, created_by="test",
        source=SourceInfo("tiny", None, {}),
        model=ModelInfo("idefics3", "Idefics3ForConditionalGeneration", "tiny", VisionTowerInfo(IMAGE_SEQ_LEN),
                        TextDecoderInfo(hidden_size=8, vocab_size=32)),
        target=TargetInfo("rk3588", 3), toolkits={}, min_runtime={}, vision=None, llm=None,
        processor=ProcessorInfo(ImageSettings(tile_size=32, longest_edge=64, do_image_splitting=True, resample=1,
                                              rescale_factor=1 / 255), IMAGE_SEQ_LEN),
        tokens=TokenInfo(PromptTokens("<image>", 3, "<fake_token_around_image>", "<global-img>", IMAGE_SEQ_LEN,
                                      "<end_of_utterance>"), eos_ids=(2,), bos_id=None, pad_id=None),
        chat_template="", tokenizer="tokenizer.json",
    )


def minimal_manifest() -> dict:
    """``minimal_record()`` as ``manifest.json`` would hold it (with an empty ``files``: add the
    records of the files the test means the bundle to have)."""
    return minimal_record().to_dict()

"""Manifests for tests."""

from __future__ import annotations


def minimal_manifest() -> dict:
    """The smallest manifest dict the reader accepts, without schema_version, created_by and files
    (the bundle writer adds those)."""
    return {
        "source": {"model_id": "tiny"},
        "model": {"family": "idefics3", "architecture": "Idefics3ForConditionalGeneration", "size": "tiny",
                  "vision": {"image_seq_len": 4}, "text": {"hidden_size": 8, "vocab_size": 32}},
        "target": {"platform": "rk3588", "npu_cores": 3}, "toolkits": {}, "min_runtime": {},
        "processor": {"tile_size": 32, "longest_edge": 64, "do_image_splitting": True, "resample": 1,
                      "rescale_factor": 1 / 255, "image_mean": [0.5] * 3, "image_std": [0.5] * 3,
                      "image_seq_len": 4},
        "tokens": {"image": "<image>", "image_id": 3, "fake_image": "<fake_token_around_image>",
                   "global_image": "<global-img>", "end_of_utterance": "<end_of_utterance>", "eos_ids": [2]},
        "chat_template": "", "tokenizer": "tokenizer.json",
    }

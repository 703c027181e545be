"""Manifests for tests, built from the bundle contract's records (never written by hand)."""

from __future__ import annotations

import hashlib
from pathlib import Path

from rksmolvlm.bundle.manifest import (SCHEMA_VERSION, FileRecord, Manifest, ModelInfo, ProcessorInfo, SourceInfo,
                                       TargetInfo, TextDecoderInfo, TokenInfo, VisionTowerInfo)
from rksmolvlm.processing.image import ImageSettings
from rksmolvlm.processing.prompt import PromptTokens

IMAGE_SEQ_LEN = 4


def minimal_record(root: Path = Path("bundle")) -> Manifest:
    """The smallest manifest the reader accepts: no parts, one file (``tokenizer.json`` holding
    ``{}``; the bundle writer lists the files actually staged)."""
    tokenizer = FileRecord("tokenizer.json", 2, hashlib.sha256(b"{}").hexdigest())
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
        chat_template="", tokenizer="tokenizer.json", files={tokenizer.path: tokenizer},
    )


def minimal_manifest() -> dict:
    """``minimal_record()`` as ``manifest.json`` holds it."""
    return minimal_record().to_dict()


# The three families' layouts (DESIGN.md §4), as the converter would record them.
FAMILY_LAYOUTS = {
    "idefics3-256m": dict(family="idefics3", architecture="Idefics3ForConditionalGeneration", size="256M", tile=512,
                          patch=16, vision_hidden=768, vision_layers=12, vision_heads=12, scale=4, seq=64,
                          hidden=576, layers=30, heads=9, kv_heads=3, vocab=49280, longest_edge=2048,
                          image_id=49190, fake_image_id=49189, global_image_id=49152, eou_id=49279,
                          row_col_are_tokens=True, vision_dtype="fp16", video=False),
    "idefics3-2b": dict(family="idefics3", architecture="Idefics3ForConditionalGeneration", size="2.2B", tile=384,
                        patch=14, vision_hidden=1152, vision_layers=27, vision_heads=16, scale=3, seq=81,
                        hidden=2048, layers=24, heads=32, kv_heads=32, vocab=49155, longest_edge=1536,
                        image_id=49153, fake_image_id=49152, global_image_id=None, eou_id=49154,
                        row_col_are_tokens=False, vision_dtype="int8", video=False),
    "smolvlm2": dict(family="smolvlm", architecture="SmolVLMForConditionalGeneration", size="500M", tile=512,
                     patch=16, vision_hidden=768, vision_layers=12, vision_heads=12, scale=4, seq=64, hidden=960,
                     layers=32, heads=15, kv_heads=5, vocab=49280, longest_edge=2048, image_id=49190,
                     fake_image_id=49189, global_image_id=49152, eou_id=49279, row_col_are_tokens=True,
                     vision_dtype="fp16", video=True),
}


def family_record(name: str, root: Path = Path("bundle")) -> Manifest:
    """A whole manifest of one family's layout with both parts (and video and goldens for SmolVLM2),
    its file table naming every file the parts refer to."""
    from rksmolvlm.bundle.goldens import CASES_FILE, FEATURES_FILE, GOLDENS_DIR
    from rksmolvlm.bundle.manifest import (FileRecord, GoldensInfo, LlmPart, LlmRecipe, VideoPartInfo,
                                           VisionAccuracy, VisionInput, VisionOutput, VisionPart,
                                           VisionQuantization)
    from rksmolvlm.processing.video_frames import VideoSettings

    f = FAMILY_LAYOUTS[name]
    int8 = f["vision_dtype"] == "int8"
    vision = VisionPart("vision.rknn", f["vision_dtype"], "vision.onnx",
                        VisionOutput((1, f["seq"], f["hidden"]), "image_features", "float32"),
                        VisionInput((1, f["tile"], f["tile"], 3), "pixel_values", "NHWC", "uint8",
                                    "baked in: (x - 127.5) / 127.5"),
                        VisionQuantization("w8a8", "normal", 24, ("photo_a.jpg", "doc_b.png")) if int8 else None,
                        VisionAccuracy(0.9981, 0.9953) if int8 else VisionAccuracy(0.9999998, 0.9999991))
    llm = LlmPart("llm.rkllm", "1.3.0", 4096, "embed_tokens.npy", (f["vocab"], f["hidden"]), "decoder",
                  LlmRecipe("rk3588", "w8a8", "normal", 3, 4096, 1, 0.0), "present", "float16")
    video = goldens = None
    names = ["vision.rknn", "vision.onnx", "llm.rkllm", "embed_tokens.npy", "tokenizer.json", "decoder/config.json"]
    if f["video"]:
        video = VideoPartInfo(VideoSettings(fps=1.0, max_frames=64, longest_edge=f["longest_edge"],
                                            frame_size=f["tile"]), "{{ messages }}<video>")
        goldens = GoldensInfo(f"{GOLDENS_DIR}/{CASES_FILE}", f"{GOLDENS_DIR}/{FEATURES_FILE}", 16)
        names += [goldens.cases, goldens.features, f"{GOLDENS_DIR}/inputs/clip.mp4"]
    files = {n: FileRecord(n, 1000 + i, f"{i:064x}") for i, n in enumerate(names)}
    sampling = {"fps": 1, "max_frames": 64, "video_size": {"longest_edge": f["tile"]}} if f["video"] else {}
    return Manifest(
        root=root, schema_version=SCHEMA_VERSION, created_by="rksmolvlm 0.1.0",
        source=SourceInfo(f"HuggingFaceTB/{name}", "main", {"model.safetensors": "ab" * 32}),
        model=ModelInfo(f["family"], f["architecture"], f["size"],
                        VisionTowerInfo(f["seq"], f["tile"], f["patch"], f["vision_hidden"], f["vision_layers"],
                                        f["vision_heads"], f["scale"]),
                        TextDecoderInfo(f["hidden"], f["vocab"], f["layers"], f["heads"], f["kv_heads"], 8192,
                                        False)),
        target=TargetInfo("rk3588", 3),
        toolkits={"rknn-toolkit2": "2.5.0", "rkllm-toolkit": "1.3.0", "torch": None, "python": "3.11.7"},
        min_runtime={"rksmolvlm": "0.1.0", "librknnrt": "2.5.0", "librkllmrt": "1.3.0"},
        vision=vision, llm=llm,
        processor=ProcessorInfo(ImageSettings(tile_size=f["tile"], longest_edge=f["longest_edge"],
                                              video_sampling=sampling), f["seq"]),
        tokens=TokenInfo(PromptTokens("<image>", f["image_id"], "<fake_token_around_image>", "<global-img>", f["seq"],
                                      "<end_of_utterance>"), (f["eou_id"],), 1, 2, f["fake_image_id"],
                         f["global_image_id"], f["eou_id"], "<|im_start|>", "<end_of_utterance>", f["eou_id"],
                         "<|im_end|>", f["row_col_are_tokens"]),
        chat_template="<|im_start|>{% for message in messages %}{{ message['role'] }}{% endfor %}",
        tokenizer="tokenizer.json", files=files, video=video, goldens=goldens,
        created_at="2026-12-07T20:00:00+00:00", parts=("vision", "llm"),
    )

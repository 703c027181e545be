"""Golden answers recorded at conversion: a handful of cases over shipped inputs (a photo, a document
at full split, two images, text only, a video for SmolVLM2), each with the greedy token ids the
original checkpoint generates in float32 with transformers and the reference tower features of a
few of its tiles, stored small in the bundle's ``goldens/`` with the inputs they need.

The prompt ids and pixels are the runtime's own (``rksmolvlm.processing`` and the assembler, proven
equal to transformers' processor by the parity tests); only the generation is transformers'.
``rksmolvlm verify`` (rksmolvlm/tools/verify.py) replays the cases on the board's or the host's engines.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from rksmolvlm.bundle.goldens import GOLDENS_DIR, INPUTS_DIR, GoldenCase, Goldens
from rksmolvlm.bundle.manifest import GoldensInfo, Manifest
from rksmolvlm.convert.progress import Progress
from rksmolvlm.convert.source import Checkpoint
from rksmolvlm.hashing import sha256_file
from rksmolvlm.tools.verify import case_media, cut_at_stop

__all__ = ["GOLDEN_NEW_TOKENS", "golden_cases", "record_goldens", "verify_staged"]

GOLDEN_NEW_TOKENS = 16
_VIDEO_FRAMES = 4  # frames of the video case: enough to exercise the video prompt, cheap to replay


def golden_cases(with_video: bool) -> list[dict]:
    """The cases: name and messages (media by file name in the shipped calibration folders)."""
    def user(*parts):
        return [{"role": "user", "content": list(parts)}]

    def image(name):
        return {"type": "image", "image": name, "detail": "high"}

    def text(t):
        return {"type": "text", "text": t}

    cases = [
        {"name": "photo", "messages": user(image("photo_cat_closeup_small.jpg"), text("Describe this image."))},
        {"name": "document", "messages": user(image("doc_receipt_grocery.png"),
                                              text("What is the total on this receipt?"))},
        {"name": "two_images", "messages": user(image("photo_rocket_launch_pad_portrait.jpg"),
                                                image("photo_cat_closeup_small.jpg"),
                                                text("What differs between these two images?"))},
        {"name": "text", "messages": user(text("What is the capital of France? Answer in one sentence."))},
    ]
    if with_video:
        cases.append({"name": "video", "messages": user(
            {"type": "video", "video": "video_chart_drawing.mp4", "max_frames": _VIDEO_FRAMES},
            text("What happens in this video?"))})
    return cases


def record_goldens(checkpoint: Checkpoint, bundle: Path, towers, progress: Progress, max_context: int,
                   new_tokens: int = GOLDEN_NEW_TOKENS) -> tuple[GoldensInfo, dict]:
    """Write ``goldens/`` into ``bundle``; return (manifest part, report section). A case whose
    prompt and answer would not fit ``max_context`` (the bundle's decoder context) is left out."""
    import torch
    import transformers as tf

    from rksmolvlm.calibration.decoder_set import shipped_videos_dir
    from rksmolvlm.calibration.vision_set import shipped_images_dir
    from rksmolvlm.convert.llm_part import checkpoint_assembler
    from rksmolvlm.convert.vision_tower import torch_features
    from rksmolvlm.processing.image import normalize
    from rksmolvlm.processing.video_frames import normalize_frames

    folder = bundle / GOLDENS_DIR
    (folder / INPUTS_DIR).mkdir(parents=True, exist_ok=True)
    cases = golden_cases(checkpoint.video is not None)
    sources = {"image": shipped_images_dir(), "video": shipped_videos_dir()}
    inputs = {}
    for case in cases:  # copy the inputs (small shipped files) so the bundle verifies on its own
        for part in case["messages"][0]["content"]:
            if part["type"] in sources:
                name = part[part["type"]]
                if name not in inputs:
                    shutil.copy2(sources[part["type"]] / name, folder / INPUTS_DIR / name)
                    inputs[name] = sha256_file(folder / INPUTS_DIR / name)
    shell = Goldens(bundle, new_tokens, "", [])
    assembler = checkpoint_assembler(checkpoint)
    stops = set(checkpoint.tokens.eos_ids)
    cls = tf.Idefics3ForConditionalGeneration if checkpoint.family == "idefics3" else \
        tf.SmolVLMForConditionalGeneration
    vlm = cls.from_pretrained(str(checkpoint.path), dtype=torch.float32).eval()
    written, features, skipped = [], {}, []
    try:
        for case in cases:
            messages = shell.messages(GoldenCase(case["name"], case["messages"], [], [], []))
            pixels, layouts, kinds = case_media(messages, checkpoint.image, checkpoint.video)
            ids = assembler.assemble(messages, layouts).ids
            if len(ids) + new_tokens > max_context:
                progress.note(f"golden {case['name']}: left out ({len(ids)} prompt tokens + {new_tokens} do not "
                              f"fit the context of {max_context})")
                skipped.append(case["name"])
                continue
            floats = [normalize(p, checkpoint.image) if k == "image" else normalize_frames(p, checkpoint.video)
                      for p, k in zip(pixels, kinds)]
            kwargs = {}
            if floats:
                kwargs["pixel_values"] = torch.from_numpy(np.concatenate(floats))[None]
            with torch.no_grad():
                out = vlm.generate(input_ids=torch.tensor([ids]),
                                   attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                   max_new_tokens=new_tokens, do_sample=False, eos_token_id=sorted(stops),
                                   pad_token_id=sorted(stops)[0], **kwargs)
            tokens = cut_at_stop([int(t) for t in out[0, len(ids):]], stops)
            total = sum(len(p) for p in pixels)
            wanted = sorted({0, total - 1}) if total else []
            if wanted:
                all_floats = np.concatenate(floats)
                features[case["name"]] = torch_features(towers.tower, all_floats[wanted]).astype(np.float16)
            written.append(GoldenCase(case["name"], case["messages"], [int(i) for i in ids], tokens, wanted, total))
            progress.note(f"golden {case['name']}: {len(ids)} prompt tokens, {total} tiles, {len(tokens)} tokens")
    finally:
        del vlm
    reference = f"{checkpoint.model_id} float32, transformers {tf.__version__} greedy"
    section = Goldens(bundle, new_tokens, reference, written, features, inputs).write()
    size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    return section, {"cases": [c.name for c in written], "left_out": skipped, "new_tokens": new_tokens,
                     "reference": reference, "bytes": size}


def verify_staged(stage: Path, manifest: Manifest) -> dict:
    """The host-engine verify result of a bundle being written (its host-preview files present), for
    report.json; a skip with the reason otherwise. Writes a provisional manifest that the commit replaces."""
    import json

    from rksmolvlm.bundle import MANIFEST
    from rksmolvlm.bundle.staging import stamped

    if manifest.goldens is None:
        return {"skipped": "no golden answers were recorded (both parts are needed)"}
    if manifest.vision is None or manifest.vision.onnx is None or manifest.llm is None or \
            manifest.llm.decoder_dir is None:
        return {"skipped": "the bundle has no host-preview files (convert with --host-preview); run "
                           "'rksmolvlm verify BUNDLE --engine npu' on the board"}
    provisional = stamped(manifest, stage)
    (stage / MANIFEST).write_text(json.dumps(provisional.to_dict()), encoding="utf-8")
    from rksmolvlm.runtime.loader import RuntimeBundle
    from rksmolvlm.tools.verify import open_verify_runner, verify_bundle

    from rksmolvlm.errors import RkSmolVLMError

    try:  # a conversion is not lost to its own check: a failure to run is reported, not raised
        bundle = RuntimeBundle.open(stage, verify=False)
        runner = open_verify_runner(bundle, "host")
        try:
            result = verify_bundle(runner, "host")
        finally:
            runner.close()
    except RkSmolVLMError as exc:
        return {"skipped": f"the host engines could not replay the goldens: {exc}"}
    out = result.to_dict()
    out["bundle"] = "."
    return out

#!/usr/bin/env python3
"""Goldens for the SmolVLM2 video parity tests (tests/processing/test_video_parity.py): what transformers' own
``SmolVLMProcessor`` makes of the test clips in ``tests/data/video/``.

Run it in the reference venv (torch, torchvision >= 0.27 for the uint8 Lanczos transformers uses,
torchcodec — transformers' default video backend — transformers, num2words, av), never from the test
suite::

    /tmp/ref-venv/bin/python scripts/make_video_goldens.py [--out tests/data/video/processor_goldens.json]

It builds the tiny "smolvlm2" checkpoint (convert/tiny_checkpoint.py, loaded by file path; seed 0),
loads ``AutoProcessor`` from it and runs ``apply_chat_template(..., tokenize=True, return_dict=True)``
on a set of conversations. Recorded per case: the rendered prompt, input_ids, and per video the
metadata transformers read (backend, frame count, fps, duration), the sampled frame indices and
timestamps, the sha256 of each decoded frame (RGB, HWC), of each frame's pixel_values (float32 bytes)
and of the uint8 frame they normalise (HWC, the resize output) — the last three localise a mismatch
to decoding, resizing or normalisation. Conversations where transformers is not self-consistent (two
videos; a video and an image) also get a per-part reference: the prompt built from each video's and
each image's own expansion, as the runtime builds it. Finally the pixel values of two clips at the
real SmolVLM2-256M/500M video settings (stage 1 longest edge 2048, frames 512x512).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import re
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
CLIPS_DIR = ROOT / "tests" / "data" / "video"
DEFAULT_OUT = CLIPS_DIR / "processor_goldens.json"

MAIN = "h264_24fps_96x64.mp4"  # the clip the conversation variants use
SECOND = "h264_portrait_48x96.mp4"  # the other video of the two-video conversation (fewer frames than MAIN)
LONG = "h264_70s_25fps_64x48.mp4"  # long enough for max_frames and skip_secs to matter
REAL_CLIPS = ["h264_29.97fps_96x64.mp4", "h264_portrait_48x96.mp4"]
# SmolVLM2-256M/500M-Video-Instruct's video processor (preprocessor_config.json on the hub).
REAL_SETTINGS = {"size": {"longest_edge": 2048}, "max_image_size": {"longest_edge": 512},
                 "video_sampling": {"fps": 1, "max_frames": 64, "video_size": {"longest_edge": 512}}}
IMAGE = {"width": 150, "height": 100, "seed": 3}  # the image of the video+image conversation
ASK = "What happens in this video?"


def good_clips() -> list[str]:
    """The decodable clips scripts/make_test_videos.py makes (tests/data/video/README.md)."""
    module = _load("make_test_videos", ROOT / "scripts" / "make_test_videos.py")
    return [*module.GOOD, *module.ROTATED]


def synthetic_image(width: int, height: int, seed: int) -> np.ndarray:
    """A deterministic RGB uint8 picture (gradients plus noise); tests/support/video_board_path.py draws the
    same one and checks its sha256."""
    rng = np.random.RandomState(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 // max(width - 1, 1), y * 255 // max(height - 1, 1), (x * y) % 256], -1)
    return ((base + rng.randint(0, 40, base.shape)) % 256).astype(np.uint8)


def sha256(data) -> str:
    return hashlib.sha256(data if isinstance(data, bytes) else np.ascontiguousarray(data).tobytes()).hexdigest()


def video(clip: str) -> dict:
    return {"type": "video", "clip": clip}


def text(t: str) -> dict:
    return {"type": "text", "text": t}


def user(*parts) -> dict:
    return {"role": "user", "content": list(parts)}


def cases() -> list[dict]:
    """Name, messages and per-request sampling of every golden case. ``sampling`` holds transformers'
    apply_chat_template kwargs num_frames (the runtime's max_frames) and fps."""
    out = [{"name": f"plain/{clip}", "messages": [user(video(clip), text(ASK))], "sampling": {}}
           for clip in good_clips()]
    out += [
        {"name": "text_around", "messages": [user(text("Watch this clip:"), video(MAIN), text("What moved?"))],
         "sampling": {}},
        {"name": "system", "messages": [{"role": "system", "content": [text("You are a careful video analyst.")]},
                                        user(video(MAIN), text("Summarise the clip."))], "sampling": {}},
        {"name": "multi_turn", "messages": [user(video(MAIN), text(ASK)),
                                            {"role": "assistant", "content": [text("A chart slides to the left.")]},
                                            user(text("And at the end?"))], "sampling": {}},
        {"name": "num_frames_8", "messages": [user(video(LONG), text(ASK))], "sampling": {"num_frames": 8}},
        {"name": "num_frames_2", "messages": [user(video(MAIN), text(ASK))], "sampling": {"num_frames": 2}},
        {"name": "fps_2", "messages": [user(video(MAIN), text(ASK))], "sampling": {"fps": 2}},
        {"name": "fps_2_long", "messages": [user(video(LONG), text(ASK))], "sampling": {"fps": 2}},
        {"name": "two_videos", "messages": [user(video(MAIN), text(" and "), video(SECOND), text("Compare them."))],
         "sampling": {}},
        {"name": "video_image", "messages": [user(video(MAIN), text("Is this picture in the clip?"),
                                                  {"type": "image", "image": "synthetic"})], "sampling": {}},
    ]
    return out


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


class Recorder:
    """Wraps transformers' load_video to keep each decoded video's source, frames and metadata."""

    def __init__(self):
        import transformers.video_processing_utils as vpu

        self.loads: list[tuple] = []
        original = vpu.load_video

        def load_video(*args, **kwargs):
            frames, metadata = original(*args, **kwargs)
            self.loads.append((args[0] if args else kwargs.get("video"), frames, metadata))
            return frames, metadata

        vpu.load_video = load_video


def hwc_uint8(frames) -> np.ndarray:
    """Decoded frames as (n, H, W, 3) uint8, whatever layout the backend returned."""
    array = frames.numpy() if hasattr(frames, "numpy") else np.asarray(frames)
    if array.shape[-1] != 3 and array.shape[1] == 3:
        array = array.transpose(0, 2, 3, 1)
    assert array.dtype == np.uint8, array.dtype
    return np.ascontiguousarray(array)


def frames_record(pixel_values: np.ndarray, normalize) -> dict:
    """Hashes of one video's pixel values ((frames, 3, S, S) float32), whole and per frame, and of the
    uint8 frames they normalise (checked by normalising them again with transformers' own code)."""
    frames_u8 = np.clip(np.rint(pixel_values.astype(np.float64) * 127.5 + 127.5), 0, 255).astype(np.uint8)
    again = normalize(frames_u8)
    assert again.tobytes() == pixel_values.tobytes(), "pixel values are not an exact normalisation of uint8 frames"
    return {"pixel_sha256": sha256(pixel_values),
            "frame_sha256": [sha256(f) for f in pixel_values],
            "frame_u8_sha256": [sha256(f.transpose(1, 2, 0)) for f in frames_u8]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()

    try:
        import torchcodec
    except ImportError as exc:  # transformers would silently fall back to another backend
        sys.exit(f"torchcodec is not importable in this venv ({exc}): install it (and FFmpeg's libraries) first")
    import PIL.Image
    import torch
    import torchvision
    import transformers as tf
    from transformers.models.smolvlm.processing_smolvlm import DEFAULT_CHAT_TEMPLATE, get_image_prompt_string

    recorder = Recorder()
    tiny = _load("tiny_checkpoint", ROOT / "convert" / "tiny_checkpoint.py")
    work = Path(tempfile.mkdtemp(prefix="video-goldens-"))
    try:
        checkpoint = tiny.build_tiny_checkpoint("smolvlm2", work / "smolvlm2", seed=0)
        processor = tf.AutoProcessor.from_pretrained(checkpoint)
        vp = processor.video_processor
        image = synthetic_image(**IMAGE)

        def normalize(frames_u8: np.ndarray, processor_=vp) -> np.ndarray:
            """transformers' own fused rescale + normalise of uint8 (n, 3, S, S) frames."""
            x = torch.from_numpy(np.ascontiguousarray(frames_u8))
            return processor_.rescale_and_normalize(x, True, processor_.rescale_factor, True, processor_.image_mean,
                                                    processor_.image_std).numpy()

        def hf_messages(messages: list[dict]) -> list[dict]:
            out = []
            for m in messages:
                content = []
                for p in m["content"]:
                    if p["type"] == "video":
                        content.append({"type": "video", "path": str(CLIPS_DIR / p["clip"])})
                    elif p["type"] == "image":
                        content.append({"type": "image", "image": PIL.Image.fromarray(image)})
                    else:
                        content.append(p)
                out.append({"role": m["role"], "content": content})
            return out

        def video_expansion(clip: str, sampling: dict) -> str:
            """transformers' expansion of one video processed on its own."""
            single = vp(videos=[str(CLIPS_DIR / clip)], do_sample_frames=True, return_metadata=True,
                        return_tensors="pt", **sampling)
            return processor.replace_video_token(single, 0)

        def image_expansion() -> tuple[str, dict]:
            """transformers' expansion of the image processed on its own, and its tiles' hashes (the
            PIL backend the checkpoint's image processor class names, and the torchvision one)."""
            fast = processor.image_processor(images=[[PIL.Image.fromarray(image)]], return_row_col_info=True,
                                             return_tensors="np")
            rows, cols = int(fast["rows"][0][0]), int(fast["cols"][0][0])
            pil = tf.SmolVLMImageProcessorPil.from_pretrained(checkpoint)(
                images=[[PIL.Image.fromarray(image)]], return_row_col_info=True, return_tensors="np")
            assert (int(pil["rows"][0][0]), int(pil["cols"][0][0])) == (rows, cols)
            record = {"rows": rows, "cols": cols,
                      "tile_sha256": [sha256(t.astype(np.float32)) for t in pil["pixel_values"][0]],
                      "tile_sha256_torchvision": [sha256(t.astype(np.float32)) for t in fast["pixel_values"][0]]}
            return get_image_prompt_string(rows, cols, processor.image_seq_len, processor.fake_image_token,
                                           processor.image_token, processor.global_image_token), record

        def per_part_ids(hf_conv: list[dict], messages: list[dict], sampling: dict) -> list[int]:
            """The prompt with every video and image expanded on its own (the runtime's rule)."""
            rendered = processor.apply_chat_template(hf_conv, add_generation_prompt=True, tokenize=False)
            media = [p for m in messages for p in m["content"] if p["type"] in ("video", "image")]
            out, k = [], 0
            for piece in re.split(r"(<video>|<image>)", rendered):
                if piece in ("<video>", "<image>"):
                    part = media[k]
                    k += 1
                    out.append(video_expansion(part["clip"], sampling) if piece == "<video>" else image_expansion()[0])
                else:
                    out.append(piece)
            assert k == len(media)
            return processor.tokenizer("".join(out), add_special_tokens=False)["input_ids"]

        clip_info = {}
        golden_cases = []
        for case in cases():
            hf_conv = hf_messages(case["messages"])
            rendered = processor.apply_chat_template(hf_conv, add_generation_prompt=True, tokenize=False)
            recorder.loads.clear()
            out = processor.apply_chat_template(hf_conv, add_generation_prompt=True, tokenize=True, return_dict=True,
                                                return_tensors="pt", **case["sampling"])
            ids = out["input_ids"][0].tolist()
            pixel_values = out["pixel_values"].numpy()
            mask = out["pixel_attention_mask"].numpy()
            clips = [p["clip"] for m in case["messages"] for p in m["content"] if p["type"] == "video"]
            assert len(recorder.loads) == len(clips), (case["name"], len(recorder.loads))
            record = {"name": case["name"], "messages": case["messages"], "sampling": case["sampling"],
                      "rendered": rendered, "input_ids": ids, "pixel_values_shape": list(pixel_values.shape),
                      "videos": []}
            announced = re.findall(r"series of ([a-z\- ,]+) frames from a (\d+:\d\d:\d\d)",
                                   processor.tokenizer.decode(ids))
            for v, (clip, (source, frames, metadata)) in enumerate(zip(clips, recorder.loads)):
                assert Path(source).name == clip and metadata.video_backend == "torchcodec", metadata
                indices = [int(i) for i in metadata.frames_indices]
                decoded = hwc_uint8(frames)
                n = len(indices)
                assert len(decoded) == n
                info = {"total_num_frames": int(metadata.total_num_frames), "fps": float(metadata.fps),
                        "duration": float(metadata.duration), "width": int(metadata.width),
                        "height": int(metadata.height), "backend": metadata.video_backend}
                clip_info.setdefault(clip, {"sha256": sha256((CLIPS_DIR / clip).read_bytes()), **info})
                assert clip_info[clip] == {"sha256": clip_info[clip]["sha256"], **info}
                record["videos"].append({
                    "clip": clip, "indices": indices, "timestamps": [float(t) for t in metadata.timestamps],
                    "announced": list(announced[v]) if v < len(announced) else None,
                    "decoded_sha256": [sha256(f) for f in decoded],
                    "pixel_attention_mask_all_ones": bool(mask[v, :n].all()),
                    **frames_record(pixel_values[v, :n], normalize)})
            if case["name"] in ("two_videos", "video_image"):
                # transformers' own ids stay on record (DESIGN.md §8); the tests check the per-part reference
                record["reference_ids"] = per_part_ids(hf_conv, case["messages"], case["sampling"])
                record["transformers_differs"] = record["reference_ids"] != ids
                if case["name"] == "video_image":
                    _, record["image"] = image_expansion()
                    record["image"].update(IMAGE, rgb_sha256=sha256(image))
                    # transformers' pixel_values hold the video's frames only: the image's tiles are gone
                    record["transformers_pixel_values_are_the_videos"] = bool(
                        pixel_values.shape[:2] == (1, len(record["videos"][0]["indices"]))
                        and sha256(pixel_values[0]) == record["videos"][0]["pixel_sha256"])
            else:  # the per-part construction is transformers' own where transformers is consistent
                assert per_part_ids(hf_conv, case["messages"], case["sampling"]) == ids, case["name"]
            golden_cases.append(record)
            print(f"{case['name']}: {len(ids)} ids, pixel_values {tuple(pixel_values.shape)}", flush=True)

        # The real 256M/500M video settings on a copy of the tiny processor (only the video processor matters).
        real_dir = work / "real"
        shutil.copytree(checkpoint, real_dir)
        pre = json.loads((real_dir / "preprocessor_config.json").read_text())
        pre.update(REAL_SETTINGS)
        (real_dir / "preprocessor_config.json").write_text(json.dumps(pre, indent=2))
        real = tf.AutoProcessor.from_pretrained(real_dir).video_processor
        assert (real.size["longest_edge"], real.max_image_size["longest_edge"], real.fps, real.num_frames) == \
            (2048, 512, 1, 64), (real.size, real.max_image_size, real.fps, real.num_frames)
        real_records = {}
        for clip in REAL_CLIPS:
            processed = real(videos=[str(CLIPS_DIR / clip)], do_sample_frames=True, return_metadata=True,
                             return_tensors="pt")
            metadata = processed["video_metadata"][0]
            assert metadata.video_backend == "torchcodec", metadata
            pixel_values = processed["pixel_values"][0].numpy()
            real_records[clip] = {"indices": [int(i) for i in metadata.frames_indices],
                                  "timestamps": [float(t) for t in metadata.timestamps],
                                  "pixel_values_shape": list(pixel_values.shape),
                                  **frames_record(pixel_values, lambda f: normalize(f, real))}
            print(f"real settings {clip}: pixel_values {tuple(pixel_values.shape)}", flush=True)

        goldens = {
            "generated_by": "scripts/make_video_goldens.py",
            "versions": {"torch": torch.__version__, "torchvision": torchvision.__version__,
                         "transformers": tf.__version__, "torchcodec": torchcodec.__version__},
            "checkpoint": {"name": "smolvlm2", "seed": 0,
                           "tokenizer_sha256": sha256((checkpoint / "tokenizer.json").read_bytes()),
                           "model_sha256": sha256((checkpoint / "model.safetensors").read_bytes())},
            "video_processor": {"size": vp.size["longest_edge"], "max_image_size": vp.max_image_size["longest_edge"],
                                "fps": vp.fps, "num_frames": vp.num_frames, "resample": int(vp.resample),
                                "image_mean": list(vp.image_mean), "image_std": list(vp.image_std),
                                "rescale_factor": vp.rescale_factor, "image_seq_len": processor.image_seq_len},
            "chat_template": DEFAULT_CHAT_TEMPLATE,
            "clips": clip_info,
            "cases": golden_cases,
            "real_settings": {"settings": REAL_SETTINGS, "clips": real_records},
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)
    args.out.write_text(json.dumps(goldens, indent=1) + "\n")
    print(f"wrote {args.out} ({args.out.stat().st_size // 1024} KB)")


if __name__ == "__main__":
    main()

"""The decoder's calibration set: shipped multimodal chats rendered exactly as the runtime renders
them, in the dataset format of the installed rkllm-toolkit.

Each sample is rendered with the checkpoint's chat template, its images are tiled and expanded into
image tokens like the runtime does, and — for the embedding formats — the image rows carry the real
tower + connector features, so the image-token activations are covered by calibration. The answer
(and ``<end_of_utterance>``) follow the prompt so generated-token activations are covered too.

Video samples (SmolVLM2 checkpoints) go the runtime's way as well: the clip is probed, its frames are
sampled at the checkpoint's fps with at most the board's default frame count, decoded, resized in
transformers' two stages and encoded as unsplit tiles; the assembler writes the intro, the frame
timestamps and one image block per frame. Checkpoints without video skip those samples.

Formats: ``text`` ``[{"input", "target"}]``; ``embed`` (toolkit 1.1–1.2.x)
``[{"input_embed": [[[…]]], "target"}]`` with shape [1, seq, hidden]; ``multimodal`` (1.3.0) an index
``[{"sample": "llm_inputs/sample_N", "token_nums": N}]`` beside one pickle per sample holding the
decoder's forward kwargs (``inputs_embeds`` [1, N, hidden], ``attention_mask``, ``position_ids``).
"""

from __future__ import annotations

import json
import pickle
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import resources
from itertools import pairwise
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from rksmolvlm.errors import CalibrationError
from rksmolvlm.processing.assembler import Assembler, Layout, Prompt, TextChunk, VideoLayout
from rksmolvlm.processing.content import ImagePart, Message, VideoPart, conversation, media_parts
from rksmolvlm.processing.embed import EmbeddingTable
from rksmolvlm.processing.image import ImageSettings, Resolution, load_image, tile_image

if TYPE_CHECKING:
    from rksmolvlm.processing.video_frames import VideoSettings

__all__ = ["CALIBRATION_MAX_FRAMES", "DecoderSample", "RenderedSample", "RenderedSet", "load_samples",
           "render_samples", "shipped_prompts_file", "shipped_videos_dir", "write_dataset"]

FeatureFn = Callable[[np.ndarray], np.ndarray]  # uint8 NHWC tiles → (tiles, seq, hidden) float32

# The most frames a calibration video gets: the runtime's default (runtime/video.py
# DEFAULT_BOARD_MAX_FRAMES), so calibration sees the prompts the board builds unless a request asks otherwise.
CALIBRATION_MAX_FRAMES = 16


@dataclass
class DecoderSample:
    id: str
    kind: str
    messages: list[dict]
    answer: str

    def conversation(self, images_dir: Path, videos_dir: Path | None = None) -> list[Message]:
        """The chat as typed messages, image names resolved under ``images_dir`` and video names
        under ``videos_dir`` (default: the shipped videos)."""
        videos_dir = shipped_videos_dir() if videos_dir is None else Path(videos_dir)
        return conversation(_resolved(self.messages, {"image": Path(images_dir), "video": videos_dir}))

    def image_names(self) -> list[str]:
        return [Path(p.source).name for p in media_parts(self.conversation(Path(), Path()))
                if isinstance(p, ImagePart)]

    def video_names(self) -> list[str]:
        return [Path(p.source).name for p in media_parts(self.conversation(Path(), Path()))
                if isinstance(p, VideoPart)]


def _resolved(messages: list, folders: dict[str, Path]) -> list:
    """The messages with each image or video name (under the part's own type key) made a path in the
    folder for that type; anything else is left for ``conversation`` to check."""
    def part(p):
        kind = p.get("type") if isinstance(p, dict) else None
        if isinstance(kind, str) and kind in folders and isinstance(p.get(kind), str):
            return {**p, kind: str(folders[kind] / p[kind])}
        return p

    return [{**m, "content": [part(p) for p in m["content"]]}
            if isinstance(m, dict) and isinstance(m.get("content"), list) else m for m in messages]


@dataclass
class RenderedSample:
    id: str
    prompt_text: str  # chat template output with images and videos expanded
    answer: str
    ids: list[int]  # prompt + answer + end of utterance
    prompt_len: int
    embeddings: np.ndarray | None  # float32 (len(ids), hidden)


class RenderedSet(list):
    """The rendered samples (a list of RenderedSample) and the ids of the samples left out."""

    def __init__(self, rendered=(), skipped_over_context=(), skipped_no_video=()):
        super().__init__(rendered)
        self.skipped_over_context: list[str] = list(skipped_over_context)  # longer than max_tokens
        self.skipped_no_video: list[str] = list(skipped_no_video)  # a video, for a model without video


def shipped_prompts_file() -> Path:
    return Path(str(resources.files(__package__) / "prompts.json"))


def shipped_videos_dir() -> Path:
    """The calibration clips shipped with rksmolvlm (see calibration/LICENSES.md)."""
    return Path(str(resources.files(__package__) / "videos"))


def load_samples(path: Path | None = None) -> list[DecoderSample]:
    path = path or shipped_prompts_file()
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        samples = [DecoderSample(s["id"], s["kind"], s["messages"], s["answer"]) for s in data["samples"]]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CalibrationError(f"cannot read the decoder calibration prompts {path} ({exc}): it must be JSON "
                               '{"samples": [{"id", "kind", "messages", "answer"}]}') from exc
    if not samples:
        raise CalibrationError(f"{path} has no samples")
    return samples


def render_samples(samples: Sequence[DecoderSample], images_dir: Path, assembler: Assembler,
                   settings: ImageSettings, table: EmbeddingTable | None = None,
                   features: FeatureFn | None = None, max_tokens: int | None = None, *,
                   video: VideoSettings | None = None, videos_dir: Path | None = None,
                   max_frames: int = CALIBRATION_MAX_FRAMES, resolution: Resolution | None = None,
                   on_sample: Callable[[int, int], None] | None = None) -> RenderedSet:
    """Render every sample with the runtime's assembler; with ``table`` and ``features`` also build
    its decoder input embeddings. ``video`` is the checkpoint's video settings (None: the model takes
    no video, and samples with a video are skipped); videos are sampled at their part's fps, else the
    checkpoint's, with at most their part's max_frames, else ``max_frames``, and never more than the
    checkpoint's. Samples longer than ``max_tokens`` are skipped (they could never run on the board
    either). The result lists what was skipped. ``on_sample(done, total)`` is called after each
    sample (progress). ``features`` is called once per sample that shows media: give it a cache (the
    converter's TowerCache) so an image shown in several chats is encoded once. ``resolution``
    renders every image at that budget (the one a service will run with: images.max_tiles, …)
    instead of the checkpoint's full split, exactly as the runtime tiles it."""
    if video is not None and assembler.video_template is None:
        raise CalibrationError("internal: video settings given with an assembler that has no video chat template")
    if max_frames < 1:
        raise CalibrationError(f"max_frames {max_frames} must be at least 1")
    out = RenderedSet()
    eou = assembler.tokens.end_of_utterance
    for done, sample in enumerate(samples, 1):
        if on_sample is not None and done > 1:
            on_sample(done - 1, len(samples))
        messages = sample.conversation(images_dir, videos_dir)
        media = media_parts(messages)
        if video is None and any(isinstance(p, VideoPart) for p in media):
            out.skipped_no_video.append(sample.id)
            continue
        pixels, layouts = [], []  # per media part: uint8 tiles or frames, and its layout
        for part in media:
            if isinstance(part, ImagePart):
                tiled = _tiled(sample, part, settings, resolution)
                pixels.append(tiled.tiles)
                layouts.append(Layout(tiled.rows, tiled.cols))
            else:
                frames, layout = _video_frames(sample, part, video, max_frames)
                pixels.append(frames)
                layouts.append(layout)
        prompt = assembler.assemble(messages, layouts)
        # the answer as the model writes it: after "Assistant:", then its end of utterance
        answer_ids = assembler.tokenizer.encode_trusted(sample.answer + eou)
        ids = prompt.ids + answer_ids
        if max_tokens is not None and len(ids) > max_tokens:
            out.skipped_over_context.append(sample.id)
            continue
        embeddings = None
        if table is not None:  # one tower pass for all tiles and frames, split back per image and video
            computed = features(np.concatenate(pixels)) if pixels else None
            bounds = np.cumsum([0] + [len(p) for p in pixels])
            per_media = [computed[a:b] for a, b in pairwise(bounds)]
            whole = Prompt([*prompt.chunks, TextChunk(tuple(answer_ids))], prompt.text)
            embeddings = assembler.embed(whole, table, per_media)
        out.append(RenderedSample(sample.id, assembler.expanded_text(prompt), sample.answer, ids, len(prompt.ids),
                                  embeddings))
    if on_sample is not None and samples:
        on_sample(len(samples), len(samples))
    if not out:
        if out.skipped_no_video and not out.skipped_over_context:
            raise CalibrationError("every decoder calibration sample has a video and this model takes no video: add "
                                   "samples with images or text")
        raise CalibrationError("no decoder calibration sample fits the context: raise --max-context")
    return out


def _tiled(sample: DecoderSample, part: ImagePart, settings: ImageSettings, resolution: Resolution | None):
    try:
        image = load_image(part.source)
        if resolution is not None:
            settings = resolution.settings(settings, image.size)
        return tile_image(image, settings)
    except Exception as exc:
        raise CalibrationError(f"calibration sample {sample.id!r}: image {part.source} cannot be used "
                               f"({exc})") from exc


def _video_frames(sample: DecoderSample, part: VideoPart, settings: VideoSettings,
                  max_frames: int) -> tuple[np.ndarray, VideoLayout]:
    """The runtime's frame pipeline: probe, sample, decode the sampled frames, resize them to unsplit
    tiles; with the layout the assembler announces them with."""
    from rksmolvlm.processing.video import VideoLimits, probe_video, read_frames
    from rksmolvlm.processing.video_frames import frame_timestamps, resize_frames, sample_indices

    fps = part.fps or settings.fps
    limit = min(part.max_frames or max_frames, settings.max_frames)
    try:
        limits = VideoLimits()
        info = probe_video(part.source, limits)
        indices = sample_indices(info.total_num_frames, info.duration, info.fps, fps, limit, settings.skip_secs)
        frames = resize_frames(read_frames(part.source, [int(i) for i in indices], limits), settings)
    except Exception as exc:
        raise CalibrationError(f"calibration sample {sample.id!r}: video {part.source} cannot be used "
                               f"({exc})") from exc
    timestamps = tuple(float(t) for t in frame_timestamps(indices, info.fps))
    return frames, VideoLayout(timestamps, float(info.duration))


def write_dataset(rendered: Sequence[RenderedSample], fmt: str, directory: Path) -> Path:
    """Write the toolkit dataset in ``fmt`` under ``directory``; return the file to pass as
    ``build(dataset=…)``."""
    directory.mkdir(parents=True, exist_ok=True)
    if fmt == "text":
        records = [{"input": r.prompt_text, "target": r.answer} for r in rendered]
        path = directory / "dataset_text.json"
    elif fmt == "embed":
        records = [{"input_embed": r.embeddings[None].astype(np.float16).astype(np.float32).tolist(),
                    "target": r.answer} for r in _embedded(rendered)]
        path = directory / "dataset_embed.json"
    elif fmt == "multimodal":
        import torch

        records = []
        (directory / "llm_inputs").mkdir(exist_ok=True)
        for i, r in enumerate(_embedded(rendered)):
            n = len(r.ids)
            kwargs = {"inputs_embeds": torch.from_numpy(r.embeddings[None].copy()),
                      "attention_mask": torch.ones(1, n, dtype=torch.long),
                      "position_ids": torch.arange(n, dtype=torch.long)[None]}
            with open(directory / "llm_inputs" / f"sample_{i}", "wb") as f:
                pickle.dump(kwargs, f)
            records.append({"sample": f"llm_inputs/sample_{i}", "token_nums": n})
        path = directory / "llm_inputs.json"
    else:
        raise CalibrationError(f"unknown dataset format {fmt!r}: choose text, embed or multimodal")
    path.write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")
    return path


def _embedded(rendered: Sequence[RenderedSample]) -> Sequence[RenderedSample]:
    if any(r.embeddings is None for r in rendered):
        raise CalibrationError("internal: embedding formats need rendered embeddings")
    return rendered

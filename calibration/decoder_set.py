"""The decoder's calibration set: shipped multimodal chats rendered exactly as the runtime renders
them, in the dataset format of the installed rkllm-toolkit.

Each sample is rendered with the checkpoint's chat template, its images are tiled and expanded into
image tokens like the runtime does, and — for the embedding formats — the image rows carry the real
tower + connector features, so the image-token activations are covered by calibration. The answer
(and ``<end_of_utterance>``) follow the prompt so generated-token activations are covered too.

Formats: ``text`` ``[{"input", "target"}]``; ``embed`` (toolkit 1.1–1.2.x)
``[{"input_embed": [[[…]]], "target"}]`` with shape [1, seq, hidden]; ``multimodal`` (1.3.0) an index
``[{"sample": "llm_inputs/sample_N", "token_nums": N}]`` beside one pickle per sample holding the
decoder's forward kwargs (``inputs_embeds`` [1, N, hidden], ``attention_mask``, ``position_ids``).
"""

from __future__ import annotations

import json
import pickle
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from rksmolvlm.errors import CalibrationError
from rksmolvlm.processing.assembler import Assembler, Layout, Prompt, TextChunk
from rksmolvlm.processing.content import Message, conversation, image_parts
from rksmolvlm.processing.embed import EmbeddingTable
from rksmolvlm.processing.image import ImageSettings, preprocess

__all__ = ["DecoderSample", "RenderedSample", "load_samples", "shipped_prompts_file", "render_samples",
           "write_dataset"]

FeatureFn = Callable[[np.ndarray], np.ndarray]  # uint8 NHWC tiles → (tiles, seq, hidden) float32


@dataclass
class DecoderSample:
    id: str
    kind: str
    messages: list[dict]
    answer: str

    def conversation(self, images_dir: Path) -> list[Message]:
        """The chat as typed messages, image names resolved under ``images_dir``."""
        return conversation(self.messages, resolve=lambda name: images_dir / name)

    def image_names(self) -> list[str]:
        return [Path(part.source).name for part in image_parts(self.conversation(Path()))]


@dataclass
class RenderedSample:
    id: str
    prompt_text: str  # chat template output with images expanded
    answer: str
    ids: list[int]  # prompt + answer + end of utterance
    prompt_len: int
    embeddings: np.ndarray | None  # float32 (len(ids), hidden)


def shipped_prompts_file() -> Path:
    return Path(str(resources.files(__package__) / "prompts.json"))


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
                   features: FeatureFn | None = None, max_tokens: int | None = None) -> list[RenderedSample]:
    """Render every sample with the runtime's assembler; with ``table`` and ``features`` also build
    its decoder input embeddings. Samples longer than ``max_tokens`` are skipped (they could never
    run on the board either)."""
    out = []
    eou = assembler.tokens.end_of_utterance
    for sample in samples:
        messages = sample.conversation(images_dir)
        tiled = []
        for part in image_parts(messages):
            try:
                tiled.append(preprocess(part.source, settings))
            except Exception as exc:
                raise CalibrationError(f"calibration sample {sample.id!r}: image {part.source} cannot be used "
                                       f"({exc})") from exc
        prompt = assembler.assemble(messages, [Layout(t.rows, t.cols) for t in tiled])
        # the answer as the model writes it: after "Assistant:", then its end of utterance
        answer_ids = assembler.tokenizer.encode_trusted(sample.answer + eou)
        ids = prompt.ids + answer_ids
        if max_tokens is not None and len(ids) > max_tokens:
            continue
        embeddings = None
        if table is not None:  # one tower pass for all tiles, split back per image
            computed = features(np.concatenate([t.tiles for t in tiled])) if tiled else None
            bounds = np.cumsum([0] + [len(t.tiles) for t in tiled])
            per_image = [computed[a:b] for a, b in zip(bounds[:-1], bounds[1:])]
            whole = Prompt([*prompt.chunks, TextChunk(tuple(answer_ids))], prompt.text)
            embeddings = assembler.embed(whole, table, per_image)
        out.append(RenderedSample(sample.id, assembler.expanded_text(prompt), sample.answer, ids, len(prompt.ids),
                                  embeddings))
    if not out:
        raise CalibrationError("no decoder calibration sample fits the context: raise --max-context")
    return out


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

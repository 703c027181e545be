"""The demo model: a tiny SmolVLM trained offline on the shipped calibration images, so that its answers
are short, readable and depend on the image ("What is on the table?" → "A coffee cup." for the coffee
photo, "There is no table." for the cat).

Geometry and token layout are those of the tiny ``idefics3-256m`` checkpoint (SmolVLM-256M token layout,
the real 49,280-id vocabulary, SigLIP-B/16 patches with scale factor 4) with a 256-pixel longest edge, so
an image is at most 2×2 tiles of 128 px plus the global tile, 4 image tokens each. Both model classes
are built from the same weights (Idefics3 and SmolVLM share every tensor name).

The weights are committed once (``demo_weights/``, float16): every tensor of the tower, connector and
decoder, and of the embedding and LM-head tables only the rows of the tokens the Q&A set uses; all other
rows are zero, so an untrained token's logit is exactly 0 and never wins. ``train_demo_weights`` is the
seeded, CPU, deterministic training that made them (``scripts/train_demo_model.py``): the training
inputs are transformers' own processor outputs (its pixel values and prompt ids, which the runtime's
processing equals token for token), the loss is the full-vocabulary cross-entropy of the answer tokens.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from rksmolvlm.convert.tiny_checkpoint import TINY_SPECS, TinySpec, build_tiny_checkpoint
from rksmolvlm.errors import RkSmolVLMError

__all__ = ["DEMO_FAMILIES", "DEMO_SPECS", "DEMO_QA_FILE", "DEMO_WEIGHTS_FILE", "QA", "DemoQA", "load_demo_qa",
           "load_demo_weights", "save_demo_weights", "train_demo_weights", "build_demo_checkpoint",
           "demo_spec", "DemoWeightsError", "transformers_answers"]

_HERE = Path(__file__).resolve().parent
DEMO_QA_FILE = _HERE / "demo_qa.json"
DEMO_WEIGHTS_FILE = _HERE / "demo_weights" / "demo-smolvlm-256m.npz"
DEMO_FAMILIES = ("idefics3", "smolvlm")
_BASE = dataclasses.replace(TINY_SPECS["idefics3-256m"], name="demo-idefics3", longest_edge=256)
DEMO_SPECS: dict[str, TinySpec] = {
    "idefics3": _BASE,
    "smolvlm": dataclasses.replace(_BASE, name="demo-smolvlm", family="smolvlm"),
}
_EMBED, _HEAD = "model.text_model.embed_tokens.weight", "lm_head.weight"
# Extra arrays of the weights file: which rows of the two big tables are stored, and their tokens
# (checked against the tokenizer, so a changed tokenizer cannot silently scramble the answers).
_ROW_KEYS = ("rows.embed.ids", "rows.embed.values", "rows.embed.tokens",
             "rows.head.ids", "rows.head.values", "rows.head.tokens")


class DemoWeightsError(RkSmolVLMError):
    """The committed demo weights are missing or do not fit this tokenizer."""


@dataclass(frozen=True)
class QA:
    """One training/demo item: the images (shipped file names, in order), the question, the answer."""

    images: tuple[str, ...]
    question: str
    answer: str


@dataclass(frozen=True)
class DemoQA:
    items: tuple[QA, ...]
    demo_question: str
    demo_images: tuple[str, ...]

    def answer(self, images: tuple[str, ...], question: str) -> str:
        for item in self.items:
            if item.images == tuple(images) and item.question == question:
                return item.answer
        raise KeyError((images, question))


def demo_spec(family: str) -> TinySpec:
    if family not in DEMO_SPECS:
        raise RkSmolVLMError(f"unknown demo model family {family!r}: choose {' or '.join(DEMO_FAMILIES)}")
    return DEMO_SPECS[family]


def load_demo_qa(path: Path = DEMO_QA_FILE) -> DemoQA:
    """The Q&A set: every question of a group asked of every image, plus the extra items. Images are
    file names in the shipped calibration folder."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        items = []
        for image, answers in data["images"].items():
            for group, answer in answers.items():
                items += [QA((image,), str(q), str(answer)) for q in data["questions"][group]]
        items += [QA(tuple(e["images"]), str(e["question"]), str(e["answer"])) for e in data["extra"]]
        qa = DemoQA(tuple(items), str(data["demo"]["question"]), tuple(data["demo"]["images"]))
        for name in {n for item in qa.items for n in item.images} | set(qa.demo_images):
            if not isinstance(name, str) or Path(name).name != name or name in ("", ".", ".."):
                raise ValueError(f"image {name!r} is not a file name of the shipped calibration images")
        for image in qa.demo_images:
            qa.answer((image,), qa.demo_question)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise RkSmolVLMError(f"{path} is not a valid demo Q&A set ({type(exc).__name__}: {exc}): fix it as "
                             "described in its 'description', or restore the shipped file") from exc
    return qa


def load_demo_weights(path: Path = DEMO_WEIGHTS_FILE) -> dict[str, np.ndarray]:
    if not Path(path).is_file():
        raise DemoWeightsError(f"the demo model's weights {path} are missing: reinstall rksmolvlm, or train them "
                               "again with 'python scripts/train_demo_model.py'")
    try:
        with np.load(path, allow_pickle=False) as npz:
            return {k: npz[k] for k in npz.files}
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise DemoWeightsError(f"the demo model's weights {path} cannot be read ({exc}): reinstall rksmolvlm, or "
                               "train them again with 'python scripts/train_demo_model.py'") from exc


def save_demo_weights(weights: dict[str, np.ndarray], path: Path = DEMO_WEIGHTS_FILE) -> int:
    """Write the weights file atomically; return its size in bytes."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".npz", delete=False) as f:
        np.savez_compressed(f, **weights)
    os.chmod(f.name, 0o644)  # a data file like any other, not the temp file's 0600
    os.replace(f.name, path)
    return path.stat().st_size


def build_demo_checkpoint(out_dir: str | os.PathLike, family: str = "idefics3",
                          weights: dict[str, np.ndarray] | None = None) -> Path:
    """Write the trained demo checkpoint (a hub-style directory, ``family`` picks the model class:
    Idefics3ForConditionalGeneration or SmolVLMForConditionalGeneration) into ``out_dir``."""
    from rksmolvlm.convert.tiny_checkpoint import build_tiny_tokenizer

    spec = demo_spec(family)
    weights = load_demo_weights() if weights is None else weights
    _check_rows(weights, build_tiny_tokenizer(spec))
    return build_tiny_checkpoint(spec, out_dir, init=lambda model: _set_weights(model, weights))


def _check_rows(weights: dict[str, np.ndarray], tokenizer) -> None:
    missing = [k for k in _ROW_KEYS if k not in weights]
    if missing:
        raise DemoWeightsError(f"the demo weights lack {', '.join(missing)}: train them again with "
                               "'python scripts/train_demo_model.py'")
    for table in ("embed", "head"):
        ids = [int(i) for i in weights[f"rows.{table}.ids"]]
        have = tokenizer.convert_ids_to_tokens(ids)
        want = [str(t) for t in weights[f"rows.{table}.tokens"]]
        if have != want:
            bad = next(i for i, (a, b) in enumerate(zip(have, want)) if a != b)
            raise DemoWeightsError(
                f"the demo weights were trained with another tokenizer (id {ids[bad]} is {have[bad]!r} here, "
                f"{want[bad]!r} in the weights): train them again with 'python scripts/train_demo_model.py'")


def _set_weights(model, weights: dict[str, np.ndarray]) -> None:
    import torch

    state = model.state_dict()
    tensors = {k: v for k, v in weights.items() if not k.startswith("rows.")}
    expected = set(state) - {_EMBED, _HEAD}
    if set(tensors) != expected:
        raise DemoWeightsError(f"the demo weights do not fit the model (missing {sorted(expected - set(tensors))[:3]}, "
                               f"extra {sorted(set(tensors) - expected)[:3]}): train them again")
    with torch.no_grad():
        for name, value in tensors.items():
            if tuple(state[name].shape) != value.shape:
                raise DemoWeightsError(f"demo weight {name} has shape {value.shape}, the model "
                                       f"{tuple(state[name].shape)}: train the weights again")
            state[name].copy_(torch.from_numpy(value.astype(np.float32)))
        for table, name in (("embed", _EMBED), ("head", _HEAD)):
            state[name].zero_()
            ids = torch.from_numpy(weights[f"rows.{table}.ids"].astype(np.int64))
            state[name][ids] = torch.from_numpy(weights[f"rows.{table}.values"].astype(np.float32))


# -- training ------------------------------------------------------------------------------------
@dataclass
class _Batch:
    ids: "object"  # (B, L) long: prompt + answer ids, right-padded
    mask: "object"  # (B, L) attention mask
    image_rows: "object"  # (B, L) long: row of the flattened image features for <image> positions, else -1
    target_pos: "object"  # (n,) flat positions (b * L + t) whose next token is a target
    targets: "object"  # (n,) the target ids


def train_demo_weights(steps: int = 450, seed: int = 0, lr: float = 5e-3,
                       log: Callable[[str], None] | None = None) -> tuple[dict[str, np.ndarray], dict]:
    """Train the demo model from a seeded init on the Q&A set; return (weights in float16, stats)."""
    import torch

    deterministic = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        return _train(steps, seed, lr, log)
    finally:
        torch.use_deterministic_algorithms(deterministic)


def _train(steps: int, seed: int, lr: float, log: Callable[[str], None] | None) -> tuple[dict[str, np.ndarray], dict]:
    import torch
    import transformers as tf
    from PIL import Image

    from rksmolvlm.calibration.vision_set import shipped_images_dir

    torch.manual_seed(seed)
    qa = load_demo_qa()
    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="rksmolvlm-demo-train-") as tmp:
        path = build_tiny_checkpoint(DEMO_SPECS["idefics3"], Path(tmp) / "ckpt", seed=seed)
        processor = tf.AutoProcessor.from_pretrained(path)
        model = tf.Idefics3ForConditionalGeneration.from_pretrained(path, dtype=torch.float32)
    tokenizer = processor.tokenizer
    eos = DEMO_SPECS["idefics3"].eos_token_id
    image_token = DEMO_SPECS["idefics3"].image_token_id
    folder = shipped_images_dir()
    names = sorted({n for item in qa.items for n in item.images})
    pixels, spans, first = [], {}, 0
    for name in names:  # each image's tiles once: the processor's own pixel values
        with Image.open(folder / name) as im:
            values = processor.image_processor([[im.convert("RGB")]], return_tensors="pt")["pixel_values"][0]
        pixels.append(values)
        spans[name] = (first, first + len(values))
        first += len(values)
    all_tiles = torch.cat(pixels)
    seq = DEMO_SPECS["idefics3"].image_seq_len

    rows_ids, rows_img, answer_spans = [], [], []
    for item in qa.items:
        out = _processor_inputs(processor, item, folder)
        prompt_ids = out["input_ids"][0].tolist()
        answer = tokenizer(" " + item.answer, add_special_tokens=False)["input_ids"] + [eos]
        feature_rows = [r for name in item.images for t in range(*spans[name]) for r in range(t * seq, (t + 1) * seq)]
        positions = [i for i, t in enumerate(prompt_ids) if t == image_token]
        if len(positions) != len(feature_rows):
            raise RkSmolVLMError(f"internal: {len(positions)} image tokens for {len(feature_rows)} feature rows")
        img = [-1] * len(prompt_ids)
        for p, r in zip(positions, feature_rows):
            img[p] = r
        rows_ids.append(prompt_ids + answer)
        rows_img.append(img + [-1] * len(answer))
        answer_spans.append((len(prompt_ids), len(answer)))
    length = max(len(r) for r in rows_ids)
    batch = len(rows_ids)
    ids = torch.full((batch, length), 2, dtype=torch.long)
    mask = torch.zeros((batch, length), dtype=torch.long)
    image_rows = torch.full((batch, length), -1, dtype=torch.long)
    target_pos, targets = [], []
    for b, (r, img, (p, n)) in enumerate(zip(rows_ids, rows_img, answer_spans)):
        ids[b, :len(r)] = torch.tensor(r)
        mask[b, :len(r)] = 1
        image_rows[b, :len(r)] = torch.tensor(img)
        target_pos += [b * length + t - 1 for t in range(p, p + n)]
        targets += r[p:p + n]
    data = _Batch(ids, mask, image_rows, torch.tensor(target_pos), torch.tensor(targets))
    if log:
        log(f"{batch} samples, {len(all_tiles)} tiles, {len(targets)} answer tokens, prepared in "
            f"{time.monotonic() - start:.0f} s")

    embed_ids = torch.unique(ids[mask.bool()])
    head_ids = torch.unique(data.targets)
    vocab = model.config.text_config.vocab_size
    others = math.log(vocab - len(head_ids))  # the zero rows: vocab − K logits of exactly 0
    with torch.no_grad():  # HF's default init scale; the two big tables train only their rows, kept apart
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.02)
    embed_rows = torch.nn.Parameter(torch.randn(len(embed_ids), model.config.text_config.hidden_size) * 0.02)
    head_rows = torch.nn.Parameter(torch.randn(len(head_ids), model.config.text_config.hidden_size) * 0.02)
    remap = torch.zeros(vocab, dtype=torch.long)
    remap[embed_ids] = torch.arange(len(embed_ids))
    head_remap = torch.zeros(vocab, dtype=torch.long)
    head_remap[head_ids] = torch.arange(len(head_ids))
    local_ids, local_targets = remap[data.ids], head_remap[data.targets]
    inner = model.model
    params = [p for n, p in model.named_parameters() if n not in (_EMBED, _HEAD)] + [embed_rows, head_rows]
    optimizer = torch.optim.Adam(params, lr=lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / 50) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    is_image = data.image_rows >= 0
    gather = data.image_rows.clamp(min=0)
    losses = []
    model.train()
    for step in range(steps):
        features = inner.connector(inner.vision_model(pixel_values=all_tiles).last_hidden_state)
        flat = features.reshape(-1, features.shape[-1])
        embeds = torch.where(is_image[..., None], flat[gather], embed_rows[local_ids])
        hidden = inner.text_model(inputs_embeds=embeds, attention_mask=data.mask).last_hidden_state
        chosen = hidden.reshape(-1, hidden.shape[-1])[data.target_pos]
        logits = chosen @ head_rows.T
        log_z = torch.logsumexp(torch.cat([logits, torch.full_like(logits[:, :1], others)], 1), 1)
        loss = (log_z - logits.gather(1, local_targets[:, None])[:, 0]).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(float(loss.detach()))
        if log and (step % 100 == 0 or step == steps - 1):
            log(f"step {step}: loss {losses[-1]:.4f} ({time.monotonic() - start:.0f} s)")
    model.eval()
    weights = {k: v.detach().numpy().astype(np.float16) for k, v in model.state_dict().items()
               if k not in (_EMBED, _HEAD)}
    for table, row_ids, values in (("embed", embed_ids, embed_rows), ("head", head_ids, head_rows)):
        weights[f"rows.{table}.ids"] = row_ids.numpy().astype(np.int32)
        weights[f"rows.{table}.values"] = values.detach().numpy().astype(np.float16)
        weights[f"rows.{table}.tokens"] = np.array(tokenizer.convert_ids_to_tokens(row_ids.tolist()))
    stats = {"steps": steps, "seed": seed, "lr": lr, "samples": batch, "tiles": len(all_tiles),
             "target_tokens": len(targets), "final_loss": losses[-1], "train_s": round(time.monotonic() - start, 1),
             "torch": torch.__version__, "transformers": tf.__version__}
    return weights, stats


def transformers_answers(checkpoint: str | os.PathLike, items, max_new_tokens: int = 24) -> list[list[int]]:
    """transformers' own greedy answer ids (up to and including the first end id, as the Runner's) for
    each QA item on ``checkpoint`` (its processor, its ``generate``): the reference the demo's answers
    are compared with."""
    import torch
    import transformers as tf

    from rksmolvlm.calibration.vision_set import shipped_images_dir
    from rksmolvlm.tools.verify import cut_at_stop

    config = json.loads((Path(checkpoint) / "config.json").read_text())
    cls = tf.SmolVLMForConditionalGeneration if config["model_type"] == "smolvlm" else \
        tf.Idefics3ForConditionalGeneration
    model = cls.from_pretrained(checkpoint, dtype=torch.float32).eval()
    tokenizer = tf.AutoTokenizer.from_pretrained(checkpoint)
    # SmolVLMProcessor needs torchvision for its video part: the Idefics3 processor makes the same
    # image prompts and pixels (the parity tests prove both equal the runtime's processing)
    image_processor = tf.Idefics3ImageProcessorPil.from_pretrained(checkpoint)
    seq = json.loads((Path(checkpoint) / "processor_config.json").read_text())["image_seq_len"]
    processor = tf.Idefics3Processor(image_processor=image_processor, tokenizer=tokenizer, image_seq_len=seq,
                                     chat_template=tokenizer.chat_template)
    eos = model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos])
    folder = shipped_images_dir()
    out = []
    for item in items:
        inputs = _processor_inputs(processor, item, folder)
        with torch.no_grad():
            ids = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        out.append(cut_at_stop([int(t) for t in ids[0, inputs["input_ids"].shape[1]:]], eos))
    return out


def _processor_inputs(processor, item: "QA", folder: Path):
    """transformers' processor inputs (ids, pixel values) of one Q&A item: its images, then its question."""
    from PIL import Image

    content = [{"type": "image"} for _ in item.images] + [{"type": "text", "text": item.question}]
    prompt = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    images = []
    for name in item.images:
        with Image.open(folder / name) as im:
            images.append(im.convert("RGB"))
    return processor(text=prompt, images=[images] if images else None, return_tensors="pt")

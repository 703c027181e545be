"""Open a SmolVLM checkpoint (local directory or hub id) and read everything the bundle needs from
the checkpoint's own files: family, geometry, processor settings, special tokens, chat template,
and the sha256 of the weight files. Nothing here is hard-coded per model."""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING
from pathlib import Path

from rksmolvlm.errors import CheckpointError
from rksmolvlm.hashing import sha256_file
from rksmolvlm.processing.image import ImageSettings

if TYPE_CHECKING:  # the video settings' module is imported where a bundle has video
    from rksmolvlm.processing.video_frames import VideoSettings

__all__ = [
    "Checkpoint", "VisionGeometry", "TextGeometry", "SpecialTokens",
    "open_checkpoint", "FAMILIES",
]

# config.json model_type → family name used in the manifest.
FAMILIES = {"idefics3": "idefics3", "smolvlm": "smolvlm"}
_SIZE_BY_TEXT_HIDDEN = {576: "256M", 960: "500M", 2048: "2.2B"}
_WEIGHT_PATTERNS = ("*.safetensors", "*.bin")
_HUB_FILES = ["config.json", "generation_config.json", "preprocessor_config.json", "processor_config.json",
              "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.json",
              "chat_template.jinja", "*.safetensors", "*.safetensors.index.json"]
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass(frozen=True)
class VisionGeometry:
    tile_size: int
    patch_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    scale_factor: int
    image_seq_len: int

    @property
    def grid(self) -> int:
        return self.tile_size // self.patch_size


@dataclass(frozen=True)
class TextGeometry:
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    vocab_size: int
    max_position_embeddings: int
    tie_word_embeddings: bool


@dataclass(frozen=True)
class SpecialTokens:
    """Token strings and ids as the checkpoint's tokenizer defines them."""

    image: str
    image_id: int
    fake_image: str
    fake_image_id: int
    global_image: str
    global_image_id: int | None  # None when <global-img> is plain text (SmolVLM-Instruct 2.2B)
    end_of_utterance: str
    end_of_utterance_id: int
    bos: str | None
    bos_id: int | None
    eos: str | None
    eos_id: int | None
    pad: str | None
    pad_id: int | None
    row_col_are_tokens: bool  # <row_i_col_j> are single added tokens (256M/500M, SmolVLM2)
    eos_ids: tuple[int, ...] = ()  # every id that ends generation (generation_config ∪ eou)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["eos_ids"] = list(self.eos_ids)
        return d


@dataclass
class Checkpoint:
    """A SmolVLM checkpoint on disk with everything read from its files."""

    path: Path
    model_id: str
    revision: str | None
    family: str
    architecture: str
    size_label: str
    vision: VisionGeometry
    text: TextGeometry
    image: ImageSettings
    tokens: SpecialTokens
    chat_template: str
    weights: dict[str, str] = field(default_factory=dict)  # file name → sha256
    config: dict = field(default_factory=dict)
    video: "VideoSettings | None" = None  # SmolVLM2 checkpoints (their processor samples videos)

    def describe(self) -> str:
        return (f"{self.model_id} ({self.architecture}, {self.size_label}, tile {self.vision.tile_size}, "
                f"{self.vision.image_seq_len} tokens per tile)")


def open_checkpoint(model: str, revision: str | None = None, hash_weights: bool = True) -> Checkpoint:
    """Open ``model`` (a local directory, or a hub id fetched with huggingface_hub)."""
    local = Path(model).expanduser()
    if local.exists():
        if not local.is_dir():
            raise CheckpointError(f"{local} is a file, not a checkpoint directory: pass the directory that "
                                  "holds config.json and the weights")
        path, model_id, resolved_revision = local.resolve(), local.resolve().name, revision
    elif _HUB_ID.match(model):
        path, resolved_revision = _download(model, revision)
        model_id = model
    else:
        raise CheckpointError(f"{model!r} is neither an existing directory nor a hub id like "
                              "'HuggingFaceTB/SmolVLM-256M-Instruct'")
    return _read(path, model_id, resolved_revision, hash_weights)


def _download(repo_id: str, revision: str | None) -> tuple[Path, str | None]:
    try:
        from huggingface_hub import snapshot_download
    except ImportError as exc:  # pragma: no cover - huggingface_hub is a host dependency
        raise CheckpointError("huggingface_hub is not installed: install the host extra "
                              "(pip install 'rksmolvlm[host]') or pass a local checkpoint directory") from exc
    try:
        path = Path(snapshot_download(repo_id, revision=revision, allow_patterns=_HUB_FILES))
    except Exception as exc:  # the hub client raises many network/auth error types
        raise CheckpointError(
            f"cannot fetch {repo_id!r} from the Hugging Face hub ({type(exc).__name__}: {exc}). "
            f"Offline? Download it on a connected machine (huggingface-cli download {repo_id} "
            "--local-dir DIR), copy DIR here and pass DIR instead of the hub id") from exc
    return path, path.name if re.fullmatch(r"[0-9a-f]{40}", path.name) else revision


def _load_json(path: Path, required: bool = True) -> dict:
    if not path.is_file():
        if required:
            raise CheckpointError(f"{path.parent} is not a SmolVLM checkpoint: {path.name} is missing")
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path} is not valid JSON ({exc}): re-download the checkpoint") from exc


def _read(path: Path, model_id: str, revision: str | None, hash_weights: bool) -> Checkpoint:
    config = _load_json(path / "config.json")
    model_type = config.get("model_type")
    if model_type not in FAMILIES:
        raise CheckpointError(
            f"{path} holds a {model_type or 'unknown'!s} model, not SmolVLM: rksmolvlm converts "
            "Idefics3ForConditionalGeneration (SmolVLM) and SmolVLMForConditionalGeneration (SmolVLM2) checkpoints")
    family = FAMILIES[model_type]
    vcfg, tcfg = config.get("vision_config") or {}, config.get("text_config") or {}
    scale = int(config.get("scale_factor", 2))
    tile, patch = int(vcfg.get("image_size", 224)), int(vcfg.get("patch_size", 32))
    grid = tile // patch  # SigLIP's patch convolution drops a remainder: so400m/14 at 384 is 27 patches a side
    if grid < 1 or grid % scale:
        raise CheckpointError(f"{path}: vision tile {tile} gives {grid} patches of {patch} a side, which the scale "
                              f"factor {scale} does not divide; the checkpoint's config.json looks damaged")

    pre = _load_json(path / "preprocessor_config.json")
    proc = _load_json(path / "processor_config.json", required=False)
    image_seq_len = int(proc.get("image_seq_len", grid * grid // scale ** 2))
    if image_seq_len != grid * grid // scale ** 2:
        raise CheckpointError(f"{path}: processor image_seq_len {image_seq_len} disagrees with the vision config "
                              f"({grid}² patches / {scale}² = {grid * grid // scale ** 2})")
    tile_from_processor = int((pre.get("max_image_size") or {}).get("longest_edge", tile))
    if tile_from_processor != tile:
        raise CheckpointError(f"{path}: processor tile size {tile_from_processor} differs from the vision tower's "
                              f"image_size {tile}: the tower runs on fixed T×T tiles, fix preprocessor_config.json")
    image = ImageSettings(
        tile_size=tile,
        longest_edge=int((pre.get("size") or {}).get("longest_edge", 4 * tile)),
        do_image_splitting=bool(pre.get("do_image_splitting", True)),
        resample=int(pre.get("resample", 1)),
        rescale_factor=float(pre.get("rescale_factor", 1 / 255)),
        image_mean=tuple(float(v) for v in pre.get("image_mean", (0.5, 0.5, 0.5))),
        image_std=tuple(float(v) for v in pre.get("image_std", (0.5, 0.5, 0.5))),
        video_sampling=dict(pre.get("video_sampling") or {}),
    )
    text = TextGeometry(
        hidden_size=int(tcfg.get("hidden_size", 0)),
        num_layers=int(tcfg.get("num_hidden_layers", 0)),
        num_heads=int(tcfg.get("num_attention_heads", 0)),
        num_kv_heads=int(tcfg.get("num_key_value_heads", tcfg.get("num_attention_heads", 0))),
        vocab_size=int(tcfg.get("vocab_size", 0)),
        max_position_embeddings=int(tcfg.get("max_position_embeddings", 2048)),
        tie_word_embeddings=bool(config.get("tie_word_embeddings", tcfg.get("tie_word_embeddings", False))),
    )
    vision = VisionGeometry(tile, patch, int(vcfg.get("hidden_size", 0)), int(vcfg.get("num_hidden_layers", 0)),
                            int(vcfg.get("num_attention_heads", 0)), scale, image_seq_len)
    tokens = _read_tokens(path, config)
    weights = _weight_files(path)
    return Checkpoint(
        path=path, model_id=model_id, revision=revision, family=family,
        architecture=(config.get("architectures") or [f"{model_type}"])[0],
        size_label=_SIZE_BY_TEXT_HIDDEN.get(text.hidden_size, f"custom-{text.hidden_size}"),
        vision=vision, text=text, image=image, tokens=tokens, chat_template=_read_chat_template(path),
        weights={p.name: sha256_file(p) if hash_weights else "" for p in weights}, config=config,
        video=_read_video_settings(path, family, pre),
    )


def _read_video_settings(path: Path, family: str, pre: dict):
    """The video processor's settings of a SmolVLM2 checkpoint (its video_preprocessor_config.json, else
    the video_sampling of preprocessor_config.json, as transformers loads them); None for models
    without video."""
    from rksmolvlm.processing.video_frames import VideoSettings

    video_pre = _load_json(path / "video_preprocessor_config.json", required=False) or pre
    if family != "smolvlm" or not video_pre.get("video_sampling"):
        return None
    try:
        return VideoSettings.from_preprocessor(video_pre)
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{path}: the video processor settings cannot be read ({exc}): fix "
                              "video_preprocessor_config.json / preprocessor_config.json 'video_sampling'") from exc


def _weight_files(path: Path) -> list[Path]:
    files = sorted({p for pattern in _WEIGHT_PATTERNS for p in path.glob(pattern)
                    if not p.name.startswith("training_args")})
    if not files:
        raise CheckpointError(f"{path} has no weight files (*.safetensors or *.bin): the download is incomplete")
    return files


def _read_tokens(path: Path, config: dict) -> SpecialTokens:
    try:
        from tokenizers import Tokenizer
    except ImportError as exc:  # pragma: no cover
        raise CheckpointError("the tokenizers package is missing: pip install 'rksmolvlm[host]'") from exc
    tok_file = path / "tokenizer.json"
    if not tok_file.is_file():
        raise CheckpointError(f"{path} is not a usable SmolVLM checkpoint: tokenizer.json is missing")
    tokenizer = Tokenizer.from_file(str(tok_file))
    tcfg = _load_json(path / "tokenizer_config.json", required=False)
    smap = _load_json(path / "special_tokens_map.json", required=False)
    gen = _load_json(path / "generation_config.json", required=False)

    def single_id(text: str) -> int | None:
        token_id = tokenizer.token_to_id(text)
        if token_id is None:
            return None
        ids = tokenizer.encode(text, add_special_tokens=False).ids
        return token_id if ids == [token_id] else None

    def named(key: str) -> tuple[str | None, int | None]:
        value = tcfg.get(key, smap.get(key))
        if isinstance(value, dict):
            value = value.get("content")
        return (value, tokenizer.token_to_id(value)) if value else (None, None)

    needed = {}
    for text in ("<image>", "<fake_token_around_image>", "<end_of_utterance>"):
        token_id = single_id(text)
        if token_id is None:
            raise CheckpointError(f"{path}/tokenizer.json has no {text} token: this is not a SmolVLM tokenizer")
        needed[text] = token_id
    image_token_id = config.get("image_token_id")
    if image_token_id is not None and int(image_token_id) != needed["<image>"]:
        raise CheckpointError(f"{path}: config.json image_token_id {image_token_id} differs from the tokenizer's "
                              f"<image> id {needed['<image>']}: tokenizer and weights do not belong together")
    bos, bos_id = named("bos_token")
    eos, eos_id = named("eos_token")
    pad, pad_id = named("pad_token")
    eos_ids = gen.get("eos_token_id", eos_id)
    eos_ids = [eos_ids] if isinstance(eos_ids, int) else list(eos_ids or [])
    eos_ids = sorted({int(i) for i in eos_ids} | {needed["<end_of_utterance>"]})
    return SpecialTokens(
        image="<image>", image_id=needed["<image>"],
        fake_image="<fake_token_around_image>", fake_image_id=needed["<fake_token_around_image>"],
        global_image="<global-img>", global_image_id=single_id("<global-img>"),
        end_of_utterance="<end_of_utterance>", end_of_utterance_id=needed["<end_of_utterance>"],
        bos=bos, bos_id=bos_id, eos=eos, eos_id=eos_id, pad=pad, pad_id=pad_id,
        row_col_are_tokens=all(single_id(f"<row_{r}_col_{c}>") is not None for r in range(1, 7) for c in range(1, 7)),
        eos_ids=tuple(eos_ids),
    )


def _read_chat_template(path: Path) -> str:
    jinja = path / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    for name in ("chat_template.json", "processor_config.json", "tokenizer_config.json"):
        template = _load_json(path / name, required=False).get("chat_template")
        if isinstance(template, str) and template:
            return template
    raise CheckpointError(f"{path} has no chat template (chat_template.jinja/.json, processor_config.json or "
                          "tokenizer_config.json): copy the one published with the model into the directory")

"""The bundle manifest as typed records, each writing and reading its own part of ``manifest.json``.

Every part is a frozen record with ``to_dict()`` (what the converter writes) and ``from_dict()`` (what
the board reads): the key names, types, shapes, allowed values and file confinement of a part live in
its record and nowhere else. A wrong key is a ``BundleError`` naming it; every file path is confined to
the bundle directory; ``Manifest.from_dict`` adds the checks across parts and the schema version.
``Manifest.from_dict(m.to_dict(), m.root) == m`` holds for every manifest (the bundle writer checks it).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

from rksmolvlm.errors import BundleError
from rksmolvlm.processing.image import ImageSettings
from rksmolvlm.processing.prompt import PromptTokens

if TYPE_CHECKING:  # the video settings' module is imported where a bundle has video
    from rksmolvlm.processing.video_frames import VideoSettings

__all__ = ["SCHEMA_VERSION", "MANIFEST", "FAMILIES", "VISION_DTYPES", "PARTS", "Manifest", "FileRecord", "SourceInfo",
           "ModelInfo", "VisionTowerInfo", "TextDecoderInfo", "TargetInfo", "VisionPart", "VisionInput",
           "VisionOutput", "VisionQuantization", "VisionAccuracy", "LlmPart", "LlmRecipe", "ProcessorInfo",
           "TokenInfo", "VideoPartInfo", "GoldensInfo", "confined_path", "CHAT_TEMPLATE_FILE",
           "VIDEO_CHAT_TEMPLATE_FILE"]

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
FAMILIES = ("idefics3", "smolvlm")
VISION_DTYPES = ("fp16", "int8")
PARTS = ("vision", "llm")
# the converter writes the chat templates as files of the bundle, so that its sha256s cover them
CHAT_TEMPLATE_FILE = "chat_template.jinja"
VIDEO_CHAT_TEMPLATE_FILE = "video_chat_template.jinja"


_PartT = TypeVar("_PartT", bound="_Part")  # typing.Self needs Python 3.11; boards run 3.10 (Ubuntu 22.04)


class _Part:
    """A manifest part that reads itself from its place in the manifest (``_KEY``, for messages)."""

    _KEY: ClassVar[str]

    @classmethod
    def from_dict(cls: type[_PartT], data: Any, root: str | os.PathLike = ".",
                  files: Mapping[str, "FileRecord"] | None = None) -> _PartT:
        """Read and check this part; file names are confined to ``root`` and, when ``files`` (the
        bundle's file table) is given, must be among them."""
        return cls._read(_Section(data, cls._KEY, _Bundle(Path(root), files)))

    @classmethod
    def _read(cls: type[_PartT], s: "_Section") -> _PartT:
        raise NotImplementedError


@dataclass(frozen=True)
class FileRecord:
    path: str  # relative, POSIX, inside the bundle
    size: int
    sha256: str

    @classmethod
    def of(cls, root: Path, relative: str) -> "FileRecord":
        """The record of a file of the bundle at ``root`` as it is on disk now."""
        from rksmolvlm.hashing import sha256_file

        path = confined_path(root, relative, f"files[{relative!r}]")
        return cls(relative, path.stat().st_size, sha256_file(path))

    def to_dict(self) -> dict:
        return {"size": self.size, "sha256": self.sha256}

    @classmethod
    def from_dict(cls, data: Any, path: str, root: str | os.PathLike = ".") -> "FileRecord":
        return cls._read(_Section(data, f"files.{path}", _Bundle(Path(root), None)), path)

    @classmethod
    def _read(cls, s: "_Section", path: str) -> "FileRecord":
        confined_path(s.bundle.root, path, f"files[{path!r}]")
        return cls(path, s.integer("size", 0), s.sha256("sha256"))


@dataclass(frozen=True)
class SourceInfo(_Part):
    _KEY = "source"
    model_id: str
    revision: str | None
    weights: dict[str, str]  # file name → sha256

    def to_dict(self) -> dict:
        return {"model_id": self.model_id, "revision": self.revision,
                "weights": {name: {"sha256": sha} for name, sha in self.weights.items()}}

    @classmethod
    def _read(cls, s: "_Section") -> "SourceInfo":
        weights = s.optional_obj("weights")
        return cls(s.string("model_id"), s.optional_str("revision"),
                   {k: weights.obj(k).sha256("sha256") for k in weights.keys()} if weights else {})


@dataclass(frozen=True)
class VisionTowerInfo(_Part):
    """The vision tower's geometry (``model.vision``); only ``image_seq_len`` is read by the board."""

    _KEY = "model.vision"
    image_seq_len: int
    tile_size: int | None = None
    patch_size: int | None = None
    hidden_size: int | None = None
    layers: int | None = None
    heads: int | None = None
    scale_factor: int | None = None

    def to_dict(self) -> dict:
        return {"tile_size": self.tile_size, "patch_size": self.patch_size, "hidden_size": self.hidden_size,
                "layers": self.layers, "heads": self.heads, "scale_factor": self.scale_factor,
                "image_seq_len": self.image_seq_len}

    @classmethod
    def _read(cls, s: "_Section") -> "VisionTowerInfo":
        return cls(s.integer("image_seq_len", 1), *(s.optional_int(k, 1) for k in
                                                ("tile_size", "patch_size", "hidden_size", "layers", "heads",
                                                 "scale_factor")))


@dataclass(frozen=True)
class TextDecoderInfo(_Part):
    """The text decoder's geometry (``model.text``)."""

    _KEY = "model.text"
    hidden_size: int
    vocab_size: int
    layers: int | None = None
    heads: int | None = None
    kv_heads: int | None = None
    max_position_embeddings: int | None = None
    tie_word_embeddings: bool | None = None

    def to_dict(self) -> dict:
        return {"hidden_size": self.hidden_size, "layers": self.layers, "heads": self.heads,
                "kv_heads": self.kv_heads, "vocab_size": self.vocab_size,
                "max_position_embeddings": self.max_position_embeddings,
                "tie_word_embeddings": self.tie_word_embeddings}

    @classmethod
    def _read(cls, s: "_Section") -> "TextDecoderInfo":
        return cls(s.integer("hidden_size", 1), s.integer("vocab_size", 1), s.optional_int("layers", 1),
                   s.optional_int("heads", 1), s.optional_int("kv_heads", 1),
                   s.optional_int("max_position_embeddings", 1), s.optional_bool("tie_word_embeddings"))


@dataclass(frozen=True)
class ModelInfo(_Part):
    _KEY = "model"
    family: str  # idefics3 | smolvlm
    architecture: str
    size: str
    vision: VisionTowerInfo
    text: TextDecoderInfo

    @property
    def image_seq_len(self) -> int:
        return self.vision.image_seq_len

    @property
    def text_hidden_size(self) -> int:
        return self.text.hidden_size

    @property
    def vocab_size(self) -> int:
        return self.text.vocab_size

    def to_dict(self) -> dict:
        return {"family": self.family, "architecture": self.architecture, "size": self.size,
                "vision": self.vision.to_dict(), "text": self.text.to_dict()}

    @classmethod
    def _read(cls, s: "_Section") -> "ModelInfo":
        return cls(s.choice("family", FAMILIES), s.string("architecture"), s.string("size"),
                   VisionTowerInfo._read(s.obj("vision")), TextDecoderInfo._read(s.obj("text")))


@dataclass(frozen=True)
class TargetInfo(_Part):
    _KEY = "target"
    platform: str
    npu_cores: int

    def to_dict(self) -> dict:
        return {"platform": self.platform, "npu_cores": self.npu_cores}

    @classmethod
    def _read(cls, s: "_Section") -> "TargetInfo":
        return cls(s.string("platform"), s.integer("npu_cores", 1))


@dataclass(frozen=True)
class VisionInput(_Part):
    """The RKNN tower's input as the board feeds it (uint8 NHWC tiles, normalization baked in)."""

    _KEY = "vision.input"
    shape: tuple[int, ...]  # (1, tile, tile, 3)
    name: str | None = None
    layout: str | None = None
    dtype: str | None = None
    normalization: str | None = None

    def to_dict(self) -> dict:
        return {"name": self.name, "layout": self.layout, "dtype": self.dtype, "shape": list(self.shape),
                "normalization": self.normalization}

    @classmethod
    def _read(cls, s: "_Section") -> "VisionInput":
        return cls(tuple(s.int_list("shape", 4)), s.optional_str("name"), s.optional_str("layout"),
                   s.optional_str("dtype"), s.optional_str("normalization"))


@dataclass(frozen=True)
class VisionOutput(_Part):
    _KEY = "vision.output"
    shape: tuple[int, ...]  # (1, image_seq_len, text_hidden)
    name: str | None = None
    dtype: str | None = None

    def to_dict(self) -> dict:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}

    @classmethod
    def _read(cls, s: "_Section") -> "VisionOutput":
        return cls(tuple(s.int_list("shape", 3)), s.optional_str("name"), s.optional_str("dtype"))


@dataclass(frozen=True)
class VisionQuantization(_Part):
    """How an int8 tower was quantized (absent for fp16)."""

    _KEY = "vision.quantization"
    dtype: str
    algorithm: str
    calibration_tiles: int
    calibration_images: tuple[str, ...]

    def to_dict(self) -> dict:
        return {"dtype": self.dtype, "algorithm": self.algorithm, "calibration_tiles": self.calibration_tiles,
                "calibration_images": list(self.calibration_images)}

    @classmethod
    def _read(cls, s: "_Section") -> "VisionQuantization":
        return cls(s.string("dtype"), s.string("algorithm"), s.integer("calibration_tiles", 0),
                   tuple(s.str_list("calibration_images")))


@dataclass(frozen=True)
class VisionAccuracy(_Part):
    """The simulator's score against torch on the held-out tiles, at conversion."""

    _KEY = "vision.accuracy"
    simulator_cosine: float
    min_tile_cosine: float

    def to_dict(self) -> dict:
        return {"simulator_cosine": self.simulator_cosine, "min_tile_cosine": self.min_tile_cosine}

    @classmethod
    def _read(cls, s: "_Section") -> "VisionAccuracy":
        return cls(s.number("simulator_cosine"), s.number("min_tile_cosine"))


@dataclass(frozen=True)
class VisionPart(_Part):
    _KEY = "vision"
    file: str | None  # vision.rknn
    dtype: str
    onnx: str | None  # host preview
    output: VisionOutput
    input: VisionInput | None = None
    quantization: VisionQuantization | None = None
    accuracy: VisionAccuracy | None = None

    @property
    def output_shape(self) -> tuple[int, ...]:
        return self.output.shape

    def to_dict(self) -> dict:
        return {"file": self.file, "dtype": self.dtype, "quantization": _dict_or_none(self.quantization),
                "input": _dict_or_none(self.input), "output": self.output.to_dict(), "onnx": self.onnx,
                "accuracy": _dict_or_none(self.accuracy)}

    @classmethod
    def _read(cls, s: "_Section") -> "VisionPart":
        return cls(s.optional_file("file"), s.choice("dtype", VISION_DTYPES), s.optional_file("onnx"),
                   VisionOutput._read(s.obj("output")), _optional(s, "input", VisionInput),
                   _optional(s, "quantization", VisionQuantization), _optional(s, "accuracy", VisionAccuracy))


@dataclass(frozen=True)
class LlmRecipe(_Part):
    """How the board decoder is (or would be) built with rkllm-toolkit; the converter's recipe."""

    _KEY = "llm.recipe"
    target: str
    dtype: str
    algorithm: str
    num_npu_core: int
    max_context: int
    optimization_level: int
    hybrid_rate: float = 0.0

    def to_dict(self) -> dict:
        return {"target": self.target, "dtype": self.dtype, "algorithm": self.algorithm,
                "num_npu_core": self.num_npu_core, "max_context": self.max_context,
                "optimization_level": self.optimization_level, "hybrid_rate": self.hybrid_rate}

    @classmethod
    def _read(cls, s: "_Section") -> "LlmRecipe":
        return cls(s.string("target"), s.string("dtype"), s.string("algorithm"), s.integer("num_npu_core", 1),
                   s.integer("max_context", 1), s.integer("optimization_level", 0), s.number("hybrid_rate"))


MAX_CONTEXT = 16384  # rkllm-toolkit's max_context limit (DESIGN §6): no decoder of a bundle has more


@dataclass(frozen=True)
class LlmPart(_Part):
    _KEY = "llm"
    file: str | None  # llm.rkllm; None when converted with --llm-host-only
    toolkit_version: str | None
    max_context: int
    embed_tokens: str
    embed_shape: tuple[int, int]  # (vocab, hidden)
    decoder_dir: str | None  # host preview
    recipe: LlmRecipe | None = None
    board_decoder: str | None = None  # "present", or why it is missing
    embed_dtype: str | None = None

    @property
    def dtype(self) -> str | None:
        """The board decoder's quantization (w8a8, …)."""
        return self.recipe.dtype if self.recipe is not None else None

    def to_dict(self) -> dict:
        return {"file": self.file, "board_decoder": self.board_decoder, "recipe": _dict_or_none(self.recipe),
                "max_context": self.max_context, "toolkit_version": self.toolkit_version,
                "embed_tokens": {"file": self.embed_tokens, "dtype": self.embed_dtype,
                                 "shape": list(self.embed_shape)},
                "decoder_dir": self.decoder_dir}

    @classmethod
    def _read(cls, s: "_Section") -> "LlmPart":
        embed = s.obj("embed_tokens")
        shape = embed.int_list("shape", 2)
        decoder_dir = s.optional_str("decoder_dir")
        if decoder_dir is not None:
            confined_path(s.bundle.root, decoder_dir, s.key("decoder_dir"))
        max_context = s.integer("max_context", 32, MAX_CONTEXT, " (rkllm-toolkit's limit)")
        return cls(s.optional_file("file"), s.optional_str("toolkit_version"), max_context,
                   embed.file("file"), (shape[0], shape[1]), decoder_dir, _optional(s, "recipe", LlmRecipe),
                   s.optional_str("board_decoder"), embed.optional_str("dtype"))


@dataclass(frozen=True)
class ProcessorInfo(_Part):
    _KEY = "processor"
    image: ImageSettings
    image_seq_len: int

    def to_dict(self) -> dict:
        i = self.image
        return {"tile_size": i.tile_size, "longest_edge": i.longest_edge, "do_image_splitting": i.do_image_splitting,
                "resample": i.resample, "rescale_factor": i.rescale_factor, "image_mean": list(i.image_mean),
                "image_std": list(i.image_std), "video_sampling": dict(i.video_sampling),
                "image_seq_len": self.image_seq_len}

    @classmethod
    def _read(cls, s: "_Section") -> "ProcessorInfo":
        mean, std = s.float_list("image_mean", 3), s.float_list("image_std", 3)
        video = s.optional_obj("video_sampling")
        settings = ImageSettings(
            tile_size=s.integer("tile_size", 1), longest_edge=s.integer("longest_edge", 1),
            do_image_splitting=s.boolean("do_image_splitting"), resample=s.integer("resample", 0),
            rescale_factor=s.number("rescale_factor"), image_mean=(mean[0], mean[1], mean[2]),
            image_std=(std[0], std[1], std[2]), video_sampling=dict(video.data) if video else {})
        return cls(settings, s.integer("image_seq_len", 1))


@dataclass(frozen=True)
class TokenInfo:
    """The special tokens: what the prompt needs (``prompt``, its ``image_seq_len`` from the
    processor), the ids that end an answer, and the rest of the checkpoint's layout for reference."""

    _KEY = "tokens"
    prompt: PromptTokens
    eos_ids: tuple[int, ...]
    bos_id: int | None
    pad_id: int | None
    fake_image_id: int | None = None
    global_image_id: int | None = None  # None when <global-img> is plain text (SmolVLM-Instruct 2.2B)
    end_of_utterance_id: int | None = None
    bos: str | None = None
    eos: str | None = None
    eos_id: int | None = None
    pad: str | None = None
    row_col_are_tokens: bool | None = None

    def to_dict(self) -> dict:
        p = self.prompt
        return {"image": p.image, "image_id": p.image_id, "fake_image": p.fake_image,
                "fake_image_id": self.fake_image_id, "global_image": p.global_image,
                "global_image_id": self.global_image_id, "end_of_utterance": p.end_of_utterance,
                "end_of_utterance_id": self.end_of_utterance_id, "bos": self.bos, "bos_id": self.bos_id,
                "eos": self.eos, "eos_id": self.eos_id, "pad": self.pad, "pad_id": self.pad_id,
                "row_col_are_tokens": self.row_col_are_tokens, "eos_ids": list(self.eos_ids)}

    @classmethod
    def from_dict(cls, data: Any, root: str | os.PathLike = ".", files: Mapping[str, FileRecord] | None = None,
                  *, image_seq_len: int) -> "TokenInfo":
        """As every part; ``image_seq_len`` is the processor's (the prompt expands images with it)."""
        return cls._read(_Section(data, cls._KEY, _Bundle(Path(root), files)), image_seq_len)

    @classmethod
    def _read(cls, s: "_Section", image_seq_len: int) -> "TokenInfo":
        eos = s.int_list("eos_ids", None)
        if not eos:
            raise BundleError(f"{MANIFEST}: 'tokens.eos_ids' is empty: the bundle cannot know where an answer ends; "
                              "convert it again")
        prompt = PromptTokens(image=s.string("image"), image_id=s.integer("image_id", 0),
                              fake_image=s.string("fake_image"), global_image=s.string("global_image"),
                              image_seq_len=image_seq_len,
                              end_of_utterance=s.string("end_of_utterance"))
        ids = {k: s.optional_int(k, 0) for k in ("fake_image_id", "global_image_id", "end_of_utterance_id",
                                                  "eos_id")}
        return cls(prompt, tuple(eos), s.optional_int("bos_id", None), s.optional_int("pad_id", None),
                   ids["fake_image_id"], ids["global_image_id"], ids["end_of_utterance_id"], s.optional_str("bos"),
                   s.optional_str("eos"), ids["eos_id"], s.optional_str("pad"), s.optional_bool("row_col_are_tokens"))


@dataclass(frozen=True)
class VideoPartInfo(_Part):
    """What video input needs (SmolVLM2 bundles only): the frame pipeline's settings and the chat
    template transformers renders conversations with a video with (its DEFAULT_CHAT_TEMPLATE)."""

    _KEY = "video"
    settings: "VideoSettings"
    chat_template: str  # the template's text (read from chat_template_file when the bundle has one)
    chat_template_file: str | None = None  # None: inline in manifest.json (bundles before the file)

    def to_dict(self) -> dict:
        v = self.settings
        return {"settings": {"fps": float(v.fps), "max_frames": int(v.max_frames), "skip_secs": float(v.skip_secs),
                             "longest_edge": int(v.longest_edge), "frame_size": int(v.frame_size),
                             "image_mean": [float(x) for x in v.image_mean],
                             "image_std": [float(x) for x in v.image_std],
                             "rescale_factor": float(v.rescale_factor)},
                **_template_dict(self.chat_template, self.chat_template_file)}

    @classmethod
    def _read(cls, s: "_Section") -> "VideoPartInfo":
        from rksmolvlm.processing.video_frames import VideoSettings

        v = s.obj("settings")
        fps, skip = v.number("fps"), v.number("skip_secs")
        if fps <= 0 or skip < 0:
            raise BundleError(f"{MANIFEST}: 'video.settings' has fps {fps} and skip_secs {skip}: fps must be above 0 "
                              "and skip_secs at least 0; convert the bundle again")
        mean, std = v.float_list("image_mean", 3), v.float_list("image_std", 3)
        try:
            settings = VideoSettings(fps=fps, max_frames=v.integer("max_frames", 1), skip_secs=skip,
                                     longest_edge=v.integer("longest_edge", 1), frame_size=v.integer("frame_size", 1),
                                     image_mean=(mean[0], mean[1], mean[2]), image_std=(std[0], std[1], std[2]),
                                     rescale_factor=v.number("rescale_factor"))
        except ValueError as exc:  # the settings' own checks (a zero std, a rescale of 0, …)
            raise BundleError(f"{MANIFEST}: '{v.where}' is not usable ({exc})") from None
        return cls(settings, *s.template())


@dataclass(frozen=True)
class GoldensInfo(_Part):
    """Golden answers recorded at conversion (``rksmolvlm.bundle.goldens`` reads them): the cases
    file and the reference tower features, both listed in ``files``."""

    _KEY = "goldens"
    cases: str
    features: str
    new_tokens: int

    def to_dict(self) -> dict:
        return {"cases": self.cases, "features": self.features, "new_tokens": self.new_tokens}

    @classmethod
    def _read(cls, s: "_Section") -> "GoldensInfo":
        return cls(s.file("cases"), s.file("features"), s.integer("new_tokens", 1))


@dataclass(frozen=True)
class Manifest:
    """Everything the board reads from a bundle."""

    root: Path  # where the bundle is; not written
    schema_version: int
    created_by: str
    source: SourceInfo
    model: ModelInfo
    target: TargetInfo
    toolkits: dict[str, str | None]
    min_runtime: dict[str, str | None]
    vision: VisionPart | None
    llm: LlmPart | None
    processor: ProcessorInfo
    tokens: TokenInfo
    chat_template: str
    tokenizer: str
    files: dict[str, FileRecord] = field(default_factory=dict)  # the bundle writer lists them at commit
    video: VideoPartInfo | None = None
    goldens: GoldensInfo | None = None
    created_at: str | None = None  # the bundle writer stamps it at commit
    parts: tuple[str, ...] | None = None  # the parts asked for at conversion
    # the file chat_template is read from (listed in files: its sha256 is checked); None: inline in
    # manifest.json, as bundles written before the file have it, which no hash covers
    chat_template_file: str | None = None

    @classmethod
    def read(cls, root: str | os.PathLike) -> "Manifest":
        root = Path(root).expanduser()
        path = root / MANIFEST
        if not path.is_file():
            raise BundleError(f"{root} is not a bundle (no {MANIFEST}): convert a checkpoint first with "
                              "'rksmolvlm convert MODEL -o BUNDLE'")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
            raise BundleError(f"{path} is not valid JSON ({exc}): the bundle is damaged, convert it again") from exc
        return cls.from_dict(data, root)

    def to_dict(self) -> dict:
        """The manifest as ``manifest.json`` holds it (``video`` and ``goldens`` only when present)."""
        out = {"schema_version": self.schema_version, "created_by": self.created_by, "created_at": self.created_at,
               "source": self.source.to_dict(), "model": self.model.to_dict(), "target": self.target.to_dict(),
               "toolkits": dict(self.toolkits), "min_runtime": dict(self.min_runtime),
               "parts": None if self.parts is None else list(self.parts),
               "vision": _dict_or_none(self.vision), "llm": _dict_or_none(self.llm),
               "processor": self.processor.to_dict(), "tokens": self.tokens.to_dict(),
               **_template_dict(self.chat_template, self.chat_template_file), "tokenizer": self.tokenizer}
        if self.video is not None:
            out["video"] = self.video.to_dict()
        if self.goldens is not None:
            out["goldens"] = self.goldens.to_dict()
        out["files"] = {name: record.to_dict() for name, record in self.files.items()}
        return out

    @classmethod
    def from_dict(cls, data: Any, root: str | os.PathLike) -> "Manifest":
        root = Path(root)
        top = _Section(data, MANIFEST, _Bundle(root, None))
        version = data.get("schema_version") if isinstance(data, dict) else None
        if not _is_int(version) or version != SCHEMA_VERSION:
            raise BundleError(f"{root} has bundle schema {version!r}, this rksmolvlm reads schema {SCHEMA_VERSION}: "
                              "convert the checkpoint again with this version, or install the matching rksmolvlm")
        files = top.obj("files")
        records = {name: FileRecord._read(files.obj(name), name) for name in files.keys()}
        top = _Section(data, MANIFEST, _Bundle(root, records))
        processor = ProcessorInfo._read(top.obj("processor"))
        parts = top.optional_str_list("parts", PARTS)
        template, template_file = top.template()
        manifest = cls(
            root=root,
            schema_version=SCHEMA_VERSION,
            created_by=top.string("created_by"),
            source=SourceInfo._read(top.obj("source")),
            model=ModelInfo._read(top.obj("model")),
            target=TargetInfo._read(top.obj("target")),
            toolkits=top.obj("toolkits").str_map(),
            min_runtime=top.obj("min_runtime").str_map(),
            vision=_optional(top, "vision", VisionPart),
            llm=_optional(top, "llm", LlmPart),
            processor=processor,
            tokens=TokenInfo._read(top.obj("tokens"), processor.image_seq_len),
            chat_template=template,
            chat_template_file=template_file,
            tokenizer=top.file("tokenizer"),
            files=records,
            video=_optional(top, "video", VideoPartInfo),
            goldens=_optional(top, "goldens", GoldensInfo),
            created_at=top.optional_str("created_at"),
            parts=None if parts is None else tuple(parts),
        )
        manifest._check_consistency()
        return manifest

    # -- facts derived from the records ---------------------------------------------------------
    def path(self, relative: str) -> Path:
        """A file of the bundle (confined to it)."""
        return confined_path(self.root, relative, relative)

    @property
    def max_context(self) -> int:
        return self.require_llm().max_context

    @property
    def size_bytes(self) -> int:
        return sum(r.size for r in self.files.values())

    def require_parts(self) -> None:
        """Both parts are needed to answer."""
        self.require_llm()
        self.require_vision()

    def require_llm(self) -> LlmPart:
        """The decoder part; a bundle converted without it is refused."""
        if self.llm is None:
            raise BundleError(f"{self.root} has no decoder part: convert with --parts vision,llm")
        return self.llm

    def require_vision(self) -> VisionPart:
        """The vision part; a bundle converted without it is refused."""
        if self.vision is None:
            raise BundleError(f"{self.root} has no vision part: convert with --parts vision,llm")
        return self.vision

    def verify_files(self) -> None:
        """Raise BundleError naming every file that is missing or whose size/sha256 differ."""
        from rksmolvlm.hashing import sha256_file

        problems = []
        for name, record in self.files.items():
            p = self.path(name)
            if not p.is_file():
                problems.append(f"{name} is missing")
            elif p.stat().st_size != record.size:
                problems.append(f"{name} has {p.stat().st_size} bytes, manifest says {record.size}")
            elif sha256_file(p) != record.sha256:
                problems.append(f"{name} sha256 differs from the manifest")
        if problems:
            raise BundleError(f"bundle {self.root} failed verification: {'; '.join(problems)}. "
                              "Copy the bundle again (e.g. rsync -a) or convert it again")

    def _check_consistency(self) -> None:
        if self.video is not None and self.video.settings.frame_size != self.processor.image.tile_size:
            raise BundleError(f"{MANIFEST}: 'video.settings.frame_size' {self.video.settings.frame_size} differs from "
                              f"the tile size {self.processor.image.tile_size}: frames are unsplit tiles; convert the "
                              "bundle again")
        if self.vision is not None and self.vision.output_shape[1:] != (self.model.image_seq_len,
                                                                         self.model.text_hidden_size):
            raise BundleError(f"{MANIFEST}: 'vision.output.shape' {list(self.vision.output_shape)} disagrees with "
                              f"model.vision.image_seq_len {self.model.image_seq_len} and model.text.hidden_size "
                              f"{self.model.text_hidden_size}: the bundle is damaged, convert it again")
        if self.llm is not None and self.llm.embed_shape[1] != self.model.text_hidden_size:
            raise BundleError(f"{MANIFEST}: 'llm.embed_tokens.shape' {list(self.llm.embed_shape)} disagrees with "
                              f"model.text.hidden_size {self.model.text_hidden_size}: convert the bundle again")
        if self.processor.image_seq_len != self.model.image_seq_len:
            raise BundleError(f"{MANIFEST}: 'processor.image_seq_len' {self.processor.image_seq_len} disagrees with "
                              f"'model.vision.image_seq_len' {self.model.image_seq_len}: convert the bundle again")


def confined_path(root: Path, relative: Any, key: str) -> Path:
    """``root / relative`` when ``relative`` is a plain relative path that stays inside ``root``
    (symbolic links included); otherwise a BundleError naming ``key``."""
    if not isinstance(relative, str) or not relative or "\x00" in relative:
        raise BundleError(f"{MANIFEST}: '{key}' must be a relative file path inside the bundle, not {relative!r}: "
                          "the bundle is damaged, convert it again")
    pure = PurePosixPath(relative)
    if pure.is_absolute() or ".." in pure.parts or "\\" in relative:
        raise BundleError(f"{MANIFEST}: '{key}' is {relative!r}, a path outside the bundle: a bundle may only "
                          "name its own files; convert it again")
    path = root / pure
    base = root.resolve()
    try:
        path.resolve().relative_to(base)
    except ValueError:
        raise BundleError(f"{MANIFEST}: '{key}' ({relative!r}) leads outside the bundle through a symbolic link: "
                          "copy the bundle without links to other places") from None
    return path


# -- reading JSON with its place in the manifest ----------------------------------------------
@dataclass(frozen=True)
class _Bundle:
    root: Path
    files: Mapping[str, FileRecord] | None  # None: file names are confined but not looked up


def _optional(s: "_Section", key: str, record: Any) -> Any:
    """The record of an optional (missing or null) section."""
    section = s.optional_obj(key)
    return None if section is None else record._read(section)


CHAT_TEMPLATE_MAX_BYTES = 1 << 20  # a chat template is a few KB: a bigger file is not one


def _template_dict(text: str, file: str | None) -> dict:
    """A chat template as manifest.json holds it: the name of its file (covered by ``files``), or inline."""
    return {"chat_template_file": file} if file is not None else {"chat_template": text}


def _dict_or_none(record: Any) -> dict | None:
    return None if record is None else record.to_dict()


class _Section:
    """A JSON object being read, with its place in the manifest for error messages."""

    def __init__(self, data: Any, where: str, bundle: _Bundle):
        if not isinstance(data, dict):
            raise BundleError(f"{MANIFEST}: '{where}' must be an object, not {_kind(data)}: the bundle is damaged "
                              "or was not written by rksmolvlm; convert it again")
        self.data, self.where, self.bundle = data, where, bundle

    def key(self, key: str) -> str:
        return key if self.where == MANIFEST else f"{self.where}.{key}"

    def _fail(self, key: str, want: str, value: Any = None, missing: bool = False) -> BundleError:
        what = "is missing" if missing else f"must be {want}, not {_kind(value)}"
        return BundleError(f"{MANIFEST}: '{self.key(key)}' {what}: the bundle is damaged or was not written by "
                           "this rksmolvlm; convert it again")

    def _get(self, key: str, want: str) -> Any:
        if key not in self.data:
            raise self._fail(key, want, missing=True)
        return self.data[key]

    def _absent(self, key: str) -> bool:
        return self.data.get(key) is None

    def keys(self) -> list[str]:
        return list(self.data)

    def obj(self, key: str) -> "_Section":
        value = self._get(key, "an object")
        if not isinstance(value, dict):
            raise self._fail(key, "an object", value)
        return _Section(value, self.key(key), self.bundle)

    def optional_obj(self, key: str) -> "_Section | None":
        return None if self._absent(key) else self.obj(key)

    def string(self, key: str) -> str:
        value = self._get(key, "a string")
        if not isinstance(value, str):
            raise self._fail(key, "a string", value)
        return value

    def optional_str(self, key: str) -> str | None:
        return None if self._absent(key) else self.string(key)

    def choice(self, key: str, allowed: tuple[str, ...]) -> str:
        value = self.string(key)
        if value not in allowed:
            raise self._fail(key, f"one of {', '.join(allowed)}", value)
        return value

    def integer(self, key: str, minimum: int | None, maximum: int | None = None, why: str = "") -> int:
        value = self._get(key, "an integer")
        if not _is_int(value) or (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
            raise self._fail(key, "an integer" + (f" ≥ {minimum}" if minimum is not None else "")
                             + (f" and ≤ {maximum}{why}" if maximum is not None else ""), value)
        return value

    def optional_int(self, key: str, minimum: int | None) -> int | None:
        return None if self._absent(key) else self.integer(key, minimum)

    def number(self, key: str) -> float:
        value = self._get(key, "a number")
        if not _is_number(value):
            raise self._fail(key, "a finite number", value)
        return float(value)

    def boolean(self, key: str) -> bool:
        value = self._get(key, "true or false")
        if not isinstance(value, bool):
            raise self._fail(key, "true or false", value)
        return value

    def optional_bool(self, key: str) -> bool | None:
        return None if self._absent(key) else self.boolean(key)

    def sha256(self, key: str) -> str:
        value = self.string(key)
        if len(value) != 64 or any(c not in "0123456789abcdef" for c in value):
            raise self._fail(key, "a sha256 in hex (64 characters)", value)
        return value

    def int_list(self, key: str, length: int | None) -> list[int]:
        value = self._get(key, "a list of integers")
        if not isinstance(value, list) or not all(_is_int(v) and v >= 0 for v in value) or \
                (length is not None and len(value) != length):
            raise self._fail(key, f"a list of {length or 'some'} non-negative integers", value)
        return list(value)

    def float_list(self, key: str, length: int) -> list[float]:
        value = self._get(key, "a list of numbers")
        if not isinstance(value, list) or len(value) != length or not all(_is_number(v) for v in value):
            raise self._fail(key, f"a list of {length} numbers", value)
        return [float(v) for v in value]

    def str_list(self, key: str, allowed: tuple[str, ...] | None = None) -> list[str]:
        want = f"a list of strings from {', '.join(allowed)}" if allowed else "a list of strings"
        value = self._get(key, want)
        if not isinstance(value, list) or not all(isinstance(v, str) and (not allowed or v in allowed)
                                                  for v in value):
            raise self._fail(key, want, value)
        return list(value)

    def optional_str_list(self, key: str, allowed: tuple[str, ...] | None = None) -> list[str] | None:
        return None if self._absent(key) else self.str_list(key, allowed)

    def str_map(self) -> dict[str, str | None]:
        for key, value in self.data.items():
            if value is not None and not isinstance(value, str):
                raise self._fail(key, "a string or null", value)
        return dict(self.data)

    def file(self, key: str) -> str:
        value = self._get(key, "a file name")
        confined_path(self.bundle.root, value, self.key(key))
        if self.bundle.files is not None and value not in self.bundle.files:
            raise BundleError(f"{MANIFEST}: '{self.key(key)}' names {value!r}, which is not among the bundle's "
                              "files: the bundle is damaged, convert it again")
        return value

    def optional_file(self, key: str) -> str | None:
        return None if self._absent(key) else self.file(key)

    def template(self) -> tuple[str, str | None]:
        """(text, file) of the chat template here: read from ``chat_template_file`` (one of the bundle's files,
        so verify_files checks its sha256), else ``chat_template`` inline (bundles written before the file)."""
        if self._absent("chat_template_file"):
            return self.string("chat_template"), None
        if "chat_template" in self.data:
            raise BundleError(f"{MANIFEST}: '{self.where}' has both 'chat_template' and 'chat_template_file': a "
                              "bundle has one of them; convert it again")
        name = self.file("chat_template_file")
        path = confined_path(self.bundle.root, name, self.key("chat_template_file"))
        try:
            if not path.is_file():  # missing, or a FIFO or device that a read would block on
                raise FileNotFoundError(2, "not a regular file")
            with open(path, "rb") as f:
                data = f.read(CHAT_TEMPLATE_MAX_BYTES + 1)
            if len(data) > CHAT_TEMPLATE_MAX_BYTES:
                raise BundleError(f"{path} is over {CHAT_TEMPLATE_MAX_BYTES:,} bytes: it is not a chat template; "
                                  "copy the bundle again or convert it again")
            return data.decode("utf-8"), name
        except OSError as exc:
            raise BundleError(f"{path} (the chat template named by '{self.key('chat_template_file')}') cannot be "
                              f"read ({exc.strerror or exc}): copy the bundle again (e.g. rsync -a) or convert it "
                              "again") from None
        except UnicodeDecodeError:
            raise BundleError(f"{path} (the chat template) is not UTF-8 text: copy the bundle again or convert it "
                              "again") from None


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)) and math.isfinite(value)


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"{str(value).lower()}"
    if isinstance(value, (int, float)):
        return f"the number {value!r}"
    if isinstance(value, str):
        return f"the string {value[:40]!r}"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__

"""The bundle manifest as typed records, read and validated in one place.

``Manifest.read(root)`` is the only code that parses ``manifest.json``: every key is checked for its
type and shape (a wrong one is a ``BundleError`` naming the key), every file path is confined to the
bundle directory, and the schema version is checked. The rest of the runtime reads these records.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

from rksmolvlm.errors import BundleError
from rksmolvlm.processing.image import ImageSettings
from rksmolvlm.processing.prompt import PromptTokens

if TYPE_CHECKING:  # the video settings' module is imported where a bundle has video
    from rksmolvlm.processing.video_frames import VideoSettings

__all__ = ["SCHEMA_VERSION", "MANIFEST", "Manifest", "SourceInfo", "ModelInfo", "TargetInfo", "VisionPart",
           "LlmPart", "ProcessorInfo", "TokenInfo", "FileRecord", "GoldensInfo", "confined_path"]

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
FAMILIES = ("idefics3", "smolvlm")
VISION_DTYPES = ("fp16", "int8")


@dataclass(frozen=True)
class FileRecord:
    path: str  # relative, POSIX, inside the bundle
    size: int
    sha256: str


@dataclass(frozen=True)
class SourceInfo:
    model_id: str
    revision: str | None
    weights: dict[str, str]  # file name → sha256


@dataclass(frozen=True)
class ModelInfo:
    family: str  # idefics3 | smolvlm
    architecture: str
    size: str
    image_seq_len: int
    text_hidden_size: int
    vocab_size: int


@dataclass(frozen=True)
class TargetInfo:
    platform: str
    npu_cores: int


@dataclass(frozen=True)
class VisionPart:
    file: str | None  # vision.rknn
    dtype: str
    onnx: str | None  # host preview
    output_shape: tuple[int, ...]  # (1, image_seq_len, text_hidden)


@dataclass(frozen=True)
class LlmPart:
    file: str | None  # llm.rkllm; None when converted with --llm-host-only
    toolkit_version: str | None
    max_context: int
    embed_tokens: str
    embed_shape: tuple[int, int]  # (vocab, hidden)
    decoder_dir: str | None  # host preview
    dtype: str | None


@dataclass(frozen=True)
class ProcessorInfo:
    image: ImageSettings
    image_seq_len: int


@dataclass(frozen=True)
class VideoPartInfo:
    """What video input needs (SmolVLM2 bundles only): the frame pipeline's settings and the chat
    template transformers renders conversations with a video with (its DEFAULT_CHAT_TEMPLATE)."""

    settings: "VideoSettings"
    chat_template: str


@dataclass(frozen=True)
class GoldensInfo:
    """Golden answers recorded at conversion (rksmolvlm/tools/verify.py reads them): the cases file and the
    reference tower features, both listed in ``files``."""

    cases: str
    features: str
    new_tokens: int


@dataclass(frozen=True)
class TokenInfo:
    prompt: PromptTokens
    eos_ids: tuple[int, ...]
    bos_id: int | None
    pad_id: int | None


@dataclass(frozen=True)
class Manifest:
    """Everything the board reads from a bundle."""

    root: Path
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
    files: dict[str, FileRecord]
    video: VideoPartInfo | None = None
    goldens: GoldensInfo | None = None

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

    @classmethod
    def from_dict(cls, data: Any, root: str | os.PathLike) -> "Manifest":
        root = Path(root)
        top = _Obj(data, MANIFEST, root)
        version = data.get("schema_version") if isinstance(data, dict) else None
        if not _is_int(version) or version != SCHEMA_VERSION:
            raise BundleError(f"{root} has bundle schema {version!r}, this rksmolvlm reads schema {SCHEMA_VERSION}: "
                              "convert the checkpoint again with this version, or install the matching rksmolvlm")
        files = top.obj("files")
        records = {}
        for name in files.keys():
            rec = files.obj(name)
            confined_path(root, name, f"files[{name!r}]")
            records[name] = FileRecord(name, rec.int("size", 0), rec.sha256("sha256"))
        src = top.obj("source")
        weights = src.optional_obj("weights")
        model = top.obj("model")
        m_vision, m_text = model.obj("vision"), model.obj("text")
        target = top.obj("target")
        proc = top.obj("processor")
        toks = top.obj("tokens")
        manifest = cls(
            root=root,
            schema_version=SCHEMA_VERSION,
            created_by=top.str("created_by"),
            source=SourceInfo(src.str("model_id"), src.optional_str("revision"),
                              {k: weights.obj(k).sha256("sha256") for k in weights.keys()} if weights else {}),
            model=ModelInfo(model.choice("family", FAMILIES), model.str("architecture"), model.str("size"),
                            m_vision.int("image_seq_len", 1), m_text.int("hidden_size", 1),
                            m_text.int("vocab_size", 1)),
            target=TargetInfo(target.str("platform"), target.int("npu_cores", 1)),
            toolkits=top.obj("toolkits").str_map(),
            min_runtime=top.obj("min_runtime").str_map(),
            vision=_vision(top.optional_obj("vision"), records),
            llm=_llm(top.optional_obj("llm"), records),
            processor=_processor(proc),
            tokens=_tokens(toks, proc.int("image_seq_len", 1)),
            chat_template=top.str("chat_template"),
            tokenizer=top.file("tokenizer", records),
            files=records,
            video=_video(top.optional_obj("video")),
            goldens=_goldens(top.optional_obj("goldens"), records),
        )
        manifest._check_consistency()
        return manifest

    # -- facts derived from the records ---------------------------------------------------------
    def path(self, relative: str) -> Path:
        """A file of the bundle (confined to it)."""
        return confined_path(self.root, relative, relative)

    @property
    def max_context(self) -> int:
        if self.llm is None:
            raise BundleError(f"{self.root} has no decoder part: convert with --parts vision,llm")
        return self.llm.max_context

    @property
    def size_bytes(self) -> int:
        return sum(r.size for r in self.files.values())

    def require_parts(self) -> None:
        """Both parts are needed to answer."""
        if self.llm is None:
            raise BundleError(f"{self.root} has no decoder part: convert with --parts vision,llm")
        if self.vision is None:
            raise BundleError(f"{self.root} has no vision part: convert with --parts vision,llm")

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


# -- sections ---------------------------------------------------------------------------------
def _vision(section: "_Obj | None", files: dict[str, FileRecord]) -> VisionPart | None:
    if section is None:
        return None
    out = section.obj("output")
    shape = out.int_list("shape", 3)
    return VisionPart(section.optional_file("file", files), section.choice("dtype", VISION_DTYPES),
                      section.optional_file("onnx", files), tuple(shape))


def _llm(section: "_Obj | None", files: dict[str, FileRecord]) -> LlmPart | None:
    if section is None:
        return None
    embed = section.obj("embed_tokens")
    shape = embed.int_list("shape", 2)
    recipe = section.optional_obj("recipe")
    decoder_dir = section.optional_str("decoder_dir")
    if decoder_dir is not None:
        confined_path(section.root, decoder_dir, f"{section.where}.decoder_dir")
    return LlmPart(section.optional_file("file", files), section.optional_str("toolkit_version"),
                   section.int("max_context", 32), embed.file("file", files), (shape[0], shape[1]), decoder_dir,
                   recipe.optional_str("dtype") if recipe else None)


def _processor(p: "_Obj") -> ProcessorInfo:
    mean, std = p.float_list("image_mean", 3), p.float_list("image_std", 3)
    video = p.optional_obj("video_sampling")
    settings = ImageSettings(
        tile_size=p.int("tile_size", 1), longest_edge=p.int("longest_edge", 1),
        do_image_splitting=p.bool("do_image_splitting"), resample=p.int("resample", 0),
        rescale_factor=p.float("rescale_factor"), image_mean=tuple(mean), image_std=tuple(std),
        video_sampling=dict(video.data) if video else {})
    return ProcessorInfo(settings, p.int("image_seq_len", 1))


def _video(v: "_Obj | None") -> VideoPartInfo | None:
    if v is None:
        return None
    from rksmolvlm.processing.video_frames import VideoSettings

    s = v.obj("settings")
    fps = s.float("fps")
    skip = s.float("skip_secs")
    if fps <= 0 or skip < 0:
        raise BundleError(f"{MANIFEST}: 'video.settings' has fps {fps} and skip_secs {skip}: fps must be above 0 and "
                          "skip_secs at least 0; convert the bundle again")
    settings = VideoSettings(fps=fps, max_frames=s.int("max_frames", 1), skip_secs=skip,
                             longest_edge=s.int("longest_edge", 1), frame_size=s.int("frame_size", 1),
                             image_mean=tuple(s.float_list("image_mean", 3)),
                             image_std=tuple(s.float_list("image_std", 3)),
                             rescale_factor=s.float("rescale_factor"))
    return VideoPartInfo(settings, v.str("chat_template"))


def _goldens(g: "_Obj | None", files: dict[str, FileRecord]) -> GoldensInfo | None:
    if g is None:
        return None
    return GoldensInfo(g.file("cases", files), g.file("features", files), g.int("new_tokens", 1))


def _tokens(t: "_Obj", image_seq_len: int) -> TokenInfo:
    eos = t.int_list("eos_ids", None)
    if not eos:
        raise BundleError(f"{MANIFEST}: 'tokens.eos_ids' is empty: the bundle cannot know where an answer ends; "
                          "convert it again")
    prompt = PromptTokens(image=t.str("image"), image_id=t.int("image_id", 0), fake_image=t.str("fake_image"),
                          global_image=t.str("global_image"), image_seq_len=image_seq_len,
                          end_of_utterance=t.str("end_of_utterance"))
    return TokenInfo(prompt, tuple(eos), t.optional_int("bos_id"), t.optional_int("pad_id"))


class _Obj:
    """A JSON object being read, with its place in the manifest for error messages."""

    def __init__(self, data: Any, where: str, root: Path):
        if not isinstance(data, dict):
            raise BundleError(f"{MANIFEST}: '{where}' must be an object, not {_kind(data)}: the bundle is damaged "
                              "or was not written by rksmolvlm; convert it again")
        self.data, self.where, self.root = data, where, root

    def _key(self, key: str) -> str:
        return key if self.where == MANIFEST else f"{self.where}.{key}"

    def _fail(self, key: str, want: str, value: Any = None, missing: bool = False) -> BundleError:
        what = "is missing" if missing else f"must be {want}, not {_kind(value)}"
        return BundleError(f"{MANIFEST}: '{self._key(key)}' {what}: the bundle is damaged or was not written by "
                           "this rksmolvlm; convert it again")

    def _get(self, key: str, want: str) -> Any:
        if key not in self.data:
            raise self._fail(key, want, missing=True)
        return self.data[key]

    def keys(self) -> list[str]:
        return list(self.data)

    def obj(self, key: str) -> "_Obj":
        value = self._get(key, "an object")
        if not isinstance(value, dict):
            raise self._fail(key, "an object", value)
        return _Obj(value, self._key(key), self.root)

    def optional_obj(self, key: str) -> "_Obj | None":
        return None if self.data.get(key) is None else self.obj(key)

    def str(self, key: str) -> str:
        value = self._get(key, "a string")
        if not isinstance(value, str):
            raise self._fail(key, "a string", value)
        return value

    def optional_str(self, key: str) -> str | None:
        return None if self.data.get(key) is None else self.str(key)

    def choice(self, key: str, allowed: tuple[str, ...]) -> str:
        value = self.str(key)
        if value not in allowed:
            raise self._fail(key, f"one of {', '.join(allowed)}", value)
        return value

    def int(self, key: str, minimum: int | None) -> int:
        value = self._get(key, "an integer")
        if not _is_int(value) or (minimum is not None and value < minimum):
            raise self._fail(key, "an integer" + (f" ≥ {minimum}" if minimum is not None else ""), value)
        return value

    def optional_int(self, key: str) -> int | None:
        return None if self.data.get(key) is None else self.int(key, None)

    def float(self, key: str) -> float:
        value = self._get(key, "a number")
        if not _is_number(value):
            raise self._fail(key, "a finite number", value)
        return float(value)

    def bool(self, key: str) -> bool:
        value = self._get(key, "true or false")
        if not isinstance(value, bool):
            raise self._fail(key, "true or false", value)
        return value

    def sha256(self, key: str) -> str:
        value = self.str(key)
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

    def str_map(self) -> dict[str, str | None]:
        for key, value in self.data.items():
            if value is not None and not isinstance(value, str):
                raise self._fail(key, "a string or null", value)
        return dict(self.data)

    def file(self, key: str, files: dict[str, FileRecord]) -> str:
        value = self._get(key, "a file name")
        confined_path(self.root, value, self._key(key))
        if value not in files:
            raise BundleError(f"{MANIFEST}: '{self._key(key)}' names {value!r}, which is not among the bundle's "
                              "files: the bundle is damaged, convert it again")
        return value

    def optional_file(self, key: str, files: dict[str, FileRecord]) -> str | None:
        return None if self.data.get(key) is None else self.file(key, files)


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

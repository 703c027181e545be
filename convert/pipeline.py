"""``rksmolvlm convert``: checkpoint → bundle, step by step, staged and committed atomically."""

from __future__ import annotations

import json
import platform
import shutil
import tempfile
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import numpy as np

from rksmolvlm import __version__
from rksmolvlm.boards import BoardProfile, load_profile
from rksmolvlm.bundle import staged_bundle
from rksmolvlm.bundle.manifest import (CHAT_TEMPLATE_FILE, PARTS, SCHEMA_VERSION, VIDEO_CHAT_TEMPLATE_FILE,
                                       GoldensInfo, LlmPart, Manifest, ModelInfo, ProcessorInfo,
                                       SourceInfo, TargetInfo, TextDecoderInfo, TokenInfo, VideoPartInfo,
                                       VisionAccuracy, VisionInput, VisionOutput, VisionPart, VisionQuantization,
                                       VisionTowerInfo)
from rksmolvlm.errors import AccuracyError, TargetError
from rksmolvlm.convert.progress import Progress
from rksmolvlm.convert.source import Checkpoint, open_checkpoint
from rksmolvlm.processing.image import Resolution
from rksmolvlm.processing.prompt import PromptTokens

__all__ = ["ConvertOptions", "ConvertResult", "convert", "PARTS"]

VISION_FILE, ONNX_FILE, TOKENIZER_FILE, REPORT_FILE = "vision.rknn", "vision.onnx", "tokenizer.json", "report.json"
BUILD_LOG_FILE = "vision-build.log"


@dataclass
class ConvertOptions:
    model: str
    output: Path
    target: str = "rk3588"
    parts: tuple[str, ...] = PARTS
    vision_dtype: str = "fp16"
    quant_algorithm: str = "normal"
    calibration: Path | None = None
    calibration_tiles: int = 24
    evaluation_tiles: int = 3
    min_cosine: float = 0.99
    accept_low_accuracy: bool = False
    host_preview: bool = False
    force: bool = False
    revision: str | None = None
    llm_dtype: str | None = None
    llm_algorithm: str = "normal"
    llm_npu_cores: int | None = None
    max_context: int | None = None
    llm_optimization: int = 1
    llm_dataset_format: str | None = None
    llm_host_only: bool = False
    llm_prompts: Path | None = None
    # the resolution budget the decoder calibration renders images at (None: the checkpoint's full split)
    llm_calibration_resolution: Resolution | None = None
    goldens: bool = True  # record golden answers (both parts only) for `rksmolvlm verify`


@dataclass
class ConvertResult:
    bundle: Path
    manifest: dict
    report: dict
    timings: dict[str, float] = field(default_factory=dict)

    def summary(self) -> str:
        files = self.manifest["files"]
        width = max(len(n) for n in files)
        lines = [f"bundle: {self.bundle}"]
        lines += [f"  {name:<{width}}  {_human(rec['size']):>9}" for name, rec in files.items()]
        vision = self.report.get("vision")
        if vision:
            sim = vision["simulator_vs_torch"]
            lines.append(f"vision ({vision['dtype']}, {vision['target']}): simulator cosine {sim['cosine']:.6f} "
                         f"(worst tile {sim['min_tile_cosine']:.6f}), max-abs {sim['max_abs']:.3g}; "
                         f"ONNX max-abs {vision['onnx_vs_torch']['max_abs']:.2g}; "
                         f"CPU fallback ops: {len(vision['cpu_fallback_ops'])}")
        llm = self.report.get("llm")
        if llm:
            board = (f"llm.rkllm ({llm['recipe']['dtype']}, rkllm-toolkit {llm['toolkit_version']}, "
                     f"{llm['calibration']['format']} calibration: {llm['calibration']['samples']} samples, "
                     f"{llm['calibration']['tokens']} tokens)") if llm.get("toolkit_version") else \
                "no board decoder (--llm-host-only): host preview only"
            lines.append(f"decoder: {board}; decoder logits vs checkpoint max-abs {llm['decoder_max_abs']:.2g}")
        lines.append("times: " + ", ".join(f"{k} {v:.1f} s" for k, v in self.timings.items()))
        return "\n".join(lines)


def _human(size: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return str(size)


def _validate(options: ConvertOptions) -> BoardProfile:
    """Refuse bad combinations before any heavy work."""
    profile = load_profile(options.target)
    unknown = [p for p in options.parts if p not in PARTS]
    if unknown or not options.parts:
        raise TargetError(f"unknown --parts {','.join(unknown) or '(none)'}: choose from {','.join(PARTS)}")
    if options.vision_dtype not in profile.vision_dtypes:
        raise TargetError(f"--vision-dtype {options.vision_dtype!r} is not available on {profile.name}: "
                          f"choose one of {', '.join(profile.vision_dtypes)}")
    from rksmolvlm.convert.vision_rknn import QUANT_ALGORITHMS, rknn_toolkit_version

    if options.quant_algorithm not in QUANT_ALGORITHMS:
        raise TargetError(f"--quant-algorithm {options.quant_algorithm!r} is unknown: choose one of "
                          f"{', '.join(QUANT_ALGORITHMS)}")
    if not 0.0 < options.min_cosine <= 1.0:
        raise TargetError(f"--min-cosine {options.min_cosine} must be in (0, 1]")
    if options.calibration_tiles < 1 or options.evaluation_tiles < 1:
        raise TargetError("--calibration-tiles and --evaluation-tiles must be at least 1")
    if "vision" in options.parts:
        rknn_toolkit_version()
    if "llm" in options.parts:
        from rksmolvlm.convert.llm_recipe import make_recipe
        from rksmolvlm.convert.llm_rkllm import DATASET_FORMATS, require_toolkit

        make_recipe(profile, options.llm_dtype, options.llm_algorithm, options.llm_npu_cores,
                    options.max_context or 4096, options.llm_optimization)
        if options.llm_dataset_format not in (None, *DATASET_FORMATS):
            raise TargetError(f"--llm-dataset-format {options.llm_dataset_format!r} is unknown: choose one of "
                              f"{', '.join(DATASET_FORMATS)}")
        if not options.llm_host_only:
            require_toolkit()
    return profile


def _versions() -> dict:
    out = {}
    for name in ("rknn-toolkit2", "torch", "transformers", "onnx", "onnxruntime"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def convert(options: ConvertOptions, progress: Progress | None = None) -> ConvertResult:
    profile = _validate(options)
    steps = 2 + (4 if "vision" in options.parts else 0) + (3 if "llm" in options.parts else 0)
    steps += 1 if set(PARTS) <= set(options.parts) and options.goldens else 0  # golden answers need both parts
    progress = progress or Progress(steps)
    progress.total = progress.total or steps
    with progress.step("reading the checkpoint"):
        checkpoint = open_checkpoint(options.model, revision=options.revision)
        progress.note(checkpoint.describe())
        if options.llm_calibration_resolution is not None and "llm" in options.parts:
            try:
                options.llm_calibration_resolution.check(checkpoint.image.tile_size)
            except ValueError as exc:
                raise TargetError(f"--llm-calibration-image-size: {exc}") from None
    report: dict = {"rksmolvlm": __version__, "model": checkpoint.model_id}
    versions = _versions()
    recipe = None
    if "llm" in options.parts:  # the model's own context bounds the recipe: still before heavy work
        from rksmolvlm.convert.llm_recipe import CONTEXT_ALIGN, make_recipe

        trained = checkpoint.text.max_position_embeddings
        context = options.max_context or min(4096, trained - trained % CONTEXT_ALIGN)
        recipe = make_recipe(profile, options.llm_dtype, options.llm_algorithm, options.llm_npu_cores, context,
                             options.llm_optimization, model_context=trained)
    towers = TowerCache(checkpoint)
    with staged_bundle(options.output, overwrite=options.force) as stage, \
            tempfile.TemporaryDirectory(prefix="rksmolvlm-work-") as work_dir:
        work = Path(work_dir)
        vision_section = llm_section = None
        if "vision" in options.parts:
            vision_section, report["vision"] = _convert_vision(checkpoint, profile, options, stage.path, work,
                                                               progress, towers)
        if "llm" in options.parts:
            from rksmolvlm.convert.llm_part import convert_llm

            llm_section, report["llm"] = convert_llm(checkpoint, recipe, options, stage.path, work, progress, towers)
        goldens_section = None
        if vision_section is not None and llm_section is not None and options.goldens:
            from rksmolvlm.convert.goldens import record_goldens

            with progress.step("recording golden answers with transformers (float32)"):
                goldens_section, report["goldens"] = record_goldens(checkpoint, stage.path, towers, progress,
                                                                    llm_section.max_context)
        towers.clear()
        with progress.step("writing the bundle manifest"):
            shutil.copy2(checkpoint.path / TOKENIZER_FILE, stage.path / TOKENIZER_FILE)
            _write_templates(checkpoint, stage.path)  # files of the bundle: its sha256s cover them
            stage.manifest = _manifest(checkpoint, profile, options, versions, vision_section, llm_section,
                                       goldens_section, stage.path)
            if goldens_section is not None:
                from rksmolvlm.convert.goldens import verify_staged

                report["verify"] = verify_staged(stage.path, stage.manifest)
                if "skipped" not in report["verify"]:
                    progress.note(f"verify (host engines): {report['verify']['verdict']}, token agreement "
                                  f"{report['verify']['agreement']:.0%}")
            (stage.path / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return ConvertResult(stage.path, stage.manifest.to_dict(), report, dict(progress.timings))


class TowerCache:
    """Image features for every step that needs them: the tower + connector loaded once, each
    distinct tile encoded once (keyed by a hash of its bytes), in onnxruntime on the just-exported
    ``vision.onnx`` once the conversion has checked it matches torch, else in eager torch.

    ``memoize`` and ``prefer_onnx`` (class defaults, per instance too) exist so the conversion
    bench can measure the old behaviour (every tile encoded in torch each time it is asked for)."""

    memoize = True
    prefer_onnx = True

    def __init__(self, checkpoint: Checkpoint):
        self.checkpoint = checkpoint
        self._tower = None
        self._session = None
        self._onnx_path: Path | None = None
        self._features: dict[bytes, np.ndarray] = {}
        self.requested = 0  # tiles asked for
        self.encoded = 0  # tiles run through an engine
        self.engine = "torch"

    @property
    def tower(self):
        if self._tower is None:
            from rksmolvlm.convert.vision_tower import load_vision_tower

            self._tower, _ = load_vision_tower(self.checkpoint)
        return self._tower

    def use_onnx(self, onnx_path: Path, check) -> bool:
        """Encode with onnxruntime on ``onnx_path`` from now on if ``check`` (its OnnxCheck against
        torch) passes the exactness bar; return whether it does."""
        from rksmolvlm.convert.vision_tower import onnx_matches

        if not self.prefer_onnx or not onnx_matches(check):
            return False
        self._onnx_path, self._session, self.engine = Path(onnx_path), None, "onnxruntime"
        return True

    def features(self, tiles_u8: np.ndarray) -> np.ndarray:
        """uint8 NHWC tiles → (tiles, image_seq_len, text_hidden) float32 features."""
        self.requested += len(tiles_u8)
        if not self.memoize:
            return self._encode(tiles_u8)
        keys = [_tile_key(t) for t in tiles_u8]
        missing = {}
        for i, key in enumerate(keys):
            if key not in self._features and key not in missing:
                missing[key] = i
        if missing:
            computed = self._encode(tiles_u8[list(missing.values())])
            self._features.update(zip(missing, computed))
        if not keys:
            return np.empty((0, self.checkpoint.vision.image_seq_len, self.checkpoint.text.hidden_size), np.float32)
        return np.stack([self._features[k] for k in keys])

    def _encode(self, tiles_u8: np.ndarray) -> np.ndarray:
        from rksmolvlm.processing.image import normalize

        self.encoded += len(tiles_u8)
        x = normalize(tiles_u8, self.checkpoint.image)
        if self._onnx_path is not None:
            from rksmolvlm.convert.vision_tower import onnx_features, onnx_session

            if self._session is None:
                self._session = onnx_session(self._onnx_path)
            return onnx_features(self._session, x)
        from rksmolvlm.convert.vision_tower import torch_features

        return torch_features(self.tower, x)

    def release(self) -> None:
        """Free the torch model and the onnxruntime session (the feature cache stays: it is small)."""
        self._tower = self._session = None

    def clear(self) -> None:
        self.release()
        self._features = {}


def _tile_key(tile: np.ndarray) -> bytes:
    import hashlib

    tile = np.ascontiguousarray(tile)
    return hashlib.blake2b(tile.tobytes(), digest_size=20, person=repr(tile.shape).encode()[:16]).digest()


def _convert_vision(checkpoint: Checkpoint, profile: BoardProfile, options: ConvertOptions, bundle: Path,
                    work: Path, progress: Progress, towers: TowerCache) -> tuple[VisionPart, dict]:
    from rksmolvlm.calibration.vision_set import build_tile_sets, collect_images, shipped_images_dir, write_rknn_dataset
    from rksmolvlm.processing.image import normalize
    from rksmolvlm.convert.metrics import cosine, max_abs, per_row_cosine_min
    from rksmolvlm.convert.vision_rknn import build_vision_rknn
    from rksmolvlm.convert.vision_tower import check_onnx, export_onnx, torch_features

    with progress.step("tiling calibration images"):
        source = Path(options.calibration) if options.calibration else shipped_images_dir()
        images = collect_images(source)
        calibration_tiles = options.calibration_tiles if options.vision_dtype == "int8" else 0
        sets = build_tile_sets(images, checkpoint.image, calibration_tiles, options.evaluation_tiles)
        if calibration_tiles:
            progress.note(f"{len(sets.calibration)} calibration tiles from {len(sets.calibration_images)} images")
        progress.note(f"{len(sets.evaluation)} held-out tiles from {len(sets.evaluation_images)} images ({source})")
    with progress.step("exporting the vision tower to ONNX"):
        onnx_path = (bundle if options.host_preview else work) / ONNX_FILE
        export_seconds = export_onnx(towers.tower, onnx_path, checkpoint.vision.tile_size)
        eval_float = normalize(sets.evaluation, checkpoint.image)
        reference = torch_features(towers.tower, eval_float)
        towers.release()  # free the VLM before the toolkit's own memory peak
        onnx_check = check_onnx(onnx_path, eval_float, reference)
        progress.note(f"onnxruntime vs torch: max-abs {onnx_check.max_abs:.2g}, cosine {onnx_check.cosine:.8f}")
        if towers.use_onnx(onnx_path, onnx_check):
            progress.note("later image features (decoder calibration) come from onnxruntime on this ONNX")
    dataset = None
    if options.vision_dtype == "int8":
        dataset = write_rknn_dataset(sets.calibration, work / "calibration")
    with progress.step(f"building {VISION_FILE} ({options.vision_dtype}, {profile.name}) with rknn-toolkit2"):
        build = build_vision_rknn(onnx_path, bundle / VISION_FILE, profile, options.vision_dtype,
                                  log_path=bundle / BUILD_LOG_FILE, dataset=dataset,
                                  algorithm=options.quant_algorithm, evaluation_tiles=sets.evaluation)
        # the held-out tiles run in the simulator inside this step: say where its time went
        per_tile = build.simulate_seconds / max(len(sets.evaluation), 1)
        progress.note(f"rknn build {build.seconds:.1f} s, then the simulator on {len(sets.evaluation)} held-out "
                      f"tiles {build.simulate_seconds:.1f} s ({per_tile:.1f} s/tile)")
    with progress.step("checking the RKNN model in the simulator"):
        sim = build.simulated.reshape(reference.shape)
        sim_cos, sim_min, sim_abs = cosine(sim, reference), per_row_cosine_min(sim, reference), max_abs(sim, reference)
        progress.note(f"simulator vs torch on {len(sim)} held-out tiles: cosine {sim_cos:.6f} "
                      f"(worst tile {sim_min:.6f}), max-abs {sim_abs:.3g}")
        by_kind = _scores_by_kind(sim, reference, sets.evaluation_global)
        progress.note("; ".join(f"{kind} tiles ({v['tiles']}): cosine {v['cosine']:.6f}, "
                                f"worst {v['min_tile_cosine']:.6f}" for kind, v in by_kind.items() if v))
        for layer in build.cpu_fallback:
            progress.note(f"WARNING: {layer.op} ({layer.name}) runs on the CPU, not the NPU")
    report = {
        "dtype": options.vision_dtype, "target": profile.name,
        "quantization": {"dtype": "w8a8", "algorithm": options.quant_algorithm,
                         "calibration_tiles": int(len(sets.calibration)),
                         "calibration_images": sets.calibration_images} if dataset else None,
        "evaluation_images": sets.evaluation_images,
        "onnx_vs_torch": {"tiles": onnx_check.tiles, "max_abs": onnx_check.max_abs, "cosine": onnx_check.cosine},
        "simulator_vs_torch": {"tiles": int(len(sim)), "cosine": sim_cos, "min_tile_cosine": sim_min,
                               "max_abs": sim_abs, **by_kind},
        "min_cosine": options.min_cosine,
        "accepted_below_floor": False,
        "cpu_fallback_ops": [{"op": layer.op, "name": layer.name} for layer in build.cpu_fallback],
        "layers": len(build.layers),
        "static_cycles": build.static_cycles,
        "seconds": {"onnx_export": export_seconds, "rknn_build": build.seconds,
                    "simulator": build.simulate_seconds},
    }
    if sim_min < options.min_cosine:
        message = (f"the {options.vision_dtype} vision model scores cosine {sim_min:.5f} on its worst held-out tile, "
                   f"below the floor {options.min_cosine}")
        if not options.accept_low_accuracy:
            raise AccuracyError(message + ": try --vision-dtype fp16, --quant-algorithm mmse, a calibration set "
                                "closer to your images (--calibration DIR), or pass --accept-low-accuracy to keep it")
        progress.note("WARNING: " + message + " (accepted with --accept-low-accuracy)")
        report["accepted_below_floor"] = True
    tile = checkpoint.vision.tile_size
    quantization = None
    if dataset:
        quantization = VisionQuantization("w8a8", options.quant_algorithm, int(len(sets.calibration)),
                                          tuple(sets.calibration_images))
    section = VisionPart(
        file=VISION_FILE, dtype=options.vision_dtype, onnx=ONNX_FILE if options.host_preview else None,
        output=VisionOutput((1, checkpoint.vision.image_seq_len, checkpoint.text.hidden_size), "image_features",
                            "float32"),
        input=VisionInput((1, tile, tile, 3), "pixel_values", "NHWC", "uint8", "baked in: (x - 127.5) / 127.5"),
        quantization=quantization, accuracy=VisionAccuracy(sim_cos, sim_min))
    return section, report


def _scores_by_kind(sim: np.ndarray, reference: np.ndarray, is_global: np.ndarray | None) -> dict:
    """The simulator's scores on the global and on the split held-out tiles apart (None: no such tile)."""
    from rksmolvlm.convert.metrics import cosine, max_abs, per_row_cosine_min

    is_global = np.ones(len(sim), bool) if is_global is None else np.asarray(is_global, bool)
    out = {}
    for kind, mask in (("global", is_global), ("split", ~is_global)):
        out[kind] = {"tiles": int(mask.sum()), "cosine": cosine(sim[mask], reference[mask]),
                     "min_tile_cosine": per_row_cosine_min(sim[mask], reference[mask]),
                     "max_abs": max_abs(sim[mask], reference[mask])} if mask.any() else None
    return out


def video_chat_template() -> str:
    """The template transformers renders every conversation with a video with (SmolVLM2's hub chat
    templates have no video branch; its processor falls back to this one)."""
    from transformers.models.smolvlm import processing_smolvlm

    return processing_smolvlm.DEFAULT_CHAT_TEMPLATE


def _manifest(checkpoint: Checkpoint, profile: BoardProfile, options: ConvertOptions, versions: dict,
              vision: VisionPart | None, llm: LlmPart | None, goldens: GoldensInfo | None, root: Path) -> Manifest:
    """The bundle's manifest as records (its files are listed when the bundle is committed)."""
    toolkit = llm.toolkit_version if llm else None
    v, t, k = checkpoint.vision, checkpoint.text, checkpoint.tokens
    return Manifest(
        root=root, schema_version=SCHEMA_VERSION, created_by=f"rksmolvlm {__version__}",
        source=SourceInfo(checkpoint.model_id, checkpoint.revision, dict(checkpoint.weights)),
        model=ModelInfo(checkpoint.family, checkpoint.architecture, checkpoint.size_label,
                        VisionTowerInfo(v.image_seq_len, v.tile_size, v.patch_size, v.hidden_size, v.num_layers,
                                        v.num_heads, v.scale_factor),
                        TextDecoderInfo(t.hidden_size, t.vocab_size, t.num_layers, t.num_heads, t.num_kv_heads,
                                        t.max_position_embeddings, t.tie_word_embeddings)),
        target=TargetInfo(profile.name, profile.npu_cores),
        toolkits={**versions, "rkllm-toolkit": toolkit, "python": platform.python_version()},
        min_runtime={"rksmolvlm": __version__, "librknnrt": versions.get("rknn-toolkit2"), "librkllmrt": toolkit},
        parts=tuple(options.parts),
        vision=vision,
        llm=llm,
        processor=ProcessorInfo(checkpoint.image, v.image_seq_len),
        tokens=TokenInfo(PromptTokens(k.image, k.image_id, k.fake_image, k.global_image, v.image_seq_len,
                                      k.end_of_utterance),
                         tuple(k.eos_ids), k.bos_id, k.pad_id, k.fake_image_id, k.global_image_id,
                         k.end_of_utterance_id, k.bos, k.eos, k.eos_id, k.pad, k.row_col_are_tokens),
        chat_template=checkpoint.chat_template,
        chat_template_file=CHAT_TEMPLATE_FILE,
        tokenizer=TOKENIZER_FILE,
        video=VideoPartInfo(checkpoint.video, video_chat_template(), VIDEO_CHAT_TEMPLATE_FILE)
        if checkpoint.video is not None else None,
        goldens=goldens,
    )


def _write_templates(checkpoint: Checkpoint, root: Path) -> None:
    """The chat templates _manifest names, as files of the bundle (UTF-8, exactly the checkpoint's text)."""
    (root / CHAT_TEMPLATE_FILE).write_bytes(checkpoint.chat_template.encode("utf-8"))
    if checkpoint.video is not None:
        (root / VIDEO_CHAT_TEMPLATE_FILE).write_bytes(video_chat_template().encode("utf-8"))

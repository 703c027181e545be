"""Calibration and evaluation tiles for the vision tower, made with the runtime's own preprocessing.

Images are tiled exactly as the board will tile them (``runtime.preprocess``), so int8 ranges are
measured on the tiles the NPU will really see, global images included. Every fourth image (by
name) is held out: its tiles score the converted model and never calibrate it.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np

from rksmolvlm.errors import CalibrationError, ImageError
from rksmolvlm.processing.image import ImageSettings, preprocess

__all__ = ["IMAGE_SUFFIXES", "TileSets", "shipped_images_dir", "collect_images", "build_tile_sets",
           "write_rknn_dataset"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
HOLDOUT_EVERY = 4


@dataclass
class TileSets:
    """uint8 NHWC tiles for calibration and for the held-out accuracy check."""

    calibration: np.ndarray
    evaluation: np.ndarray
    calibration_images: list[str]
    evaluation_images: list[str]
    # per evaluation tile: True for a global (squashed whole-image) tile, False for a split tile
    evaluation_global: np.ndarray | None = None


def shipped_images_dir() -> Path:
    """The calibration images shipped with rksmolvlm (see calibration/LICENSES.md)."""
    return Path(str(resources.files(__package__) / "images"))


def collect_images(directory: str | Path) -> list[Path]:
    """Every image file (by suffix) directly in ``directory`` or below it, sorted by path."""
    root = Path(directory).expanduser()
    if not root.is_dir():
        raise CalibrationError(f"calibration directory {root} does not exist: pass a folder of images "
                               "with --calibration DIR, or omit it to use the shipped set")
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise CalibrationError(f"{root} holds no images ({', '.join(IMAGE_SUFFIXES)}): add images or point "
                               "--calibration at another folder")
    return files


def _even_pick(count: int, want: int) -> list[int]:
    if want >= count:
        return list(range(count))
    return sorted({int(round(i * (count - 1) / max(want - 1, 1))) for i in range(want)})


def build_tile_sets(images: list[Path], settings: ImageSettings, calibration_tiles: int = 24,
                    evaluation_tiles: int = 6) -> TileSets:
    """Tile the images; pick ``calibration_tiles`` evenly from the calibration images (global
    images first, then the split tiles) and ``evaluation_tiles`` from the held-out ones: half of
    them (rounded down, at least one when there are two or more) split tiles, the rest global
    tiles, so the accuracy check scores both kinds the board encodes.
    ``calibration_tiles=0`` skips the calibration images (fp16 builds)."""
    if len(images) < 2:
        raise CalibrationError("a calibration set needs at least 2 images (one is held out for the accuracy "
                               "check): add images to the folder")
    held_out = [p for i, p in enumerate(images) if i % HOLDOUT_EVERY == HOLDOUT_EVERY - 1] or [images[-1]]
    calibration = [p for p in images if p not in held_out]

    def tiled(paths: list[Path]) -> tuple[list[np.ndarray], list[np.ndarray]]:
        globals_, splits = [], []
        for path in paths:
            try:
                tiled = preprocess(path, settings)
            except ImageError as exc:
                raise CalibrationError(f"calibration image {path} cannot be used: {exc}. Remove or replace the "
                                       "file") from exc
            globals_.append(tiled.tiles[-1])
            splits.extend(tiled.tiles[:-1])
        return globals_, splits

    def tiles_of(paths: list[Path], want: int) -> np.ndarray:
        if want <= 0:  # fp16 needs no calibration: do not tile what is not used
            return np.empty((0, settings.tile_size, settings.tile_size, 3), dtype=np.uint8)
        globals_, splits = tiled(paths)
        ordered = globals_ + [splits[i] for i in _even_pick(len(splits), max(want - len(globals_), 0))]
        return np.stack([ordered[i] for i in _even_pick(len(ordered), want)])

    def evaluation_of(paths: list[Path], want: int) -> tuple[np.ndarray, np.ndarray]:
        globals_, splits = tiled(paths)
        n_split = min(max(want // 2, 1) if want >= 2 else 0, len(splits))
        n_global = min(want - n_split, len(globals_))
        n_split = min(want - n_global, len(splits))  # too few globals: more split tiles
        picked = [globals_[i] for i in _even_pick(len(globals_), n_global)] if n_global else []
        picked += [splits[i] for i in _even_pick(len(splits), n_split)] if n_split else []
        return np.stack(picked), np.array([True] * n_global + [False] * n_split)

    evaluation, evaluation_global = evaluation_of(held_out, evaluation_tiles)
    return TileSets(tiles_of(calibration, calibration_tiles), evaluation,
                    [p.name for p in calibration], [p.name for p in held_out], evaluation_global)


def write_rknn_dataset(tiles: np.ndarray, directory: Path) -> Path:
    """Write one NCHW uint8 ``.npy`` per tile (the ONNX input layout; rknn-toolkit2 applies the
    baked-in mean/std itself) and the dataset list file; return the list file."""
    directory.mkdir(parents=True, exist_ok=True)
    lines = []
    for i, tile in enumerate(tiles):
        path = directory / f"tile_{i:04d}.npy"
        np.save(path, np.ascontiguousarray(tile.transpose(2, 0, 1)[None]))
        lines.append(str(path.resolve()))
    listing = directory / "dataset.txt"
    listing.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return listing

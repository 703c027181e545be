"""The bundle's tower in rknn-toolkit2's x86 simulator, as a vision encoder (``--engine sim``).

The RKNN model is built again from the bundle's ``vision.onnx`` with the bundle's dtype (int8:
quantized on the shipped calibration images, as the converter does by default), and the simulator
runs the tiles given at start: rknn-toolkit2 simulates only inside the build session, so ``encode``
looks their features up. Host side only (rknn-toolkit2, the converter's RKNN build, calibration);
``rksmolvlm.runners`` opens it with the host decoder.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from rksmolvlm.errors import BundleError

if TYPE_CHECKING:
    from rksmolvlm.runtime.loader import RuntimeBundle

__all__ = ["SimulatedVisionEncoder", "simulation_notes"]


class SimulatedVisionEncoder:
    """The simulated tower: features of the tiles given at start, looked up by their pixels."""

    def __init__(self, bundle: "RuntimeBundle", tiles: np.ndarray, work: Path):
        from rksmolvlm.boards import load_profile
        from rksmolvlm.convert.vision_rknn import build_vision_rknn

        part = bundle.manifest.vision
        if part is None or part.onnx is None:
            raise BundleError(f"{bundle.path} has no vision.onnx: the simulator builds the tower from it; convert "
                              "with --host-preview")
        tiles = np.unique(tiles, axis=0) if len(tiles) else tiles
        build = build_vision_rknn(bundle.file(part.onnx), work / "vision.rknn",
                                  load_profile(bundle.manifest.target.platform), part.dtype,
                                  log_path=work / "vision-build.log", dataset=_calibration(bundle, part.dtype, work),
                                  evaluation_tiles=tiles)
        shape = part.output_shape[1:]
        simulated = build.simulated.reshape((len(tiles), *shape)) if len(tiles) else np.zeros((0, *shape))
        self._features = {t.tobytes(): f for t, f in zip(tiles, simulated)}

    def encode(self, tiles: np.ndarray) -> np.ndarray:
        try:
            return np.stack([self._features[t.tobytes()] for t in tiles]).astype(np.float32)
        except KeyError:
            raise BundleError("a tile the simulator was not given at start: pass every tile the run will encode "
                              "to SimulatedVisionEncoder (rknn-toolkit2 simulates only inside its build)") from None

    def encode_frames(self, frames: np.ndarray) -> np.ndarray:
        return self.encode(frames)  # the RKNN model bakes in (x − 127.5) / 127.5 for both

    def close(self) -> None:
        self._features = {}


def simulation_notes(bundle: "RuntimeBundle") -> list[str]:
    """What ``--engine sim`` runs, for the report: the simulated tower, and a decoder in torch float32
    (rkllm-toolkit's host simulation of the quantized decoder is not driven)."""
    notes = [f"tower: rknn-toolkit2 simulator ({bundle.manifest.vision.dtype}, {bundle.manifest.target.platform})"]
    if importlib.util.find_spec("rkllm") is None:
        notes.append("decoder: torch float32 (rkllm-toolkit is not installed, so its host simulation of the "
                     "quantized decoder is not run; --engine npu on the board shows what the quantization does)")
    else:
        notes.append("decoder: torch float32 (rkllm-toolkit is installed, but verify does not drive its host "
                     "simulation yet; --engine npu on the board shows what the quantization does)")
    return notes


def _calibration(bundle: "RuntimeBundle", dtype: str, work: Path) -> Path | None:
    """int8: the dataset the converter quantizes with by default (the shipped calibration images)."""
    if dtype != "int8":
        return None
    from rksmolvlm.calibration.vision_set import (build_tile_sets, collect_images, shipped_images_dir,
                                                  write_rknn_dataset)

    sets = build_tile_sets(collect_images(shipped_images_dir()), bundle.settings, 24, 1)
    return write_rknn_dataset(sets.calibration, work / "calibration")

"""ONNX tower → RKNN with rknn-toolkit2, checked in the x86 simulator in the same process.

SigLIP normalization is baked in (mean = std = 127.5 per channel), so the board feeds uint8 NHWC
tiles. The compiler's "Network Layer Information Table" (verbose output) is parsed to list every
op that falls back to the CPU; the toolkit's whole output goes to a log file, not the terminal.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from rksmolvlm.boards import BoardProfile
from rksmolvlm.errors import TargetError, ToolkitFailedError, ToolkitMissingError

__all__ = ["LayerInfo", "RknnBuild", "build_vision_rknn", "parse_layer_table", "rknn_toolkit_version",
           "VISION_DTYPES", "QUANT_ALGORITHMS"]

VISION_DTYPES = ("fp16", "int8")
QUANT_ALGORITHMS = ("normal", "mmse", "kl_divergence")
_IO_OPS = {"InputOperator", "OutputOperator"}


@dataclass(frozen=True)
class LayerInfo:
    index: int
    op: str
    dtype: str
    target: str
    name: str
    cycles: int


@dataclass
class RknnBuild:
    """What one RKNN build produced and measured."""

    path: Path
    dtype: str
    target: str
    algorithm: str | None
    seconds: float
    layers: list[LayerInfo] = field(default_factory=list)
    simulated: np.ndarray | None = None  # simulator outputs for the evaluation tiles
    simulate_seconds: float = 0.0

    @property
    def cpu_fallback(self) -> list[LayerInfo]:
        return [layer for layer in self.layers if layer.target != "NPU" and layer.op not in _IO_OPS]

    @property
    def static_cycles(self) -> int:
        return sum(layer.cycles for layer in self.layers)


def rknn_toolkit_version() -> str:
    try:
        from importlib.metadata import version

        return version("rknn-toolkit2")
    except Exception as exc:  # PackageNotFoundError
        raise ToolkitMissingError(
            "rknn-toolkit2 is not installed: run scripts/setup.sh (it installs rknn-toolkit2 2.5.0 with "
            "--no-deps next to torch 2.13), or 'pip install --no-deps rknn-toolkit2==2.5.0' plus its "
            "dependencies (see README)") from exc


_ROW = re.compile(r"^\s*(\d+)\s+(\S+)\s+(\S+)\s+(CPU|NPU|GPU)\s+.*?\s(\d+)/(\d+)/(\d+)\s+\S+\s+(\S+)\s*$")


def parse_layer_table(log: str) -> list[LayerInfo]:
    """Rows of the last "Network Layer Information Table" in the toolkit's verbose output."""
    lines = log.splitlines()
    starts = [i for i, line in enumerate(lines) if "Network Layer Information Table" in line]
    if not starts:
        return []
    layers = []
    for line in lines[starts[-1] + 1:]:
        body = re.sub(r"^[DIWE] RKNN: \[[\d:.]+\]\s?", "", line)
        if body.startswith("ID ") or set(body.strip()) <= {"-"}:
            if layers and set(body.strip()) <= {"-"} and body.strip():
                break
            continue
        match = _ROW.match(body)
        if not match:
            if layers:
                break
            continue
        index, op, dtype, target, _, _, total, name = match.groups()
        layers.append(LayerInfo(int(index), op, dtype, target, name, int(total)))
    return layers


@contextlib.contextmanager
def _captured_output(log_path: Path):
    """Send fd 1 and 2 (the toolkit's Python and native logging) to ``log_path``."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with open(log_path, "wb") as log:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        try:
            yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])


@contextlib.contextmanager
def _cwd(path: Path):
    previous = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(previous)


def build_vision_rknn(onnx_path: Path, out_path: Path, profile: BoardProfile, dtype: str, log_path: Path,
                      dataset: Path | None = None, algorithm: str = "normal",
                      evaluation_tiles: np.ndarray | None = None) -> RknnBuild:
    """Build ``onnx_path`` for ``profile`` as fp16 or int8 (w8a8 from ``dataset``), export it to
    ``out_path`` and run ``evaluation_tiles`` (uint8 NHWC) in the simulator."""
    if dtype not in profile.vision_dtypes:
        raise TargetError(f"vision dtype {dtype!r} is not available on {profile.name}: choose one of "
                          f"{', '.join(profile.vision_dtypes)}")
    if algorithm not in QUANT_ALGORITHMS:
        raise TargetError(f"unknown quantization algorithm {algorithm!r}: choose one of {', '.join(QUANT_ALGORITHMS)}")
    if dtype == "int8" and dataset is None:
        raise TargetError("int8 needs a calibration dataset")
    rknn_toolkit_version()
    from rknn.api import RKNN

    # rknn-toolkit2 runs in a temp working directory (its side files): relative paths must not follow it
    onnx_path, out_path, log_path = Path(onnx_path).resolve(), Path(out_path).resolve(), Path(log_path).resolve()
    dataset = Path(dataset).resolve() if dataset is not None else None

    start = time.perf_counter()
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="rksmolvlm-rknn-") as work, _cwd(Path(work)), \
            _captured_output(log_path):
        rknn = RKNN(verbose=True)
        try:
            _check(rknn.config(mean_values=[[127.5] * 3], std_values=[[127.5] * 3],
                               target_platform=profile.rknn_target, quantized_dtype="w8a8",
                               quantized_algorithm=algorithm, optimization_level=3), "config", log_path)
            _check(rknn.load_onnx(model=str(onnx_path)), "load_onnx", log_path)
            _check(rknn.build(do_quantization=dtype == "int8",
                              dataset=str(dataset) if dataset is not None else None), "build", log_path)
            _check(rknn.export_rknn(str(out_path)), "export_rknn", log_path)
            simulated = None
            sim_start = time.perf_counter()
            if evaluation_tiles is not None and len(evaluation_tiles):
                _check(rknn.init_runtime(), "init_runtime (simulator)", log_path)
                simulated = np.concatenate(
                    [rknn.inference(inputs=[tile[None]], data_format="nhwc")[0] for tile in evaluation_tiles])
            sim_seconds = time.perf_counter() - sim_start
        finally:
            rknn.release()
    layers = parse_layer_table(log_path.read_text(encoding="utf-8", errors="replace"))
    return RknnBuild(out_path, dtype, profile.rknn_target, algorithm if dtype == "int8" else None,
                     time.perf_counter() - start - sim_seconds, layers, simulated, sim_seconds)


def _check(code, step: str, log_path: Path) -> None:
    if code != 0:
        tail = "\n".join(log_path.read_text(encoding="utf-8", errors="replace").splitlines()[-15:])
        raise ToolkitFailedError(f"rknn-toolkit2 {step} returned {code}. The toolkit's last lines:\n{tail}")

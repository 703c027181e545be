"""The one Runner factory: every caller (ask, chat, demo, bench, verify, and the server, which is given
``RUNNERS`` by the serve verb) opens its engines and its Runner here.

Engines: ``npu`` (the tower on RKNNLite or on librknnrt directly, as ``make_npu_vision`` chooses, +
librkllmrt, ``runtime/npu_engines.py``), ``host`` (onnxruntime + torch,
``rksmolvlm/preview``), ``sim`` (the tower in rknn-toolkit2's simulator, ``convert/simulator.py``, with
the host decoder; x86 only, for verify), ``auto`` (npu on a Rockchip board, host elsewhere). Choosing
engines is host knowledge: the board package never imports this module, it is handed a
``RunnerFactory`` (tests/runtime/test_board_imports.py walks the imports).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rksmolvlm.errors import BundleError
from rksmolvlm.runtime.engines import EngineOptions, LlmEngine, VisionEncoder

if TYPE_CHECKING:
    import numpy as np

    from rksmolvlm.runtime.loader import RuntimeBundle
    from rksmolvlm.runtime.runner import Runner

__all__ = ["ENGINES", "RUNNERS", "BundleRunners", "Simulation", "engine_notes", "on_rockchip_board", "open_engines",
           "open_runner", "open_vision", "resolve_engine"]

ENGINES = ("auto", "host", "npu", "sim")


@dataclass(frozen=True)
class Simulation:
    """What the ``sim`` engine needs at start: every tile it will be asked to encode (rknn-toolkit2
    simulates only inside its build) and a work directory for the build."""

    tiles: "np.ndarray"
    work: Path


def on_rockchip_board(root: str = "/") -> bool:
    """True on a Rockchip SoC (device tree compatible string names rockchip)."""
    path = Path(root) / "proc/device-tree/compatible"
    try:
        return b"rockchip," in path.read_bytes()
    except OSError:
        return False


def resolve_engine(engine: str) -> str:
    """``auto`` → ``npu`` on a Rockchip board, ``host`` elsewhere; the others stay."""
    if engine not in ENGINES:
        raise BundleError(f"unknown engine {engine!r}: choose one of {', '.join(ENGINES)}")
    if engine == "auto":
        return "npu" if on_rockchip_board() else "host"
    return engine


def open_engines(bundle: "RuntimeBundle", engine: str = "auto", options: EngineOptions | None = None,
                 simulation: Simulation | None = None) -> tuple[VisionEncoder, LlmEngine]:
    """(vision encoder, LLM engine) of ``bundle`` on ``engine``; ``sim`` needs ``simulation``."""
    options = options or EngineOptions()
    engine = resolve_engine(engine)
    if engine == "npu":
        from rksmolvlm.runtime.npu_engines import make_npu_engines

        return make_npu_engines(bundle, options)
    if engine == "host":
        from rksmolvlm.preview.host_engines import make_host_engines

        return make_host_engines(bundle, options)
    return _sim_engines(bundle, options, simulation)


def open_vision(bundle: "RuntimeBundle", engine: str = "auto", options: EngineOptions | None = None) -> VisionEncoder:
    """The vision encoder alone (bench times the tower on one NPU core or one CPU thread): npu or host."""
    options = options or EngineOptions()
    engine = resolve_engine(engine)
    if engine == "npu":
        from rksmolvlm.runtime.npu_engines import make_npu_vision

        return make_npu_vision(bundle, options)
    if engine == "host":
        from rksmolvlm.preview.host_engines import make_host_vision

        return make_host_vision(bundle, options)
    raise BundleError(f"the {engine} engine has no tower of its own to open alone: use npu or host")


def engine_notes(bundle: "RuntimeBundle", engine: str) -> list[str]:
    """What an engine does not run as the board would (for reports): the simulator's parts; none otherwise."""
    if resolve_engine(engine) != "sim":
        return []
    from rksmolvlm.convert.simulator import simulation_notes

    return simulation_notes(bundle)


def open_runner(bundle: "RuntimeBundle", engine: str = "auto", options: EngineOptions | None = None, *,
                simulation: Simulation | None = None, **settings: Any) -> "Runner":
    """A Runner on ``bundle``'s engines; ``settings`` are the Runner's own (image cache, resolution,
    video defaults, …). The engines are closed again if the Runner refuses the settings."""
    from rksmolvlm.runtime.runner import Runner

    vision, llm = open_engines(bundle, engine, options, simulation)
    try:
        return Runner(bundle, vision, llm, **settings)
    except BaseException:
        _close(vision, llm)
        raise


class BundleRunners:
    """This module as a ``rksmolvlm.runtime.runner.RunnerFactory``: what the serve verb hands the server."""

    def resolve(self, engine: str) -> str:
        return resolve_engine(engine)

    def open(self, bundle: "RuntimeBundle", engine: str, options: EngineOptions, **settings: Any) -> "Runner":
        return open_runner(bundle, engine, options, **settings)


RUNNERS = BundleRunners()


def _sim_engines(bundle: "RuntimeBundle", options: EngineOptions,
                 simulation: Simulation | None) -> tuple[VisionEncoder, LlmEngine]:
    if simulation is None:
        raise BundleError("the sim engine encodes only the tiles it is given at start: pass a Simulation (rksmolvlm "
                          "verify --engine sim does), or use --engine host")
    if bundle.manifest.llm.decoder_dir is None:
        raise BundleError(f"{bundle.path} has no host-preview decoder (decoder/): convert with --host-preview")
    from rksmolvlm.convert.simulator import SimulatedVisionEncoder
    from rksmolvlm.preview.host_engines import TorchLlmEngine

    vision = SimulatedVisionEncoder(bundle, simulation.tiles, simulation.work)
    try:
        return vision, TorchLlmEngine(bundle.file(bundle.manifest.llm.decoder_dir), options.threads)
    except BaseException:
        vision.close()
        raise


def _close(*engines: VisionEncoder | LlmEngine) -> None:
    for engine in engines:
        try:
            engine.close()
        except Exception:  # noqa: BLE001 - already failing: the first error is the one to report
            pass

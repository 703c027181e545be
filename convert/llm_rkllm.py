"""The decoder → ``llm.rkllm`` with Rockchip's rkllm-toolkit (``rkllm.api.RKLLM``).

The toolkit is on no package registry: users install the wheel from Rockchip's rknn-llm release.
When it is missing, ``require_toolkit`` says exactly which wheel to install. Every toolkit call's
return code is checked (0 success, −1 failure, per the SDK documentation).
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path

from rksmolvlm.errors import ToolkitFailedError, ToolkitMissingError
from rksmolvlm.convert.llm_recipe import LlmRecipe

__all__ = ["ToolkitInfo", "require_toolkit", "toolkit_info", "dataset_format_for", "build_rkllm", "RkllmBuild",
           "DATASET_FORMATS", "RELEASES_URL"]

RELEASES_URL = "https://github.com/airockchip/rknn-llm (rkllm-toolkit/packages/)"
# text: [{"input", "target"}]; embed: [{"input_embed": [[…]], "target"}] (1.1–1.2.x);
# multimodal: [{"sample": path, "token_nums": n}] + pickled decoder kwargs (1.3.0+).
DATASET_FORMATS = ("text", "embed", "multimodal")


@dataclass(frozen=True)
class ToolkitInfo:
    version: str

    @property
    def version_tuple(self) -> tuple[int, ...]:
        parts = []
        for piece in self.version.split("."):
            digits = "".join(ch for ch in piece if ch.isdigit())
            if not digits:
                break
            parts.append(int(digits))
            if not piece.isdigit():
                break
        return tuple(parts)


def _wheel_hint() -> str:
    tag = f"cp{sys.version_info.major}{sys.version_info.minor}"
    return (f"download rkllm_toolkit-1.3.0-{tag}-{tag}-linux_x86_64.whl from {RELEASES_URL} and install it "
            f"into this environment: {sys.executable} -m pip install --no-deps rkllm_toolkit-1.3.0-{tag}-{tag}-"
            "linux_x86_64.whl (it pins torch 2.6 / transformers 5.8; --no-deps keeps this venv's versions). "
            "Or pass --llm-host-only to build a host-preview bundle without the board decoder")


def toolkit_info() -> ToolkitInfo | None:
    """The installed toolkit's version, or None when ``rkllm.api`` cannot be imported."""
    try:
        import rkllm
        import rkllm.api  # noqa: F401  (the toolkit is usable only if its API imports)
    except ImportError:
        return None
    from importlib.metadata import PackageNotFoundError, version

    for dist in ("rkllm-toolkit", "rkllm_toolkit"):
        try:
            return ToolkitInfo(version(dist))
        except PackageNotFoundError:
            continue
    return ToolkitInfo(str(getattr(rkllm, "__version__", "unknown")))


def require_toolkit() -> ToolkitInfo:
    info = toolkit_info()
    if info is None:
        raise ToolkitMissingError("rkllm-toolkit is not installed (it is on no package registry): " + _wheel_hint())
    return info


def dataset_format_for(info: ToolkitInfo) -> str:
    """The calibration format the installed toolkit takes for embedding (multimodal) input."""
    v = info.version_tuple
    if not v:
        raise ToolkitMissingError(f"cannot read the rkllm-toolkit version ({info.version!r}): pass "
                                  f"--llm-dataset-format {'|'.join(DATASET_FORMATS)}")
    if v >= (1, 3):
        return "multimodal"
    if v >= (1, 1):
        return "embed"
    return "text"


@dataclass
class RkllmBuild:
    path: Path
    seconds: float
    toolkit_version: str


def build_rkllm(decoder_dir: Path, out_path: Path, recipe: LlmRecipe, dataset: Path | None,
                info: ToolkitInfo) -> RkllmBuild:
    """load_huggingface → build → export_rkllm, each return code checked."""
    from rkllm.api import RKLLM

    start = time.perf_counter()
    llm = RKLLM()
    _check(llm.load_huggingface(model=str(decoder_dir), model_lora=None, device="cpu", dtype="float32",
                                custom_config=None, load_weight=True), "load_huggingface", decoder_dir)
    kwargs = dict(do_quantization=True, optimization_level=recipe.optimization_level,
                  quantized_dtype=recipe.dtype, quantized_algorithm=recipe.algorithm,
                  target_platform=recipe.target, num_npu_core=recipe.num_npu_core, extra_qparams=None,
                  dataset=str(dataset) if dataset is not None else None, hybrid_rate=recipe.hybrid_rate)
    if info.version_tuple >= (1, 2):
        kwargs["max_context"] = recipe.max_context  # absent before 1.2.0
    _check(llm.build(**kwargs), "build", decoder_dir)
    _check(llm.export_rkllm(str(out_path)), "export_rkllm", decoder_dir)
    if not out_path.is_file():
        raise ToolkitFailedError(f"rkllm-toolkit export_rkllm returned 0 but wrote no {out_path.name}")
    return RkllmBuild(out_path, time.perf_counter() - start, info.version)


def _check(code, step: str, decoder_dir: Path) -> None:
    if code != 0:
        raise ToolkitFailedError(f"rkllm-toolkit {step} returned {code} for {decoder_dir}: see the toolkit's "
                                 "messages above; check the recipe (--llm-dtype, --llm-npu-cores, --max-context) "
                                 "and that the toolkit version matches the board's librkllmrt")

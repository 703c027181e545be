"""Decoder build recipes as data: target × quantized dtype × algorithm × NPU cores × context.

Allowed values come from the board profiles (``boards/profiles/*.toml``) and the rkllm-toolkit
SDK documentation; an invalid combination is refused before any heavy work, listing the choices.
"""

from __future__ import annotations

from rksmolvlm.boards import BoardProfile
from rksmolvlm.bundle.manifest import LlmRecipe  # the recipe is a part of the bundle contract
from rksmolvlm.errors import TargetError

__all__ = ["LlmRecipe", "make_recipe", "ALGORITHMS", "MAX_CONTEXT_LIMIT", "CONTEXT_ALIGN"]

MAX_CONTEXT_LIMIT = 16384  # rkllm-toolkit: max_context ≤ 16384 and a multiple of 32
CONTEXT_ALIGN = 32
# normal suits w8a8*; grq is for w4a16* (and needs a GPU in the toolkit).
ALGORITHMS = {"normal": None, "grq": "w4a16"}
OPTIMIZATION_LEVELS = (0, 1)


def make_recipe(profile: BoardProfile, dtype: str | None = None, algorithm: str = "normal",
                num_npu_core: int | None = None, max_context: int = 4096, optimization_level: int = 1,
                model_context: int | None = None, hybrid_rate: float = 0.0) -> LlmRecipe:
    """Validate one recipe for ``profile``; ``model_context`` is the checkpoint's trained context."""
    dtype = (dtype or profile.llm_default_dtype).lower()
    if dtype not in profile.llm_dtypes:
        raise TargetError(f"--llm-dtype {dtype!r} is not supported on {profile.name}: choose one of "
                          f"{', '.join(profile.llm_dtypes)}")
    algorithm = algorithm.lower()
    if algorithm not in ALGORITHMS:
        raise TargetError(f"--llm-algorithm {algorithm!r} is unknown: choose one of {', '.join(ALGORITHMS)}")
    needs = ALGORITHMS[algorithm]
    if needs and not dtype.startswith(needs):
        raise TargetError(f"--llm-algorithm {algorithm} only applies to {needs}* dtypes; use normal for {dtype}")
    cores = profile.llm_max_npu_cores if num_npu_core is None else int(num_npu_core)
    if not 1 <= cores <= profile.llm_max_npu_cores:
        raise TargetError(f"--llm-npu-cores {cores} is invalid on {profile.name}: choose 1 to "
                          f"{profile.llm_max_npu_cores}")
    if max_context % CONTEXT_ALIGN or not CONTEXT_ALIGN <= max_context <= MAX_CONTEXT_LIMIT:
        valid = f"a multiple of {CONTEXT_ALIGN} from {CONTEXT_ALIGN} to {MAX_CONTEXT_LIMIT}"
        raise TargetError(f"--max-context {max_context} is invalid: use {valid}")
    if model_context is not None and max_context > model_context:
        raise TargetError(f"--max-context {max_context} exceeds the model's trained context ({model_context} "
                          f"positions): use at most {model_context - model_context % CONTEXT_ALIGN}")
    if optimization_level not in OPTIMIZATION_LEVELS:
        raise TargetError(f"--llm-optimization {optimization_level} is invalid: choose 0 or 1")
    if not 0.0 <= hybrid_rate < 1.0:
        raise TargetError(f"hybrid rate {hybrid_rate} must be in [0, 1)")
    return LlmRecipe(profile.rkllm_target, dtype, algorithm, cores, max_context, optimization_level, hybrid_rate)

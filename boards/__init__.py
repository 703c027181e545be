"""Per-SoC board profiles, kept as data in ``profiles/*.toml``.

Also in this folder (not Python): ``systemd/`` unit, ``install.sh`` and the config example.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from importlib import resources

from rksmolvlm.errors import TargetError

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10 (Ubuntu 22.04 boards): tomllib's origin, the tomli package
    import tomli as tomllib

__all__ = ["BoardProfile", "load_profile", "profile_names"]


@dataclass(frozen=True)
class BoardProfile:
    name: str
    description: str
    npu_cores: int
    core_masks: tuple[int, ...]
    min_npu_driver: str
    device_tree_compatible: tuple[str, ...]
    vision_dtypes: tuple[str, ...]
    rknn_target: str
    llm_dtypes: tuple[str, ...]
    llm_default_dtype: str
    rkllm_target: str
    llm_max_npu_cores: int
    frequency: dict = field(default_factory=dict)


def _profiles_dir():
    return resources.files(__name__) / "profiles"


def profile_names() -> list[str]:
    return sorted(p.name[:-5] for p in _profiles_dir().iterdir() if p.name.endswith(".toml"))


def load_profile(name: str) -> BoardProfile:
    """The profile of target ``name`` (e.g. ``rk3588``); unknown names list the valid ones."""
    key = name.strip().lower()
    names = profile_names()
    if key not in names:
        raise TargetError(f"unknown target {name!r}: choose one of {', '.join(names)}")
    data = tomllib.loads((_profiles_dir() / f"{key}.toml").read_text(encoding="utf-8"))
    vision, llm = data["vision"], data["llm"]
    return BoardProfile(
        name=data["name"], description=data["description"], npu_cores=int(data["npu_cores"]),
        core_masks=tuple(data["core_masks"]), min_npu_driver=data["min_npu_driver"],
        device_tree_compatible=tuple(data["device_tree_compatible"]),
        vision_dtypes=tuple(vision["dtypes"]), rknn_target=vision["rknn_target"],
        llm_dtypes=tuple(llm["dtypes"]), llm_default_dtype=llm["default_dtype"],
        rkllm_target=llm["rkllm_target"], llm_max_npu_cores=int(llm["max_npu_cores"]),
        frequency=dict(data.get("frequency", {})),
    )

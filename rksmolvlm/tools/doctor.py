"""``rksmolvlm doctor``: is this board ready to run a bundle? Each finding names its fix.

Everything is read below ``root`` (default ``/``), so tests run it against a fake sysfs/proc tree.
"""

from __future__ import annotations

import importlib.util
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from rksmolvlm.boards import load_profile, profile_names
from rksmolvlm.runtime.npu_engines import LIBRARY_DIRS

if TYPE_CHECKING:
    from rksmolvlm.bundle.manifest import Manifest

__all__ = ["Finding", "run_doctor", "parse_version"]

_DRIVER_FILES = ("sys/kernel/debug/rknpu/version", "sys/module/rknpu/version", "proc/debug/rknpu/version")
_NPU_NODES = ("dev/dri/renderD129", "dev/rknpu")


@dataclass
class Finding:
    status: str  # ok | warn | fail | info
    check: str
    message: str
    fix: str = ""


def parse_version(text: str) -> tuple[int, ...] | None:
    match = re.search(r"(\d+)\.(\d+)\.(\d+)", text)
    return tuple(int(x) for x in match.groups()) if match else None


def _soc(root: Path) -> str | None:
    try:
        compatible = (root / "proc/device-tree/compatible").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return None
    for name in profile_names():
        if any(c in compatible for c in load_profile(name).device_tree_compatible):
            return name
    return "rockchip-unknown" if any(c.startswith("rockchip,") for c in compatible) else None


def _library_version(path: Path, pattern: bytes) -> str | None:
    try:
        data = path.read_bytes()
    except OSError:
        return None
    match = re.search(pattern, data)
    return match.group(1).decode() if match else None


def _find(root: Path, name: str) -> Path | None:
    for directory in LIBRARY_DIRS:
        candidate = root / directory.lstrip("/") / name
        if candidate.is_file():
            return candidate
    return None


def run_doctor(manifest: "Manifest | None" = None, root: str | os.PathLike = "/") -> list[Finding]:
    """Findings about the board below ``root`` and, given a bundle's manifest, about that bundle on it
    (target SoC, runtime versions, memory for its size)."""
    root = Path(root)
    min_runtime = manifest.min_runtime if manifest is not None else {}
    out: list[Finding] = []
    soc = _soc(root)
    if soc is None:
        out.append(Finding("info", "board", "this is not a Rockchip board (no rockchip entry in "
                           "/proc/device-tree/compatible): only the bundle can be checked here",
                           "run 'rksmolvlm doctor' on the RK3588/RK3576/RK3562 board"))
        if manifest is not None:
            out.append(Finding("ok", "bundle", f"bundle for {manifest.target.platform} reads and verifies"))
        return out
    if soc == "rockchip-unknown":
        out.append(Finding("fail", "soc", "a Rockchip SoC rksmolvlm has no profile for",
                           f"supported: {', '.join(profile_names())}"))
        return out
    profile = load_profile(soc)
    out.append(Finding("ok", "soc", f"{profile.description}"))
    if manifest is not None:
        target = manifest.target.platform
        if target != soc:
            out.append(Finding("fail", "bundle target", f"the bundle was converted for {target}, this board is {soc}",
                               f"convert again with --target {soc}"))
        else:
            out.append(Finding("ok", "bundle target", f"bundle built for {target}"))

    # NPU kernel driver
    driver = None
    for rel in _DRIVER_FILES:
        try:
            driver = (root / rel).read_text(errors="replace").strip()
            break
        except PermissionError:
            driver = "unreadable"
        except OSError:
            continue
    need = parse_version(profile.min_npu_driver)
    if driver is None:
        out.append(Finding("fail", "npu driver", "no RKNPU driver found (no /sys/kernel/debug/rknpu/version)",
                           "use a board image whose kernel has the rknpu driver (≥ 0.9.8); "
                           "check 'dmesg | grep -i rknpu'"))
    elif driver == "unreadable":
        out.append(Finding("warn", "npu driver", "the RKNPU driver version is not readable by this user",
                           "run 'sudo rksmolvlm doctor' (debugfs is root-only)"))
    else:
        have = parse_version(driver)
        if have is None or have < need:
            out.append(Finding("fail", "npu driver", f"RKNPU driver {driver!r} is older than {profile.min_npu_driver}",
                               "update the board's kernel / image to one with rknpu ≥ 0.9.8 (rkllm needs it)"))
        else:
            out.append(Finding("ok", "npu driver", f"RKNPU driver {'.'.join(map(str, have))}"))

    # NPU device node
    nodes = [root / n for n in _NPU_NODES if (root / n).exists()]
    if not nodes:
        out.append(Finding("fail", "npu device", "no NPU device node (/dev/dri/renderD129 or /dev/rknpu)",
                           "load the rknpu driver; check the device tree enables the NPU"))
    elif not any(os.access(n, os.R_OK | os.W_OK) for n in nodes):
        out.append(Finding("fail", "npu device", f"{nodes[0]} is not readable and writable by this user",
                           "add the user to the node's group (e.g. 'sudo usermod -aG render,video $USER') "
                           "and log in again"))
    else:
        out.append(Finding("ok", "npu device", f"{nodes[0]} accessible"))

    # Runtime libraries
    rknnrt = _find(root, "librknnrt.so")
    if rknnrt is None:
        out.append(Finding("fail", "librknnrt", "librknnrt.so not found in /usr/lib or /usr/local/lib",
                           "install librknnrt.so (rknpu2 runtime, ≥ the bundle's rknn-toolkit2 version) into /usr/lib"))
    else:
        version = _library_version(rknnrt, rb"librknnrt version: ([0-9][0-9.]*)") or "unknown"
        need_rknn = min_runtime.get("librknnrt")
        if need_rknn and version != "unknown" and parse_version(version) < parse_version(need_rknn):
            out.append(Finding("fail", "librknnrt", f"librknnrt {version} is older than the bundle's {need_rknn}",
                               f"install librknnrt.so {need_rknn} or newer"))
        else:
            out.append(Finding("ok", "librknnrt", f"{rknnrt} (version {version})"))
    rkllmrt = _find(root, "librkllmrt.so")
    if rkllmrt is None:
        out.append(Finding("fail", "librkllmrt", "librkllmrt.so not found in /usr/lib or /usr/local/lib",
                           "copy rkllm-runtime/Linux/librkllm_api/aarch64/librkllmrt.so from the rknn-llm release "
                           "matching the bundle's rkllm-toolkit to /usr/lib"))
    else:
        version = _library_version(rkllmrt, rb"rkllm-runtime version: ?v?([0-9][0-9.]*)") or "unknown"
        need_llm = min_runtime.get("librkllmrt")
        if need_llm and version != "unknown" and parse_version(version)[:2] != parse_version(need_llm)[:2]:
            out.append(Finding("fail", "librkllmrt", f"librkllmrt {version} does not match the bundle's rkllm-toolkit "
                               f"{need_llm} (1.2.x and 1.3.x are not compatible)",
                               f"install librkllmrt {need_llm}, or convert again with toolkit {version}"))
        else:
            out.append(Finding("ok", "librkllmrt", f"{rkllmrt} (version {version})"))
    if importlib.util.find_spec("rknnlite") is None and sys.version_info >= (3, 13):
        out.append(Finding("fail", "rknn-toolkit-lite2", f"rknn-toolkit-lite2 has no wheel for Python "
                           f"{sys.version_info[0]}.{sys.version_info[1]} (2.5.0: cp310-cp312), so the vision "
                           "tower cannot run in this venv",
                           "make the venv with Python 3.10-3.12 (e.g. uv venv --python 3.12), then pip install "
                           "'rksmolvlm[board]'"))
    elif importlib.util.find_spec("rknnlite") is None:
        out.append(Finding("fail", "rknn-toolkit-lite2", "the rknnlite Python package is not importable",
                           "pip install rknn-toolkit-lite2 (or 'rksmolvlm[board]')"))
    else:
        out.append(Finding("ok", "rknn-toolkit-lite2", "rknnlite importable"))
    if manifest is not None and manifest.video is not None:  # a SmolVLM2 bundle: videos need PyAV
        if importlib.util.find_spec("av") is None:
            out.append(Finding("warn", "pyav", "the av (PyAV) package is not importable: the bundle takes videos, "
                               "which will be refused", "pip install 'av>=17.1,<19' (or 'rksmolvlm[board]')"))
        else:
            out.append(Finding("ok", "pyav", "av importable (video decoding)"))

    # Memory
    try:
        meminfo = (root / "proc/meminfo").read_text()
        available = int(re.search(r"MemAvailable:\s+(\d+) kB", meminfo).group(1)) * 1024
    except (OSError, AttributeError):
        available = None
    if available is not None and manifest is not None and manifest.size_bytes:
        need_bytes = int(manifest.size_bytes * 1.3) + 400 * 1024 ** 2
        status = "ok" if available >= need_bytes else "fail"
        out.append(Finding(status, "memory", f"{available / 1024 ** 3:.1f} GB available, the bundle needs about "
                           f"{need_bytes / 1024 ** 3:.1f} GB", "" if status == "ok" else
                           "stop other services, use a smaller model, or add swap/zram"))
    return out

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

__all__ = ["Finding", "run_doctor", "parse_version", "jail_finding"]

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


def jail_finding(timeout_s: float = 60.0) -> Finding:
    """Start one decoding child as the server does (runtime/jail/) and report its sandbox: the address-space
    and file-size limits, and whether the seccomp filter that takes away the network and exec is on."""
    try:
        from rksmolvlm.runtime.jail import DecodePool, JailError
    except ImportError as exc:
        return Finding("fail", "decode jail", f"the decoding children cannot be imported ({exc})",
                       "pip install 'rksmolvlm[board,serve]'")
    debug = "run with RKSMOLVLM_JAIL_DEBUG=1 to see the child's error; check that numpy, Pillow and av import"
    try:
        with DecodePool(2, reserved=1) as pool:
            if not pool.wait_ready(timeout_s):
                return Finding("fail", "decode jail", f"a decoding child did not start within {timeout_s:g} s", debug)
            facts = pool.run("diagnose", {}, deadline_s=timeout_s).result
    except (OSError, JailError) as exc:
        return Finding("fail", "decode jail", f"a decoding child cannot run here ({exc})", debug)
    limits = f"address space {facts['as_limit'] / 2**20:,.0f} MiB, file writes {facts['fsize_limit']}"
    if facts.get("no_network"):
        return Finding("ok", "decode jail", f"children sandboxed: {limits}, seccomp {facts['seccomp']} (no network, "
                       "no exec)")
    return Finding("warn", "decode jail", f"children run with {limits} but without the seccomp filter "
                   f"({facts['seccomp']}): a decoder could open sockets",
                   "use a kernel with seccomp filters (CONFIG_SECCOMP_FILTER; every board image has it — qemu-user "
                   "emulation does not)")


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
        if root == Path("/"):  # the host preview's server decodes in the same jail
            out.append(jail_finding())
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
    if importlib.util.find_spec("rknnlite") is None and rknnrt is not None:  # the tower runs on librknnrt directly
        out.append(Finding("ok", "rknn-toolkit-lite2", "rknnlite is not installed (no wheel for this Python, e.g. "
                           "3.13): the vision tower runs on librknnrt.so directly"))
    elif importlib.util.find_spec("rknnlite") is None and sys.version_info >= (3, 13):
        out.append(Finding("fail", "rknn-toolkit-lite2", f"neither rknnlite (no wheel for Python "
                           f"{sys.version_info[0]}.{sys.version_info[1]}: 2.5.0 has cp310–cp312) nor librknnrt.so is "
                           "there: the vision tower cannot run",
                           "install librknnrt.so (see librknnrt above): the tower runs on it directly"))
    elif importlib.util.find_spec("rknnlite") is None:
        out.append(Finding("fail", "rknn-toolkit-lite2", "neither the rknnlite Python package nor librknnrt.so is "
                           "there: the vision tower cannot run",
                           "install librknnrt.so (see librknnrt above), or pip install rknn-toolkit-lite2"))
    else:
        out.append(Finding("ok", "rknn-toolkit-lite2", "rknnlite importable"))
    if manifest is not None and manifest.video is not None:  # a SmolVLM2 bundle: videos need PyAV
        if importlib.util.find_spec("av") is None:
            out.append(Finding("warn", "pyav", "the av (PyAV) package is not importable: the bundle takes videos, "
                               "which will be refused", "pip install 'av>=17.1,<19' (or 'rksmolvlm[board]')"))
        else:
            out.append(Finding("ok", "pyav", "av importable (video decoding)"))

    if root == Path("/"):  # the jail is a property of this machine's kernel, not of a tree of files
        out.append(jail_finding())

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

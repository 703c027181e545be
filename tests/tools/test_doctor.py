"""`rksmolvlm doctor` against fake sysfs/proc trees: a good board, and each failure with its fix."""

import re
import os
from pathlib import Path

import pytest

from support.manifests import minimal_manifest
from rksmolvlm.bundle.manifest import Manifest
from rksmolvlm.tools.doctor import run_doctor


def _manifest(size_bytes: int = 600 * 1024 ** 2) -> Manifest:
    """An rk3588 bundle's manifest needing librknnrt 2.5.0 and librkllmrt 1.3.0, ``size_bytes`` large."""
    data = minimal_manifest()
    data.update(schema_version=1, created_by="test", min_runtime={"librknnrt": "2.5.0", "librkllmrt": "1.3.0"},
                files={"tokenizer.json": {"size": size_bytes, "sha256": "0" * 64}})
    return Manifest.from_dict(data, Path("bundle"))


MANIFEST = _manifest()


def _board(root, compatible=b"friendlyarm,nanopi-r6s\0rockchip,rk3588s\0", driver="RKNPU driver: v0.9.8",
           rknnrt=b"...librknnrt version: 2.5.0 (abc)...", rkllmrt=b"..rkllm-runtime version: 1.3.0..",
           mem_kb=8_000_000, node=True):
    (root / "proc/device-tree").mkdir(parents=True)
    (root / "proc/device-tree/compatible").write_bytes(compatible)
    if driver is not None:
        (root / "sys/kernel/debug/rknpu").mkdir(parents=True)
        (root / "sys/kernel/debug/rknpu/version").write_text(driver + "\n")
    (root / "usr/lib").mkdir(parents=True)
    if rknnrt is not None:
        (root / "usr/lib/librknnrt.so").write_bytes(rknnrt)
    if rkllmrt is not None:
        (root / "usr/lib/librkllmrt.so").write_bytes(rkllmrt)
    (root / "proc/meminfo").write_text(f"MemTotal: 16000000 kB\nMemAvailable: {mem_kb} kB\n")
    if node:
        (root / "dev/dri").mkdir(parents=True)
        (root / "dev/dri/renderD129").write_text("")
    return root


def _by_check(findings):
    return {f.check: f for f in findings}


def test_good_board(tmp_path, rknnlite_double):
    findings = run_doctor(MANIFEST, _board(tmp_path))
    assert [f for f in findings if f.status == "fail"] == []
    checks = _by_check(findings)
    assert "RK3588" in checks["soc"].message
    assert checks["npu driver"].message.endswith("0.9.8")
    assert "2.5.0" in checks["librknnrt"].message and "1.3.0" in checks["librkllmrt"].message


@pytest.mark.parametrize("kwargs,check,fix", [
    (dict(driver="RKNPU driver: v0.9.6"), "npu driver", "rknpu ≥ 0.9.8"),
    (dict(driver=None), "npu driver", "dmesg"),
    (dict(rknnrt=None), "librknnrt", "/usr/lib"),
    (dict(rkllmrt=None), "librkllmrt", "rkllm-runtime/Linux/librkllm_api/aarch64"),
    (dict(rkllmrt=b"rkllm-runtime version: 1.2.3"), "librkllmrt", "not compatible"),
    (dict(rknnrt=b"librknnrt version: 2.3.0"), "librknnrt", "2.5.0 or newer"),
    (dict(mem_kb=200_000), "memory", "swap"),
    (dict(node=False), "npu device", "rknpu driver"),
    (dict(compatible=b"rockchip,rk3576\0"), "bundle target", "--target rk3576"),
])
def test_each_failure_names_its_fix(tmp_path, rknnlite_double, kwargs, check, fix):
    findings = _by_check(run_doctor(MANIFEST, _board(tmp_path, **kwargs)))
    assert findings[check].status == "fail", findings[check]
    assert fix in findings[check].fix + findings[check].message


@pytest.mark.skipif(os.geteuid() == 0, reason="root can open any file")
def test_unwritable_npu_node(tmp_path, rknnlite_double):
    root = _board(tmp_path)
    os.chmod(root / "dev/dri/renderD129", 0o400)
    assert _by_check(run_doctor(MANIFEST, root))["npu device"].status == "fail"


def test_missing_rknnlite(tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "rknnlite" else real(n, *a))
    # with librknnrt.so the tower runs on it directly (Python 3.13 has no rknn-toolkit-lite2 wheel) ...
    direct = _by_check(run_doctor(MANIFEST, _board(tmp_path / "direct")))["rknn-toolkit-lite2"]
    assert direct.status == "ok" and "librknnrt.so directly" in direct.message
    # ... without it, nothing can run the tower
    missing = _by_check(run_doctor(MANIFEST, _board(tmp_path / "none", rknnrt=None)))["rknn-toolkit-lite2"]
    assert missing.status == "fail" and "pip install rknn-toolkit-lite2" in missing.fix


@pytest.mark.parametrize("version, says", [((3, 12, 3, "final", 0), "pip install rknn-toolkit-lite2"),
                                           ((3, 13, 5, "final", 0), "the tower runs on it directly")])
def test_missing_rknnlite_on_python_3_13_names_the_python_not_pip(tmp_path, monkeypatch, version, says):
    import importlib.util
    import sys

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "rknnlite" else real(n, *a))
    monkeypatch.setattr(sys, "version_info", version)  # rknn-toolkit-lite2 2.5.0 has no cp313 wheel
    finding = _by_check(run_doctor(MANIFEST, _board(tmp_path, rknnrt=None)))["rknn-toolkit-lite2"]
    monkeypatch.undo()
    assert finding.status == "fail" and says in finding.fix
    assert ("3.13" in finding.message) == (version[1] == 13) and ("pip" in finding.fix) == (version[1] < 13)


def test_off_a_board_says_so(tmp_path):
    findings = run_doctor(MANIFEST, tmp_path)
    assert findings[0].status == "info" and "not a Rockchip board" in findings[0].message
    assert not any(f.status == "fail" for f in findings)


def test_a_video_bundle_needs_pyav(tmp_path, monkeypatch):
    import dataclasses
    import importlib.util

    from rksmolvlm.bundle.manifest import VideoPartInfo
    from rksmolvlm.processing.video_frames import VideoSettings

    video = dataclasses.replace(MANIFEST, video=VideoPartInfo(VideoSettings(1.0, 64, 2048, 512), "{{ messages }}"))
    board = _board(tmp_path)
    assert _by_check(run_doctor(video, board))["pyav"].status == "ok"
    assert "pyav" not in _by_check(run_doctor(MANIFEST, board))  # an image-only bundle does not need it
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "av" else real(n, *a))
    finding = _by_check(run_doctor(video, board))["pyav"]
    assert finding.status == "warn" and "refused" in finding.message and "pip install" in finding.fix


def test_the_decode_jail_is_reported_as_this_machine_runs_it():
    from rksmolvlm.runtime.jail import DecodePool
    from rksmolvlm.tools.doctor import jail_finding

    finding = jail_finding()
    with DecodePool(2, reserved=1) as pool:
        assert pool.wait_ready(60)
        facts = pool.run("diagnose", {}, deadline_s=30).result
    assert finding.status == ("ok" if facts["no_network"] else "warn")
    # each child's address space is its own idle size plus the pool's max_memory (768 MiB by default)
    shown = int(re.search(r"address space ([\d,]+) MiB", finding.message).group(1).replace(",", ""))
    assert 768 < shown < 768 + 1024 and abs(shown - facts["as_limit"] / 2**20) < 64
    assert "file writes 0" in finding.message


def test_a_decode_jail_that_cannot_start_fails_naming_how_to_see_why(monkeypatch):
    import sys

    from rksmolvlm.runtime.jail import pool
    from rksmolvlm.tools.doctor import jail_finding

    monkeypatch.setattr(pool, "_default_child_args", lambda: [sys.executable, "-c", "import sys; sys.exit(3)"])
    finding = jail_finding(timeout_s=3)
    assert finding.status == "fail" and "RKSMOLVLM_JAIL_DEBUG=1" in finding.fix

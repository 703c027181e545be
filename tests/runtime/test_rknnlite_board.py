"""The real rknn-toolkit-lite2 (its aarch64 wheel: on a board, or in the board check's emulated rootfs,
scripts/board_check/) loads the vision.rknn that rknn-toolkit2 built on the x86 host into a tiny bundle,
and without an NPU (no librknnrt.so, no device) fails cleanly: a return code, then our EngineError
naming the fix."""

from __future__ import annotations

import platform
import sys
from pathlib import Path

import pytest

from support import built
from rksmolvlm.runtime.npu_engines import LIBRARY_DIRS, EngineError, RknnLiteVisionEncoder

pytestmark = [
    pytest.mark.skipif(platform.machine() != "aarch64",
                       reason="rknn-toolkit-lite2 ships aarch64 wheels only: run on the board or scripts/board_check"),
    pytest.mark.skipif(sys.version_info >= (3, 13),
                       reason="rknn-toolkit-lite2 2.5.0 has no cp313 wheel (Debian 13): not installed on Python 3.13"),
]


@pytest.fixture(scope="module")
def vision_rknn() -> Path:
    """The tiny Idefics3 bundle's vision.rknn (rknn-toolkit2, rk3588, fp16), built on the host."""
    folder = built.handed_in(built.PREVIEW_BUNDLES)
    if folder is None:
        pytest.skip("needs the bundles built by rknn-toolkit2 on the host: RKSMOLVLM_TEST_FIXTURES "
                    "(scripts/board_check/fixtures.py builds them)")
    return folder / "idefics3-256m" / "vision.rknn"


@pytest.fixture(scope="module")
def without_npu():
    found = [d for d in LIBRARY_DIRS if (Path(d) / "librknnrt.so").exists()]
    if found or Path("/dev/rknpu").exists():
        pytest.skip(f"this machine has an NPU runtime ({found or '/dev/rknpu'}): verify --engine npu checks it")


def test_the_real_rknnlite_loads_the_host_built_model_and_refuses_to_start_without_an_npu(vision_rknn, without_npu):
    from rknnlite.api import RKNNLite  # the real wheel: on aarch64 below 3.13 it is a board dependency

    runtime = RKNNLite(verbose=False)
    try:
        assert runtime.load_rknn(str(vision_rknn)) == 0
        assert runtime.init_runtime() != 0  # no device tree, no librknnrt.so: a return code, no crash
    finally:
        runtime.release()


def test_the_vision_engine_names_librknnrt_when_the_runtime_cannot_start(vision_rknn, without_npu):
    with pytest.raises(EngineError, match=r"init_runtime\(core_mask=1\) failed: check that librknnrt\.so is installed"):
        RknnLiteVisionEncoder(vision_rknn, [1])

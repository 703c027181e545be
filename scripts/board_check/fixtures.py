"""Build the fixtures that need torch on the x86 host, once, for the board check's arm64 slice: the tiny
checkpoints, their host-preview bundles, the demo model's bundle (the functions tests/conftest.py uses,
tests/support/built.py) and an fp16 vision.rknn of the tiny Idefics3 tower (rknn-toolkit2) for the
real RKNNLite. run.sh mounts OUT read-only in the rootfs and sets RKSMOLVLM_TEST_FIXTURES to it.
Usage: .venv/bin/python scripts/board_check/fixtures.py OUT"""

from __future__ import annotations

import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))

from support import built  # noqa: E402  (tests/ is put on the path just above)

RKNN = "rknn"  # OUT/rknn/vision.rknn: the tiny idefics3-256m tower for rk3588, fp16


def main(out: Path) -> None:
    if out.exists() and any(out.iterdir()):
        raise SystemExit(f"fixtures: {out} is not empty: give a new folder")
    started = time.monotonic()
    checkpoints = built.build_tiny_checkpoints(out / built.CHECKPOINTS)
    bundles = built.build_preview_bundles(checkpoints, out / built.PREVIEW_BUNDLES)
    built.build_demo_preview_bundle(out / built.DEMO_PREVIEW)
    _build_vision_rknn(bundles["idefics3-256m"] / "vision.onnx", out / RKNN)
    print(f"fixtures: built in {time.monotonic() - started:.0f} s into {out}")


# ======================================================================================================
# Private helpers
# ======================================================================================================


def _build_vision_rknn(onnx: Path, folder: Path) -> None:
    from rksmolvlm.boards import load_profile
    from rksmolvlm.convert.vision_rknn import build_vision_rknn

    folder.mkdir(parents=True)
    build_vision_rknn(onnx, folder / "vision.rknn", load_profile("rk3588"), "fp16", folder / "build.log")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit(__doc__.rsplit("Usage: ", 1)[1])
    main(Path(sys.argv[1]))

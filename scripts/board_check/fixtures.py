"""Build the fixtures that need torch on the x86 host, once, for the board check's arm64 slice: the tiny
checkpoints, their host-preview bundles (with the vision.rknn rknn-toolkit2 builds, which the real
RKNNLite loads there) and the demo model's bundle, by the functions tests/conftest.py uses
(tests/support/built.py). run.sh mounts OUT read-only in the rootfs and sets RKSMOLVLM_TEST_FIXTURES to it.
Usage: .venv/bin/python scripts/board_check/fixtures.py OUT"""

from __future__ import annotations

import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))

from support import built  # noqa: E402  (tests/ is put on the path just above)


def main(out: Path) -> None:
    if out.exists() and any(out.iterdir()):
        raise SystemExit(f"fixtures: {out} is not empty: give a new folder")
    started = time.monotonic()
    checkpoints = built.build_tiny_checkpoints(out / built.CHECKPOINTS)
    built.build_preview_bundles(checkpoints, out / built.PREVIEW_BUNDLES)
    built.build_demo_preview_bundle(out / built.DEMO_PREVIEW)
    print(f"fixtures: built in {time.monotonic() - started:.0f} s into {out}")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit(__doc__.rsplit("Usage: ", 1)[1])
    main(Path(sys.argv[1]))

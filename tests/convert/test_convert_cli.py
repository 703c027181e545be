"""`rksmolvlm convert --parts vision` end to end with the real rknn-toolkit2, on both model classes: fp16 and
int8 bundles whose manifest matches the files, and bad input that leaves nothing behind."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from rksmolvlm.bundle import read_manifest, staging_dirs
from rksmolvlm.cli import main
from rksmolvlm.hashing import sha256_file


def _convert(*args):
    return main(["convert", *map(str, args), "--parts", "vision", "-q"])


@pytest.mark.parametrize("name,dtype", [("idefics3-256m", "fp16"), ("idefics3-2b", "int8"),
                                        ("smolvlm2", "fp16"), ("smolvlm2", "int8")])
def test_convert_vision_bundle(tiny_checkpoints, calibration_dir, tmp_path, name, dtype, capsys):
    out = tmp_path / "bundle"
    code = _convert(tiny_checkpoints[name], "-o", out, "--vision-dtype", dtype, "--calibration", calibration_dir,
                    "--host-preview")
    assert code == 0
    summary = capsys.readouterr().out
    assert "vision.rknn" in summary and "cosine" in summary
    manifest = read_manifest(out)  # verifies size + sha256 of every file
    for rel, record in manifest.files.items():
        assert sha256_file(out / rel) == record.sha256
        assert (out / rel).stat().st_size == record.size
    assert set(manifest.files) >= {"vision.rknn", "vision.onnx", "tokenizer.json", "report.json"}
    assert manifest.vision.dtype == dtype
    written = json.loads((out / "manifest.json").read_text())
    assert written["vision"]["input"]["layout"] == "NHWC" and written["vision"]["input"]["dtype"] == "uint8"
    assert manifest.target.platform == "rk3588"
    assert manifest.model.family == ("smolvlm" if name == "smolvlm2" else "idefics3")
    assert manifest.toolkits["rknn-toolkit2"] == "2.5.0"
    report = json.loads((out / "report.json").read_text())["vision"]
    floor = 0.999 if dtype == "fp16" else 0.99
    assert report["simulator_vs_torch"]["cosine"] >= floor
    assert report["simulator_vs_torch"]["min_tile_cosine"] >= floor
    assert report["onnx_vs_torch"]["max_abs"] <= 1e-4
    kinds = [report["simulator_vs_torch"][kind] for kind in ("global", "split")]  # both kinds are scored
    assert all(k["tiles"] >= 1 and k["min_tile_cosine"] >= floor for k in kinds)
    assert sum(k["tiles"] for k in kinds) == report["simulator_vs_torch"]["tiles"] == 3
    assert report["cpu_fallback_ops"] == []
    if dtype == "int8":
        assert report["quantization"]["calibration_tiles"] == 24
        assert written["vision"]["quantization"]["dtype"] == "w8a8"
    assert not staging_dirs(out)


def test_shipped_calibration_set_is_the_default(tiny_checkpoints, tmp_path):
    out = tmp_path / "b"
    assert _convert(tiny_checkpoints["smolvlm2"], "-o", out, "--vision-dtype", "int8") == 0
    report = json.loads((out / "report.json").read_text())["vision"]
    assert any(n.startswith("doc_") for n in report["quantization"]["calibration_images"])
    assert "vision.onnx" not in read_manifest(out).files  # only with --host-preview


def _assert_nothing_left(tmp_path, out):
    assert not out.exists()
    assert not staging_dirs(out)


def test_not_a_checkpoint(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    out = tmp_path / "b"
    assert _convert(tmp_path / "empty", "-o", out) == 2
    assert "config.json is missing" in capsys.readouterr().err
    _assert_nothing_left(tmp_path, out)


def test_unknown_target_fails_before_any_work(tiny_checkpoints, tmp_path, capsys):
    out = tmp_path / "b"
    start = time.perf_counter()
    assert _convert(tiny_checkpoints["smolvlm2"], "-o", out, "--target", "rk3399") == 2
    assert time.perf_counter() - start < 5
    assert "choose one of rk3562, rk3576, rk3588" in capsys.readouterr().err
    _assert_nothing_left(tmp_path, out)


def test_unreadable_calibration_image(tiny_checkpoints, calibration_dir, tmp_path, capsys):
    folder = tmp_path / "calib"
    folder.mkdir()
    for p in sorted(calibration_dir.iterdir())[:3]:
        (folder / p.name).write_bytes(p.read_bytes())
    (folder / "zz_broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    out = tmp_path / "b"
    assert _convert(tiny_checkpoints["smolvlm2"], "-o", out, "--vision-dtype", "int8",
                    "--calibration", folder) == 2
    err = capsys.readouterr().err
    assert "zz_broken.png cannot be used" in err
    _assert_nothing_left(tmp_path, out)


def test_accuracy_floor(tiny_checkpoints, calibration_dir, tmp_path, capsys):
    out = tmp_path / "b"
    args = [tiny_checkpoints["idefics3-256m"], "-o", out, "--vision-dtype", "int8", "--calibration",
            calibration_dir, "--min-cosine", "0.999999"]
    assert _convert(*args) == 3
    assert "below the floor 0.999999" in capsys.readouterr().err
    _assert_nothing_left(tmp_path, out)
    assert _convert(*args, "--accept-low-accuracy") == 0
    report = json.loads((out / "report.json").read_text())["vision"]
    assert report["accepted_below_floor"] is True


def test_existing_output_needs_force(tiny_checkpoints, calibration_dir, tmp_path, capsys):
    out = tmp_path / "b"
    out.mkdir()
    (out / "manifest.json").write_text("{}")
    assert _convert(tiny_checkpoints["smolvlm2"], "-o", out, "--calibration", calibration_dir) == 2
    assert "--force" in capsys.readouterr().err
    assert (out / "manifest.json").read_text() == "{}"


# Runs `rksmolvlm convert` with rknn-toolkit2's RKNN.build wrapped: the wrapper creates the file named by
# HELD_BUILD_MARKER (the converter sends fd 2 to the build log meanwhile) and holds inside the build call
# until the signal arrives, so the SIGTERM lands inside rknn-toolkit2's build every time (a real build of
# the tiny tower can finish before a test's signal reaches it).
_HELD_BUILD = """
import os, pathlib, sys, time
import rknn.api
real_build = rknn.api.RKNN.build
def held_build(self, *args, **kwargs):
    pathlib.Path(os.environ["HELD_BUILD_MARKER"]).touch()
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        time.sleep(0.05)
    return real_build(self, *args, **kwargs)
rknn.api.RKNN.build = held_build
from rksmolvlm.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_interrupted_build_leaves_nothing(tiny_checkpoints, calibration_dir, tmp_path):
    """A real SIGTERM while rknn-toolkit2's build is running: exit 130, no bundle, no staging directory."""
    out = tmp_path / "b"
    marker = tmp_path / "build-started"
    env = dict(os.environ, PYTHONUNBUFFERED="1", HELD_BUILD_MARKER=str(marker))
    proc = subprocess.Popen([sys.executable, "-c", _HELD_BUILD, "convert", str(tiny_checkpoints["idefics3-256m"]),
                             "-o", str(out), "--vision-dtype", "int8", "--calibration", str(calibration_dir),
                             "--parts", "vision"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + 120
    while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    if not marker.exists():
        proc.kill()
        pytest.fail("the build never started: " + proc.communicate()[1])
    assert staging_dirs(out), "the staging directory exists while the build runs"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "interrupted; nothing was left behind" in err
    _assert_nothing_left(tmp_path, out)

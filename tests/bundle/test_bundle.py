"""The bundle writer is atomic and the reader verifies every file."""

import json

import pytest

from support.manifests import minimal_record
from rksmolvlm.bundle import SCHEMA_VERSION, read_manifest, staged_bundle, staging_dirs
from rksmolvlm.errors import BundleError
from rksmolvlm.bundle.manifest import FileRecord


def _write(dest, payload=b"abc", **kw):
    with staged_bundle(dest, **kw) as stage:
        (stage.path / "vision.rknn").write_bytes(payload)
        (stage.path / "tokenizer.json").write_text("{}")
        (stage.path / "sub").mkdir()
        (stage.path / "sub" / "x.bin").write_bytes(b"x" * 10)
        stage.manifest = minimal_record()
    return stage


def test_commit_lists_every_file_with_size_and_sha(tmp_path):
    dest = tmp_path / "b"
    _write(dest)
    manifest = read_manifest(dest)
    assert manifest.schema_version == SCHEMA_VERSION
    assert manifest.files["vision.rknn"] == FileRecord(
        "vision.rknn", 3, "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad")
    assert manifest.files["sub/x.bin"].size == 10
    assert json.loads((dest / "manifest.json").read_text())["files"]["sub/x.bin"]["size"] == 10
    assert not staging_dirs(dest)


def test_failure_leaves_nothing(tmp_path):
    dest = tmp_path / "b"
    with pytest.raises(RuntimeError):
        with staged_bundle(dest) as stage:
            (stage.path / "vision.rknn").write_bytes(b"half")
            raise RuntimeError("boom")
    assert not dest.exists()
    assert not staging_dirs(dest)
    assert list(tmp_path.iterdir()) == []


def test_interrupt_leaves_nothing(tmp_path):
    dest = tmp_path / "b"
    with pytest.raises(KeyboardInterrupt):
        with staged_bundle(dest) as stage:
            (stage.path / "vision.rknn").write_bytes(b"half")
            raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []


def test_existing_destination_needs_force(tmp_path):
    dest = tmp_path / "b"
    _write(dest, b"one")
    with pytest.raises(BundleError, match="--force"):
        _write(dest, b"two")
    _write(dest, b"two", overwrite=True)
    assert (dest / "vision.rknn").read_bytes() == b"two"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]


def test_refuses_to_replace_a_non_bundle(tmp_path):
    dest = tmp_path / "home"
    dest.mkdir()
    (dest / "precious.txt").write_text("keep me")
    with pytest.raises(BundleError, match="not a bundle"):
        _write(dest, overwrite=True)
    assert (dest / "precious.txt").read_text() == "keep me"


def test_tampered_file_is_detected(tmp_path):
    dest = tmp_path / "b"
    _write(dest, b"abc")
    (dest / "vision.rknn").write_bytes(b"abd")
    with pytest.raises(BundleError, match="vision.rknn sha256 differs"):
        read_manifest(dest)
    (dest / "vision.rknn").unlink()
    with pytest.raises(BundleError, match="vision.rknn is missing"):
        read_manifest(dest)


def test_other_schema_version_is_refused(tmp_path):
    dest = tmp_path / "b"
    _write(dest)
    manifest = json.loads((dest / "manifest.json").read_text())
    manifest["schema_version"] = 99
    (dest / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="schema 99"):
        read_manifest(dest)


def test_not_a_bundle(tmp_path):
    with pytest.raises(BundleError, match="rksmolvlm convert"):
        read_manifest(tmp_path)


@pytest.mark.parametrize("verb", [["ask", "--prompt", "?"], ["chat"], ["bench"], ["doctor", "--root", "/no-board"]])
def test_cli_refuses_an_invalid_bundle_without_a_traceback(tmp_path, capsys, verb):
    from rksmolvlm.cli import main

    assert main([verb[0], str(tmp_path), *verb[1:]]) == 2
    err = capsys.readouterr().err
    assert f"rksmolvlm {verb[0]}: error: {tmp_path} is not a bundle" in err and "rksmolvlm convert" in err
    dest = tmp_path / "b"  # a bundle without parts, then with a tampered file
    _write(dest)
    assert main([verb[0], str(dest), *verb[1:]]) == (0 if verb[0] == "doctor" else 2)  # answering needs both parts
    (dest / "vision.rknn").write_bytes(b"abd")
    assert main([verb[0], str(dest), *verb[1:]]) == 2
    err = capsys.readouterr().err
    assert f"rksmolvlm {verb[0]}: error:" in err and "Traceback" not in err

"""The chat templates are files of the bundle (issue 21, Low: "the chat template is not covered by the
bundle's hashes"): the converter writes ``chat_template.jinja`` (and ``video_chat_template.jinja`` for
SmolVLM2) and lists them in ``files`` with their sha256, the manifest names them in
``chat_template_file``; a changed template fails verification at start-up with a BundleError naming
the file. Bundles written before keep their template inline in manifest.json, where no hash covers it:
they are read as before, with a warning that says to convert again."""

import json
import logging
import os
import shutil
import subprocess
import sys

import pytest

from rksmolvlm.bundle.manifest import CHAT_TEMPLATE_FILE, CHAT_TEMPLATE_MAX_BYTES, VIDEO_CHAT_TEMPLATE_FILE, Manifest
from rksmolvlm.errors import BundleError
from rksmolvlm.hashing import sha256_file
from rksmolvlm.runtime.loader import RuntimeBundle


def _copy(source, destination):
    """The bundle's files hard-linked, its manifest and templates copied (tests rewrite them)."""
    def link(src, dst):
        if os.path.basename(src) in ("manifest.json", CHAT_TEMPLATE_FILE, VIDEO_CHAT_TEMPLATE_FILE):
            return shutil.copy2(src, dst)
        return os.link(src, dst)

    shutil.copytree(source, destination, copy_function=link)
    return destination


def _rewrite(path, old: bytes, new: bytes) -> None:
    data = path.read_bytes()
    assert old in data
    path.write_bytes(data.replace(old, new, 1))


@pytest.mark.parametrize("name", ["idefics3-256m", "smolvlm2"])
def test_the_converter_writes_the_templates_as_hashed_files(preview_bundles, tiny_checkpoints, name):
    root = preview_bundles[name]
    raw = json.loads((root / "manifest.json").read_text())
    assert raw["chat_template_file"] == CHAT_TEMPLATE_FILE and "chat_template" not in raw
    assert raw["files"][CHAT_TEMPLATE_FILE]["sha256"] == sha256_file(root / CHAT_TEMPLATE_FILE)
    source = json.loads((tiny_checkpoints[name] / "chat_template.json").read_text())["chat_template"]
    manifest = Manifest.read(root)
    assert manifest.chat_template == source == (root / CHAT_TEMPLATE_FILE).read_text(encoding="utf-8")
    if name == "smolvlm2":
        assert raw["video"]["chat_template_file"] == VIDEO_CHAT_TEMPLATE_FILE
        assert raw["files"][VIDEO_CHAT_TEMPLATE_FILE]["sha256"] == sha256_file(root / VIDEO_CHAT_TEMPLATE_FILE)
        assert manifest.video.chat_template == (root / VIDEO_CHAT_TEMPLATE_FILE).read_text(encoding="utf-8")
    else:
        assert manifest.video is None and not (root / VIDEO_CHAT_TEMPLATE_FILE).exists()


@pytest.mark.parametrize("name, file", [("idefics3-256m", CHAT_TEMPLATE_FILE), ("smolvlm2", VIDEO_CHAT_TEMPLATE_FILE)])
def test_a_changed_template_fails_verification_at_start_up_naming_the_file(preview_bundles, tmp_path, name, file):
    root = _copy(preview_bundles[name], tmp_path / "bundle")
    assert RuntimeBundle.open(root).manifest.chat_template_file == CHAT_TEMPLATE_FILE
    _rewrite(root / file, b"Assistant:", b"Assistanx:")  # same size: only the sha256 tells
    with pytest.raises(BundleError, match=rf"failed verification: {file} sha256 differs from the manifest"):
        RuntimeBundle.open(root)
    (root / file).write_text((root / file).read_text() + "{{ 'more' }}")
    with pytest.raises(BundleError, match=rf"{file} has \d+ bytes, manifest says \d+"):
        RuntimeBundle.open(root)
    assert RuntimeBundle.open(root, verify=False).manifest.root == root  # --no-verify: taken as it is


def test_a_missing_or_oversized_template_file_is_named(preview_bundles, tmp_path):
    root = _copy(preview_bundles["idefics3-256m"], tmp_path / "bundle")
    (root / CHAT_TEMPLATE_FILE).unlink()
    with pytest.raises(BundleError, match=rf"{CHAT_TEMPLATE_FILE} \(the chat template named by "
                                          "'chat_template_file'\\) cannot be read"):
        RuntimeBundle.open(root)
    (root / CHAT_TEMPLATE_FILE).write_bytes(b"x" * (CHAT_TEMPLATE_MAX_BYTES + 1))
    with pytest.raises(BundleError, match=f"{CHAT_TEMPLATE_FILE} is over 1,048,576 bytes: it is not a chat template"):
        RuntimeBundle.open(root)
    (root / CHAT_TEMPLATE_FILE).write_bytes(b"\xff\xfe{{")
    with pytest.raises(BundleError, match="is not UTF-8 text"):
        RuntimeBundle.open(root)


def test_a_template_that_is_not_jinja_names_its_file(preview_bundles, tmp_path):
    root = _copy(preview_bundles["idefics3-256m"], tmp_path / "bundle")
    (root / CHAT_TEMPLATE_FILE).write_text("{% for %}")
    with pytest.raises(BundleError, match=f"{CHAT_TEMPLATE_FILE} is not a valid Jinja template"):
        RuntimeBundle.open(root, verify=False)


def test_an_older_bundle_with_an_inline_template_is_read_with_a_warning(preview_bundles, tmp_path, caplog):
    """Refusing it would mean converting again (hours on a host with the toolkits); it is read as
    before, the warning saying what no hash covers and the fix."""
    root = _copy(preview_bundles["idefics3-256m"], tmp_path / "bundle")
    raw = json.loads((root / "manifest.json").read_text())
    text = (root / CHAT_TEMPLATE_FILE).read_text(encoding="utf-8")
    del raw["chat_template_file"], raw["files"][CHAT_TEMPLATE_FILE]
    raw = {**{k: v for k, v in raw.items() if k != "tokenizer"}, "chat_template": text, "tokenizer": raw["tokenizer"]}
    (root / CHAT_TEMPLATE_FILE).unlink()
    (root / "manifest.json").write_text(json.dumps(raw, indent=2))
    with caplog.at_level(logging.WARNING, logger="rksmolvlm.bundle"):
        bundle = RuntimeBundle.open(root)
    assert bundle.manifest.chat_template == text and bundle.manifest.chat_template_file is None
    assert "inline in manifest.json, where no sha256 covers it" in caplog.text and "convert the bundle again" in \
        caplog.text
    back = bundle.manifest.to_dict()
    assert back["chat_template"] == text and "chat_template_file" not in back  # it round-trips as it was


def test_serve_refuses_a_changed_template_at_start_up(preview_bundles, tmp_path):
    root = _copy(preview_bundles["idefics3-256m"], tmp_path / "bundle")
    _rewrite(root / CHAT_TEMPLATE_FILE, b"Assistant:", b"Assistanx:")
    result = subprocess.run([sys.executable, "-m", "rksmolvlm", "serve", str(root), "--no-config", "--engine", "host",
                             "--check"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    assert f"{CHAT_TEMPLATE_FILE} sha256 differs from the manifest" in result.stderr
    assert "Traceback" not in result.stderr

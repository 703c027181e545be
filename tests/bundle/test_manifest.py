"""The typed manifest: a real converted manifest reads into the records the runtime uses, and each
kind of damage is a BundleError naming the key — `rksmolvlm ask` exits 2 with that message and no
traceback."""

import dataclasses
import json
import os
import re
import shutil

import pytest

from support import TINY_NAMES
from rksmolvlm.cli import main
from rksmolvlm.errors import BundleError
from rksmolvlm.bundle.manifest import SCHEMA_VERSION, Manifest
from rksmolvlm.processing.image import ImageSettings


def _copy(source, destination):
    """The bundle's files hard-linked (cheap), its manifest copied (it gets rewritten)."""
    def link(src, dst):
        if os.path.basename(src) == "manifest.json":
            return shutil.copy2(src, dst)
        return os.link(src, dst)

    shutil.copytree(source, destination, copy_function=link)
    return destination


def _edit(key_path, value):
    def edit(manifest, root):
        *parents, last = key_path.split(".")
        node = manifest
        for key in parents:
            node = node[key]
        node[last] = value(node[last]) if callable(value) else value
    return edit


def _symlink_outside(manifest, root):
    outside = root.parent / f"{root.name}-outside.json"
    shutil.copy2(root / "tokenizer.json", outside)
    (root / "tokenizer.json").unlink()
    (root / "tokenizer.json").symlink_to(outside)


DAMAGE = {  # what is done to the manifest → what the error must name
    "files is a list": (_edit("files", list), "'files' must be an object"),
    "processor is a string": (_edit("processor", "fast"), "'processor' must be an object"),
    "max_context is a string": (_edit("llm.max_context", "big"), "'llm.max_context' must be an integer"),
    "tokens is empty": (_edit("tokens", {}), r"'tokens\.\w+' is missing"),
    "image token id is text": (_edit("tokens.image_id", "49190"), "'tokens.image_id' must be an integer"),
    "tokenizer climbs out": (_edit("tokenizer", "../../../etc/hostname"), "'tokenizer' is '../../../etc/hostname', a "
                                                                          "path outside the bundle"),
    "tokenizer is absolute": (_edit("tokenizer", "/etc/hostname"), "'tokenizer' is '/etc/hostname', a path outside"),
    "tokenizer is not a bundle file": (_edit("tokenizer", "notes.txt"), "'tokenizer' names 'notes.txt', which "
                                                                        "is not among the bundle's files"),
    "a file is a symlink outside": (_symlink_outside, r"'files\['tokenizer.json'\]' .* leads outside the bundle "
                                                      "through a symbolic link"),
    "a file record is damaged": (lambda m, root: m["files"]["tokenizer.json"].update(sha256="abc"),
                                 r"'files.tokenizer.json.sha256' must be a sha256"),
    "schema version": (_edit("schema_version", SCHEMA_VERSION + 1), f"has bundle schema {SCHEMA_VERSION + 1}, this "
                                                                    f"rksmolvlm reads schema {SCHEMA_VERSION}"),
    "schema version missing": (lambda m, root: m.pop("schema_version"), "has bundle schema None"),
    "vision output shape": (_edit("vision.output.shape", [1, 5, 64]), r"'vision.output.shape' \[1, 5, 64\] "
                                                                      "disagrees with"),
    "vision output shape of two": (_edit("vision.output.shape", [4, 64]), "'vision.output.shape' must be a list of 3"),
    "family": (_edit("model.family", "llava"), "'model.family' must be one of idefics3, smolvlm"),
    "chat template file": (_edit("chat_template_file", ["x"]), "'chat_template_file' must be a relative file path"),
    "chat template file not listed": (_edit("chat_template_file", "notes.txt"), "'chat_template_file' names "
                                                                                "'notes.txt', which is not among"),
    "chat template inline too": (_edit("chat_template", "{{ 'x' }}"), "has both 'chat_template' and "
                                                                        "'chat_template_file'"),
    "chat template inline": (lambda m, root: m.update(chat_template=["x"]) or m.pop("chat_template_file"),
                             "'chat_template' must be a string"),
    "image mean": (_edit("processor.image_mean", [0.5, 0.5]), "'processor.image_mean' must be a list of 3 numbers"),
    "splitting flag": (_edit("processor.do_image_splitting", 1),
                       "'processor.do_image_splitting' must be true or false"),
    "no end ids": (_edit("tokens.eos_ids", []), "'tokens.eos_ids' is empty"),
}


def _damaged(preview_bundles, tmp_path, case):
    root = _copy(preview_bundles["idefics3-256m"], tmp_path / "bundle")
    manifest = json.loads((root / "manifest.json").read_text())
    damage, _ = DAMAGE[case]
    damage(manifest, root)
    (root / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return root


@pytest.mark.parametrize("case", sorted(DAMAGE))
def test_damage_is_an_error_naming_the_key(preview_bundles, tmp_path, case):
    root = _damaged(preview_bundles, tmp_path, case)
    with pytest.raises(BundleError, match=DAMAGE[case][1]):
        Manifest.read(root)


@pytest.mark.parametrize("case", ["files is a list", "processor is a string", "max_context is a string",
                                  "tokens is empty", "tokenizer climbs out", "tokenizer is absolute",
                                  "a file is a symlink outside", "schema version", "vision output shape"])
def test_ask_on_a_damaged_bundle_exits_2_naming_the_key(preview_bundles, tmp_path, capsys, case):
    root = _damaged(preview_bundles, tmp_path, case)
    code = main(["ask", str(root), "--prompt", "hi", "--engine", "host"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    assert re.search(DAMAGE[case][1], err), err


@pytest.mark.parametrize("content,match", [("{not json", "is not valid JSON"), ("[1, 2]", "'manifest.json' must be "
                                                                                             "an object"),
                                           ("\xff\xfe", "is not valid JSON")])
def test_a_manifest_that_is_not_a_json_object(preview_bundles, tmp_path, capsys, content, match):
    root = _copy(preview_bundles["idefics3-256m"], tmp_path / "bundle")
    (root / "manifest.json").write_bytes(content.encode("latin-1"))
    with pytest.raises(BundleError, match=match):
        Manifest.read(root)
    assert main(["ask", str(root), "--prompt", "hi", "--engine", "host"]) == 2
    err = capsys.readouterr().err
    assert "manifest.json" in err and "Traceback" not in err


def test_a_folder_without_a_manifest(tmp_path):
    with pytest.raises(BundleError, match="is not a bundle .* convert a checkpoint first"):
        Manifest.read(tmp_path)


@pytest.mark.parametrize("name", TINY_NAMES)
def test_a_good_manifest_reads_into_records(preview_bundles, tiny_checkpoints, name):
    root = preview_bundles[name]
    raw = json.loads((root / "manifest.json").read_text())
    config = json.loads((tiny_checkpoints[name] / "config.json").read_text())
    processor = json.loads((tiny_checkpoints[name] / "preprocessor_config.json").read_text())
    seq_len = json.loads((tiny_checkpoints[name] / "processor_config.json").read_text())["image_seq_len"]
    m = Manifest.read(root)

    assert m.root == root and m.schema_version == SCHEMA_VERSION and m.created_by.startswith("rksmolvlm ")
    assert m.source.model_id == name and m.source.revision is None
    assert m.source.weights == {"model.safetensors": raw["source"]["weights"]["model.safetensors"]["sha256"]}
    assert m.model.family == config["model_type"] and m.model.architecture == config["architectures"][0]
    hidden, vocab = config["text_config"]["hidden_size"], config["text_config"]["vocab_size"]
    assert (m.model.image_seq_len, m.model.text_hidden_size, m.model.vocab_size) == (seq_len, hidden, vocab)
    assert (m.target.platform, m.target.npu_cores) == ("rk3588", 3)
    assert m.vision.file == "vision.rknn" and m.vision.onnx == "vision.onnx" and m.vision.dtype == "fp16"
    assert m.vision.output_shape == (1, seq_len, hidden)
    assert m.llm.file is None and m.llm.toolkit_version is None and m.llm.decoder_dir == "decoder"
    assert m.llm.embed_tokens == "embed_tokens.npy" and m.llm.embed_shape == (vocab, hidden)
    assert m.llm.max_context == m.max_context == raw["llm"]["max_context"] and m.llm.dtype == "w8a8"
    assert m.processor.image == ImageSettings(
        tile_size=processor["max_image_size"]["longest_edge"], longest_edge=processor["size"]["longest_edge"],
        do_image_splitting=processor["do_image_splitting"], resample=processor["resample"],
        rescale_factor=processor["rescale_factor"], image_mean=tuple(processor["image_mean"]),
        image_std=tuple(processor["image_std"]), video_sampling=processor.get("video_sampling", {}))
    assert m.processor.image_seq_len == seq_len
    tokens = m.tokens.prompt
    assert (tokens.image, tokens.fake_image, tokens.global_image, tokens.end_of_utterance) == \
        ("<image>", "<fake_token_around_image>", "<global-img>", "<end_of_utterance>")
    assert tokens.image_id == config["image_token_id"] and tokens.image_seq_len == seq_len
    generation = json.loads((tiny_checkpoints[name] / "generation_config.json").read_text())
    assert list(m.tokens.eos_ids) == generation["eos_token_id"]
    assert (m.tokens.bos_id, m.tokens.pad_id) == (1, 2)
    assert m.chat_template == json.loads((tiny_checkpoints[name] / "chat_template.json").read_text())["chat_template"]
    assert m.tokenizer == "tokenizer.json"
    assert set(m.files) == set(raw["files"]) and {"vision.onnx", "embed_tokens.npy", "tokenizer.json"} <= set(m.files)
    for rel, record in m.files.items():
        assert record.path == rel and record.size == (root / rel).stat().st_size
    assert m.size_bytes == sum((root / rel).stat().st_size for rel in m.files)
    m.verify_files()
    m.require_parts()
    assert m.require_llm() is m.llm and m.require_vision() is m.vision


def test_verify_files_names_a_changed_file(preview_bundles, tmp_path):
    root = _copy(preview_bundles["smolvlm2"], tmp_path / "bundle")
    tokenizer = root / "tokenizer.json"
    data = tokenizer.read_bytes()
    tokenizer.unlink()  # a new inode: the original bundle stays intact
    tokenizer.write_bytes(data.replace(b"<image>", b"<imagf>"))
    (root / "embed_tokens.npy").unlink()
    with pytest.raises(BundleError, match="embed_tokens.npy is missing; tokenizer.json sha256 differs"):
        Manifest.read(root).verify_files()


def test_a_bundle_without_a_part(preview_bundles, tmp_path):
    root = _copy(preview_bundles["idefics3-256m"], tmp_path / "bundle")
    manifest = json.loads((root / "manifest.json").read_text())
    manifest["llm"] = None
    (root / "manifest.json").write_text(json.dumps(manifest))
    m = Manifest.read(root)
    assert m.llm is None
    with pytest.raises(BundleError, match="has no decoder part: convert with --parts vision,llm"):
        m.require_parts()
    with pytest.raises(BundleError, match="has no decoder part: convert with --parts vision,llm"):
        m.require_llm()  # the typed accessor the board code reads the decoder through
    assert m.require_vision() is m.vision
    towerless = dataclasses.replace(m, vision=None)
    with pytest.raises(BundleError, match="has no vision part: convert with --parts vision,llm"):
        towerless.require_vision()

"""The bundle contract round-trips: every manifest part writes and reads itself (write → read → equal),
each part's own reader refuses damage naming the key, whole manifests of each family round-trip, the
bundle writer refuses a record that does not read back, and every real converted bundle's manifest
is exactly what its records write. The goldens' format round-trips the same way."""

import copy
import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

from support import TINY_NAMES
from support.manifests import FAMILY_LAYOUTS, family_record, minimal_record
from rksmolvlm.bundle import manifest as contract
from rksmolvlm.bundle import staged_bundle
from rksmolvlm.bundle.goldens import GOLDENS_FORMAT, GoldenCase, Goldens
from rksmolvlm.bundle.manifest import (FileRecord, GoldensInfo, LlmPart, LlmRecipe, Manifest, ModelInfo, ProcessorInfo,
                                       SourceInfo, TargetInfo, TextDecoderInfo, TokenInfo, VideoPartInfo,
                                       VisionAccuracy, VisionInput, VisionOutput, VisionPart, VisionQuantization,
                                       VisionTowerInfo)
from rksmolvlm.errors import BundleError

ROOT = Path("bundle")
FAMILIES = sorted(FAMILY_LAYOUTS)


def _json(data):
    """What a dict becomes on disk and back."""
    return json.loads(json.dumps(data))


def _parts(record, found=None):
    """Every part record reachable from ``record`` (the records inside records included)."""
    found = [] if found is None else found
    for f in dataclasses.fields(record):
        value = getattr(record, f.name)
        values = value.values() if isinstance(value, dict) else [value]
        for v in values:
            if dataclasses.is_dataclass(v) and type(v).__module__ == contract.__name__:
                found.append(v)
                _parts(v, found)
    return found


def _read_part(part, data, files, root=ROOT):
    """``part``'s own reader on ``data`` (``root``: the bundle whose files it may read, a chat template's)."""
    if isinstance(part, TokenInfo):
        return TokenInfo.from_dict(data, root, files, image_seq_len=part.prompt.image_seq_len)
    if isinstance(part, FileRecord):
        return FileRecord.from_dict(data, part.path, root)
    return type(part).from_dict(data, root, files)


PARTS = [(family, i) for family in FAMILIES for i in range(len(_parts(family_record(family))))]


@pytest.mark.parametrize("family,index", PARTS, ids=[f"{f}-{type(_parts(family_record(f))[i]).__name__}-{i}"
                                                      for f, i in PARTS])
def test_every_part_reads_back_what_it_writes(family, index):
    manifest = family_record(family)
    part = _parts(manifest)[index]
    data = part.to_dict()
    assert _json(data) == data  # plain JSON: no tuples, no records
    assert _read_part(part, _json(data), manifest.files) == part


def test_every_record_of_the_contract_is_round_tripped_above():
    covered = {type(p) for family in FAMILIES for p in _parts(family_record(family))}
    records = {getattr(contract, name) for name in contract.__all__
               if dataclasses.is_dataclass(getattr(contract, name))} - {Manifest}
    assert records - covered == set(), "a part with no family manifest carrying it: add it to family_record()"


@pytest.mark.parametrize("family", FAMILIES)
def test_a_whole_manifest_round_trips(family, tmp_path):
    manifest = family_record(family, tmp_path)
    data = manifest.to_dict()
    back = Manifest.from_dict(_json(data), tmp_path)
    assert back == manifest
    assert back.to_dict() == data and list(back.to_dict()) == list(data)  # same keys, same order
    assert ("video" in data) == (family == "smolvlm2") and ("goldens" in data) == (family == "smolvlm2")
    assert data["model"]["vision"]["image_seq_len"] == FAMILY_LAYOUTS[family]["seq"]
    assert back.model.image_seq_len == back.processor.image_seq_len == back.tokens.prompt.image_seq_len


def test_the_minimal_manifest_round_trips():
    manifest = minimal_record()
    data = manifest.to_dict()
    assert Manifest.from_dict(_json(data), manifest.root) == manifest
    assert data["vision"] is None and data["llm"] is None and list(data["files"]) == ["tokenizer.json"]
    assert "video" not in data and "goldens" not in data  # optional parts are left out, not written as null


def test_a_2b_layout_keeps_its_plain_text_global_image():
    back = Manifest.from_dict(_json(family_record("idefics3-2b").to_dict()), ROOT)
    assert back.tokens.global_image_id is None and back.tokens.row_col_are_tokens is False
    assert back.vision.quantization == VisionQuantization("w8a8", "normal", 24, ("photo_a.jpg", "doc_b.png"))
    assert back.llm.dtype == "w8a8"


def _set(path, value):
    def edit(data):
        *parents, last = path.split(".")
        node = data
        for key in parents:
            node = node[key]
        if value is _DROP:
            del node[last]
        else:
            node[last] = value
    return edit


_DROP = object()

# part → (damage to its dict, what the part's own reader must say)
PART_DAMAGE = {
    "source model id missing": (SourceInfo, _set("model_id", _DROP), r"'source\.model_id' is missing"),
    "source weight sha": (SourceInfo, lambda d: d["weights"]["model.safetensors"].update(sha256="x" * 64),
                          r"'source\.weights\.model\.safetensors\.sha256' must be a sha256"),
    "model family": (ModelInfo, _set("family", "llava"), "'model.family' must be one of idefics3, smolvlm"),
    "model seq len zero": (ModelInfo, _set("vision.image_seq_len", 0),
                           r"'model\.vision\.image_seq_len' must be an integer ≥ 1, not the number 0"),
    "model tie flag": (ModelInfo, _set("text.tie_word_embeddings", "no"),
                       "'model.text.tie_word_embeddings' must be true or false"),
    "tower heads": (VisionTowerInfo, _set("heads", 1.5), r"'model\.vision\.heads' must be an integer"),
    "decoder vocab": (TextDecoderInfo, _set("vocab_size", _DROP), r"'model\.text\.vocab_size' is missing"),
    "target cores": (TargetInfo, _set("npu_cores", 0), "'target.npu_cores' must be an integer ≥ 1"),
    "vision dtype": (VisionPart, _set("dtype", "int4"), "'vision.dtype' must be one of fp16, int8"),
    "vision output shape": (VisionPart, _set("output.shape", [1, 64]),
                            "'vision.output.shape' must be a list of 3 non-negative integers"),
    "vision file climbs out": (VisionPart, _set("file", "../vision.rknn"),
                               "'vision.file' is '../vision.rknn', a path outside the bundle"),
    "vision onnx not a bundle file": (VisionPart, _set("onnx", "other.onnx"),
                                      "'vision.onnx' names 'other.onnx', which is not among the bundle's files"),
    "vision input shape": (VisionInput, _set("shape", [1, 512, 512]), "'vision.input.shape' must be a list of 4"),
    "vision output name": (VisionOutput, _set("name", 3), "'vision.output.name' must be a string"),
    "quantization images": (VisionQuantization, _set("calibration_images", ["a.jpg", 2]),
                            "'vision.quantization.calibration_images' must be a list of strings"),
    "accuracy not finite": (VisionAccuracy, _set("min_tile_cosine", float("nan")),
                            "'vision.accuracy.min_tile_cosine' must be a finite number"),
    "llm context": (LlmPart, _set("max_context", 16), "'llm.max_context' must be an integer ≥ 32"),
    "llm context too large": (LlmPart, _set("max_context", 10 ** 12), r"'llm\.max_context' must be an integer ≥ 32 "
                              r"and ≤ 16384 \(rkllm-toolkit's limit\), not the number 1000000000000"),
    "llm context not an integer": (LlmPart, _set("max_context", 1e12), r"'llm\.max_context' must be an integer ≥ 32 "
                                   r"and ≤ 16384 .*, not the number 1000000000000\.0"),
    "llm embed shape": (LlmPart, _set("embed_tokens.shape", [49280, 576, 1]),
                        "'llm.embed_tokens.shape' must be a list of 2"),
    "llm decoder dir absolute": (LlmPart, _set("decoder_dir", "/opt/decoder"),
                                 "'llm.decoder_dir' is '/opt/decoder', a path outside the bundle"),
    "llm embed file missing": (LlmPart, _set("embed_tokens.file", "embed.npy"),
                               "'llm.embed_tokens.file' names 'embed.npy', which is not among"),
    "recipe cores": (LlmRecipe, _set("num_npu_core", "3"), "'llm.recipe.num_npu_core' must be an integer"),
    "processor mean": (ProcessorInfo, _set("image_mean", [0.5, 0.5]),
                       "'processor.image_mean' must be a list of 3 numbers"),
    "processor splitting": (ProcessorInfo, _set("do_image_splitting", 1),
                            "'processor.do_image_splitting' must be true or false"),
    "processor video sampling": (ProcessorInfo, _set("video_sampling", [1]),
                                 "'processor.video_sampling' must be an object"),
    "tokens no end": (TokenInfo, _set("eos_ids", []), "'tokens.eos_ids' is empty"),
    "tokens image id text": (TokenInfo, _set("image_id", "49190"), "'tokens.image_id' must be an integer"),
    "tokens fake image id negative": (TokenInfo, _set("fake_image_id", -1),
                                      "'tokens.fake_image_id' must be an integer ≥ 0"),
    "video fps": (VideoPartInfo, _set("settings.fps", 0), "'video.settings' has fps 0.0 .* fps must be above 0"),
    "video zero std": (VideoPartInfo, _set("settings.image_std", [0.5, 0, 0.5]),
                       r"'video\.settings' is not usable \(invalid video settings: image_std"),
    "video template": (VideoPartInfo, _set("chat_template", _DROP), "'video.chat_template' is missing"),
    "goldens cases not a file": (GoldensInfo, _set("cases", "goldens/other.json"),
                                 "'goldens.cases' names 'goldens/other.json', which is not among"),
    "goldens tokens": (GoldensInfo, _set("new_tokens", 0), "'goldens.new_tokens' must be an integer ≥ 1"),
    "file sha": (FileRecord, _set("sha256", "abc"), r"'files\.vision\.rknn\.sha256' must be a sha256"),
    "file size": (FileRecord, _set("size", -1), r"'files\.vision\.rknn\.size' must be an integer ≥ 0"),
}


@pytest.mark.parametrize("case", sorted(PART_DAMAGE))
def test_each_part_refuses_damage_naming_the_key(case):
    cls, damage, match = PART_DAMAGE[case]
    manifest = family_record("smolvlm2" if cls in (VideoPartInfo, GoldensInfo) else "idefics3-2b")
    part = next(p for p in _parts(manifest) if type(p) is cls and (cls is not FileRecord or p.path == "vision.rknn"))
    data = copy.deepcopy(part.to_dict())
    damage(data)
    with pytest.raises(BundleError, match=match) as info:
        _read_part(part, data, manifest.files)
    assert "convert" in str(info.value) or "copy the bundle" in str(info.value)  # the fix is named


MANIFEST_DAMAGE = {  # checks across parts, and the manifest's own keys
    "schema": (_set("schema_version", 2), "has bundle schema 2, this rksmolvlm reads schema 1"),
    "seq len disagrees": (_set("processor.image_seq_len", 81), "'processor.image_seq_len' 81 disagrees with "
                                                               "'model.vision.image_seq_len' 64"),
    "vision output disagrees": (_set("vision.output.shape", [1, 64, 576]), r"'vision.output.shape' \[1, 64, 576\] "
                                                                           "disagrees with"),
    "embed width disagrees": (_set("llm.embed_tokens.shape", [49280, 576]), r"'llm.embed_tokens.shape' .* disagrees "
                                                                            "with model.text.hidden_size 960"),
    "frames are not tiles": (_set("video.settings.frame_size", 384), "'video.settings.frame_size' 384 differs from "
                                                                     "the tile size 512"),
    "unknown part": (_set("parts", ["vision", "audio"]), "'parts' must be a list of strings from vision, llm"),
    "toolkits value": (_set("toolkits.torch", 2), "'toolkits.torch' must be a string or null"),
    "created_at": (_set("created_at", 5), "'created_at' must be a string"),
    "files not an object": (_set("files", []), "'files' must be an object"),
    "tokenizer not listed": (_set("tokenizer", "tok.json"), "'tokenizer' names 'tok.json', which is not among"),
}


@pytest.mark.parametrize("case", sorted(MANIFEST_DAMAGE))
def test_the_manifest_refuses_damage_across_parts(case):
    data = family_record("smolvlm2").to_dict()
    damage, match = MANIFEST_DAMAGE[case]
    damage(data)
    with pytest.raises(BundleError, match=match):
        Manifest.from_dict(_json(data), ROOT)


def test_missing_optional_keys_read_as_absent():
    """Bundles written before a key existed still read: every key the board does not need may be missing."""
    data = family_record("idefics3-256m").to_dict()
    for section, key in (("model.vision", "patch_size"), ("model.text", "kv_heads"), ("vision", "accuracy"),
                         ("vision", "input"), ("llm", "recipe"), ("llm", "board_decoder"), ("tokens", "bos"),
                         ("", "parts"), ("", "created_at")):
        node = data
        for k in filter(None, section.split(".")):
            node = node[k]
        del node[key]
    m = Manifest.from_dict(_json(data), ROOT)
    assert m.model.vision.patch_size is None and m.vision.accuracy is None and m.llm.dtype is None
    assert m.parts is None and m.created_at is None and m.tokens.bos is None


def _write_files(root, manifest):
    for name in manifest.files:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(name.encode())


@pytest.mark.parametrize("family", FAMILIES)
def test_the_bundle_writer_writes_the_records(tmp_path, family):
    dest = tmp_path / "b"
    record = family_record(family)
    with staged_bundle(dest) as stage:
        _write_files(stage.path, record)
        stage.manifest = dataclasses.replace(record, files={})  # the writer lists the files
    on_disk = json.loads((dest / "manifest.json").read_text())
    back = Manifest.read(dest)
    assert back.to_dict() == on_disk and stage.manifest == back
    assert set(back.files) == set(record.files)
    assert all(r.size == len(n.encode()) for n, r in back.files.items())
    assert dataclasses.replace(back, root=record.root, files=record.files, created_at=record.created_at,
                               created_by=record.created_by) == record
    back.verify_files()


def test_the_bundle_writer_refuses_a_record_that_does_not_read_back(tmp_path, monkeypatch):
    record = family_record("idefics3-256m")

    def swapped(self):
        return {"simulator_cosine": self.min_tile_cosine, "min_tile_cosine": self.simulator_cosine}

    monkeypatch.setattr(VisionAccuracy, "to_dict", swapped)  # a writer that disagrees with its reader
    with pytest.raises(BundleError, match="internal: the manifest reads back different in vision"):
        with staged_bundle(tmp_path / "b") as stage:
            _write_files(stage.path, record)
            stage.manifest = dataclasses.replace(record, files={})
    assert not (tmp_path / "b").exists()


# -- the goldens' format --------------------------------------------------------------------------
def _goldens(root):
    cases = [GoldenCase("photo", [{"role": "user", "content": [{"type": "image", "image": "cat.jpg"},
                                                               {"type": "text", "text": "Describe."}]}],
                        [1, 2, 3], [7, 8, 2], [0, 4], 5),
             GoldenCase("text", [{"role": "user", "content": [{"type": "text", "text": "Hi"}]}], [1, 4], [9, 2], [], 0)]
    features = {"photo": np.arange(2 * 4 * 8, dtype=np.float16).reshape(2, 4, 8)}
    return Goldens(root, 16, "tiny float32, transformers greedy", cases, features, {"cat.jpg": "cd" * 32})


def test_goldens_round_trip(tmp_path):
    goldens = _goldens(tmp_path)
    info = goldens.write()
    assert info == GoldensInfo("goldens/cases.json", "goldens/features.npz", 16)
    back = Goldens.read(tmp_path, tmp_path / info.cases, tmp_path / info.features)
    assert (back.root, back.new_tokens, back.reference, back.cases, back.inputs) == \
        (goldens.root, goldens.new_tokens, goldens.reference, goldens.cases, goldens.inputs)
    assert set(back.features) == {"photo"} and np.array_equal(back.features["photo"], goldens.features["photo"])
    assert back.features["photo"].dtype == np.float16
    assert json.loads((tmp_path / info.cases).read_text()) == goldens.to_dict()
    for case in goldens.cases:
        assert GoldenCase.from_dict(_json(case.to_dict())) == case
    image = back.messages(back.cases[0])[0].parts[0]
    assert str(image.source) == str(tmp_path / "goldens" / "inputs" / "cat.jpg")


@pytest.mark.parametrize("damage,match", [
    (lambda d: d.update(format=GOLDENS_FORMAT + 1), "format 2, this rksmolvlm reads 1"),
    (lambda d: d["cases"][0].pop("prompt_ids"), "case 'photo': 'prompt_ids' must be a list of non-negative"),
    (lambda d: d["cases"][1].update(token_ids=["9"]), "case 'text': 'token_ids' must be a list"),
    (lambda d: d.update(new_tokens=0), "'new_tokens' must be an integer ≥ 1"),
    (lambda d: d["cases"][0].update(messages="hi"), "case 'photo': 'messages' must be a list of objects"),
])
def test_damaged_goldens_name_the_key(tmp_path, damage, match):
    info = _goldens(tmp_path).write()
    data = json.loads((tmp_path / info.cases).read_text())
    damage(data)
    (tmp_path / info.cases).write_text(json.dumps(data))
    with pytest.raises(BundleError, match=f"cases.json cannot be read .*{match}.*convert the bundle again"):
        Goldens.read(tmp_path, tmp_path / info.cases, tmp_path / info.features)


# -- the real converted bundles ---------------------------------------------------------------------
@pytest.mark.parametrize("name", TINY_NAMES)
def test_every_converted_manifest_is_what_its_records_write(preview_bundles, name):
    root = preview_bundles[name]
    on_disk = json.loads((root / "manifest.json").read_text())
    m = Manifest.read(root)
    assert Manifest.from_dict(m.to_dict(), root) == m
    assert m.to_dict() == on_disk and list(m.to_dict()) == list(on_disk)
    for part in _parts(m):
        assert _read_part(part, _json(part.to_dict()), m.files, root) == part

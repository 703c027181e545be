"""convert/source: a checkpoint's family, geometry, processor settings and tokens, read from its
own files; bad sources give clear errors."""

import json
import shutil

import pytest
from transformers import AutoTokenizer

from rksmolvlm.convert.source import open_checkpoint
from rksmolvlm.convert.tiny_checkpoint import CHAT_TEMPLATE, TINY_SPECS
from rksmolvlm.errors import CheckpointError
from rksmolvlm.hashing import sha256_file


@pytest.mark.parametrize("name", sorted(TINY_SPECS))
def test_reads_geometry_and_settings(tiny_checkpoints, name):
    spec = TINY_SPECS[name]
    ck = open_checkpoint(str(tiny_checkpoints[name]))
    assert ck.family == spec.family
    assert ck.vision.tile_size == spec.tile_size
    assert ck.vision.patch_size == spec.patch_size
    assert ck.vision.scale_factor == spec.scale_factor
    assert ck.vision.image_seq_len == spec.image_seq_len
    assert ck.image.longest_edge == spec.longest_edge
    assert ck.image.tile_size == spec.tile_size
    assert ck.text.vocab_size == spec.vocab_size
    assert ck.chat_template == CHAT_TEMPLATE
    assert ck.weights == {"model.safetensors": sha256_file(tiny_checkpoints[name] / "model.safetensors")}


@pytest.mark.parametrize("name", sorted(TINY_SPECS))
def test_special_tokens_equal_the_tokenizers(tiny_checkpoints, name):
    path = tiny_checkpoints[name]
    tok = AutoTokenizer.from_pretrained(path)
    t = open_checkpoint(str(path)).tokens
    assert t.image_id == tok.convert_tokens_to_ids("<image>")
    assert t.fake_image_id == tok.convert_tokens_to_ids("<fake_token_around_image>")
    assert t.end_of_utterance_id == tok.convert_tokens_to_ids("<end_of_utterance>")
    assert (t.bos_id, t.eos_id, t.pad_id) == (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id)
    assert t.end_of_utterance_id in t.eos_ids
    two_b = name == "idefics3-2b"
    assert t.row_col_are_tokens is (not two_b)
    assert (t.global_image_id is None) is two_b


def test_chat_template_from_jinja_file_wins(tiny_checkpoints, tmp_path):
    ck_dir = tmp_path / "ck"
    shutil.copytree(tiny_checkpoints["smolvlm2"], ck_dir)
    (ck_dir / "chat_template.jinja").write_text("{{ 'custom' }}")
    assert open_checkpoint(str(ck_dir)).chat_template == "{{ 'custom' }}"


def test_not_a_checkpoint_empty_dir(tmp_path):
    with pytest.raises(CheckpointError, match="config.json is missing"):
        open_checkpoint(str(tmp_path))


def test_not_a_smolvlm_model(tiny_checkpoints, tmp_path):
    ck_dir = tmp_path / "llama"
    shutil.copytree(tiny_checkpoints["idefics3-256m"], ck_dir)
    (ck_dir / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(CheckpointError, match="llama model, not SmolVLM"):
        open_checkpoint(str(ck_dir))


def test_missing_weights(tiny_checkpoints, tmp_path):
    ck_dir = tmp_path / "noweights"
    shutil.copytree(tiny_checkpoints["idefics3-256m"], ck_dir)
    (ck_dir / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no weight files"):
        open_checkpoint(str(ck_dir))


def test_tokenizer_not_matching_config(tiny_checkpoints, tmp_path):
    ck_dir = tmp_path / "mismatch"
    shutil.copytree(tiny_checkpoints["idefics3-256m"], ck_dir)
    shutil.copy(tiny_checkpoints["idefics3-2b"] / "tokenizer.json", ck_dir / "tokenizer.json")
    with pytest.raises(CheckpointError, match="do not belong together"):
        open_checkpoint(str(ck_dir))


def test_file_instead_of_directory(tiny_checkpoints):
    with pytest.raises(CheckpointError, match="is a file"):
        open_checkpoint(str(tiny_checkpoints["idefics3-256m"] / "config.json"))


def test_hub_id_offline_names_the_local_alternative(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CheckpointError, match="local-dir"):
        open_checkpoint("HuggingFaceTB/SmolVLM-256M-Instruct")


def test_neither_dir_nor_hub_id():
    with pytest.raises(CheckpointError, match="neither an existing directory nor a hub id"):
        open_checkpoint("no such thing!")


@pytest.mark.parametrize("tile,patch,scale,seq,ok", [(384, 14, 3, 81, True),   # SmolVLM-Instruct 2.2B: 27 a side
                                                      (512, 16, 4, 64, True),   # SmolVLM-256M/500M
                                                      (384, 14, 2, 169, False),  # 27 patches: 2 does not divide
                                                      (10, 14, 1, 0, False)])   # smaller than one patch
def test_geometry_accepts_the_patch_remainder_and_refuses_the_rest(tiny_checkpoints, tmp_path, tile, patch, scale,
                                                                     seq, ok):
    """SigLIP's patch convolution drops what is left of a tile (so400m/14 at 384: 27 patches, 6 pixels
    unused); only a patch grid the connector's scale factor cannot divide is refused."""
    ck_dir = tmp_path / "ck"
    shutil.copytree(tiny_checkpoints["idefics3-2b"], ck_dir)
    config = json.loads((ck_dir / "config.json").read_text())
    config["vision_config"].update(image_size=tile, patch_size=patch)
    config["scale_factor"] = scale
    (ck_dir / "config.json").write_text(json.dumps(config))
    pre = json.loads((ck_dir / "preprocessor_config.json").read_text())
    pre["max_image_size"], pre["size"] = {"longest_edge": tile}, {"longest_edge": 4 * tile}
    (ck_dir / "preprocessor_config.json").write_text(json.dumps(pre))
    (ck_dir / "processor_config.json").write_text(json.dumps({"image_seq_len": seq,
                                                             "processor_class": "Idefics3Processor"}))
    if ok:
        ck = open_checkpoint(str(ck_dir))
        assert (ck.vision.tile_size, ck.vision.image_seq_len) == (tile, seq)
    else:
        with pytest.raises(CheckpointError, match="does not divide; the checkpoint's config.json looks damaged"):
            open_checkpoint(str(ck_dir))

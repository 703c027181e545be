"""The rkllm-toolkit contract double refuses what the documented toolkit refuses (a double that
accepts anything would prove nothing)."""

import json

import pytest

from rksmolvlm.convert.decoder import extract_decoder
from rksmolvlm.convert.source import open_checkpoint


@pytest.fixture(scope="module")
def decoder(tiny_checkpoints, tmp_path_factory):
    path = tmp_path_factory.mktemp("decoder") / "d"
    extract_decoder(open_checkpoint(str(tiny_checkpoints["idefics3-256m"])), path)
    return path


def test_happy_path_writes_a_file(decoder, tmp_path, rkllm_double):
    llm = rkllm_double("1.3.0")()
    assert llm.load_huggingface(model=str(decoder)) == 0
    assert llm.build(quantized_dtype="W8A8", target_platform="RK3588", max_context=1024) == 0
    assert llm.export_rkllm(str(tmp_path / "m.rkllm")) == 0
    assert (tmp_path / "m.rkllm").read_bytes().endswith(b"rkllm-toolkit version: 1.3.0")


@pytest.mark.parametrize("kwargs", [dict(quantized_dtype="w4a16"), dict(target_platform="rk3399"),
                                    dict(num_npu_core=4), dict(quantized_algorithm="grq"),
                                    dict(optimization_level=2), dict(max_context=1000),
                                    dict(max_context=32768), dict(hybrid_rate=1.0),
                                    dict(dataset="/nonexistent.json")])
def test_build_refuses_invalid_values(decoder, rkllm_double, kwargs):
    llm = rkllm_double("1.3.0")()
    assert llm.load_huggingface(model=str(decoder)) == 0
    assert llm.build(**kwargs) == -1


def test_order_and_inputs_are_enforced(decoder, tmp_path, rkllm_double):
    llm = rkllm_double("1.3.0")()
    assert llm.build() == -1  # before load
    assert llm.export_rkllm(str(tmp_path / "x.rkllm")) == -1  # before build
    assert llm.load_huggingface(model=str(decoder), device="cuda") == -1
    assert llm.load_huggingface(model=str(decoder), dtype="int8") == -1
    assert llm.load_huggingface(model=str(tmp_path)) == -1


def test_vlm_directory_and_wrong_weights_are_refused(decoder, tiny_checkpoints, tmp_path, rkllm_double):
    llm = rkllm_double("1.3.0")()
    assert llm.load_huggingface(model=str(tiny_checkpoints["idefics3-256m"])) == -1  # a VLM, not a decoder
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in decoder.iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    config = json.loads((broken / "config.json").read_text())
    config["num_hidden_layers"] += 1
    (broken / "config.json").write_text(json.dumps(config))
    assert llm.load_huggingface(model=str(broken)) == -1


def test_version_specific_signatures(decoder, tmp_path, rkllm_double):
    old = rkllm_double("1.1.4")()
    assert old.load_huggingface(model=str(decoder)) == 0
    with pytest.raises(TypeError):
        old.build(max_context=4096)  # no max_context before 1.2.0
    assert old.build(target_platform="rk3562") == -1  # rk3562 arrived in 1.2.0
    with pytest.raises(TypeError):
        rkllm_double("1.2.3")().export_rkllm(str(tmp_path / "x"), export_tokenizer=False)  # 1.3.0 only
    new = rkllm_double("1.3.0")()
    assert new.load_huggingface(model=str(decoder)) == 0
    assert new.build(quantized_dtype="w4a16", target_platform="rk3576", quantized_algorithm="gdq") == -1

"""The tiny fixtures look like hub checkpoints and carry the real special-token layouts."""

import json

import pytest
from tokenizers import Tokenizer

from rksmolvlm.convert.tiny_checkpoint import TINY_SPECS

HUB_FILES = ["config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
             "tokenizer_config.json", "preprocessor_config.json", "processor_config.json", "chat_template.json"]


def test_files_are_those_of_a_hub_checkpoint(tiny_checkpoint):
    for name in HUB_FILES:
        assert (tiny_checkpoint / name).is_file(), name


def test_256m_layout_has_row_col_tokens(tiny_checkpoints):
    tok = Tokenizer.from_file(str(tiny_checkpoints["idefics3-256m"] / "tokenizer.json"))
    assert tok.token_to_id("<global-img>") == 49152
    assert tok.token_to_id("<row_1_col_1>") == 49153
    assert tok.token_to_id("<row_6_col_6>") == 49188
    assert tok.token_to_id("<fake_token_around_image>") == 49189
    assert tok.token_to_id("<image>") == 49190
    assert tok.token_to_id("<end_of_utterance>") == 49279
    assert [tok.token_to_id(t) for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>")] == [0, 1, 2]
    assert tok.encode("<row_2_col_3><image>", add_special_tokens=False).ids == [49153 + 6 + 2, 49190]


def test_2b_layout_keeps_row_col_as_plain_text(tiny_checkpoints):
    tok = Tokenizer.from_file(str(tiny_checkpoints["idefics3-2b"] / "tokenizer.json"))
    assert tok.token_to_id("<fake_token_around_image>") == 49152
    assert tok.token_to_id("<image>") == 49153
    assert tok.token_to_id("<end_of_utterance>") == 49154
    assert tok.get_vocab_size() == 49155
    assert tok.token_to_id("<row_1_col_1>") is None
    assert len(tok.encode("<row_1_col_1>", add_special_tokens=False).ids) > 1


@pytest.mark.parametrize("name,cls", [("idefics3-256m", "Idefics3ForConditionalGeneration"),
                                      ("idefics3-2b", "Idefics3ForConditionalGeneration"),
                                      ("smolvlm2", "SmolVLMForConditionalGeneration")])
def test_transformers_loads_the_model_class(tiny_checkpoints, name, cls):
    import transformers

    config = json.loads((tiny_checkpoints[name] / "config.json").read_text())
    assert config["architectures"] == [cls]
    assert config["image_token_id"] == TINY_SPECS[name].image_token_id
    model = transformers.AutoModelForImageTextToText.from_pretrained(tiny_checkpoints[name])
    assert type(model).__name__ == cls

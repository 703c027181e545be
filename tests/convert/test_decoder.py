"""convert/decoder: the extracted LlamaForCausalLM gives the VLM's logits for the same
inputs_embeds; the embedding table is the checkpoint's."""

import json

import numpy as np
import pytest
import torch
import transformers as tf

from rksmolvlm.convert.decoder import extract_decoder, write_embedding_table
from rksmolvlm.convert.source import open_checkpoint


@pytest.mark.parametrize("name", ["idefics3-256m", "idefics3-2b", "smolvlm2"])
def test_logits_parity_with_the_vlm_text_path(tiny_checkpoints, tmp_path, name):
    ck = open_checkpoint(str(tiny_checkpoints[name]))
    out = extract_decoder(ck, tmp_path / "decoder")
    config = json.loads((tmp_path / "decoder" / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["vocab_size"] == ck.text.vocab_size
    assert config["tie_word_embeddings"] is ck.text.tie_word_embeddings is out.tied
    assert config["eos_token_id"] == list(ck.tokens.eos_ids)
    assert (tmp_path / "decoder" / "tokenizer.json").is_file()
    vlm = tf.AutoModelForImageTextToText.from_pretrained(tiny_checkpoints[name]).eval()
    llm = tf.LlamaForCausalLM.from_pretrained(tmp_path / "decoder").eval()
    embeds = torch.randn(2, 24, ck.text.hidden_size, generator=torch.Generator().manual_seed(3)) * 0.1
    with torch.no_grad():
        expected = vlm(inputs_embeds=embeds).logits
        got = llm(inputs_embeds=embeds).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    # and greedy continuation from the same embeddings picks the same tokens
    with torch.no_grad():
        a = vlm.generate(inputs_embeds=embeds[:1], max_new_tokens=6, do_sample=False)
        b = llm.generate(inputs_embeds=embeds[:1], max_new_tokens=6, do_sample=False)
    assert a.tolist() == b.tolist()


@pytest.mark.parametrize("name", ["idefics3-256m", "idefics3-2b"])
def test_embedding_table_is_the_checkpoints(tiny_checkpoints, tmp_path, name):
    ck = open_checkpoint(str(tiny_checkpoints[name]))
    shape = write_embedding_table(ck, tmp_path / "embed_tokens.npy")
    table = np.load(tmp_path / "embed_tokens.npy")
    assert table.dtype == np.float16 and table.shape == shape == (ck.text.vocab_size, ck.text.hidden_size)
    vlm = tf.AutoModelForImageTextToText.from_pretrained(tiny_checkpoints[name])
    reference = vlm.get_input_embeddings().weight.detach().numpy().astype(np.float16)
    assert np.array_equal(table, reference)

"""The decoder calibration set: shipped chats rendered exactly as transformers would (token ids),
with the real image features spliced at the image tokens (the VLM's own inputs_embeds), written
in each toolkit format and accepted by the toolkit contract double."""

import json
import pickle

import numpy as np
import pytest
import torch
import transformers as tf

from rksmolvlm.calibration.decoder_set import load_samples, render_samples, write_dataset
from rksmolvlm.calibration.vision_set import shipped_images_dir
from rksmolvlm.convert.decoder import write_embedding_table
from rksmolvlm.convert.llm_part import checkpoint_assembler
from rksmolvlm.convert.pipeline import TowerCache
from rksmolvlm.convert.source import open_checkpoint
from rksmolvlm.processing.embed import EmbeddingTable
from rksmolvlm.processing.image import normalize, preprocess

KINDS = {"caption", "vqa", "document", "chart", "screenshot", "scene_text", "diagram", "multi_image",
         "multi_turn", "text_only"}


def test_shipped_prompts_cover_every_kind_and_image():
    samples = load_samples()
    assert {s.kind for s in samples} == KINDS
    used = {name for s in samples for name in s.image_names()}
    shipped = {p.name for p in shipped_images_dir().iterdir()}
    assert used <= shipped
    assert used == shipped, f"images never used: {sorted(shipped - used)}"
    multi_turn_new_image = [s for s in samples if s.kind == "multi_turn" and
                            any(p.get("type") == "image" for m in s.messages[1:] if isinstance(m["content"], list)
                                for p in m["content"])]
    assert len(multi_turn_new_image) >= 2


def _pick(samples, kinds):
    return [next(s for s in samples if s.kind == k) for k in kinds]


@pytest.fixture(scope="module")
def rendered(tiny_checkpoints, tmp_path_factory):
    """Rendered samples (one of each kind with images, plus text-only) for each checkpoint."""
    out = {}
    samples = _pick(load_samples(), ["caption", "multi_image", "multi_turn", "text_only", "document"])
    for name, path in tiny_checkpoints.items():
        ck = open_checkpoint(str(path))
        table_path = tmp_path_factory.mktemp(name) / "embed_tokens.npy"
        write_embedding_table(ck, table_path)
        towers = TowerCache(ck)
        out[name] = (ck, samples, render_samples(samples, shipped_images_dir(), checkpoint_assembler(ck), ck.image,
                                                  table=EmbeddingTable(table_path),
                                                  features=towers.features))
    return out


@pytest.mark.parametrize("name", ["idefics3-256m", "idefics3-2b"])
def test_prompt_ids_equal_transformers_processor(rendered, name, tiny_checkpoints):
    ck, samples, results = rendered[name]
    processor = tf.AutoProcessor.from_pretrained(tiny_checkpoints[name])
    for sample, r in zip(samples, results):
        messages = [{"role": m["role"], "content": [{"type": p["type"], **({"text": p["text"]} if p["type"] == "text" else {})}
                                                    for p in m["content"]]} for m in sample.messages]
        text = processor.apply_chat_template(messages, add_generation_prompt=True)
        images = [tf.image_utils.load_image(str(shipped_images_dir() / n)) for n in sample.image_names()]
        inputs = processor(text=text, images=[images] if images else None, return_tensors="np")
        assert r.ids[:r.prompt_len] == inputs["input_ids"][0].tolist(), sample.id
        assert r.ids[r.prompt_len:] == processor.tokenizer(sample.answer + "<end_of_utterance>",
                                                           add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("name", ["idefics3-256m", "idefics3-2b", "smolvlm2"])
def test_embeddings_equal_the_vlms_inputs_embeds(rendered, name, tiny_checkpoints):
    ck, samples, results = rendered[name]
    model = tf.AutoModelForImageTextToText.from_pretrained(tiny_checkpoints[name]).eval()
    captured = {}
    model.model.text_model.register_forward_pre_hook(
        lambda module, args, kwargs: captured.update(kwargs), with_kwargs=True)
    for sample, r in zip(samples, results):
        kwargs = {"input_ids": torch.tensor([r.ids])}
        names = sample.image_names()
        if names:
            tiles = np.concatenate([preprocess(shipped_images_dir() / n, ck.image).tiles for n in names])
            kwargs["pixel_values"] = torch.from_numpy(normalize(tiles, ck.image))[None]
        with torch.no_grad():
            model(**kwargs)
        expected = captured["inputs_embeds"][0].numpy()
        image_rows = np.asarray(r.ids) == ck.tokens.image_id
        assert image_rows.sum() == (len(kwargs.get("pixel_values", [[]])[0]) * ck.vision.image_seq_len)
        np.testing.assert_allclose(r.embeddings[image_rows], expected[image_rows], atol=2e-5, rtol=0)
        # text rows come from the float16 table the board uses: the VLM's rows rounded to float16
        assert np.array_equal(r.embeddings[~image_rows], expected[~image_rows].astype(np.float16).astype(np.float32))


@pytest.mark.parametrize("version,fmt", [("1.2.3", "text"), ("1.2.3", "embed"), ("1.3.0", "text"),
                                         ("1.3.0", "multimodal")])
def test_formats_are_accepted_by_the_toolkit_double(rendered, tmp_path, rkllm_double, version, fmt):
    ck, _, results = rendered["smolvlm2"]
    path = write_dataset(results, fmt, tmp_path / "ds")
    RKLLM = rkllm_double(version)
    llm = RKLLM()
    decoder = tmp_path / "decoder"
    from rksmolvlm.convert.decoder import extract_decoder

    extract_decoder(ck, decoder)
    assert llm.load_huggingface(model=str(decoder)) == 0
    assert llm.build(dataset=str(path), max_context=2048) == 0
    built = RKLLM.calls[-1][1]
    assert built["dataset"] == str(path)
    assert llm._built["dataset_info"]["format"] == fmt
    assert llm._built["dataset_info"]["samples"] == len(results)
    if fmt != "text":
        assert llm._built["dataset_info"]["tokens"] == sum(len(r.ids) for r in results)


def test_multimodal_pickles_hold_the_spliced_embeddings(rendered, tmp_path):
    ck, _, results = rendered["idefics3-256m"]
    path = write_dataset(results, "multimodal", tmp_path)
    index = json.loads(path.read_text())
    for entry, r in zip(index, results):
        with open(tmp_path / entry["sample"], "rb") as f:
            kwargs = pickle.load(f)
        assert entry["token_nums"] == len(r.ids)
        assert kwargs["inputs_embeds"].shape == (1, len(r.ids), ck.text.hidden_size)
        assert np.array_equal(kwargs["inputs_embeds"][0].numpy(), r.embeddings)


def test_double_refuses_the_wrong_format_for_its_version(rendered, tmp_path, rkllm_double):
    ck, _, results = rendered["smolvlm2"]
    from rksmolvlm.convert.decoder import extract_decoder

    extract_decoder(ck, tmp_path / "decoder")
    for version, fmt in (("1.3.0", "embed"), ("1.2.3", "multimodal")):
        RKLLM = rkllm_double(version)
        llm = RKLLM()
        assert llm.load_huggingface(model=str(tmp_path / "decoder")) == 0
        assert llm.build(dataset=str(write_dataset(results, fmt, tmp_path / fmt)), max_context=2048) == -1

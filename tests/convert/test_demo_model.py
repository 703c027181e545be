"""The demo model (convert/demo_model.py): a tiny SmolVLM trained on the shipped images whose answers
depend on the image. Through the converted bundle its host-preview answers equal transformers'
``generate`` on the same checkpoint and are the trained text; a tower with destroyed features changes
them; the fp16 RKNN tower in rknn-toolkit2's simulator does not, nor does the int8 one; both model
classes load the same weights; weights that do not fit the tokenizer name the fix; the demo prints both answers."""

from __future__ import annotations

import json

import numpy as np
import pytest

from support.fakes import VisionWrapper
from rksmolvlm.cli import main
from rksmolvlm.convert.demo_model import (DEMO_WEIGHTS_FILE, QA, DemoWeightsError, build_demo_checkpoint,
                                          load_demo_qa, load_demo_weights, transformers_answers)

TABLE = "What is on the table?"
COFFEE, CAT = "photo_coffee_cup_table.jpg", "photo_cat_closeup_small.jpg"
# Training the demo checkpoint, converting it and running transformers or rknn-toolkit2: out of the fast lane.
SLOW = pytest.mark.slow


@pytest.fixture(scope="module")
def qa():
    return load_demo_qa()


@pytest.fixture(scope="module")
def demo_checkpoint(tmp_path_factory):
    return build_demo_checkpoint(tmp_path_factory.mktemp("demo") / "idefics3", "idefics3")


@pytest.fixture(scope="module")
def demo_bundle(demo_checkpoint, tmp_path_factory):
    from rksmolvlm.convert.pipeline import ConvertOptions, convert
    from rksmolvlm.convert.progress import Progress
    from rksmolvlm.runtime.loader import RuntimeBundle

    out = tmp_path_factory.mktemp("demo-bundle") / "bundle"
    convert(ConvertOptions(model=str(demo_checkpoint), output=out, host_preview=True, llm_host_only=True,
                           llm_dataset_format="text"), Progress(0, quiet=True))
    return RuntimeBundle.open(out)


@pytest.fixture(scope="module")
def reference(demo_checkpoint, qa):
    """transformers' greedy ids for the table question on the coffee photo and the cat."""
    items = [QA((name,), TABLE, qa.answer((name,), TABLE)) for name in (COFFEE, CAT)]
    return items, transformers_answers(demo_checkpoint, items)


def _runner_answers(bundle, vision, llm, items):
    from rksmolvlm.calibration.vision_set import shipped_images_dir
    from rksmolvlm.processing.content import ImagePart, Message, TextPart
    from rksmolvlm.runtime.engines import GenerationConfig
    from rksmolvlm.runtime.runner import Runner

    runner = Runner(bundle, vision, llm)
    try:
        return [runner.generate([Message("user", (*(ImagePart(shipped_images_dir() / n) for n in item.images),
                                                  TextPart(item.question)))],
                                GenerationConfig(max_new_tokens=24)).consume() for item in items]
    finally:
        runner.close()


def _text(bundle, ids):
    return bundle.tokenizer.decode(ids, skip_special_tokens=True).strip()


@SLOW
def test_bundle_answers_equal_transformers_and_the_trained_text(demo_bundle, reference):
    from rksmolvlm.runners import open_engines

    items, expected = reference
    got = _runner_answers(demo_bundle, *open_engines(demo_bundle, "host"), items)
    assert [g.token_ids for g in got] == expected
    assert [g.text.strip() for g in got] == ["A coffee cup.", "There is no table."]
    assert [i.answer for i in items] == ["A coffee cup.", "There is no table."]


@SLOW
def test_the_answer_comes_from_the_image(demo_checkpoint, qa):
    """The same question about the shipped images with their own answers (and two without a table):
    transformers gives each image its trained answer."""
    items = [i for i in qa.items if i.question == TABLE]
    assert len(items) == 24
    items = [i for i in items if i.answer != "There is no table."] + [i for i in items if "photo_r" in i.images[0]]
    assert len({i.answer for i in items}) == len(items) - 1 >= 4
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(demo_checkpoint)
    answers = transformers_answers(demo_checkpoint, items)
    assert [tokenizer.decode(a, skip_special_tokens=True).strip() for a in answers] == [i.answer for i in items]


class _DestroyedVision(VisionWrapper):
    """The host tower with its features replaced: zeros, or the features of the cat photo's tiles."""

    def __init__(self, inner, replacement):
        super().__init__(inner)
        self.replacement = replacement

    def encode(self, tiles):
        if self.replacement is None:
            return np.zeros_like(self.inner.encode(tiles))
        return self.inner.encode(self.replacement[:len(tiles)])


@SLOW
@pytest.mark.parametrize("mode", ["zeroed", "the cat's"])
def test_destroyed_tower_features_change_the_answer(demo_bundle, reference, mode):
    """The coffee photo's prompt with the tower's output zeroed, or swapped for the cat photo's
    features: the answer is no longer the coffee cup (with the cat's, it is the cat's answer)."""
    from rksmolvlm.calibration.vision_set import shipped_images_dir
    from rksmolvlm.processing.image import preprocess
    from rksmolvlm.runners import open_engines

    items, expected = reference
    cat = preprocess(shipped_images_dir() / CAT, demo_bundle.settings).tiles
    assert len(cat) == len(preprocess(shipped_images_dir() / COFFEE, demo_bundle.settings).tiles) == 5
    vision, llm = open_engines(demo_bundle, "host")
    got = _runner_answers(demo_bundle, _DestroyedVision(vision, None if mode == "zeroed" else cat), llm, items[:1])
    assert got[0].token_ids != expected[0] and got[0].text.strip() != "A coffee cup."
    if mode != "zeroed":
        assert got[0].token_ids == expected[1]


@SLOW
def test_fp16_rknn_tower_in_the_simulator_gives_the_same_answers(demo_bundle, reference, tmp_path, capsys):
    from rksmolvlm.calibration.vision_set import shipped_images_dir
    from rksmolvlm.processing.image import preprocess
    from rksmolvlm.preview.host_engines import TorchLlmEngine
    from rksmolvlm.convert.simulator import SimulatedVisionEncoder

    items, expected = reference
    tiles = np.concatenate([preprocess(shipped_images_dir() / i.images[0], demo_bundle.settings).tiles
                            for i in items])
    vision = SimulatedVisionEncoder(demo_bundle, tiles, tmp_path)
    llm = TorchLlmEngine(demo_bundle.file(demo_bundle.manifest.llm.decoder_dir))
    assert [g.token_ids for g in _runner_answers(demo_bundle, vision, llm, items)] == expected

    # and 'rksmolvlm verify --engine sim' replays the conversion's golden answers token for token
    capsys.readouterr()
    code = main(["verify", str(demo_bundle.path), "--engine", "sim", "--min-agreement", "1.0", "--json"])
    result = json.loads(capsys.readouterr().out)
    assert code == 0 and result["verdict"] == "pass"
    assert all(c["exact"] for c in result["cases"])
    photo = next(c for c in result["cases"] if c["name"] == "photo")  # the cat, "Describe this image."
    assert _text(demo_bundle, photo["generated_ids"]) == "A tabby cat."


@SLOW
def test_int8_rknn_tower_in_the_simulator_keeps_the_answers(demo_checkpoint, reference, tmp_path):
    """The tower quantized to int8 on the shipped calibration tiles, run in the simulator, with the
    float decoder: the trained answers survive (and stay different per image)."""
    from rksmolvlm.calibration.vision_set import shipped_images_dir
    from rksmolvlm.convert.pipeline import ConvertOptions, convert
    from rksmolvlm.convert.progress import Progress
    from rksmolvlm.processing.image import preprocess
    from rksmolvlm.preview.host_engines import TorchLlmEngine
    from rksmolvlm.runtime.loader import RuntimeBundle
    from rksmolvlm.convert.simulator import SimulatedVisionEncoder

    convert(ConvertOptions(model=str(demo_checkpoint), output=tmp_path / "int8", vision_dtype="int8", host_preview=True,
                           llm_host_only=True, llm_dataset_format="text", goldens=False), Progress(0, quiet=True))
    int8 = RuntimeBundle.open(tmp_path / "int8")
    assert int8.manifest.vision.dtype == "int8"
    items, expected = reference
    tiles = np.concatenate([preprocess(shipped_images_dir() / i.images[0], int8.settings).tiles for i in items])
    vision = SimulatedVisionEncoder(int8, tiles, tmp_path / "work")
    llm = TorchLlmEngine(int8.file(int8.manifest.llm.decoder_dir))
    assert [g.token_ids for g in _runner_answers(int8, vision, llm, items)] == expected


@SLOW
def test_smolvlm_class_loads_the_same_weights(tmp_path, reference):
    items, expected = reference
    checkpoint = build_demo_checkpoint(tmp_path / "smolvlm", "smolvlm")
    assert json.loads((checkpoint / "config.json").read_text())["model_type"] == "smolvlm"
    assert transformers_answers(checkpoint, items) == expected


def test_weights_are_small_float16_and_must_fit_the_tokenizer(tmp_path):
    assert DEMO_WEIGHTS_FILE.stat().st_size < 1_000_000
    weights = load_demo_weights()
    assert {v.dtype for k, v in weights.items() if not k.startswith("rows.") or k.endswith(".values")} == \
        {np.dtype(np.float16)}
    assert len(weights["rows.head.ids"]) < 300  # only the rows the answers use; the rest are zero

    tokens = weights["rows.embed.tokens"].copy()
    tokens[5] = "not-this-token"
    with pytest.raises(DemoWeightsError, match="another tokenizer.*train_demo_model.py"):
        build_demo_checkpoint(tmp_path / "x", "idefics3", {**weights, "rows.embed.tokens": tokens})
    with pytest.raises(DemoWeightsError, match="train_demo_model.py"):
        load_demo_weights(tmp_path / "missing.npz")
    (tmp_path / "broken.npz").write_bytes(b"PK\x03\x04 not a zip")
    with pytest.raises(DemoWeightsError, match="cannot be read"):
        load_demo_weights(tmp_path / "broken.npz")
    assert not (tmp_path / "x").exists()


def test_qa_set_images_are_shipped_file_names(tmp_path):
    from rksmolvlm.convert.demo_model import DEMO_QA_FILE
    from rksmolvlm.errors import RkSmolVLMError

    data = json.loads(DEMO_QA_FILE.read_text())
    data["extra"][0]["images"] = ["../../etc/passwd"]
    (tmp_path / "qa.json").write_text(json.dumps(data))
    with pytest.raises(RkSmolVLMError, match="not a file name of the shipped calibration images"):
        load_demo_qa(tmp_path / "qa.json")
    (tmp_path / "qa.json").write_text("{")
    with pytest.raises(RkSmolVLMError, match="not a valid demo Q&A set"):
        load_demo_qa(tmp_path / "qa.json")


@SLOW
def test_demo_prints_both_answers_next_to_transformers(demo_bundle, reference, capsys):
    from rksmolvlm.cli.demo import _answer

    assert _answer(demo_bundle.path, reference[1]) == 0
    out = capsys.readouterr().out
    assert f"{COFFEE}: 'A coffee cup.'" in out and f"{CAT}: 'There is no table.'" in out
    assert out.count("transformers on the same checkpoint: same tokens") == 2


def test_demo_without_trained_weights_for_a_layout_names_random(tmp_path, capsys):
    assert main(["demo", "--model", "idefics3-2b", "-o", str(tmp_path / "b")]) != 0
    assert "--random" in capsys.readouterr().err
    assert not (tmp_path / "b").exists()

"""The runner wires the parts: what the LLM engine is given, how an answer ends (stop id, stop
string, length, abort), the context limit, the image-feature cache, closing — first with fake
engines that cost nothing, then on the host-preview engines (abort from another thread, seeded
sampling, streaming, `rksmolvlm ask`), and the board path importing no torch."""

import json
import subprocess
import sys
import threading

import numpy as np
import pytest

from support import ROOT

from support.fakes import fake_runner, FakeVision

from support.images import rng_image
from rksmolvlm.cli import main
from rksmolvlm.errors import ImageError
from rksmolvlm.processing.assembler import Layout
from rksmolvlm.processing.content import Message, TextPart, conversation
from rksmolvlm.processing.image import load_image, tile_image
from rksmolvlm.runtime.engines import GenerationConfig
from rksmolvlm.runners import open_engines
from rksmolvlm.runtime.loader import RuntimeBundle
from rksmolvlm.runtime.runner import ContextError, InputError, Runner
from rksmolvlm.runtime.text_stream import assistant_content


@pytest.fixture
def bundle(runtime_bundles):
    return runtime_bundles["idefics3-256m"]


def _ask(*images, text="What is it?"):
    return [{"role": "user", "content": [*({"type": "image", "image": i} for i in images),
                                         {"type": "text", "text": text}]}]


def _answer(bundle, text, stop=True):
    return bundle.tokenizer.encode_text(text) + ([bundle.stop_ids[0]] if stop else [])


# -- wiring, with fake engines --------------------------------------------------------------------
def test_the_llm_gets_the_assembler_s_embeddings(bundle):
    images = [rng_image(500, 300, seed=1), rng_image(60, 90, seed=2)]
    runner = fake_runner(bundle, _answer(bundle, " Two pictures."))
    g = runner.generate(_ask(*images)).consume()

    tiled = [tile_image(load_image(i), bundle.settings) for i in images]
    prompt = bundle.assembler.assemble(conversation(_ask(*images)), [Layout(t.rows, t.cols) for t in tiled])
    features = [FakeVision.for_bundle(bundle).encode(t.tiles) for t in tiled]
    expected = bundle.assembler.embed(prompt, bundle.embedding_table(), features)
    (prefill,) = runner.llm.prefills
    assert np.array_equal(prefill.embeddings, expected) and not prefill.keep_history
    assert g.prefill_ids == prompt.ids and g.prompt_tokens == len(prompt) and g.reused_tokens == 0
    assert runner.images.encoder.calls == [t.count for t in tiled]
    assert g.stats.vision_tiles == sum(t.count for t in tiled)
    assert g.stats.prefill_tokens == len(prompt)


def test_a_stop_id_ends_the_answer(bundle):
    answer = _answer(bundle, " A red square.")
    runner = fake_runner(bundle, answer + bundle.tokenizer.encode_text(" never shown"))
    g = runner.generate(_ask(rng_image(64, 64)), GenerationConfig(max_new_tokens=50))
    deltas = list(g)
    assert g.finish_reason == "stop" and g.token_ids == answer
    assert "".join(deltas) == g.text == "A red square."
    assert runner.llm.yielded == [answer] and runner.llm.aborts == 0
    assert runner.llm.history_tokens == g.prompt_tokens + len(answer)  # kept: a session could continue


def test_the_config_s_stop_ids_replace_the_bundle_s(bundle):
    ids = bundle.tokenizer.encode_text(" a b c")
    runner = fake_runner(bundle, ids + [bundle.stop_ids[0]])
    g = runner.generate(_ask(text="Hi"), GenerationConfig(max_new_tokens=50, stop_ids=(ids[1],))).consume()
    assert g.token_ids == ids[:2] and g.finish_reason == "stop"


def test_a_stop_string_aborts_the_engine(bundle):
    script = bundle.tokenizer.encode_text(" one two three four five six seven")
    runner = fake_runner(bundle, script)
    g = runner.generate(_ask(text="Count"), GenerationConfig(max_new_tokens=50, stop=("three",)))
    assert "".join(g) == g.text == "one two "
    assert g.finish_reason == "stop"
    assert runner.llm.aborts == 1 and len(runner.llm.yielded[0]) < len(script)  # the engine was stopped
    assert runner.llm.history_tokens == 0 and runner.llm.clears == 1  # the cut answer is not kept


def test_abort_ends_with_abort_and_clears_the_history(bundle):
    runner = fake_runner(bundle, _answer(bundle, " one two three four five six seven"))
    g = runner.generate(_ask(rng_image(64, 64)), GenerationConfig(max_new_tokens=50))
    for _delta in g:
        if len(g.token_ids) == 2:
            runner.abort()
    assert g.finish_reason == "abort" and len(g.token_ids) == 2
    assert runner.llm.history_tokens == 0 and runner.llm.clears == 1
    again = runner.generate(_ask(text="Next")).consume()  # the next request runs
    assert again.finish_reason == "stop"


def test_over_context_is_refused_before_any_engine_work(bundle):
    runner = fake_runner(bundle, _answer(bundle, " ok"))
    g = runner.generate(_ask(rng_image(300, 300)), GenerationConfig(max_new_tokens=2040))
    with pytest.raises(ContextError, match=r"the prompt is \d+ tokens and max_new_tokens is 2040: together over the "
                                           "context of 2048"):
        g.consume()
    assert runner.images.encoder.calls == [] and runner.llm.prefills == []
    assert runner.generate(_ask(text="Hi")).consume().finish_reason == "stop"  # the runner is free again


def test_bad_input_is_an_input_error(bundle):
    runner = fake_runner(bundle, _answer(bundle, " ok"))
    with pytest.raises(InputError, match="role 'robot'"):
        runner.generate([{"role": "robot", "content": "hi"}])
    g = runner.generate([{"role": "user", "content": [{"type": "video", "video": "clip.mp4"}]}])
    with pytest.raises(InputError, match="does not take video"):  # an Idefics3 bundle; SmolVLM2: test_runner_video
        g.consume()
    with pytest.raises(ImageError, match="cannot decode the image"):
        runner.generate(_ask(b"not an image")).consume()
    assert runner.llm.prefills == []
    assert runner.generate(_ask(text="Hi")).consume().finish_reason == "stop"


def test_message_records_and_dicts_are_the_same_request(bundle):
    image = rng_image(100, 80, seed=3)
    runner = fake_runner(bundle, _answer(bundle, " ok"))
    a = runner.generate(_ask(image)).consume()
    b = runner.generate([Message("user", (*conversation(_ask(image))[0].parts[:1], TextPart("What is it?")))]).consume()
    assert a.prefill_ids == b.prefill_ids
    assert np.array_equal(runner.llm.prefills[0].embeddings, runner.llm.prefills[1].embeddings)


def test_features_are_cached_by_content_and_evicted(bundle, tmp_path):
    path = tmp_path / "a.png"
    rng_image(256, 256, seed=11).save(path)
    runner = fake_runner(bundle, _answer(bundle, " ok"), image_cache_size=2)
    first = runner.generate(_ask(path)).consume()
    assert first.stats.vision_tiles > 1 and first.stats.vision_cached_images == 0
    second = runner.generate(_ask(path.read_bytes())).consume()  # the same content, given as bytes
    assert second.stats.vision_tiles == 0 and second.stats.vision_cached_images == 1
    assert np.array_equal(runner.llm.prefills[0].embeddings, runner.llm.prefills[1].embeddings)
    calls = len(runner.images.encoder.calls)
    twice = runner.generate(_ask(rng_image(64, 64, seed=12), rng_image(64, 64, seed=12))).consume()
    assert runner.images.encoder.calls[calls:] == [twice.stats.vision_tiles]  # encoded once per request
    assert twice.stats.vision_cached_images == 1
    runner.generate(_ask(rng_image(64, 64, seed=13))).consume()  # the cache holds 2 images: path is evicted
    third = runner.generate(_ask(path)).consume()
    assert third.stats.vision_tiles == first.stats.vision_tiles and third.stats.vision_cached_images == 0


def test_close_closes_both_engines(bundle):
    runner = fake_runner(bundle)
    runner.close()
    assert runner.images.encoder.closed and runner.llm.closed

    runner = fake_runner(bundle)

    def broken():
        raise RuntimeError("vision close failed")

    runner.images.encoder.close = broken
    with pytest.raises(RuntimeError, match="vision close failed"):
        runner.close()
    assert runner.llm.closed  # closed although the vision engine's close failed


def test_the_runner_uses_the_engine_s_own_table_when_it_has_one(bundle):
    runner = fake_runner(bundle, _answer(bundle, " ok"))
    table = np.random.default_rng(0).standard_normal(bundle.manifest.llm.embed_shape).astype(np.float32)
    runner.llm.embedding_table = lambda: table
    runner = Runner(bundle, runner.images.encoder, runner.llm)
    g = runner.generate(_ask(text="Hi")).consume()
    assert np.array_equal(runner.llm.prefills[0].embeddings, table[g.prefill_ids])


# -- on the host-preview engines ------------------------------------------------------------------
@pytest.fixture(scope="module")
def host_runner(preview_bundles):
    bundle = RuntimeBundle.open(preview_bundles["idefics3-256m"])
    return Runner(bundle, *open_engines(bundle, "host"), image_cache_size=2)


def test_image_features_are_cached_by_content(host_runner, tmp_path):
    image = rng_image(256, 256, seed=11)
    path = tmp_path / "a.png"
    image.save(path)
    first = host_runner.generate(_ask(path), GenerationConfig(max_new_tokens=3)).consume()
    assert first.stats.vision_tiles > 0 and first.stats.vision_cached_images == 0
    second = host_runner.generate(_ask(path.read_bytes()), GenerationConfig(max_new_tokens=3)).consume()
    assert second.stats.vision_tiles == 0 and second.stats.vision_cached_images == 1
    assert second.token_ids == first.token_ids
    for seed in (12, 13):  # the cache holds 2 images: the first one is evicted
        host_runner.generate(_ask(rng_image(64, 64, seed=seed)), GenerationConfig(max_new_tokens=1)).consume()
    third = host_runner.generate(_ask(path), GenerationConfig(max_new_tokens=3)).consume()
    assert third.stats.vision_tiles == first.stats.vision_tiles


def test_abort_from_another_thread(host_runner):
    generation = host_runner.generate(_ask(rng_image(100, 100, seed=14)), GenerationConfig(max_new_tokens=500))
    for _ in generation:
        if len(generation.token_ids) == 3:
            threading.Thread(target=host_runner.abort).start()
    assert generation.finish_reason == "abort"
    assert 3 <= len(generation.token_ids) < 20
    assert host_runner.llm.history_tokens == 0  # an aborted turn is not kept


def test_over_context_is_refused_with_the_numbers(host_runner):
    with pytest.raises(ContextError, match="over the context of 2048"):
        host_runner.generate(_ask(rng_image(100, 100)), GenerationConfig(max_new_tokens=2040)).consume()


def test_sampling_is_seeded_and_top_k_1_is_greedy(host_runner):
    messages = [{"role": "user", "content": "Tell me a story."}]

    def tokens(**options):
        return host_runner.generate(messages, GenerationConfig(max_new_tokens=8, **options)).consume().token_ids

    assert tokens(temperature=0.9, top_k=1, seed=1) == tokens()
    a, b = tokens(temperature=1.5, top_p=0.95, seed=7), tokens(temperature=1.5, top_p=0.95, seed=7)
    assert a == b and a != tokens(temperature=1.5, top_p=0.95, seed=8)


def test_stream_concatenates_to_text(host_runner):
    generation = host_runner.generate(_ask(rng_image(80, 120, seed=15)), GenerationConfig(max_new_tokens=10))
    assert "".join(generation) == generation.text
    assert generation.text == assistant_content(host_runner.bundle.tokenizer.decode(generation.token_ids))
    assert generation.stats.first_token_ms > 0 and generation.stats.prefill_tokens == generation.prompt_tokens


def test_abort_during_the_vision_pass_skips_the_prefill(preview_bundles):
    bundle = RuntimeBundle.open(preview_bundles["idefics3-256m"])
    vision, llm = open_engines(bundle, "host")
    runner = Runner(bundle, vision, llm)
    encode = vision.encode

    def slow_encode(tiles):  # the first image's encoding is where the abort lands
        runner.abort()
        return encode(tiles)

    vision.encode = slow_encode
    messages = [{"role": "user", "content": [{"type": "image", "image": rng_image(100, 100, seed=41)},
                                             {"type": "image", "image": rng_image(120, 100, seed=42)},
                                             {"type": "text", "text": "Both?"}]}]
    g = runner.generate(messages, GenerationConfig(max_new_tokens=5)).consume()
    assert g.finish_reason == "abort" and g.token_ids == [] and g.stats.prefill_tokens == 0
    assert g.stats.vision_tiles == 0 or g.stats.vision_tiles < 2 * 13
    vision.encode = encode
    again = runner.generate(messages, GenerationConfig(max_new_tokens=5)).consume()  # the next request runs
    assert again.finish_reason == "length" and len(again.token_ids) == 5
    runner.close()


# -- the ask command --------------------------------------------------------------------------------
def test_ask_json(preview_bundles, tmp_path, capsys):
    image = tmp_path / "x.png"
    rng_image(300, 200, seed=16).save(image)
    code = main(["ask", str(preview_bundles["smolvlm2"]), "--image", str(image), "--image", str(image),
                 "--prompt", "Same?", "--engine", "host", "--max-new-tokens", "5", "--json"])
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out) >= {"text", "token_ids", "timings", "finish_reason"}
    assert len(out["token_ids"]) == 5 and out["finish_reason"] == "length"
    assert out["timings"]["vision_cached_images"] == 1  # the second copy of the image was not re-encoded
    bundle = RuntimeBundle.open(preview_bundles["smolvlm2"])
    runner = Runner(bundle, *open_engines(bundle, "host"))
    again = runner.generate(_ask(image, image, text="Same?"), GenerationConfig(max_new_tokens=5)).consume()
    runner.close()
    assert again.token_ids == out["token_ids"] and again.text == out["text"]


def test_ask_bad_image_is_a_clear_error(preview_bundles, tmp_path, capsys):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"nope")
    assert main(["ask", str(preview_bundles["smolvlm2"]), "--image", str(bad), "--prompt", "?", "--engine",
                 "host"]) == 2
    assert "cannot decode the image" in capsys.readouterr().err


# -- the board path -------------------------------------------------------------------------------
def test_board_path_runs_without_torch_or_transformers(preview_bundles, tmp_path):
    image = tmp_path / "x.jpg"
    rng_image(640, 480, seed=18).save(image)
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "support" / "board_path.py"),
                           str(preview_bundles["idefics3-256m"]), str(image)],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("OK ") and proc.stdout.strip().endswith("[]"), proc.stdout

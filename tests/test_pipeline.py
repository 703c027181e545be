"""The pipeline's own behaviour: image-feature cache, abort from another thread, context limits,
sampling options, streaming, the ask/chat commands — and the board path importing no torch."""

import json
import subprocess
import sys
import textwrap
import threading

import pytest

from conftest import ROOT, rng_image
from rksmolvlm.cli import main
from rksmolvlm.runtime.engines import GenerationConfig
from rksmolvlm.runtime.loader import RuntimeBundle
from rksmolvlm.runtime.pipeline import ContextError, Pipeline


@pytest.fixture(scope="module")
def pipeline(preview_bundles):
    bundle = RuntimeBundle.open(preview_bundles["idefics3-256m"])
    return Pipeline(bundle, *bundle.make_engines("host"), image_cache_size=2)


def _ask(image, text="What is it?"):
    return [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": text}]}]


def test_image_features_are_cached_by_content(pipeline, tmp_path):
    image = rng_image(256, 256, seed=11)
    path = tmp_path / "a.png"
    image.save(path)
    first = pipeline.generate(_ask(path), GenerationConfig(max_new_tokens=3), keep_history=False).consume()
    assert first.stats.vision_tiles > 0 and first.stats.vision_cached_images == 0
    second = pipeline.generate(_ask(path.read_bytes()), GenerationConfig(max_new_tokens=3),
                               keep_history=False).consume()
    assert second.stats.vision_tiles == 0 and second.stats.vision_cached_images == 1
    assert second.token_ids == first.token_ids
    for seed in (12, 13):  # the cache holds 2 images: the first one is evicted
        pipeline.generate(_ask(rng_image(64, 64, seed=seed)), GenerationConfig(max_new_tokens=1),
                          keep_history=False).consume()
    third = pipeline.generate(_ask(path), GenerationConfig(max_new_tokens=3), keep_history=False).consume()
    assert third.stats.vision_tiles == first.stats.vision_tiles


def test_abort_from_another_thread(pipeline):
    generation = pipeline.generate(_ask(rng_image(100, 100, seed=14)), GenerationConfig(max_new_tokens=500),
                                   keep_history=False)
    deltas = []
    for delta in generation:
        deltas.append(delta)
        if len(generation.token_ids) == 3:
            threading.Thread(target=pipeline.abort).start()
    assert generation.finish_reason == "abort"
    assert 3 <= len(generation.token_ids) < 20
    assert pipeline.llm.history_tokens == 0  # an aborted turn is not kept


def test_over_context_is_refused_with_the_numbers(pipeline):
    with pytest.raises(ContextError, match="over the context of 2048"):
        pipeline.generate(_ask(rng_image(100, 100)), GenerationConfig(max_new_tokens=2000)).consume()


def test_sampling_is_seeded_and_top_k_1_is_greedy(pipeline):
    messages = [{"role": "user", "content": "Tell me a story."}]
    greedy = pipeline.generate(messages, GenerationConfig(max_new_tokens=8), keep_history=False).consume()
    top1 = pipeline.generate(messages, GenerationConfig(max_new_tokens=8, temperature=0.9, top_k=1, seed=1),
                             keep_history=False).consume()
    assert top1.token_ids == greedy.token_ids
    a = pipeline.generate(messages, GenerationConfig(max_new_tokens=8, temperature=1.5, top_p=0.95, seed=7),
                          keep_history=False).consume()
    b = pipeline.generate(messages, GenerationConfig(max_new_tokens=8, temperature=1.5, top_p=0.95, seed=7),
                          keep_history=False).consume()
    c = pipeline.generate(messages, GenerationConfig(max_new_tokens=8, temperature=1.5, top_p=0.95, seed=8),
                          keep_history=False).consume()
    assert a.token_ids == b.token_ids and a.token_ids != c.token_ids


def test_stream_concatenates_to_text(pipeline):
    generation = pipeline.generate(_ask(rng_image(80, 120, seed=15)), GenerationConfig(max_new_tokens=10),
                                   keep_history=False)
    assert "".join(generation) == generation.text
    assert generation.text == pipeline.bundle.prompts.decode(generation.token_ids)
    assert generation.stats.first_token_ms > 0 and generation.stats.prefill_tokens == generation.prompt_tokens


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
    again = Pipeline(bundle, *bundle.make_engines("host")).generate(
        [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "image", "image": image},
                                      {"type": "text", "text": "Same?"}]}],
        GenerationConfig(max_new_tokens=5)).consume()
    assert again.token_ids == out["token_ids"]


def test_ask_bad_image_is_a_clear_error(preview_bundles, tmp_path, capsys):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"nope")
    assert main(["ask", str(preview_bundles["smolvlm2"]), "--image", str(bad), "--prompt", "?", "--engine",
                 "host"]) == 2
    assert "cannot decode the image" in capsys.readouterr().err


def test_chat_repl_keeps_history(preview_bundles, tmp_path):
    image = tmp_path / "x.png"
    rng_image(200, 200, seed=17).save(image)
    script = f"/image {image}\nDescribe it.\nAnd now?\n/reset\nHello\n/quit\n"
    proc = subprocess.run([sys.executable, "-m", "rksmolvlm", "chat", str(preview_bundles["idefics3-256m"]),
                           "--engine", "host", "--max-new-tokens", "4"], input=script, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("assistant> ") == 3


BOARD_SCRIPT = textwrap.dedent("""
    import importlib.abc, sys

    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("torch", "transformers", "onnxruntime", "onnx", "rknn"):
                raise ImportError(f"{name} is not on the board")
            return None

    sys.meta_path.insert(0, Block())
    import numpy as np
    from rksmolvlm.runtime.loader import RuntimeBundle
    from rksmolvlm.runtime.pipeline import Pipeline
    from rksmolvlm.runtime.engines import GenerationConfig

    class StandInVision:
        def __init__(self, seq, hidden):
            self.seq, self.hidden = seq, hidden
        def encode(self, tiles):
            return np.repeat(tiles.reshape(len(tiles), -1)[:, :1].astype(np.float32), self.seq * self.hidden,
                             axis=1).reshape(len(tiles), self.seq, self.hidden) / 255
        def close(self):
            pass

    class StandInLlm:
        history_tokens = 0
        def __init__(self):
            self.seen = None
        def generate(self, embeddings, config, keep_history, stats):
            self.seen = embeddings
            stats.prefill_tokens += len(embeddings)
            yield from [1674, 42615]
            yield config.stop_ids[0]
        def abort(self): pass
        def clear_history(self): pass
        def close(self): pass

    bundle = RuntimeBundle.open(sys.argv[1])
    out = bundle.manifest["vision"]["output"]["shape"]
    llm = StandInLlm()
    pipeline = Pipeline(bundle, StandInVision(out[1], out[2]), llm)
    g = pipeline.generate([{"role": "user", "content": [{"type": "image", "image": sys.argv[2]},
                                                        {"type": "text", "text": "What?"}]}]).consume()
    assert g.finish_reason == "stop", g.finish_reason
    assert llm.seen.shape == (g.prompt_tokens, out[2])
    blocked = [m for m in ("torch", "transformers", "onnxruntime") if m in sys.modules]
    print("OK", g.prompt_tokens, g.token_ids, blocked)
""")


def test_board_path_runs_without_torch_or_transformers(preview_bundles, tmp_path):
    image = tmp_path / "x.jpg"
    rng_image(640, 480, seed=18).save(image)
    proc = subprocess.run([sys.executable, "-c", BOARD_SCRIPT, str(preview_bundles["idefics3-256m"]), str(image)],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("OK ") and proc.stdout.strip().endswith("[]")


def test_abort_during_the_vision_pass_skips_the_prefill(preview_bundles):
    bundle = RuntimeBundle.open(preview_bundles["idefics3-256m"])
    vision, llm = bundle.make_engines("host")
    pipeline = Pipeline(bundle, vision, llm)
    encode = vision.encode

    def slow_encode(tiles):  # the first image's encoding is where the abort lands
        pipeline.abort()
        return encode(tiles)

    vision.encode = slow_encode
    messages = [{"role": "user", "content": [{"type": "image", "image": rng_image(100, 100, seed=41)},
                                             {"type": "image", "image": rng_image(120, 100, seed=42)},
                                             {"type": "text", "text": "Both?"}]}]
    g = pipeline.generate(messages, GenerationConfig(max_new_tokens=5)).consume()
    assert g.finish_reason == "abort" and g.token_ids == [] and g.stats.prefill_tokens == 0
    assert g.stats.vision_tiles == 0 or g.stats.vision_tiles < 2 * 13
    vision.encode = encode
    again = pipeline.generate(messages, GenerationConfig(max_new_tokens=5)).consume()  # the next request runs
    assert again.finish_reason == "length" and len(again.token_ids) == 5

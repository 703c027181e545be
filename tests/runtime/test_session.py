"""Sessions reuse the KV cache only when a conversation extends the previous turn and its answer;
edited history, another session or request on the runner, an aborted or cut turn and a reset start
over. With fake engines, plus the chat REPL on the host preview."""

import subprocess
import sys

import numpy as np
import pytest

from support.fakes import fake_runner, FakeVision

from support.images import rng_image
from rksmolvlm.processing.assembler import Layout
from rksmolvlm.processing.content import conversation, image_parts
from rksmolvlm.processing.image import load_image, tile_image
from rksmolvlm.runtime.engines import GenerationConfig

IMAGE_1, IMAGE_2 = rng_image(300, 200, seed=1), rng_image(150, 400, seed=2)


@pytest.fixture
def bundle(runtime_bundles):
    return runtime_bundles["idefics3-256m"]


def user(*content):
    return {"role": "user", "content": [{"type": "text", "text": c} if isinstance(c, str) else
                                        {"type": "image", "image": c} for c in content]}


def assistant(text):
    return {"role": "assistant", "content": [{"type": "text", "text": text}]}


def answer_ids(bundle, text=" Hello there.", stop=True):
    return bundle.tokenizer.encode_text(text) + ([bundle.stop_ids[0]] if stop else [])


def tiled(bundle, messages):
    return [tile_image(load_image(p.source), bundle.settings) for p in image_parts(conversation(messages))]


def assemble(bundle, messages):
    return bundle.assembler.assemble(conversation(messages), [Layout(t.rows, t.cols) for t in tiled(bundle, messages)])


def assert_started_over(runner, g, bundle, messages):
    assert g.reused_tokens == 0 and not runner.llm.prefills[-1].keep_history
    assert g.prefill_ids == assemble(bundle, messages).ids


# -- reuse ------------------------------------------------------------------------------------------
def test_a_continued_conversation_prefills_only_the_new_part(bundle):
    runner = fake_runner(bundle, answer_ids(bundle))
    session = runner.session()
    turn1 = [user(IMAGE_1, "Describe.")]
    g1 = session.generate(turn1).consume()
    assert g1.finish_reason == "stop" and g1.text == "Hello there."
    turn2 = turn1 + [assistant(g1.text), user(IMAGE_2, "And this?")]
    g2 = session.generate(turn2).consume()

    full = assemble(bundle, turn2)
    held = g1.prompt_tokens + len(g1.token_ids)
    assert g2.reused_tokens == held == runner.llm.prefills[1].history_before and runner.llm.prefills[1].keep_history
    assert g1.prefill_ids + g1.token_ids + g2.prefill_ids == full.ids  # the stop token stands for the template's
    assert g2.prompt_tokens == len(full) and g2.stats.prefill_tokens == len(g2.prefill_ids)
    tiles = tiled(bundle, turn2)
    assert g2.stats.vision_tiles == tiles[1].count and g2.stats.vision_cached_images == 0  # only the new image
    features = [FakeVision.for_bundle(bundle).encode(t.tiles) for t in tiles]
    whole = bundle.assembler.embed(full, bundle.embedding_table(), features)
    assert np.array_equal(runner.llm.prefills[1].embeddings, whole[held:])

    turn3 = turn2 + [assistant(g2.text), user("Thanks")]
    g3 = session.generate(turn3).consume()
    assert g3.reused_tokens == g2.prompt_tokens + len(g2.token_ids)
    assert g1.prefill_ids + g1.token_ids + g2.prefill_ids + g2.token_ids + g3.prefill_ids == \
        assemble(bundle, turn3).ids
    assert g3.stats.vision_tiles == 0


def test_an_answer_cut_by_length_keeps_the_template_s_end_of_utterance(bundle):
    script = answer_ids(bundle, " Hello there, and more", stop=False)
    runner = fake_runner(bundle, script)
    session = runner.session()
    turn1 = [user("Hi")]
    g1 = session.generate(turn1, GenerationConfig(max_new_tokens=len(script))).consume()
    assert g1.finish_reason == "length"
    turn2 = turn1 + [assistant(g1.text), user("Go on")]
    g2 = session.generate(turn2).consume()
    assert g2.reused_tokens == g1.prompt_tokens + len(script)
    assert g2.prefill_ids[0] == bundle.stop_ids[0]  # <end_of_utterance> was never generated: prefilled now
    assert g1.prefill_ids + g1.token_ids + g2.prefill_ids == assemble(bundle, turn2).ids



def test_an_answer_ended_by_another_stop_id_still_ends_the_utterance(bundle):
    """Only <end_of_utterance> stands for the template's own: an answer ended by another stop id
    (here <|im_end|>) must not make the next turn drop the template's end of utterance."""
    eou, im_end = bundle.stop_ids[0], bundle.tokenizer.token_id("<|im_end|>")
    runner = fake_runner(bundle, answer_ids(bundle, stop=False) + [im_end])
    session = runner.session()
    config = GenerationConfig(stop_ids=(eou, im_end))
    turn1 = [user("Hi")]
    g1 = session.generate(turn1, config).consume()
    assert g1.finish_reason == "stop" and g1.token_ids[-1] == im_end
    g2 = session.generate(turn1 + [assistant(g1.text), user("More")], config).consume()
    assert g2.reused_tokens == 0 or g2.prefill_ids[0] == eou, \
        bundle.tokenizer.decode(g2.prefill_ids, skip_special_tokens=False)


def test_an_empty_answer_is_continued_too(bundle):
    runner = fake_runner(bundle, [bundle.stop_ids[0]])
    session = runner.session()
    turn1 = [user("Hi")]
    g1 = session.generate(turn1).consume()
    assert g1.text == "" and g1.token_ids == [bundle.stop_ids[0]]
    turn2 = turn1 + [{"role": "assistant", "content": ""}, user("Hello?")]
    g2 = session.generate(turn2).consume()
    assert g2.reused_tokens == g1.prompt_tokens + 1
    assert g2.prefill_ids == bundle.tokenizer.encode_trusted("\nUser: Hello?<end_of_utterance>\nAssistant:")

# -- starting over --------------------------------------------------------------------------------
EDITS = {
    "edited user text": lambda t1, a: [user(IMAGE_1, "Describe it."), assistant(a), user("More")],
    "another image in the history": lambda t1, a: [user(IMAGE_2, "Describe."), assistant(a), user("More")],
    "edited answer": lambda t1, a: t1 + [assistant(a + " Edited."), user("More")],
    "answer with two parts": lambda t1, a: t1 + [{"role": "assistant", "content": [
        {"type": "text", "text": a[:3]}, {"type": "text", "text": a[3:]}]}, user("More")],
    "a user message instead of the answer": lambda t1, a: t1 + [user(a), user("More")],
    "the same turn again": lambda t1, a: t1,
    "no new message": lambda t1, a: t1 + [assistant(a)],
    "a system message first": lambda t1, a: [{"role": "system", "content": "Be brief."}] + t1 + [assistant(a),
                                                                                                 user("More")],
}


@pytest.mark.parametrize("edit", sorted(EDITS))
def test_a_conversation_that_does_not_extend_the_last_turn_starts_over(bundle, edit):
    runner = fake_runner(bundle, answer_ids(bundle))
    session = runner.session()
    turn1 = [user(IMAGE_1, "Describe.")]
    g1 = session.generate(turn1).consume()
    turn2 = EDITS[edit](turn1, g1.text)
    g2 = session.generate(turn2).consume()
    assert_started_over(runner, g2, bundle, turn2)


def test_the_answer_may_differ_in_surrounding_whitespace(bundle):
    runner = fake_runner(bundle, answer_ids(bundle))
    session = runner.session()
    turn1 = [user("Hi")]
    g1 = session.generate(turn1).consume()
    g2 = session.generate(turn1 + [assistant(g1.text + "\n"), user("More")]).consume()
    assert g2.reused_tokens == g1.prompt_tokens + len(g1.token_ids)


def test_another_session_or_request_in_between_starts_over(bundle):
    runner = fake_runner(bundle, answer_ids(bundle))
    mine, other = runner.session(), runner.session()
    turn1 = [user(IMAGE_1, "Describe.")]
    g1 = mine.generate(turn1).consume()
    other.generate([user("Something else")]).consume()
    turn2 = turn1 + [assistant(g1.text), user("More")]
    g2 = mine.generate(turn2).consume()
    assert_started_over(runner, g2, bundle, turn2)
    assert g2.stats.vision_cached_images == 1  # the image features outlived the KV cache
    turn3 = turn2 + [assistant(g2.text), user("Again")]
    assert mine.generate(turn3).consume().reused_tokens == g2.prompt_tokens + len(g2.token_ids)  # reuse again

    runner.generate([user("A one-off question")]).consume()  # a sessionless request also takes the cache
    turn4 = turn3 + [assistant("Hello there."), user("Last")]
    g4 = mine.generate(turn4).consume()
    assert_started_over(runner, g4, bundle, turn4)


def test_an_engine_that_lost_its_history_starts_over(bundle):
    runner = fake_runner(bundle, answer_ids(bundle))
    session = runner.session()
    turn1 = [user("Hi")]
    g1 = session.generate(turn1).consume()
    runner.llm.clear_history()
    turn2 = turn1 + [assistant(g1.text), user("More")]
    assert_started_over(runner, session.generate(turn2).consume(), bundle, turn2)


def test_an_aborted_turn_is_not_continued(bundle):
    runner = fake_runner(bundle, answer_ids(bundle, " one two three four five six"))
    session = runner.session()
    turn1 = [user("Count")]
    g1 = session.generate(turn1)
    for _ in g1:
        if len(g1.token_ids) == 2:
            runner.abort()
    assert g1.finish_reason == "abort" and runner.llm.history_tokens == 0
    turn2 = turn1 + [assistant(g1.text), user("Go on")]
    g2 = session.generate(turn2).consume()
    assert_started_over(runner, g2, bundle, turn2)
    assert g2.finish_reason == "stop"
    turn3 = turn2 + [assistant(g2.text), user("And?")]
    assert session.generate(turn3).consume().reused_tokens == g2.prompt_tokens + len(g2.token_ids)


def test_an_answer_cut_by_a_stop_string_is_not_continued(bundle):
    runner = fake_runner(bundle, answer_ids(bundle, " one two three four five six"))
    session = runner.session()
    turn1 = [user("Count")]
    g1 = session.generate(turn1, GenerationConfig(stop=("three",))).consume()
    assert g1.text == "one two " and g1.finish_reason == "stop"
    turn2 = turn1 + [assistant(g1.text), user("Go on")]
    assert_started_over(runner, session.generate(turn2).consume(), bundle, turn2)


def test_reset_forgets_the_conversation_but_not_the_image_features(bundle):
    runner = fake_runner(bundle, answer_ids(bundle))
    session = runner.session()
    turn1 = [user(IMAGE_1, "Describe.")]
    g1 = session.generate(turn1).consume()
    clears = runner.llm.clears
    session.reset()
    assert runner.llm.clears == clears + 1 and runner.llm.history_tokens == 0
    turn2 = turn1 + [assistant(g1.text), user("More")]
    g2 = session.generate(turn2).consume()
    assert_started_over(runner, g2, bundle, turn2)
    assert g2.stats.vision_tiles == 0 and g2.stats.vision_cached_images == 1


def test_reset_of_a_session_that_does_not_hold_the_cache_leaves_it(bundle):
    runner = fake_runner(bundle, answer_ids(bundle))
    idle, active = runner.session(), runner.session()
    idle.generate([user("Hi")]).consume()
    turn1 = [user("Hello")]
    g1 = active.generate(turn1).consume()
    clears = runner.llm.clears
    idle.reset()
    assert runner.llm.clears == clears and runner.llm.history_tokens > 0
    g2 = active.generate(turn1 + [assistant(g1.text), user("More")]).consume()
    assert g2.reused_tokens == g1.prompt_tokens + len(g1.token_ids)


def test_a_history_that_no_longer_fits_starts_over_instead_of_failing(bundle):
    per_char = [bundle.tokenizer.encode_text(c)[0] for c in " the" * 100]  # 400 ids for ~100 tokens of text
    runner = fake_runner(bundle, per_char + [bundle.stop_ids[0]])
    session = runner.session()
    turn1 = [user("Say the")]
    g1 = session.generate(turn1, GenerationConfig(max_new_tokens=500)).consume()
    assert len(g1.token_ids) == 401
    turn2 = turn1 + [assistant(g1.text), user("More")]
    full = len(assemble(bundle, turn2))
    held = g1.prompt_tokens + len(g1.token_ids)
    assert held > full  # the cache holds the long spelling, the template the short one
    room = bundle.max_context - full
    g2 = session.generate(turn2, GenerationConfig(max_new_tokens=room)).consume()
    assert_started_over(runner, g2, bundle, turn2)


# -- the chat command -------------------------------------------------------------------------------
def test_chat_repl_keeps_history(preview_bundles, tmp_path):
    image = tmp_path / "x.png"
    rng_image(200, 200, seed=17).save(image)
    script = f"/image {image}\nDescribe it.\nAnd now?\n/reset\nHello\n/quit\n"
    proc = subprocess.run([sys.executable, "-m", "rksmolvlm", "chat", str(preview_bundles["idefics3-256m"]),
                           "--engine", "host", "--max-new-tokens", "4"], input=script, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("assistant> ") == 3

"""Structured answers on the host engine, through ``Runner.generate`` with a compiled grammar
(DESIGN §10): on a tiny random bundle and on the trained demo bundle, Frigate's ReviewMetadata, a
Home Assistant style object, json_object and a forced tool call validate with jsonschema when the
answer stops, and are a prefix the grammar accepts when max_new_tokens cuts them; greedy and seeded
sampling repeat; the KV cache holds exactly prompt + answer, so a session's next free-text turn
equals a fresh engine's; free text (grammar None) stays transformers' greedy tokens."""

from __future__ import annotations

import json

import jsonschema
import pytest

from support.frigate import FRIGATE
from support.parity import HfProcessor, message_images
from rksmolvlm.runtime.engines import GenerationConfig, PerfStats
from rksmolvlm.runtime.loader import RuntimeBundle
from rksmolvlm.runtime.runner import Runner
from rksmolvlm.runtime.structured import (GrammarCompiler, from_ollama_format, from_openai_response_format,
                                          from_tool_choice, tool_call_from_text)
from rksmolvlm.runners import open_engines

# Every test here runs a bundle's engines; the ``setup`` fixture picks its bundle fixture at run time,
# where the bundle fixtures' automatic slow mark cannot see it.
pytestmark = pytest.mark.slow

# A Home Assistant AI Task structure (Ollama format: an object schema, no additionalProperties).
HA_TASK = {
    "type": "object",
    "properties": {
        "color": {"type": "string", "maxLength": 30},
        "count": {"type": "integer", "minimum": 0, "maximum": 20},
        "kind": {"type": "string", "enum": ["car", "truck", "bike"]},
        "open": {"type": "boolean"},
    },
    "required": ["color", "count", "kind"],
}
TOOLS = [{"type": "function", "function": {
    "name": "set_light", "description": "Turn a light on or off",
    "parameters": {"type": "object", "properties": {"entity": {"type": "string", "maxLength": 40},
                                                    "on": {"type": "boolean"},
                                                    "brightness": {"type": "integer", "minimum": 0, "maximum": 255}},
                   "required": ["entity", "on"], "additionalProperties": False}}}]

FORMATS = {
    "frigate": (lambda: from_openai_response_format({"type": "json_schema", "json_schema": {
        "name": "review_metadata", "strict": True, "schema": FRIGATE}}), FRIGATE),
    "home-assistant": (lambda: from_ollama_format(HA_TASK), HA_TASK),
    "json_object": (lambda: from_openai_response_format({"type": "json_object"}), {"type": "object"}),
    "tool-call": (lambda: from_tool_choice({"type": "function", "function": {"name": "set_light"}}, TOOLS), None),
}
FIRST_FORMATS = ["frigate", "home-assistant"]

QUESTION = "Describe the activity as JSON."


def user(text: str, image=None) -> dict:
    content = [{"type": "text", "text": text}]
    if image is not None:
        content.insert(0, {"type": "image", "image": image, "detail": "low"})
    return {"role": "user", "content": content}


class Setup:
    """A host-engine runner on one bundle and a grammar compiler over the bundle's tokenizer."""

    def __init__(self, path):
        self.bundle = RuntimeBundle.open(path)
        self.runner = Runner(self.bundle, *open_engines(self.bundle, "host"))
        self.compiler = GrammarCompiler.for_bundle(self.runner.bundle)

    def grammar(self, name: str):
        return self.compiler.compile(FORMATS[name][0]())

    def eou(self) -> int:
        return self.bundle.stop_ids[0]


@pytest.fixture(scope="module")
def tiny(preview_bundles):
    setup = Setup(preview_bundles["idefics3-256m"])
    yield setup
    setup.runner.close()


@pytest.fixture(scope="module")
def demo(demo_preview_bundle):
    setup = Setup(demo_preview_bundle)
    yield setup
    setup.runner.close()


@pytest.fixture(params=["tiny", "demo"])
def setup(request):
    return request.getfixturevalue(request.param)


def coffee():
    from rksmolvlm.calibration.vision_set import shipped_images_dir

    return str(shipped_images_dir() / "photo_coffee_cup_table.jpg")


def check_answer(setup: Setup, name: str, g) -> object | None:
    """A stopped answer parses and validates (the value); a cut one is a prefix the grammar accepts (None)."""
    assert g.finish_reason in ("stop", "length"), g.finish_reason
    eou = setup.eou()
    ids = g.token_ids
    assert eou not in ids[:-1]
    # The KV cache holds exactly the prompt and the answer's ids (stop id included).
    assert setup.runner.llm.history_tokens == g.prompt_tokens + len(ids)
    assert g.text == setup.bundle.tokenizer.decode([t for t in ids if t != eou]).removeprefix(" ")
    replay = setup.grammar(name).constraint()  # the ids are ones the grammar allows, in order
    for token in ids:
        replay.accept(token)
    if g.finish_reason == "length":
        assert ids[-1] != eou and not replay.done
        return None
    assert ids[-1] == eou and replay.done
    value = json.loads(g.text)
    schema = FORMATS[name][1]
    if schema is None:  # the forced tool call: its arguments validate against the tool's parameters
        call = tool_call_from_text(g.text)
        assert call.name == "set_light"
        jsonschema.validate(call.arguments, TOOLS[0]["function"]["parameters"])
    else:
        jsonschema.validate(value, schema)
    return value


@pytest.mark.parametrize("name", sorted(FORMATS))
def test_answers_validate_on_the_tiny_bundle(tiny, name):
    g = tiny.runner.generate([user(QUESTION)], GenerationConfig(max_new_tokens=1_500,
                                                                grammar=tiny.grammar(name))).consume()
    assert g.finish_reason == "stop", g.text[-200:]
    value = check_answer(tiny, name, g)
    if name == "frigate":
        assert list(value) == list(FRIGATE["properties"])
        assert 3 <= len(value["observations"]) <= 8


@pytest.mark.parametrize("name", sorted(FORMATS))
def test_answers_validate_on_the_demo_bundle_with_an_image(demo, name):
    """Frigate's request (an image at detail "low") on the trained demo model; the answer may use the
    whole context (its strings run to their maxLength). An object with no bound on its strings
    (json_object) may be cut; every bounded one must stop."""
    config = GenerationConfig(max_new_tokens=demo.bundle.max_context, cap_to_context=True,
                              grammar=demo.grammar(name))
    g = demo.runner.generate([user(QUESTION, coffee())], config).consume()
    if name != "json_object":
        assert g.finish_reason == "stop", g.text[-200:]
    check_answer(demo, name, g)


@pytest.mark.parametrize("name", sorted(FORMATS))
def test_a_cut_answer_is_a_valid_prefix_ended_by_length(tiny, name):
    """The same greedy answer cut by max_new_tokens: its first ids, finish_reason "length", a prefix
    the grammar accepts and a KV cache of exactly prompt + the cut answer."""
    grammar = tiny.grammar(name)
    full = tiny.runner.generate([user(QUESTION)], GenerationConfig(max_new_tokens=1_500, grammar=grammar)).consume()
    assert full.finish_reason == "stop" and len(full.token_ids) >= 3  # json_object may be "{}"
    for n in sorted({1, 2, len(full.token_ids) // 2, len(full.token_ids) - 2} - {0, len(full.token_ids) - 1}):
        g = tiny.runner.generate([user(QUESTION)], GenerationConfig(max_new_tokens=n, grammar=grammar)).consume()
        assert g.finish_reason == "length" and g.token_ids == full.token_ids[:n], n
        assert check_answer(tiny, name, g) is None
        assert full.text.startswith(g.text) and g.text and not g.text.startswith(" ")


def test_a_grammar_complete_at_the_last_token_has_no_room_for_its_stop(tiny):
    """The stop id counts against max_new_tokens as the model's own does: an answer complete at
    exactly max_new_tokens ends by length (its text the complete answer)."""
    grammar = tiny.grammar("tool-call")
    full = tiny.runner.generate([user(QUESTION)], GenerationConfig(max_new_tokens=400, grammar=grammar)).consume()
    assert full.finish_reason == "stop"
    n = len(full.token_ids) - 1
    cut = tiny.runner.generate([user(QUESTION)], GenerationConfig(max_new_tokens=n, grammar=grammar)).consume()
    assert cut.finish_reason == "length" and cut.token_ids == full.token_ids[:-1] and cut.text == full.text
    json.loads(cut.text)


@pytest.mark.parametrize("name", FIRST_FORMATS)
def test_greedy_repeats_and_seeded_sampling_reproduces(setup, name):
    grammar = setup.grammar(name)
    messages = [user(QUESTION)]

    def run(**options):
        g = setup.runner.generate(messages, GenerationConfig(max_new_tokens=150, grammar=grammar,
                                                             **options)).consume()
        check_answer(setup, name, g)
        return g.token_ids

    assert run() == run()
    sampled = dict(temperature=0.9, top_p=0.95, top_k=50, repeat_penalty=1.05, presence_penalty=0.3)
    first = run(seed=7, **sampled)
    assert run(seed=7, **sampled) == first
    assert any(run(seed=seed, **sampled) != first for seed in (8, 9, 10))
    plain = run(seed=7, temperature=0.7)  # plain temperature sampling (the check-first path)
    assert run(seed=7, temperature=0.7) == plain


def test_penalties_apply_under_the_grammar(tiny):
    grammar = tiny.grammar("home-assistant")
    plain = tiny.runner.generate([user(QUESTION)], GenerationConfig(max_new_tokens=300, grammar=grammar)).consume()
    penalised = tiny.runner.generate([user(QUESTION)], GenerationConfig(
        max_new_tokens=300, grammar=grammar, repeat_penalty=1.8, frequency_penalty=2.0)).consume()
    check_answer(tiny, "home-assistant", penalised)
    assert penalised.token_ids != plain.token_ids


def free_reference(setup: Setup, ids: list[int], max_new_tokens: int) -> list[int]:
    """Greedy tokens of a fresh host engine prefilling ``ids`` (text only) from an empty cache."""
    _, llm = open_engines(setup.bundle, "host")
    try:
        table = llm.embedding_table()
        tokens = llm.generate(table[ids], GenerationConfig(max_new_tokens=max_new_tokens,
                                                           stop_ids=setup.bundle.stop_ids), False, PerfStats())
        return list(tokens)
    finally:
        llm.close()


@pytest.mark.parametrize("name", ["home-assistant", "tool-call"])
def test_a_session_continues_after_a_grammar_answer(setup, name):
    session = setup.runner.session()
    turn1 = [user(QUESTION)]
    g1 = session.generate(turn1, GenerationConfig(max_new_tokens=600, grammar=setup.grammar(name))).consume()
    check_answer(setup, name, g1)
    assert g1.finish_reason == "stop"
    turn2 = turn1 + [{"role": "assistant", "content": g1.text}, user("Now say it in words.")]
    g2 = session.generate(turn2, GenerationConfig(max_new_tokens=16)).consume()
    assert g2.reused_tokens == g1.prompt_tokens + len(g1.token_ids)  # the KV cache was kept
    history = g1.prefill_ids + g1.token_ids + g2.prefill_ids
    assert g2.token_ids == free_reference(setup, history, 16)


def test_streamed_deltas_join_to_the_answer(tiny):
    g = tiny.runner.generate([user(QUESTION)], GenerationConfig(max_new_tokens=1_500,
                                                                grammar=tiny.grammar("frigate")))
    deltas = list(g)
    assert len(deltas) > 10 and "".join(deltas) == g.text and g.finish_reason == "stop"
    jsonschema.validate(json.loads("".join(deltas)), FRIGATE)


def test_stop_strings_cut_a_structured_answer(tiny):
    grammar = tiny.grammar("frigate")
    g = tiny.runner.generate([user(QUESTION)], GenerationConfig(max_new_tokens=300, grammar=grammar,
                                                                stop=('"scene"',))).consume()
    assert g.finish_reason == "stop" and g.text.startswith('{"title": "') and '"scene"' not in g.text
    assert tiny.runner.llm.history_tokens == 0  # a cut answer's cache is not continued


def test_abort_ends_a_structured_answer(tiny):
    g = tiny.runner.generate([user(QUESTION)], GenerationConfig(max_new_tokens=1_000,
                                                                grammar=tiny.grammar("frigate")))
    for _ in g:
        if len(g.token_ids) >= 12:
            tiny.runner.abort()
    assert g.finish_reason == "abort" and 12 <= len(g.token_ids) < 40


def test_forced_runs_are_fed_without_sampling(tiny):
    """The tool call's head '{"name": "set_light", "arguments": {"' is forced: it is in the answer
    (prefilled with the prompt) and counted as generated tokens."""
    g = tiny.runner.generate([user(QUESTION)], GenerationConfig(max_new_tokens=400,
                                                                grammar=tiny.grammar("tool-call"))).consume()
    assert g.text.startswith('{"name": "set_light", "arguments": {"')
    assert g.stats.generate_tokens == len(g.token_ids)


# -- free text is unchanged ------------------------------------------------------------------------
def test_free_text_stays_transformers_greedy_after_a_grammar_answer(tiny, tiny_checkpoints):
    import torch
    import transformers as tf

    reference = HfProcessor(tiny_checkpoints["idefics3-256m"])
    model = tf.AutoModelForImageTextToText.from_pretrained(tiny_checkpoints["idefics3-256m"]).eval()
    messages = [user("Write a haiku about NPUs.")]
    ids, _ = reference.inputs(reference.template(messages), message_images(messages))
    with torch.no_grad():
        expected = model.generate(input_ids=torch.tensor([ids]), max_new_tokens=12, do_sample=False)[0, len(ids):]
    tiny.runner.generate([user(QUESTION)], GenerationConfig(max_new_tokens=40,
                                                            grammar=tiny.grammar("frigate"))).consume()
    got = tiny.runner.generate(messages, GenerationConfig(max_new_tokens=12)).consume()
    assert got.prefill_ids == ids and got.token_ids == expected.tolist()


# -- the runner's wiring, with the fake engine -----------------------------------------------------
def test_the_fake_engine_follows_a_grammar_and_the_runner_finishes_stop(runtime_bundles):
    from support.fakes import fake_runner

    bundle = runtime_bundles["idefics3-256m"]
    compiler = GrammarCompiler.for_bundle(bundle)
    grammar = compiler.compile(FORMATS["home-assistant"][0]())
    scripted = bundle.tokenizer.encode_text('{"color": "red", "count": 2, "kind": "car"}')
    runner = fake_runner(bundle, scripted)
    g = runner.generate([user(QUESTION)], GenerationConfig(grammar=grammar)).consume()
    assert g.text == '{"color": "red", "count": 2, "kind": "car"}' and g.finish_reason == "stop"
    assert g.token_ids[-1] == bundle.stop_ids[0]
    runner.llm.script = bundle.tokenizer.encode_text("Sure! Here is the JSON you asked for.")
    whole = runner.generate([user(QUESTION)], GenerationConfig(grammar=grammar)).consume()
    assert whole.finish_reason == "stop" and not whole.text.startswith("Sure")
    jsonschema.validate(json.loads(whole.text), HA_TASK)  # not the script: the grammar's lowest ids
    g = runner.generate([user(QUESTION)], GenerationConfig(max_new_tokens=5, grammar=grammar)).consume()
    assert g.finish_reason == "length" and g.token_ids == whole.token_ids[:5] and whole.text.startswith(g.text)


def test_a_grammar_for_another_vocabulary_is_refused_by_name(runtime_bundles, tmp_path):
    from support.fakes import fake_runner

    bundle = runtime_bundles["idefics3-256m"]
    vocab = bundle.manifest.model.vocab_size
    other = GrammarCompiler.from_file(bundle.file(bundle.manifest.tokenizer), vocab + 64, bundle.stop_ids)
    grammar = other.compile(FORMATS["json_object"][0]())
    with pytest.raises(ValueError, match="GrammarCompiler.for_bundle"):
        fake_runner(bundle).generate([user(QUESTION)], GenerationConfig(grammar=grammar))

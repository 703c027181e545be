"""Structured output core (runtime/structured): request formats → ResponseFormat, schema checks and
refusals, the grammar compiler and its cache, the per-answer Constraint driven by random and
adversarial token choices (every completed answer parses and validates with jsonschema), and the
CPU sampler against the host engine's semantics."""

from __future__ import annotations

import json
import sys
import time

import jsonschema
import numpy as np
import pytest

from support.frigate import FRIGATE, FRIGATE_FORMAT
from support.bpe import byte_level_bpe

from rksmolvlm.runtime.engines import GenerationConfig
from rksmolvlm.runtime.structured import (
    TEXT,
    Constraint,
    FormatShapeError,
    GrammarCompiler,
    Guide,
    InvalidSchemaError,
    ResponseFormat,
    Sampler,
    SchemaTooComplexError,
    TokenRejectedError,
    UnsupportedSchemaError,
    apply_penalties,
    from_ollama_format,
    from_openai_response_format,
    from_responses_text_format,
    from_tool_choice,
    tool_call_from_text,
)
from rksmolvlm.runtime.structured.grammar import CompileLimits
from rksmolvlm.runtime.structured.schema import pattern_size

VOCAB = 512  # the model's vocabulary: wider than the tokenizer, like padded embedding rows

FRIGATE_REQUEST = FRIGATE_FORMAT

# Home Assistant's Ollama AI Task: format = the task's structure, no additionalProperties.
HA_TASK = {
    "type": "object",
    "properties": {
        "color": {"type": "string", "description": "Main color of the car"},
        "count": {"type": "integer", "minimum": 0},
        "kind": {"type": "string", "enum": ["car", "truck", "bike"]},
        "open": {"type": "boolean"},
        "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 4},
    },
    "required": ["color", "count", "kind"],
}

TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Weather at a place",
                                      "parameters": {"type": "object",
                                                     "properties": {"city": {"type": "string", "maxLength": 40},
                                                                    "unit": {"type": "string",
                                                                             "enum": ["celsius", "fahrenheit"]}},
                                                     "required": ["city", "unit"]}}},
    {"type": "function", "function": {"name": "turn_on", "parameters": {
        "type": "object", "properties": {"entity": {"type": "string"}, "brightness": {"type": "integer",
                                                                                      "minimum": 0, "maximum": 255}},
        "required": ["entity"], "additionalProperties": False}}},
    {"type": "function", "function": {"name": "ping"}},
]

_CORPUS = [
    'The quick brown fox jumps over the lazy dog. A person walks to the front door at night.',
    '{"title": "Person at door", "scene": "A delivery driver", "confidence": 0.85, "count": 3}',
    '{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}',
    'observations: ["a car parks", "a dog barks"], potential_threat_level: 0, shortSummary',
    'Hello world 0123456789 true false null [1, 2.5, -3e10] {} \\n \\" \\u00e9 café naïve 東京',
]


@pytest.fixture(scope="module")
def tokenizer_json() -> str:
    """A byte-level BPE like SmolVLM's (same pre-tokenizer and decoder), small, with added special
    tokens for the image placeholder and the end of utterance."""
    text = byte_level_bpe(_CORPUS, 450, ["<|endoftext|>", "<|im_start|>", "<image>", "<end_of_utterance>"])
    assert len(json.loads(text)["model"]["vocab"]) < VOCAB
    return text


@pytest.fixture(scope="module")
def tokenizer(tokenizer_json):
    from tokenizers import Tokenizer

    return Tokenizer.from_str(tokenizer_json)


@pytest.fixture(scope="module")
def eou(tokenizer) -> int:
    return tokenizer.token_to_id("<end_of_utterance>")


@pytest.fixture
def compiler(tokenizer_json, eou) -> GrammarCompiler:
    return GrammarCompiler(tokenizer_json, VOCAB, [eou], cache_size=4)


# ---------------------------------------------------------------- request formats


def test_openai_response_format_kinds():
    assert from_openai_response_format(None) is TEXT
    assert from_openai_response_format({"type": "text"}) is TEXT
    assert not TEXT.constrained
    obj = from_openai_response_format({"type": "json_object"})
    assert obj.kind == "json_object" and obj.schema == {"type": "object"} and obj.constrained
    fmt = from_openai_response_format(FRIGATE_REQUEST)
    assert (fmt.kind, fmt.name, fmt.strict) == ("json_schema", "review_metadata", True)
    assert fmt.schema["properties"]["observations"]["minItems"] == 3
    assert fmt.param == "response_format.json_schema.schema"


def test_equal_schemas_share_a_key_and_names_do_not_count():
    a = from_openai_response_format(FRIGATE_REQUEST)
    b = from_openai_response_format({"type": "json_schema", "json_schema": {"name": "other", "strict": True,
                                                                           "schema": json.loads(json.dumps(FRIGATE))}})
    assert a.key == b.key and len(a.key) == 64
    loose = from_openai_response_format({"type": "json_schema", "json_schema": {"name": "x", "schema": HA_TASK}})
    strict = from_openai_response_format({"type": "json_schema", "json_schema": {"name": "x", "strict": True,
                                                                                "schema": HA_TASK}})
    assert loose.key == strict.key and loose.strict != strict.strict  # strict does not change the grammar
    reordered = dict(reversed(list(HA_TASK.items())))
    assert from_ollama_format(reordered).key == from_ollama_format(HA_TASK).key  # keyword order is free
    props = dict(reversed(list(HA_TASK["properties"].items())))
    assert from_ollama_format({**HA_TASK, "properties": props}).key != from_ollama_format(HA_TASK).key  # written order
    assert from_ollama_format("json").key == from_openai_response_format({"type": "json_object"}).key


def test_objects_with_properties_are_closed_unless_they_say_otherwise():
    schema = {"type": "object", "properties": {"a": {"type": "object", "properties": {"b": {"type": "integer"}}},
                                               "c": {"type": "object", "additionalProperties": True},
                                               "d": {"allOf": [{"type": "object", "properties": {"x": {}}}]},
                                               "e": {"type": "object"},
                                               "f": {"type": "object", "properties": {},
                                                     "patternProperties": {"^x": {}}}}}
    for strict in (True, False):  # as llama.cpp (Ollama) does, strict or not
        closed = from_openai_response_format({"type": "json_schema", "json_schema": {"name": "s", "strict": strict,
                                                                                    "schema": schema}}).schema
        assert closed["additionalProperties"] is False
        assert closed["properties"]["a"]["additionalProperties"] is False
        assert closed["properties"]["c"]["additionalProperties"] is True
        assert "additionalProperties" not in closed["properties"]["d"]["allOf"][0]  # allOf members stay open
        assert "additionalProperties" not in closed["properties"]["e"]  # a bare object type: any object
        assert "additionalProperties" not in closed["properties"]["f"]
    assert schema["properties"]["a"] == {"type": "object", "properties": {"b": {"type": "integer"}}}  # not mutated


@pytest.mark.parametrize("value, param", [
    ("json_object", "response_format"),
    ({"type": "yaml"}, "response_format.type"),
    ({"type": "json_schema"}, "response_format.json_schema"),
    ({"type": "json_schema", "json_schema": {"schema": {}}}, "response_format.json_schema.name"),
    ({"type": "json_schema", "json_schema": {"name": "n", "strict": "yes", "schema": {}}},
     "response_format.json_schema.strict"),
    ({"type": "json_schema", "json_schema": {"name": "n", "schema": [1]}}, "response_format.json_schema.schema"),
    ({"type": "json_schema", "json_schema": {"name": "n", "schema": True}}, "response_format.json_schema.schema"),
    ({"type": "json_schema", "json_schema": {"name": "n", "schema": {"properties": []}}},
     "response_format.json_schema.schema.properties"),
])
def test_openai_bad_shapes_name_the_field(value, param):
    with pytest.raises((FormatShapeError, InvalidSchemaError)) as caught:
        from_openai_response_format(value)
    assert caught.value.param == param
    assert caught.value.code in ("invalid_response_format", "invalid_schema")


def test_ollama_format():
    assert from_ollama_format(None) is TEXT and from_ollama_format("") is TEXT
    assert from_ollama_format("json").kind == "json_object"
    fmt = from_ollama_format(HA_TASK)
    assert fmt.kind == "json_schema" and not fmt.strict and fmt.param == "format"
    for bad in ("yaml", 5, ["json"]):
        with pytest.raises(FormatShapeError) as caught:
            from_ollama_format(bad)
        assert caught.value.param == "format"


def test_responses_text_format():
    fmt = from_responses_text_format({"type": "json_schema", "name": "task", "schema": HA_TASK, "strict": True})
    assert (fmt.kind, fmt.name, fmt.strict, fmt.param) == ("json_schema", "task", True, "text.format.schema")
    assert fmt.schema["additionalProperties"] is False and "additionalProperties" not in HA_TASK
    assert from_responses_text_format({"type": "text"}) is TEXT
    assert from_responses_text_format({"type": "json_object"}).kind == "json_object"
    with pytest.raises(FormatShapeError) as caught:
        from_responses_text_format({"type": "json_schema", "name": "task"})
    assert caught.value.param == "text.format.schema"


def test_tool_choice_forms():
    assert from_tool_choice(None, TOOLS) is TEXT
    assert from_tool_choice("auto", TOOLS) is TEXT and from_tool_choice("none", TOOLS) is TEXT
    anyone = from_tool_choice("required", TOOLS)
    assert anyone.kind == "tool_call" and anyone.tool_names == ("get_weather", "turn_on", "ping")
    assert len(anyone.schema["anyOf"]) == 3
    named = from_tool_choice({"type": "function", "function": {"name": "turn_on"}}, TOOLS)
    assert named.tool_names == ("turn_on",)
    assert named.schema["properties"]["name"] == {"const": "turn_on"}
    flat_tools = [{"type": "function", "name": t["function"]["name"], "parameters": t["function"].get("parameters")}
                  for t in TOOLS]
    flat = from_tool_choice({"type": "function", "name": "get_weather"}, flat_tools)
    assert flat.tool_names == ("get_weather",)
    assert flat.schema["properties"]["arguments"] == {**TOOLS[0]["function"]["parameters"],
                                                      "additionalProperties": False}


@pytest.mark.parametrize("choice, tools, param", [
    ({"type": "function", "function": {"name": "nope"}}, TOOLS, "tool_choice.function.name"),
    ("required", None, "tools"),
    ("required", [], "tools"),
    ("required", [{"type": "retrieval"}], "tools[0]"),
    ("required", [{"type": "function", "function": {"name": ""}}], "tools[0].function.name"),
    ("required", [TOOLS[0], TOOLS[0]], "tools"),
    ("always", TOOLS, "tool_choice"),
    ("required", [{"type": "function", "function": {"name": "f", "parameters": {"type": "object",
                                                                                 "not": {"required": ["a"]}}}}],
     "tools[0].function.parameters"),
])
def test_tool_choice_bad_shapes_name_the_field(choice, tools, param):
    with pytest.raises((FormatShapeError, UnsupportedSchemaError)) as caught:
        from_tool_choice(choice, tools)
    assert caught.value.param == param


def test_tool_call_read_back():
    call = tool_call_from_text('{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}')
    assert call.name == "get_weather" and call.arguments == {"city": "Paris", "unit": "celsius"}
    assert json.loads(call.arguments_json) == call.arguments
    with pytest.raises(ValueError, match="max_tokens"):
        tool_call_from_text('{"name": "get_weather", "argu')


# ---------------------------------------------------------------- refusals


@pytest.mark.parametrize("keyword, schema, where", [
    ("if", {"type": "object", "if": {"required": ["a"]}, "then": {"required": ["b"]}}, "format"),
    ("not", {"type": "object", "properties": {"a": {"not": {"type": "string"}}}}, "format.properties.a"),
    ("uniqueItems", {"type": "array", "items": {"type": "string"}, "uniqueItems": True}, "format"),
    ("propertyNames", {"type": "object", "propertyNames": {"maxLength": 3}}, "format"),
    ("contains", {"type": "array", "contains": {"type": "integer"}}, "format"),
    ("dependentRequired", {"type": "object", "dependentRequired": {"a": ["b"]}}, "format"),
    ("unevaluatedProperties", {"type": "object", "unevaluatedProperties": False}, "format"),
    ("$ref", {"type": "object", "properties": {"a": {"$ref": "https://example.com/a.json"}}}, "format.properties.a"),
    ("$dynamicRef", {"$defs": {"n": {"type": "object", "properties": {"x": {"$dynamicRef": "#n"}}}}},
     "format.$defs.n.properties.x"),
])
def test_unsupported_keywords_are_refused_by_name(keyword, schema, where):
    with pytest.raises(UnsupportedSchemaError) as caught:
        from_ollama_format(schema)
    assert caught.value.keyword == keyword and caught.value.param == where
    assert f"'{keyword}'" in str(caught.value) and caught.value.code == "unsupported_schema_keyword"


def test_keyword_names_as_property_names_are_fine(compiler):
    fmt = from_ollama_format({"type": "object", "properties": {"if": {"type": "string"}, "not": {"type": "integer"}},
                              "required": ["if", "not"]})
    assert compiler.compile(fmt) is not None
    assert "uniqueItems" not in from_ollama_format({"type": "array", "uniqueItems": False}).schema  # no constraint


@pytest.mark.parametrize("keyword, schema", [
    ("if", {"type": "object", "if": {"required": ["a"]}}),
    ("dependentSchemas", {"type": "object", "dependentSchemas": {"a": {"required": ["b"]}}}),
    ("oneOf", {"oneOf": [{"type": "integer"}, {"type": "number", "minimum": 0}]}),  # overlapping branches
    ("format", {"type": "string", "format": "credit-card"}),
])
def test_llguidance_refusals_are_named_too(compiler, keyword, schema):
    # a ResponseFormat built around the pre-check still cannot get a keyword silently dropped
    with pytest.raises(UnsupportedSchemaError) as caught:
        compiler.compile(ResponseFormat("json_schema", json.dumps(schema), param="format"))
    assert caught.value.keyword == keyword and caught.value.param == "format"


def test_exclusive_one_of_compiles_and_validates(compiler, tokenizer, eou):
    # pydantic's discriminated unions: llguidance proves the branches exclusive by their consts
    schema = {"type": "object", "properties": {"pet": {"oneOf": [
        {"type": "object", "properties": {"kind": {"const": "cat"}, "lives": {"type": "integer"}},
         "required": ["kind", "lives"]},
        {"type": "object", "properties": {"kind": {"const": "dog"}, "good": {"type": "boolean"}},
         "required": ["kind", "good"]}]}}, "required": ["pet"]}
    fmt = from_openai_response_format({"type": "json_schema", "json_schema": {"name": "p", "strict": True,
                                                                             "schema": schema}})
    for seed in range(3):
        _validate(_walk(compiler.constraint(fmt), tokenizer, eou, np.random.default_rng(seed), "uniform"), schema)


def test_a_clients_x_guidance_cannot_turn_refusals_off(compiler):
    schema = {"x-guidance": {"lenient": True, "coerce_one_of": True, "whitespace_flexible": True},
              "type": "object", "properties": {"a": {"type": "integer"}}, "if": {"required": ["a"]}}
    with pytest.raises(UnsupportedSchemaError) as caught:
        compiler.compile(ResponseFormat("json_schema", json.dumps(schema), param="format"))
    assert caught.value.keyword == "if"
    schema = {"x-guidance": {"lenient": True, "coerce_one_of": True},
              "oneOf": [{"type": "integer"}, {"type": "number", "minimum": 0}]}
    with pytest.raises(UnsupportedSchemaError):
        compiler.compile(from_ollama_format(schema))


def test_unknown_format_is_refused_through_the_whole_path(compiler):
    with pytest.raises(UnsupportedSchemaError) as caught:
        compiler.compile(from_ollama_format({"type": "object", "properties": {"d": {"type": "string",
                                                                                    "format": "zipcode"}}}))
    assert caught.value.keyword == "format"


def test_unsatisfiable_schema_is_invalid(compiler):
    with pytest.raises(InvalidSchemaError) as caught:
        compiler.compile(from_ollama_format({"type": "object", "properties": {}, "required": ["q"],
                                             "additionalProperties": False}))
    assert caught.value.param == "format" and caught.value.code == "invalid_schema"


def _nested(depth: int) -> dict:
    schema: dict = {"type": "integer"}
    for _ in range(depth):
        schema = {"type": "object", "properties": {"a": schema}, "required": ["a"]}
    return schema


@pytest.mark.parametrize("limit, schema", [
    ("max_depth", _nested(5_000)),
    ("max_properties", {"type": "object", "properties": {f"p{i}": {"type": "string"} for i in range(1_500)}}),
    ("max_enum_values", {"enum": list(range(3_000))}),
    ("max_pattern_size", {"type": "string", "pattern": "^(a{1000}){1000}$"}),
    ("max_pattern_length", {"type": "string", "pattern": "a" * 2_000}),
    ("max_bytes", {"type": "object", "description": "x" * 200_000}),
    ("max_values", {"type": "object", "examples": [[0] * 100 for _ in range(300)]}),
])
def test_oversize_schemas_are_refused_quickly(limit, schema):
    started = time.perf_counter()
    with pytest.raises(SchemaTooComplexError) as caught:
        from_openai_response_format({"type": "json_schema", "json_schema": {"name": "big", "schema": schema}})
    assert caught.value.limit == limit and caught.value.code == "schema_too_complex"
    assert caught.value.param.startswith("response_format.json_schema.schema")
    assert time.perf_counter() - started < 5.0  # a sanity bound, not a benchmark


def test_compile_limits_refuse_what_the_pre_check_lets_through(tokenizer_json, eou):
    tight = GrammarCompiler(tokenizer_json, VOCAB, [eou], limits=CompileLimits(initial_lexer_fuel=2_000))
    started = time.perf_counter()
    with pytest.raises(SchemaTooComplexError) as caught:
        tight.constraint(from_ollama_format({"enum": [f"value{i}" for i in range(500)]}))
    assert caught.value.param == "format" and caught.value.limit == "llguidance"
    with pytest.raises(SchemaTooComplexError):  # past the pre-check: llguidance's own recursion limit
        tight.compile(ResponseFormat("json_schema", json.dumps(_nested(300)), param="format"))
    compiler = GrammarCompiler(tokenizer_json, VOCAB, [eou])
    with pytest.raises(SchemaTooComplexError):  # past the pre-check: the lexer's fuel, met by the compile probe
        compiler.compile(ResponseFormat("json_schema", json.dumps({"type": "string", "pattern": "^(a{1000}){1000}$"}),
                                        param="format"))
    assert time.perf_counter() - started < 10.0  # a sanity bound, not a benchmark
    assert tight.misses == 2 and not tight._cache and not compiler._cache  # refusals are not cached


def test_pattern_size_estimate():
    assert pattern_size("^[a-z]+$") == 1
    assert pattern_size(r"^\d{4}-\d{2}-\d{2}$") == 10
    assert pattern_size("^(a{100}){100}$") == 10_000
    assert pattern_size("^(ab|c{5}){3}$") == 21
    assert pattern_size(r"^\p{L}{3}[\]x]{2}$") == 5


# ---------------------------------------------------------------- compiler and cache


def test_compiled_grammar_is_cached_per_distinct_format(compiler):
    first = compiler.compile(from_openai_response_format(FRIGATE_REQUEST))
    again = compiler.compile(from_openai_response_format(
        {"type": "json_schema", "json_schema": {"name": "renamed", "strict": True, "schema": dict(FRIGATE)}}))
    assert again is first and (compiler.hits, compiler.misses) == (1, 1)
    assert compiler.compile(TEXT) is None and compiler.constraint(TEXT) is None
    for i in range(4):  # cache_size=4: the Frigate grammar is the least recently used and goes
        compiler.compile(from_ollama_format({"type": "object", "properties": {f"k{i}": {"type": "integer"}}}))
    assert compiler.compile(from_openai_response_format(FRIGATE_REQUEST)) is not first
    a, b = first.constraint(), first.constraint()
    a.accept_many(a.forced())
    assert a.accepted > 0 and b.accepted == 0  # every request gets its own state


def test_compiler_for_a_bundle(tmp_path, tokenizer_json, eou):
    from types import SimpleNamespace

    (tmp_path / "tokenizer.json").write_text(tokenizer_json, encoding="utf-8")
    manifest = SimpleNamespace(tokenizer="tokenizer.json", model=SimpleNamespace(vocab_size=VOCAB))
    bundle = SimpleNamespace(manifest=manifest,
                             stop_ids=(eou,), file=lambda name: tmp_path / name)
    compiler = GrammarCompiler.for_bundle(bundle)
    assert compiler.vocab_size == VOCAB and compiler.stop_ids == (eou,)
    assert compiler.constraint(from_ollama_format("json")).mask().shape == (VOCAB,)


def test_missing_local_ref_is_invalid(compiler):
    with pytest.raises(InvalidSchemaError) as caught:
        compiler.compile(from_ollama_format({"type": "object", "properties": {"a": {"$ref": "#/$defs/nope"}}}))
    assert caught.value.param == "format"


def test_compiler_refuses_a_tokenizer_wider_than_the_model(tokenizer_json, eou):
    with pytest.raises(ValueError):
        GrammarCompiler(tokenizer_json, 100, [eou])
    with pytest.raises(ValueError):
        GrammarCompiler(tokenizer_json, VOCAB, [])


# ---------------------------------------------------------------- the constraint


def test_mask_pads_the_model_vocabulary_and_stop_is_allowed_exactly_when_accepting(compiler, tokenizer, eou):
    c = compiler.constraint(from_ollama_format({"type": "object", "properties": {"a": {"type": "integer"}},
                                                "required": ["a"], "additionalProperties": False}))
    size = tokenizer.get_vocab_size()
    mask = c.mask()
    assert mask.shape == (VOCAB,) and mask.dtype == bool
    assert not mask[size:].any() and not mask[eou]
    assert {tokenizer.decode([i]) for i in np.flatnonzero(mask)} <= {"{", '{"'}
    image = tokenizer.token_to_id("<image>")
    for token in tokenizer.encode('{"a": 12', add_special_tokens=False).ids:
        assert not c.mask()[image]
        c.accept(token)
    assert not c.accepting and not c.mask()[eou] and not c.allows(eou)
    assert c.allows(tokenizer.token_to_id("}"))
    c.accept(tokenizer.token_to_id("}"))
    assert c.accepting and c.mask()[eou] and c.done  # nothing can follow a closed object
    assert np.flatnonzero(c.mask()).tolist() == [eou]
    c.accept(eou)
    assert c.done and c.forced() == []
    c.rollback(2)  # the stop and the "}": open again, expecting the close
    assert not c.done and not c.accepting and c.allows(tokenizer.token_to_id("}"))


def test_stop_is_allowed_beside_more_digits_when_a_number_could_go_on(compiler, tokenizer, eou):
    c = compiler.constraint(from_ollama_format({"type": "integer"}))
    c.accept_many(tokenizer.encode("12", add_special_tokens=False).ids)
    mask = c.mask()
    assert c.accepting and not c.done and mask[eou] and mask[tokenizer.token_to_id("3")]
    c.accept(eou)
    assert c.done and c.forced() == []
    c.rollback(1)  # a stop the matcher consumed
    assert not c.done and c.accepting and c.allows(tokenizer.token_to_id("3"))


def test_accept_refuses_a_disallowed_token_and_keeps_the_state(compiler, tokenizer):
    c = compiler.constraint(from_ollama_format("json"))
    bad = tokenizer.token_to_id("[")
    with pytest.raises(TokenRejectedError) as caught:
        c.accept(bad)
    assert caught.value.token_id == bad
    with pytest.raises(TokenRejectedError):
        c.accept(VOCAB - 1)  # a padded id
    c.accept(tokenizer.token_to_id("{"))  # still usable
    assert c.accepted == 1
    c.rollback(1)
    assert c.accepted == 0 and c.allows(tokenizer.token_to_id("{"))


def test_forced_tokens_write_the_fixed_parts(compiler, tokenizer):
    c = compiler.constraint(from_tool_choice({"type": "function", "function": {"name": "get_weather"}}, TOOLS))
    forced = c.forced()
    text = tokenizer.decode(forced)
    assert forced and '{"name": "get_weather", "arguments": {"city": "'.startswith(text)
    c.accept_many(forced)
    assert c.accepted == len(forced)
    with pytest.raises(TokenRejectedError):
        c.accept_many(tokenizer.encode("]]", add_special_tokens=False).ids)
    assert c.accepted == len(forced)


def _walk(c: Constraint, tokenizer, eou: int, rng: np.random.Generator, policy: str, limit: int = 6_000) -> str | None:
    """Drive a constraint to the end with choices a model could make; the text, or None if cut."""
    closers = [tokenizer.token_to_id(t) for t in ('"}', '"', "]", "}", ",", "0", "1")]
    closers = [t for t in closers if t is not None]
    ids: list[int] = []
    for step in range(limit):
        if c.done:
            break
        forced = c.forced()
        if forced and rng.random() < 0.5:
            c.accept_many(forced)
            ids += forced
            continue
        allowed = np.flatnonzero(c.mask())
        assert allowed.size, "the grammar allowed nothing before it was done"
        if policy == "finish" or (policy != "finish" and step > limit // 3):
            # adversarial: end everything as early as the grammar lets it (stop, close, shortest value);
            # the others turn to this late, since a number, a free string or nesting never has to end
            pick = next((t for t in [eou, *closers] if t in allowed), None)
            token = int(pick) if pick is not None else int(rng.choice(allowed))
        elif policy == "linger":
            # adversarial: never stop, never close while anything else is allowed; longest tokens first
            others = [t for t in allowed if t != eou and t not in closers]
            pool = others or allowed.tolist()
            longest = max(len(tokenizer.decode([t])) for t in pool)
            token = int(rng.choice([t for t in pool if len(tokenizer.decode([t])) == longest]))
        else:
            token = int(rng.choice(allowed))
        c.accept(token)
        ids.append(token)
        if token == eou:
            break
    else:
        return None
    assert c.done or ids[-1] == eou
    return tokenizer.decode([t for t in ids if t != eou])


def _validate(text: str, schema: dict) -> object:
    assert "\ufffd" not in text  # byte-level tokens never split a character into invalid UTF-8
    value = json.loads(text)
    jsonschema.Draft202012Validator(schema, format_checker=jsonschema.FormatChecker()).validate(value)
    return value


@pytest.mark.parametrize("policy", ["uniform", "finish", "linger"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_frigate_answers_validate_whatever_the_model_picks(compiler, tokenizer, eou, policy, seed):
    fmt = from_openai_response_format(FRIGATE_REQUEST)
    text = _walk(compiler.constraint(fmt), tokenizer, eou, np.random.default_rng(seed), policy)
    assert text is not None
    value = _validate(text, FRIGATE)
    assert list(value) == list(FRIGATE["properties"])  # written in the schema's order
    assert 3 <= len(value["observations"]) <= 8


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_frigate_ollama_provider_answers_validate(compiler, tokenizer, eou, seed):
    # Frigate's Ollama provider: format = the schema minus title, description and the length bounds
    schema = json.loads(json.dumps(FRIGATE))
    schema.pop("title")
    for prop in schema["properties"].values():
        for key in ("title", "description", "minLength", "maxLength", "minItems", "maxItems", "minimum", "maximum"):
            prop.pop(key, None)
    text = _walk(compiler.constraint(from_ollama_format(schema)), tokenizer, eou, np.random.default_rng(seed),
                 "uniform", limit=1_500)
    assert text is not None
    _validate(text, schema)


@pytest.mark.parametrize("policy", ["uniform", "finish", "linger"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_home_assistant_task_answers_validate(compiler, tokenizer, eou, policy, seed):
    text = _walk(compiler.constraint(from_ollama_format(HA_TASK)), tokenizer, eou, np.random.default_rng(seed),
                 policy if policy != "linger" else "uniform")
    assert text is not None
    _validate(text, HA_TASK)
    strict = from_responses_text_format({"type": "json_schema", "name": "t", "schema": HA_TASK, "strict": True})
    text = _walk(compiler.constraint(strict), tokenizer, eou, np.random.default_rng(seed), policy)
    value = _validate(text, HA_TASK)
    assert set(value) <= set(HA_TASK["properties"])  # no invented keys


@pytest.mark.parametrize("seed", range(6))
def test_json_object_answers_are_objects(compiler, tokenizer, eou, seed):
    text = _walk(compiler.constraint(from_openai_response_format({"type": "json_object"})), tokenizer, eou,
                 np.random.default_rng(seed), "uniform", limit=1_500)
    assert text is not None
    assert isinstance(_validate(text, {"type": "object"}), dict)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "turn_on"}}])
def test_forced_tool_calls_validate_against_the_tool(compiler, tokenizer, eou, seed, choice):
    fmt = from_tool_choice(choice, TOOLS)
    text = _walk(compiler.constraint(fmt), tokenizer, eou, np.random.default_rng(seed), "uniform")
    call = tool_call_from_text(text)
    assert call.name in fmt.tool_names
    parameters = next(t["function"].get("parameters") for t in TOOLS if t["function"]["name"] == call.name)
    jsonschema.validate(call.arguments, parameters or {"type": "object", "maxProperties": 0})


# ---------------------------------------------------------------- the sampler


def Options(**kwargs) -> GenerationConfig:  # noqa: N802 - reads like the record it builds
    """The generation options the sampler reads, seeded by default."""
    return GenerationConfig(**{"seed": 0, **kwargs})


def test_greedy_picks_equal_the_host_engines(tmp_path):
    torch = pytest.importorskip("torch")
    from types import SimpleNamespace

    from rksmolvlm.runtime.engines import GenerationConfig

    from rksmolvlm.preview.host_engines import TorchLlmEngine

    rng = np.random.default_rng(3)
    host = SimpleNamespace(torch=torch)
    for case in range(40):
        logits = rng.normal(0, 3, 300).astype(np.float32)
        previous = rng.integers(0, 300, int(rng.integers(0, 40))).tolist()
        config = GenerationConfig(repeat_penalty=float(rng.choice([1.0, 1.1, 1.3])),
                                  frequency_penalty=float(rng.choice([0.0, 0.5])),
                                  presence_penalty=float(rng.choice([0.0, 0.3])))
        want = TorchLlmEngine._pick(host, torch.from_numpy(logits.copy()), config, None, previous)
        assert Sampler(config).pick(logits, previous) == want, case


@pytest.mark.parametrize("top_p", [1e-300, 1e-45, 1e-9])
def test_a_tiny_top_p_keeps_the_top_token_in_both_samplers(top_p):
    """A top_p below float32's smallest number compared as 0 and kept no token: NaN
    probabilities, a crash (a 500 on both APIs). The nucleus always holds the top token."""
    logits = np.log(np.array([0.1, 0.6, 0.2, 0.1], dtype=np.float32))
    config = Options(temperature=1.0, top_p=top_p, seed=3)
    assert {Sampler(config).pick(logits) for _ in range(20)} == {1}
    torch = pytest.importorskip("torch")
    from types import SimpleNamespace

    from rksmolvlm.preview.host_engines import TorchLlmEngine

    host, generator = SimpleNamespace(torch=torch), torch.Generator().manual_seed(3)
    picks = {TorchLlmEngine._pick(host, torch.from_numpy(logits.copy()), config, generator, []) for _ in range(20)}
    assert picks == {1}


def test_penalties_match_the_host_formula():
    logits = np.array([2.0, -2.0, 1.0, 0.5], dtype=np.float32)
    out = apply_penalties(logits, [0, 1, 1], repeat_penalty=2.0, frequency_penalty=0.5, presence_penalty=0.25)
    np.testing.assert_allclose(out, [2.0 / 2 - 0.75, -2.0 * 2 - 1.25, 1.0, 0.5])
    assert apply_penalties(logits, []).tolist() == logits.tolist()


def test_sampled_picks_follow_top_k_and_top_p():
    logits = np.log(np.array([0.5, 0.2, 0.15, 0.1, 0.05], dtype=np.float32))
    picks = [Sampler(Options(temperature=1.0, top_k=2, seed=s)).pick(logits) for s in range(400)]
    assert set(picks) == {0, 1} and 0.6 < picks.count(0) / 400 < 0.83  # 0.5 / 0.7 ≈ 0.71
    sampler = Sampler(Options(temperature=1.0, top_p=0.8, seed=7))
    picks = [sampler.pick(logits) for _ in range(2_000)]
    assert set(picks) == {0, 1, 2}  # 0.5 + 0.2 < 0.8 ≤ 0.5 + 0.2 + 0.15
    assert abs(picks.count(0) / 2_000 - 0.5 / 0.85) < 0.05
    same = [Sampler(Options(temperature=0.7, seed=11)).pick(logits) for _ in range(5)]
    assert len(set(same)) == 1  # one seed, one pick


@pytest.mark.parametrize("options", [Options(), Options(temperature=0.8, seed=5),
                                     Options(temperature=0.8, top_k=20, top_p=0.9, seed=5, repeat_penalty=1.1)])
def test_sampler_under_a_grammar_picks_allowed_ids_and_validates(compiler, tokenizer, eou, options):
    fmt = from_openai_response_format(FRIGATE_REQUEST)
    c = compiler.constraint(fmt)
    sampler = Sampler(options)
    rng = np.random.default_rng(1)
    ids: list[int] = []
    while not c.done and len(ids) < 4_000:
        logits = rng.normal(0, 2, VOCAB).astype(np.float32)
        logits[eou] -= 4.0  # a model that prefers going on
        if options.greedy:
            masked = np.where(c.mask(), apply_penalties(logits, ids, options.repeat_penalty), -np.inf)
            expected = int(np.argmax(masked))
        token = sampler.pick(logits, ids, c)
        if options.greedy:
            assert token == expected  # the check-first path equals mask-then-argmax
        c.accept(token)
        ids.append(token)
    _validate(tokenizer.decode([t for t in ids if t != eou]), FRIGATE)
    if options.greedy:  # the same answer with the mask always first
        again, masked = compiler.constraint(fmt), Sampler(options, check_first=False)
        rng = np.random.default_rng(1)
        for token in ids:
            logits = rng.normal(0, 2, VOCAB).astype(np.float32)
            logits[eou] -= 4.0
            assert masked.pick(logits, ids[:again.accepted], again) == token
            again.accept(token)
        assert masked.fast_path_hits == 0 and masked.masks == len(ids)
    if options.top_k:
        assert sampler.fast_path_hits == 0 and sampler.masks == len(ids)
    else:
        assert sampler.fast_path_hits > 0 and sampler.masks + sampler.fast_path_hits == len(ids)


def test_logits_wider_than_the_mask_are_disallowed(compiler, tokenizer):
    c = compiler.constraint(from_ollama_format("json"))
    logits = np.zeros(VOCAB + 64, dtype=np.float32)
    logits[VOCAB + 10] = 100.0  # the model's favourite is past the grammar's vocabulary
    token = Sampler(Options()).pick(logits, (), c)
    assert token < VOCAB and c.allows(token)


def test_the_smolvlm_token_layout(eou):
    """The tiny checkpoints' tokenizer: SmolVLM-256M's 49,280 ids, added tokens at their real ids."""
    pytest.importorskip("transformers")
    from rksmolvlm.convert.tiny_checkpoint import TINY_SPECS, build_tiny_tokenizer

    spec = TINY_SPECS["idefics3-256m"]
    hf = build_tiny_tokenizer(spec)
    compiler = GrammarCompiler(hf.backend_tokenizer.to_str(), spec.vocab_size, [spec.eos_token_id])
    c = compiler.constraint(from_openai_response_format(FRIGATE_REQUEST))
    assert c.mask().shape == (49_280,)
    for special in (spec.image_token_id, 49152, 49189):  # <image>, <global-img>, <fake_token_around_image>
        assert not c.mask()[special]
    text = _walk(c, hf.backend_tokenizer, spec.eos_token_id, np.random.default_rng(0), "uniform")
    _validate(text, FRIGATE)


# ---------------------------------------------------------------- the guide (what the engines call per step)


class BigramModel:
    """A stand-in decoder whose logits depend on the last id only: a fixed random table."""

    def __init__(self, seed: int, eou: int):
        self.table = np.random.default_rng(seed).normal(0, 3, (VOCAB, VOCAB)).astype(np.float32)
        self.table[:, eou] -= 6.0  # prefers to go on, as a model asked for a long answer

    def logits(self, last: int) -> np.ndarray:
        return self.table[last]


def test_guide_writes_a_forced_tool_call_and_feeds_runs(compiler, tokenizer, eou):
    fmt = from_tool_choice({"type": "function", "function": {"name": "get_weather"}}, TOOLS)
    guide = Guide(Options(temperature=0.8, seed=3), compiler.constraint(fmt))
    model = BigramModel(0, eou)
    fed = guide.begin()  # the fixed head goes in with the prompt, no sampling
    assert tokenizer.decode(fed).startswith('{"name": "get_weather"')
    calls = 1
    while not guide.done and len(guide.produced) < 2_000:
        run = guide.step(model.logits(fed[-1]))
        fed += run
        calls += 1
        if run[-1] == eou:
            break
    assert guide.produced == fed
    call = tool_call_from_text(tokenizer.decode([t for t in fed if t != eou]))
    assert call.name == "get_weather"
    jsonschema.validate(call.arguments, TOOLS[0]["function"]["parameters"])
    assert guide.forced_ids > 0 and calls < len(fed)  # forced runs save model calls


def test_guide_without_a_grammar_is_the_plain_sampler(eou):
    model = BigramModel(1, eou)
    options = Options(temperature=0.9, top_p=0.9, seed=4, repeat_penalty=1.2)
    guide, plain = Guide(options), Sampler(options)
    assert guide.begin() == [] and not guide.done
    last, produced = 5, []
    for _ in range(50):
        run = guide.step(model.logits(last))
        want = plain.pick(model.logits(last), produced)
        assert run == [want]
        produced.append(want)
        last = want
    assert guide.produced == produced and not guide.done


@pytest.mark.parametrize("seed", range(3))
def test_guide_frigate_answers_validate_with_a_sampling_model(compiler, tokenizer, eou, seed):
    guide = Guide(Options(temperature=0.7, repeat_penalty=1.05, presence_penalty=0.3, seed=seed),
                  compiler.constraint(from_openai_response_format(FRIGATE_REQUEST)))
    model = BigramModel(seed, eou)
    last = guide.begin()[-1:] or [1]
    while not guide.done and len(guide.produced) < 5_000:
        last = guide.step(model.logits(last[-1]))
    assert guide.done
    _validate(tokenizer.decode([t for t in guide.produced if t != eou]), FRIGATE)


def test_the_benchmark_script_runs(compiler):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "scripts" / "bench_structured.py"
    spec = importlib.util.spec_from_file_location("bench_structured", path)
    bench = importlib.util.module_from_spec(spec)
    sys.modules["bench_structured"] = bench  # its dataclass looks its module up
    try:
        spec.loader.exec_module(bench)
    finally:
        del sys.modules["bench_structured"]
    report = bench.bench_schema(compiler, from_ollama_format(bench.SMALL), answers=2, seed=0)
    assert report["steps"] > 0 and report["bitmask"]["median_ms"] > 0
    assert report["pick_greedy_check_first"]["n"] > 0 and report["pick_free_top_k"]["n"] == 1_000

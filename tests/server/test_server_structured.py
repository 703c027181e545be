"""Structured output through the server's adapters (DESIGN §10), driven with the official clients
(openai, ollama) against a real loopback server:

- what the server says: /v1/models' supported_parameters, /api/show's capabilities;
- refusals before the queue: a shape error, an unsupported keyword, a schema too big or too deep
  (a named 400 in bounded time while /health keeps answering), on both adapters;
- how a forced tool call is written (OpenAI's message.tool_calls, streamed as a tool_calls delta) over
  a fake engine that writes the call's text;
- end to end on the trained demo model (host engine, grammar-constrained): Frigate 0.18's review
  request through /v1/chat/completions and through /api/generate, Home Assistant's AI Task through
  /api/chat, ollama-python's format="json", a streamed json_schema answer, a forced tool call, and
  the tiny preview bundles; every answer parses and validates with jsonschema.

The demo model knows a few answers about a few photos; inside a JSON string it writes junk (".58.58…")
and closes the string only where the grammar makes it (a maxLength). An answer to a schema whose
strings are bounded always completes; a free string (json_object's keys, ``format="json"``) only ends
when the model chooses the closing quote, so those requests add a frequency penalty (an OpenAI/Ollama
option like any other), which makes the demo model close its strings within its 2,048-token context.
Frigate's fields are all bounded, but its 3–8 observations of up to 200 characters do not fit beside
its prompt in that context when the model fills every string: its requests carry the penalty too."""

from __future__ import annotations

import base64
import json
import threading
import time

import httpx
import jsonschema
import ollama
import openai
import pytest

from support import TINY_NAMES
from support.fakes import fake_runner
from support.frigate import FRIGATE, FRIGATE_FORMAT, FRIGATE_PROMPT, coffee_photo
from rksmolvlm.runners import RUNNERS
from rksmolvlm.runtime.server import BackgroundServer, build_app
from rksmolvlm.runtime.server.config import ServerConfig, with_overrides

API_KEY = "structured-key-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
MODEL = "idefics3-256m"

def frigate_ollama_schema() -> dict:
    """What Frigate's Ollama provider sends as ``format``: the schema without titles, descriptions and
    the numeric bounds (DESIGN §10)."""
    drop = {"title", "description", "minimum", "maximum"}

    def strip(node):
        if isinstance(node, dict):
            return {k: strip(v) for k, v in node.items() if k not in drop or isinstance(v, dict) and k == "title"}
        return [strip(v) for v in node] if isinstance(node, list) else node

    schema = strip(FRIGATE)
    schema.pop("additionalProperties")  # only the openai provider closes the object
    return schema


# Home Assistant's Ollama AI Task: format = the task's structure (no additionalProperties), here one
# built from select, number and boolean selectors (enum, integer with its bounds, boolean).
HA_TASK = {
    "type": "object",
    "properties": {
        "color": {"type": "string", "description": "Main colour of the object on the table",
                  "enum": ["white", "black", "red", "blue", "brown", "other"]},
        "count": {"type": "integer", "minimum": 0, "maximum": 20, "description": "How many objects"},
        "kind": {"type": "string", "enum": ["cup", "plate", "bottle", "other"]},
        "on_table": {"type": "boolean"},
    },
    "required": ["color", "count", "kind", "on_table"],
}
PENALTY = 1.0  # frequency penalty: the demo model closes its free strings (see the module docstring)

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather at a place",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 40},
                                                    "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}
LIGHT = {"type": "function", "function": {
    "name": "turn_on", "description": "Turn a light on",
    "parameters": {"type": "object", "properties": {"entity": {"type": "string", "maxLength": 40},
                                                    "brightness": {"type": "integer", "minimum": 0,
                                                                   "maximum": 255}},
                   "required": ["entity", "brightness"], "additionalProperties": False}}}
TOOLS = [WEATHER, LIGHT]


def data_uri(data: bytes) -> str:
    return "data:image/jpeg;base64," + base64.b64encode(data).decode()


def nested(depth: int) -> dict:
    schema: dict = {"type": "string"}
    for _ in range(depth):
        schema = {"type": "object", "properties": {"a": schema}, "required": ["a"]}
    return schema


def config_for(bundle, **overrides) -> ServerConfig:
    return with_overrides(ServerConfig(), {"bundle": str(bundle), "engine": "host", **overrides})


# ==============================================================================================
# A server over a fake engine: what the server says, refusals, how a tool call is written
# ==============================================================================================
class _Script:
    """The fake engine's answer, settable per test (token ids of the bundle's tokenizer)."""

    def __init__(self):
        self.runner = None

    def say(self, text: str, stop: bool = True) -> None:
        bundle = self.runner.bundle
        self.runner.llm.script = [*bundle.tokenizer.encode_text(text), *(bundle.stop_ids[:1] if stop else [])]


@pytest.fixture(scope="module")
def fake(preview_bundles, tmp_path_factory):
    key_file = tmp_path_factory.mktemp("key") / "api_key"
    key_file.write_text(API_KEY + "\n")
    config = config_for(preview_bundles[MODEL], **{"server.api_key_file": str(key_file)})
    script = _Script()

    def load(bundle):
        script.runner = fake_runner(bundle, bundle.tokenizer.encode_text(" Hi."))
        return script.runner

    with BackgroundServer(build_app(config, load=load), config) as server:
        server.script = script
        yield server


@pytest.fixture(scope="module")
def fake_openai(fake):
    return openai.OpenAI(base_url=f"{fake.url}/v1", api_key=API_KEY, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def fake_ollama(fake):
    return ollama.Client(host=fake.url, headers=AUTH, timeout=60)


def hello(client, **kwargs):
    return client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hello?"}],
                                          max_tokens=64, **kwargs)


def test_models_and_show_say_structured_output_is_supported(fake, fake_openai, fake_ollama):
    card = fake_openai.models.list().data[0].model_extra
    assert {"response_format", "structured_outputs", "tools", "tool_choice"} <= set(card["supported_parameters"])
    assert {"max_tokens", "temperature", "seed", "stop"} <= set(card["supported_parameters"])
    one = httpx.get(f"{fake.url}/v1/models/{MODEL}", headers=AUTH).json()
    assert one["supported_parameters"] == card["supported_parameters"]
    shown = fake_ollama.show(MODEL)
    assert {"completion", "vision", "structured_outputs"} <= set(shown.capabilities)


def test_without_a_grammar_compiler_structured_requests_are_refused_and_not_advertised(preview_bundles,
                                                                                      monkeypatch):
    from rksmolvlm.runtime.server import process

    monkeypatch.setattr(process, "grammar_compiler", lambda bundle: None)
    config = config_for(preview_bundles[MODEL])
    with BackgroundServer(build_app(config, load=lambda b: fake_runner(b, [5])), config) as server:
        card = httpx.get(f"{server.url}/v1/models").json()["data"][0]
        assert "response_format" not in card["supported_parameters"] and "max_tokens" in card["supported_parameters"]
        assert "structured_outputs" not in httpx.post(f"{server.url}/api/show", json={"model": MODEL}).json()[
            "capabilities"]
        reply = httpx.post(f"{server.url}/v1/chat/completions", json={
            "messages": [{"role": "user", "content": "hi"}], "response_format": {"type": "json_object"}})
        assert reply.status_code == 501 and reply.json()["error"]["code"] == "structured_output_unavailable"
        assert reply.json()["error"]["param"] == "response_format"
        assert httpx.post(f"{server.url}/v1/chat/completions", json={
            "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}).status_code == 200


@pytest.mark.parametrize("schema, keyword", [
    ({"type": "object", "properties": {"a": {"type": "integer", "not": {"const": 3}}}}, "not"),
    ({"type": "object", "properties": {"a": {"type": "string"}}, "if": {"required": ["a"]}}, "if"),
    ({"type": "array", "items": {"type": "integer"}, "uniqueItems": True}, "uniqueItems"),
])
def test_an_unsupported_keyword_is_a_named_400_on_both_adapters(fake, fake_openai, fake_ollama, schema, keyword):
    with pytest.raises(openai.BadRequestError) as info:
        hello(fake_openai, response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": schema}})
    error = info.value.body
    assert error["code"] == "unsupported_schema_keyword"
    assert error["param"].startswith("response_format.json_schema.schema")
    assert f"'{keyword}'" in error["message"]
    with pytest.raises(ollama.ResponseError) as refused:
        fake_ollama.chat(model=MODEL, messages=[{"role": "user", "content": "hi"}], format=schema)
    assert refused.value.status_code == 400 and f"'{keyword}'" in refused.value.error
    assert "format" in refused.value.error
    raw = httpx.post(f"{fake.url}/api/generate", headers=AUTH, json={"prompt": "hi", "format": schema,
                                                                      "stream": False})
    assert raw.status_code == 400 and f"'{keyword}'" in raw.json()["error"]
    hello(fake_openai)  # the server still answers


def _health_while(server, work) -> tuple[float, list[float]]:
    """Runs ``work()``; meanwhile /health is asked every 50 ms: (work's seconds, each health answer's seconds)."""
    times: list[float] = []
    done = threading.Event()

    def poll():
        with httpx.Client(timeout=5) as client:
            while not done.is_set():
                t = time.perf_counter()
                assert client.get(f"{server.url}/health").status_code == 200
                times.append(time.perf_counter() - t)
                time.sleep(0.02)

    poller = threading.Thread(target=poll)
    poller.start()
    deadline = time.monotonic() + 5
    while not times and time.monotonic() < deadline:  # the poller is under way before the work starts
        time.sleep(0.01)
    started = time.perf_counter()
    try:
        work()
    finally:
        elapsed = time.perf_counter() - started
        done.set()
        poller.join()
    return elapsed, times


@pytest.mark.parametrize("what, schema, limit_word", [
    ("deep", nested(400), "deep"),
    ("big", {"type": "object", "properties": {f"field_{i:05d}_{'x' * 40}": {"type": "string", "description": "y" * 80}
                                              for i in range(1_500)}}, "bytes"),
    ("many properties", {"type": "object", "properties": {f"p{i}": {"type": "integer"} for i in range(1_200)}},
     "properties"),
    ("wide enum", {"type": "string", "enum": [f"value number {i}" for i in range(3_000)]}, "enum"),
    ("costly pattern", {"type": "string", "pattern": "^((a|b){100}c){100}$"}, "pattern"),
])
def test_a_schema_too_big_or_too_deep_is_a_named_400_in_bounded_time_while_health_answers(
        fake, fake_openai, what, schema, limit_word):
    errors = []

    def send():
        with pytest.raises(openai.BadRequestError) as info:
            hello(fake_openai, response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": schema}})
        errors.append(info.value.body)
        errors.append(httpx.post(f"{fake.url}/api/chat", headers=AUTH, timeout=30, json={
            "model": MODEL, "messages": [{"role": "user", "content": "hi"}], "format": schema, "stream": False}))

    elapsed, health = _health_while(fake, send)
    error, ollama_reply = errors
    assert error["code"] == "schema_too_complex", error
    assert error["param"].startswith("response_format.json_schema.schema")
    assert limit_word in error["message"]
    assert ollama_reply.status_code == 400 and limit_word in ollama_reply.json()["error"]
    assert "format" in ollama_reply.json()["error"]
    assert elapsed < 5.0, f"{what}: refused after {elapsed:.2f} s"
    assert health and max(health) < 1.0
    hello(fake_openai)


@pytest.mark.parametrize("body, code, param", [
    ({"response_format": {"type": "json_schema"}}, "invalid_response_format", "response_format.json_schema"),
    ({"response_format": {"type": "yaml"}}, "invalid_response_format", "response_format.type"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"$ref": "http://x/y"}}}},
     "unsupported_schema_keyword", "response_format.json_schema.schema"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": True}}},
     "invalid_schema", "response_format.json_schema.schema"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "invalid_response_format",
     "tool_choice.function.name"),
    ({"tool_choice": "required"}, "invalid_response_format", "tools"),
    ({"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}}, "invalid_value",
     "response_format"),
    ({"functions": [WEATHER["function"]], "function_call": {"name": "get_weather"}}, "unsupported_value",
     "function_call"),
])
def test_shape_errors_are_named_400s(fake, body, code, param):
    reply = httpx.post(f"{fake.url}/v1/chat/completions", headers=AUTH,
                       json={"messages": [{"role": "user", "content": "hi"}], **body})
    assert reply.status_code == 400, reply.text
    error = reply.json()["error"]
    assert error["param"] == param and error["code"] == code


def test_a_forced_call_is_written_as_tool_calls(fake, fake_openai):
    call = {"name": "turn_on", "arguments": {"entity": "light.kitchen", "brightness": 200}}
    fake.script.say(json.dumps(call))
    reply = hello(fake_openai, tools=TOOLS, tool_choice={"type": "function", "function": {"name": "turn_on"}})
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    [made] = choice.message.tool_calls
    assert made.type == "function" and made.id.startswith("call_") and made.function.name == "turn_on"
    assert json.loads(made.function.arguments) == call["arguments"]

    stream = list(hello(fake_openai, tools=TOOLS, tool_choice="required", stream=True))
    assert stream[0].choices[0].delta.role == "assistant" and stream[0].choices[0].delta.content is None
    deltas = [c.choices[0].delta for c in stream if c.choices]
    assert all(not d.content for d in deltas)
    [carrying] = [d for d in deltas if d.tool_calls]
    [streamed] = carrying.tool_calls
    assert streamed.index == 0 and streamed.id.startswith("call_") and streamed.type == "function"
    assert streamed.function.name == "turn_on" and json.loads(streamed.function.arguments) == call["arguments"]
    assert stream[-1].choices[0].finish_reason == "tool_calls"

    # the openai client's stream helper accumulates it into the same message
    with fake_openai.chat.completions.stream(model=MODEL, messages=[{"role": "user", "content": "Hello?"}],
                                             max_tokens=64, tools=TOOLS, tool_choice="required") as events:
        final = events.get_final_completion()
    assert final.choices[0].message.tool_calls[0].function.name == "turn_on"
    assert json.loads(final.choices[0].message.tool_calls[0].function.arguments) == call["arguments"]


def test_a_call_cut_by_max_tokens_is_text_with_finish_length(fake, fake_openai):
    call = json.dumps({"name": "turn_on", "arguments": {"entity": "light.kitchen", "brightness": 9}})
    fake.script.say(call)
    reply = fake_openai.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hello?"}],
                                                max_tokens=3, tools=TOOLS, tool_choice="required")
    choice = reply.choices[0]
    assert choice.finish_reason == "length" and choice.message.tool_calls is None
    assert choice.message.content and call.startswith(choice.message.content) and choice.message.content != call
    chunks = list(fake_openai.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hello?"}],
                                                      max_tokens=3, tools=TOOLS, tool_choice="required", stream=True))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == choice.message.content and chunks[-1].choices[0].finish_reason == "length"


def test_tool_choice_auto_or_absent_stays_text(fake, fake_openai):
    fake.script.say("It is sunny.")
    for extra in ({}, {"tool_choice": "auto"}, {"tool_choice": "none"}):
        reply = hello(fake_openai, tools=TOOLS, **extra)
        assert reply.choices[0].message.content == "It is sunny." and reply.choices[0].message.tool_calls is None
        assert reply.choices[0].finish_reason == "stop"


# ==============================================================================================
# End to end: the trained demo model on the host engine, the answer under the grammar
# ==============================================================================================
@pytest.fixture(scope="module")
def demo(demo_preview_bundle, tmp_path_factory):
    key_file = tmp_path_factory.mktemp("key") / "api_key"
    key_file.write_text(API_KEY + "\n")
    config = config_for(demo_preview_bundle, **{"server.api_key_file": str(key_file),
                                                "server.request_timeout_s": 600})
    with BackgroundServer(build_app(config, RUNNERS), config) as server:
        yield server


@pytest.fixture(scope="module")
def demo_openai(demo):
    return openai.OpenAI(base_url=f"{demo.url}/v1", api_key=API_KEY, max_retries=0, timeout=600)


@pytest.fixture(scope="module")
def demo_ollama(demo):
    return ollama.Client(host=demo.url, headers=AUTH, timeout=600)


def frigate_messages() -> list[dict]:
    images = [{"type": "image_url", "image_url": {"url": data_uri(coffee_photo()), "detail": "low"}}]
    return [{"role": "user", "content": [{"type": "text", "text": FRIGATE_PROMPT}, *images]}]


def test_frigate_review_through_chat_completions(demo_openai):
    reply = demo_openai.chat.completions.create(model=MODEL, messages=frigate_messages(),
                                                response_format=FRIGATE_FORMAT, frequency_penalty=PENALTY)
    choice = reply.choices[0]
    assert choice.finish_reason == "stop", choice
    review = json.loads(choice.message.content)
    jsonschema.validate(review, FRIGATE)
    assert list(review) == list(FRIGATE["properties"])  # written in the schema's order


def test_frigate_review_through_api_generate(demo, demo_ollama):
    schema = frigate_ollama_schema()
    assert "minimum" not in json.dumps(schema) and "minLength" in json.dumps(schema)
    reply = demo_ollama.generate(model=MODEL, prompt=FRIGATE_PROMPT, images=[coffee_photo()], format=schema,
                                 stream=False, options={"temperature": 0.5, "repeat_penalty": 1.05,
                                                        "presence_penalty": 0.3, "seed": 7,
                                                        "frequency_penalty": PENALTY})
    assert reply.done_reason == "stop"
    jsonschema.validate(json.loads(reply.response), schema)


def test_home_assistant_ai_task_through_api_chat(demo, demo_ollama):
    messages = [{"role": "system", "content": "You are a Home Assistant AI task. Answer with the data asked for."},
                {"role": "user", "content": "Describe the object on the table.", "images": [coffee_photo()]}]
    parts = list(demo_ollama.chat(model=MODEL, messages=messages, stream=True, think=False, tools=[],
                                  options={"num_ctx": 8192}, keep_alive=-1, format=HA_TASK))
    text = "".join(p.message.content for p in parts)
    assert parts[-1].done and parts[-1].done_reason == "stop"
    jsonschema.validate(json.loads(text), HA_TASK)


def test_ollama_python_format_json_is_a_json_object(demo_ollama):
    options = {"frequency_penalty": 2 * PENALTY}
    reply = demo_ollama.chat(model=MODEL, messages=[{"role": "user", "content": "What is on the table?",
                                                     "images": [coffee_photo()]}], format="json", options=options)
    assert reply.done_reason == "stop"
    assert isinstance(json.loads(reply.message.content), dict)
    generated = demo_ollama.generate(model=MODEL, prompt="What is on the table?", format="json", options=options)
    assert generated.done_reason == "stop"
    assert isinstance(json.loads(generated.response), dict)


def test_a_streamed_json_schema_answer_joins_into_the_same_valid_text(demo_openai):
    fmt = {"type": "json_schema", "json_schema": {"name": "task", "schema": HA_TASK}}
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_uri(coffee_photo())}},
                                             {"type": "text", "text": "What is on the table?"}]}]
    whole = demo_openai.chat.completions.create(model=MODEL, messages=messages, response_format=fmt, max_tokens=256)
    chunks = list(demo_openai.chat.completions.create(model=MODEL, messages=messages, response_format=fmt,
                                                      max_tokens=256, stream=True))
    deltas = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    assert len([d for d in deltas if d]) > 1  # streamed, not sent at the end
    text = "".join(deltas)
    assert text == whole.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(text), HA_TASK)
    json_mode = demo_openai.chat.completions.create(model=MODEL, messages=messages, frequency_penalty=2 * PENALTY,
                                                    response_format={"type": "json_object"})
    assert json_mode.choices[0].finish_reason == "stop"
    assert isinstance(json.loads(json_mode.choices[0].message.content), dict)


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "turn_on"}}])
def test_a_forced_tool_call_validates_against_the_function(demo_openai, choice):
    reply = demo_openai.chat.completions.create(model=MODEL, messages=[
        {"role": "user", "content": "Turn on the kitchen light."}], tools=TOOLS, tool_choice=choice, max_tokens=256)
    assert reply.choices[0].finish_reason == "tool_calls"
    [call] = reply.choices[0].message.tool_calls
    tool = {t["function"]["name"]: t["function"] for t in TOOLS}[call.function.name]
    if isinstance(choice, dict):
        assert call.function.name == "turn_on"
    jsonschema.validate(json.loads(call.function.arguments), tool["parameters"])


@pytest.mark.parametrize("name", TINY_NAMES)
def test_the_tiny_preview_bundles_answer_with_valid_json(preview_bundles, name):
    config = config_for(preview_bundles[name])
    with BackgroundServer(build_app(config, RUNNERS), config) as server:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0, timeout=300)
        reply = client.chat.completions.create(model=name, messages=[{"role": "user", "content": "Describe it."}],
                                               response_format={"type": "json_schema", "json_schema": {
                                                   "name": "task", "schema": HA_TASK}}, max_tokens=200)
        assert reply.choices[0].finish_reason == "stop"
        jsonschema.validate(json.loads(reply.choices[0].message.content), HA_TASK)
        answer = ollama.Client(host=server.url, timeout=300).chat(
            model=name, messages=[{"role": "user", "content": "hi"}], format=HA_TASK, options={"num_predict": 200})
        assert answer.done_reason == "stop"
        jsonschema.validate(json.loads(answer.message.content), HA_TASK)
        call = client.chat.completions.create(model=name, messages=[{"role": "user", "content": "Light on."}],
                                              tools=[LIGHT], tool_choice="required", max_tokens=200)
        assert call.choices[0].finish_reason == "tool_calls"
        jsonschema.validate(json.loads(call.choices[0].message.tool_calls[0].function.arguments),
                            LIGHT["function"]["parameters"])

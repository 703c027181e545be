"""What the clients people point at a board send, driven with the official openai client against the
real server: Open WebUI's 28 tools (ignored, the answer is text) and tool history, Home Assistant's
max_completion_tokens 4096 and typed model name, no max_tokens at all, frequency/presence penalties
reaching the engine, CORS for browser apps, the context and modalities in /v1/models, llama.cpp's
/props (Frigate), a stream's first chunk while another request holds the worker, and the inputs
that used to end in a 500 (each now a named 400, or accepted, then a good request succeeds)."""

import base64
import io
import json
import time
from types import SimpleNamespace

import httpx
import openai
import pytest

from support.fakes import fake_runner, RecordingLlm

from support.images import rng_image
from rksmolvlm.runtime.engines import GenerationConfig
from rksmolvlm.runners import open_engines
from rksmolvlm.preview.host_engines import TorchLlmEngine
from rksmolvlm.runtime.runner import Runner
from rksmolvlm.runtime.server import ApiError, BackgroundServer, RequestReader, ServedModel, build_app
from rksmolvlm.runtime.server.config import ServerConfig, with_overrides

API_KEY = "clients-key-0123456789abcdef"
MODEL = "idefics3-256m"
CONTEXT = 2048
ALLOWED = "http://frontend.example:3000"
AUTH = {"Authorization": f"Bearer {API_KEY}"}


def image_bytes(fmt="PNG", seed=0, size=(96, 64)) -> bytes:
    buffer = io.BytesIO()
    rng_image(*size, seed=seed).save(buffer, format=fmt)
    return buffer.getvalue()


def data_uri(data: bytes, mime="image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def ask(text="What is in the picture?", url=None) -> list[dict]:
    parts = [{"type": "image_url", "image_url": {"url": url}}] if url else []
    return [{"role": "user", "content": [*parts, {"type": "text", "text": text}]}]


@pytest.fixture(scope="module")
def served(preview_bundles, tmp_path_factory):
    key_file = tmp_path_factory.mktemp("key") / "api_key"
    key_file.write_text(API_KEY + "\n")
    config = with_overrides(ServerConfig(), {
        "bundle": str(preview_bundles[MODEL]), "engine": "host", "server.api_key_file": str(key_file),
        "server.cors_origins": [ALLOWED], "images.local_dir": str(tmp_path_factory.mktemp("images"))})
    recorder = {}

    def load(bundle):
        vision, llm = open_engines(bundle, "host")
        recorder["llm"] = RecordingLlm(llm)
        return Runner(bundle, vision, recorder["llm"])

    with BackgroundServer(build_app(config, load=load), config) as server:
        server.llm = recorder["llm"]
        yield server


@pytest.fixture(scope="module")
def client(served):
    return openai.OpenAI(base_url=f"{served.url}/v1", api_key=API_KEY, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def strict(preview_bundles):
    """A server with server.strict_model_name, no CORS, no images, no key, and fake engines."""
    config = with_overrides(ServerConfig(), {"bundle": str(preview_bundles[MODEL]), "engine": "host",
                                             "server.strict_model_name": True, "limits.max_images": 0})
    with BackgroundServer(build_app(config, load=lambda b: fake_runner(b, b.tokenizer.encode_text(" Hi."))),
                          config) as server:
        yield server


def good_request(client):
    reply = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hello?"}],
                                           max_tokens=2)
    assert reply.choices[0].finish_reason in ("stop", "length")


def ids(reply) -> list[int]:
    return reply.model_extra["rksmolvlm"]["token_ids"]


# -- tools: ignored unless a call is demanded; tool history rendered ------------------------------
def tool(i: int) -> dict:
    return {"type": "function", "function": {
        "name": f"tool_{i}", "description": f"Built-in tool number {i}: searches, fetches or remembers things.",
        "parameters": {"type": "object", "properties": {"query": {"type": "string", "description": "what"},
                                                        "limit": {"type": "integer"}}, "required": ["query"]}}}


OPEN_WEBUI_TOOLS = [tool(i) for i in range(28)]


def test_open_webui_request_with_28_tools_is_answered_with_text(client):
    messages = ask("Describe the picture.", data_uri(image_bytes()))
    plain = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=6)
    reply = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=6, tools=OPEN_WEBUI_TOOLS)
    assert reply.choices[0].message.tool_calls is None and reply.choices[0].message.content
    assert ids(reply) == ids(plain)  # the tools are not in the prompt
    for choice in ("auto", "none"):
        again = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=6, tools=OPEN_WEBUI_TOOLS,
                                               tool_choice=choice)
        assert ids(again) == ids(plain)
    chunks = list(client.chat.completions.create(model=MODEL, messages=messages, max_tokens=6, stream=True,
                                                 tools=OPEN_WEBUI_TOOLS, parallel_tool_calls=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == plain.choices[0].message.content
    assert all(c.choices[0].delta.tool_calls is None for c in chunks if c.choices)
    legacy = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=6, function_call="auto",
                                            functions=[t["function"] for t in OPEN_WEBUI_TOOLS])
    assert ids(legacy) == ids(plain)


def test_a_call_demanded_through_the_legacy_functions_is_refused(client):
    # a call demanded through tool_choice is made (tests/server/test_server_structured.py); the legacy
    # function_call cannot demand one: the refusal names the tool_choice way
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=MODEL, messages=ask("Hi"), max_tokens=2,
                                       functions=[OPEN_WEBUI_TOOLS[3]["function"]], function_call={"name": "tool_3"})
    error = info.value.body
    assert error["code"] == "unsupported_value" and error["param"] == "function_call"
    assert "\"auto\" or \"none\"" in error["message"] and "tool_choice" in error["message"]
    good_request(client)


def test_tool_history_is_rendered_as_text(client):
    question = {"role": "user", "content": "What is the weather in Paris?"}
    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
    history = [question,
               {"role": "assistant", "content": None, "tool_calls": [call]},
               {"role": "tool", "tool_call_id": "call_1", "content": "18 °C, cloudy"},
               {"role": "assistant", "content": "It is 18 °C.", "tool_calls": [call]},
               {"role": "tool", "tool_call_id": "call_1", "content": [{"type": "text", "text": "still cloudy"}]},
               {"role": "function", "name": "get_time", "content": "14:05"}]
    reply = client.chat.completions.create(model=MODEL, messages=history, max_tokens=5, tools=OPEN_WEBUI_TOOLS)
    rendered = client.chat.completions.create(model=MODEL, max_tokens=5, messages=[
        question,  # the call-only assistant message is dropped, a tool's result is a user message
        {"role": "user", "content": "Tool result:\n18 °C, cloudy"},
        {"role": "assistant", "content": "It is 18 °C."},  # its text stays, its calls go
        {"role": "user", "content": "Tool result:\nstill cloudy"},
        {"role": "user", "content": "Tool result (get_time):\n14:05"}])
    assert reply.usage.prompt_tokens == rendered.usage.prompt_tokens
    assert ids(reply) == ids(rendered)
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=MODEL, max_tokens=2, messages=[
            {"role": "assistant", "content": "", "tool_calls": [call]}])
    assert info.value.code == "invalid_value" and "only tool calls" in info.value.body["message"]


# -- max_tokens: capped, never refused for being large; absent: until the context ends ------------
@pytest.fixture(scope="module")
def near_full(client):
    """A question with a picture whose prompt leaves about 24 tokens of the context (when the picture
    is split; unsplit it leaves more: the server unsplits pictures that keep a long answer out)."""
    def prompt_tokens(words: int) -> int:
        return client.chat.completions.create(model=MODEL, max_tokens=1, messages=ask(
            "word " * words + "Describe the picture.", data_uri(image_bytes(seed=4)))).usage.prompt_tokens

    base, sample = prompt_tokens(0), prompt_tokens(200)
    words = int((CONTEXT - 24 - base) * 200 / (sample - base))
    assert 4 <= CONTEXT - prompt_tokens(words) <= 60
    return ask("word " * words + "Describe the picture.", data_uri(image_bytes(seed=4)))


def test_home_assistant_max_completion_tokens_4096_is_capped_to_the_context(client, served, near_full):
    reply = client.chat.completions.create(model="gpt-4o-mini", messages=near_full, max_completion_tokens=4096)
    room = CONTEXT - reply.usage.prompt_tokens
    assert 0 < room < 300
    assert served.llm.configs[-1].max_new_tokens == room  # the engine was asked for what fits
    assert reply.choices[0].finish_reason == "length" and reply.usage.completion_tokens == room
    chunks = list(client.chat.completions.create(model=MODEL, messages=near_full, max_tokens=100_000, stream=True,
                                                 stream_options={"include_usage": True}))
    assert chunks[-2].choices[0].finish_reason == "length"
    assert chunks[-1].usage.completion_tokens == CONTEXT - chunks[-1].usage.prompt_tokens


def test_without_max_tokens_the_answer_runs_until_the_context_ends(client, served, near_full):
    reply = client.chat.completions.create(model=MODEL, messages=near_full)
    room = CONTEXT - reply.usage.prompt_tokens
    assert 0 < room < 300 and served.llm.configs[-1].max_new_tokens == room
    assert reply.choices[0].finish_reason == "length" and reply.usage.completion_tokens == room
    text_only = client.chat.completions.create(model=MODEL, messages=ask("word " * 1000 + "Go on."))
    assert text_only.usage.prompt_tokens + text_only.usage.completion_tokens == CONTEXT


def _reader(**overrides) -> RequestReader:
    return RequestReader(with_overrides(ServerConfig(), overrides), ServedModel(MODEL, (), CONTEXT, 0, "host"))


def _config(reader: RequestReader, **fields) -> GenerationConfig:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], **fields}
    return reader.read(json.dumps(body).encode()).config


def test_max_tokens_follow_the_limits():
    config = _config(_reader(**{"limits.max_tokens": 100}), max_completion_tokens=4096)
    assert config.max_new_tokens == 100 and config.cap_to_context
    assert _config(_reader(**{"limits.max_tokens": 100})).max_new_tokens == 100  # default 0: as far as allowed
    assert _config(_reader(), max_tokens=10**30).max_new_tokens == 16384  # the runner caps it to the context
    assert _config(_reader()).max_new_tokens == 16384
    assert _config(_reader(**{"limits.default_max_tokens": 50})).max_new_tokens == 50
    assert _config(_reader(**{"limits.default_max_tokens": 50}), max_tokens=70).max_new_tokens == 70
    with pytest.raises(ApiError, match="max_tokens = 0 is out of range"):
        _config(_reader(), max_tokens=0)


# -- model names -----------------------------------------------------------------------------------
def test_any_model_name_is_answered_by_a_one_model_server(client):
    for name in ("gpt-4o-mini", "SmolVLM-256M-Instruct", ""):
        reply = client.chat.completions.create(model=name, messages=ask("Hi"), max_tokens=2)
        assert reply.model == MODEL
    assert client.models.retrieve("gpt-4o-mini").id == MODEL


def test_strict_model_names_answer_404(strict):
    strict_client = openai.OpenAI(base_url=f"{strict.url}/v1", api_key="unused", max_retries=0, timeout=30)
    with pytest.raises(openai.NotFoundError) as info:
        strict_client.chat.completions.create(model="gpt-4o-mini", messages=ask("Hi"), max_tokens=2)
    assert info.value.code == "model_not_found" and MODEL in info.value.body["message"]
    with pytest.raises(openai.NotFoundError):
        strict_client.models.retrieve("gpt-4o-mini")
    assert strict_client.chat.completions.create(model=MODEL, messages=ask("Hi")).choices[0].message.content == "Hi."


# -- frequency / presence penalties ----------------------------------------------------------------
def test_penalties_reach_the_engine_and_change_the_answer(client, served):
    messages = ask("Tell me a story.")
    plain = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=24)
    assert len(set(ids(plain))) < len(ids(plain))  # the tiny model repeats itself: penalties have work to do
    reply = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=24, frequency_penalty=2.0,
                                           presence_penalty=-0.5)
    config = served.llm.configs[-1]
    assert (config.frequency_penalty, config.presence_penalty) == (2.0, -0.5)
    assert ids(reply) != ids(plain)
    for name, value in (("frequency_penalty", 2.5), ("presence_penalty", -3)):
        with pytest.raises(openai.BadRequestError) as info:
            client.chat.completions.create(model=MODEL, messages=messages, max_tokens=2, **{name: value})
        assert info.value.code == "invalid_value" and info.value.body["param"] == name


def test_the_host_engine_applies_openai_penalty_semantics():
    import torch

    engine = SimpleNamespace(torch=torch)
    logits = torch.tensor([1.0, 0.9, 0.0, -1.0])
    pick = lambda previous, **penalties: TorchLlmEngine._pick(engine, logits, GenerationConfig(**penalties),  # noqa
                                                              None, previous)
    assert pick([0, 0]) == 0
    assert pick([0, 0], frequency_penalty=0.04) == 0  # 1.0 - 2 × 0.04 = 0.92 > 0.9
    assert pick([0, 0], frequency_penalty=0.06) == 1  # 1.0 - 2 × 0.06 = 0.88 < 0.9
    assert pick([0, 0], presence_penalty=0.06) == 0  # once per token present: 0.94
    assert pick([0, 0], presence_penalty=0.11) == 1  # 0.89
    assert pick([1, 1], frequency_penalty=-0.1) == 1  # negative: repetition encouraged (0.9 + 0.2 > 1.0)
    assert torch.equal(logits, torch.tensor([1.0, 0.9, 0.0, -1.0]))  # the caller's logits are untouched


# -- CORS --------------------------------------------------------------------------------------------
def test_cors_preflight_is_answered_before_the_key_check(served):
    response = httpx.options(f"{served.url}/v1/chat/completions", headers={
        "Origin": ALLOWED, "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type, x-stainless-os, bad header"})
    assert response.status_code == 204
    assert response.headers["access-control-allow-origin"] == ALLOWED
    assert "POST" in response.headers["access-control-allow-methods"]
    allowed = [h.strip().lower() for h in response.headers["access-control-allow-headers"].split(",")]
    assert {"authorization", "content-type", "x-stainless-os"} <= set(allowed) and "bad header" not in allowed
    refused = httpx.options(f"{served.url}/v1/chat/completions", headers={
        "Origin": "http://evil.example", "Access-Control-Request-Method": "POST"})
    assert refused.status_code == 403 and "access-control-allow-origin" not in refused.headers
    assert refused.json()["error"]["code"] == "cors_origin_not_allowed"


def test_cors_headers_only_for_an_allowed_origin(served):
    body = {"model": MODEL, "messages": ask("Hi"), "max_tokens": 2}
    ok = httpx.post(f"{served.url}/v1/chat/completions", json=body, headers={**AUTH, "Origin": ALLOWED}, timeout=30)
    assert ok.status_code == 200 and ok.headers["access-control-allow-origin"] == ALLOWED
    assert "x-request-id" in ok.headers["access-control-expose-headers"].lower()
    with httpx.stream("POST", f"{served.url}/v1/chat/completions", json={**body, "stream": True},
                      headers={**AUTH, "Origin": ALLOWED}, timeout=30) as streamed:
        assert streamed.headers["access-control-allow-origin"] == ALLOWED
        assert streamed.read().endswith(b"data: [DONE]\n\n")
    unauthorized = httpx.get(f"{served.url}/v1/models", headers={"Origin": ALLOWED})  # the page can read the 401
    assert unauthorized.status_code == 401 and unauthorized.headers["access-control-allow-origin"] == ALLOWED
    other = httpx.post(f"{served.url}/v1/chat/completions", json=body, timeout=30,
                       headers={**AUTH, "Origin": "http://evil.example"})
    assert "access-control-allow-origin" not in other.headers
    assert "access-control-allow-origin" not in httpx.get(f"{served.url}/v1/models", headers=AUTH).headers


def test_no_cors_headers_when_no_origin_is_configured(strict):
    response = httpx.get(f"{strict.url}/v1/models", headers={"Origin": ALLOWED})
    assert response.status_code == 200 and "access-control-allow-origin" not in response.headers
    preflight = httpx.options(f"{strict.url}/v1/models", headers={"Origin": ALLOWED,
                                                                  "Access-Control-Request-Method": "GET"})
    assert "access-control-allow-origin" not in preflight.headers


# -- what the server says about itself ---------------------------------------------------------------
def test_models_report_the_context_and_the_input_modalities(client, served, strict):
    card = client.models.list().data[0].model_extra
    assert card["max_model_len"] == card["context_length"] == card["meta"]["n_ctx"] == CONTEXT
    assert card["input_modalities"] == card["architecture"]["input_modalities"] == ["text", "image"]
    assert card["output_modalities"] == ["text"]
    assert client.models.retrieve(MODEL).model_extra["max_model_len"] == CONTEXT
    text_only = httpx.get(f"{strict.url}/v1/models").json()["data"][0]  # limits.max_images = 0
    assert text_only["input_modalities"] == ["text"] and text_only["max_model_len"] == CONTEXT


def test_props_answers_what_llama_cpp_reports(served, strict):
    assert httpx.get(f"{served.url}/props").status_code == 401
    props = httpx.get(f"{served.url}/props", params={"model": "anything"}, headers=AUTH).json()
    assert props["default_generation_settings"]["n_ctx"] == CONTEXT
    assert props["default_generation_settings"]["params"]["n_predict"] == -1  # until the context ends
    assert props["total_slots"] == 1 and props["model_path"] == MODEL
    assert props["modalities"] == {"vision": True, "audio": False}
    assert props["chat_template_caps"]["supports_tools"] is False
    assert httpx.get(f"{strict.url}/props").json()["modalities"]["vision"] is False


# -- a stream's first chunk does not wait for the worker ---------------------------------------------
def test_a_stream_sends_its_first_chunk_while_another_request_holds_the_worker(served, client):
    served.llm.delay = 0.05  # 400 tokens: 20 s of work
    try:
        with httpx.stream("POST", f"{served.url}/v1/chat/completions", headers=AUTH, timeout=30, json={
                "model": MODEL, "messages": ask("Tell me a long story."), "max_tokens": 400, "stream": True}) as busy:
            lines = busy.iter_lines()
            assert json.loads(next(lines)[6:])["choices"][0]["delta"]["role"] == "assistant"
            while '"content":"' not in next(lines):  # a token: the worker is generating
                pass
            impatient = client.with_options(timeout=httpx.Timeout(30, read=2.0))  # a 2 s first-byte timeout
            started = time.monotonic()
            stream = impatient.chat.completions.create(model=MODEL, messages=ask("Hi"), max_tokens=3, stream=True)
            first = next(iter(stream))
            waited = time.monotonic() - started
            queue = httpx.get(f"{served.url}/health").json()["queue"]
            stream.close()
        assert first.choices[0].delta.role == "assistant" and waited < 2.0
        assert queue["running"] == 1 and queue["waiting"] == 1  # it was still queued behind the busy one
    finally:
        served.llm.delay = 0.0
    deadline = time.monotonic() + 15
    while httpx.get(f"{served.url}/health").json()["queue"]["running"]:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    good_request(client)


# -- inputs that used to be 500s ------------------------------------------------------------------------
def _chat(**fields) -> dict:
    return {"model": MODEL, "messages": ask("Describe."), "max_tokens": 2, **fields}


LONG_NUMBER = b'{"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1' + b"0" * 5000 + b"}"
# deeper than the parser goes, under limits.max_json_values (100,000: a deeper body is refused unparsed, a 413)
DEEP = b'{"model": "m", "messages": ' + b"[" * 50_000 + b"]" * 50_000 + b"}"

REFUSED = {
    # case: (body (dict → JSON, bytes → raw), code, param, words the message must contain)
    "JSON nested 50k deep": (DEEP, "invalid_json", None, "nested too deeply"),
    "an integer of 5000 digits": (LONG_NUMBER, "invalid_json", None, "number too long"),
    "seed 2^63": (_chat(seed=2**63), "invalid_value", "seed", "seed = 9223372036854775808 is out of range"),
    "seed below -2^63": (_chat(seed=-2**63 - 1), "invalid_value", "seed", "out of range"),
    "a list as role": ({"messages": [{"role": ["user"], "content": "hi"}]}, "invalid_value", "messages[0].role",
                       "an array"),
    "an object as role": ({"messages": [{"role": {"a": 1}, "content": "hi"}]}, "invalid_value", "messages[0].role",
                          "an object"),
    "an object as part type": (_chat(messages=[{"role": "user", "content": [{"type": {"x": 1}}]}]), "invalid_value",
                               "messages[0].content[0].type", "an object"),
    "NUL in a local path": (_chat(messages=ask("?", "/srv/images/a\x00b.png")), "invalid_image_url",
                            "messages[0].content[0].image_url", "NUL"),
    "CR/LF in a URL": (_chat(messages=ask("?", "http://127.0.0.1:9/a.png\r\nX-Injected: 1")), "invalid_image_url",
                       "messages[0].content[0].image_url", "control characters"),
    "a lone surrogate in a path": (_chat(messages=ask("?", "/srv/images/\ud800.png")), "invalid_image_url",
                                   "messages[0].content[0].image_url", "invalid Unicode"),
    "a stop string of 65 characters": (_chat(stop=["x" * 65]), "invalid_value", "stop", "at most 64"),
    "octet-stream that is not an image": (_chat(messages=ask("?", data_uri(b"%PDF-1.7 not an image" * 4,
                                                                           "application/octet-stream"))),
                                          "unsupported_image_type", "messages[0].content[0].image_url",
                                          "not a PNG, JPEG"),
    "a file_id image": (_chat(messages=[{"role": "user", "content": [{"type": "input_image", "file_id": "f1"}]}]),
                        "invalid_type", "messages[0].content[0].image_url", "image_url must be"),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_former_500s_are_named_400s(served, client, case):
    body, code, param, words = REFUSED[case]
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    response = httpx.post(f"{served.url}/v1/chat/completions", content=content, timeout=60,
                          headers={**AUTH, "Content-Type": "application/json"})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert (error["code"], error["param"]) == (code, param) and words in error["message"], error
    assert len(response.text) < 2000  # never an echo of the request
    good_request(client)


def raw(served, body: dict) -> dict:
    """POST ``body`` as ASCII JSON (lone surrogates escaped, as JavaScript's JSON.stringify writes them)."""
    response = httpx.post(f"{served.url}/v1/chat/completions", content=json.dumps(body).encode(), timeout=60,
                          headers={**AUTH, "Content-Type": "application/json"})
    assert response.status_code == 200, response.text
    return response.json()


def test_inputs_that_are_accepted_the_way_they_are_meant(served, client):
    greedy = client.chat.completions.create(**_chat(max_tokens=8, temperature=0))
    tiny = client.chat.completions.create(**_chat(max_tokens=8, temperature=1e-300))  # denormal: greedy
    assert ids(tiny) == ids(greedy)
    surrogate = raw(served, _chat(messages=ask("Say \ud800 now"), max_tokens=4))
    replaced = raw(served, _chat(messages=ask("Say \ufffd now"), max_tokens=4))
    assert surrogate["rksmolvlm"]["token_ids"] == replaced["rksmolvlm"]["token_ids"]  # a lone surrogate: U+FFFD
    assert raw(served, _chat(max_tokens=4, stop=["\ud800" + "y" * 63]))["choices"][0]["finish_reason"]
    seeded = [ids(client.chat.completions.create(**_chat(max_tokens=6, temperature=1.0, seed=-1)))
              for _ in range(2)]
    assert seeded[0] == seeded[1]  # a negative seed (OpenAI's seed is an int64) is a seed like any other
    assert client.chat.completions.create(**_chat(max_tokens=2), extra_body={"top_k": 10**30}).usage.completion_tokens


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "GIF", "WEBP", "BMP", "TIFF"])
def test_octet_stream_images_are_read_by_their_bytes(fmt):
    data = image_bytes(fmt, seed=2)
    request = _reader().read(json.dumps(_chat(messages=ask("?", data_uri(data, "application/octet-stream"))))
                             .encode())
    assert request.messages[0].parts[0].source == data and request.image_bytes == len(data)


def test_octet_stream_and_input_image_parts_answer_like_image_url(client):
    data = image_bytes(seed=6)
    expected = client.chat.completions.create(**_chat(messages=ask("What is it?", data_uri(data)), max_tokens=5))
    octet = client.chat.completions.create(**_chat(
        messages=ask("What is it?", data_uri(data, "application/octet-stream")), max_tokens=5))
    responses_style = client.chat.completions.create(**_chat(max_tokens=5, messages=[{"role": "user", "content": [
        {"type": "input_image", "image_url": data_uri(data)}, {"type": "input_text", "text": "What is it?"}]}]))
    assert ids(octet) == ids(responses_style) == ids(expected)


# -- the config keys ------------------------------------------------------------------------------------
def test_the_client_keys_are_checked():
    from rksmolvlm.runtime.server.config import ConfigError, config_from_dict

    config = config_from_dict({"server": {"cors_origins": ["https://ha.local:8123", "tauri://localhost"],
                                          "strict_model_name": True}, "limits": {"default_max_tokens": 0}})
    assert config.server.cors_origins == ("https://ha.local:8123", "tauri://localhost")
    assert with_overrides(config, {"server.port": 9000}).server.cors_origins == config.server.cors_origins
    for origins, words in ((["http://ha.local:8123/"], "without a path or trailing slash"),
                           ("*", "must be an array of strings"), ([3000], "must be an array of strings")):
        with pytest.raises(ConfigError, match=words):
            config_from_dict({"server": {"cors_origins": origins}})
    with pytest.raises(ConfigError, match="limits.default_max_tokens = -1 is out of range"):
        config_from_dict({"limits": {"default_max_tokens": -1}})

"""The Ollama API (/api/*), started for real (uvicorn on a free loopback port, host-preview engines)
and driven with the official ollama client: chat and generate with images (bytes and file paths),
NDJSON streaming, tags, show, ps, version, the same limits and errors as the OpenAI side (answered
Ollama's way: {"error": message} with the status), the API key, and answers equal to the OpenAI
endpoint's for the same request."""

import base64
import io
import json
import re
from types import SimpleNamespace

import httpx
import ollama
import openai
import pytest

from support.images import rng_image
from rksmolvlm.runners import RUNNERS
from rksmolvlm.runtime.server import BackgroundServer, build_app
from rksmolvlm.runtime.server.ollama import OllamaApi, translate_chat, translate_generate
from rksmolvlm.runtime.server.errors import ApiError
from rksmolvlm.runtime.server.config import ServerConfig, with_overrides

API_KEY = "ollama-test-key-0123456789"
MODEL = "idefics3-256m"
TAG = f"{MODEL}:latest"
QUESTION = "What is in the picture?"


def image_bytes(width=160, height=120, seed=0, fmt="PNG") -> bytes:
    buffer = io.BytesIO()
    rng_image(width, height, "RGB", seed).save(buffer, format=fmt)
    return buffer.getvalue()


def flat_png(width: int, height: int) -> bytes:
    """A one-colour PNG: a few kB, many pixels."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (90, 120, 200)).save(buffer, format="PNG")
    return buffer.getvalue()


CORRUPT_PNG = image_bytes()[:60] + b"\x00garbage" * 20  # a readable header, undecodable pixels


@pytest.fixture(scope="module")
def served(preview_bundles, tmp_path_factory):
    key_file = tmp_path_factory.mktemp("key") / "api_key"
    key_file.write_text(API_KEY + "\n")
    key_file.chmod(0o600)
    config = with_overrides(ServerConfig(), {"bundle": str(preview_bundles[MODEL]), "engine": "host",
                                             "server.api_key_file": str(key_file), "limits.max_images": 3,
                                             "limits.max_body_bytes": 2 * 1024 * 1024,
                                             "limits.max_image_bytes": 1024 * 1024,
                                             "limits.max_image_pixels": 4_000_000})
    app = build_app(config, RUNNERS)
    with BackgroundServer(app, config) as server:
        yield server


@pytest.fixture(scope="module")
def client(served):
    return ollama.Client(host=served.url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60)


@pytest.fixture(scope="module")
def openai_client(served):
    return openai.OpenAI(base_url=f"{served.url}/v1", api_key=API_KEY, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def photo(tmp_path_factory):
    path = tmp_path_factory.mktemp("images") / "photo.png"
    path.write_bytes(image_bytes(300, 200, seed=3))
    return path


def ask(photo, text=QUESTION) -> list[dict]:
    return [{"role": "user", "content": text, "images": [photo.read_bytes()]}]


def openai_reply(openai_client, photo, max_tokens=12, text=QUESTION, system=None, **kwargs):
    uri = "data:image/png;base64," + base64.b64encode(photo.read_bytes()).decode()
    messages = [{"role": "system", "content": system}] if system else []
    messages.append({"role": "user", "content": [{"type": "image_url", "image_url": {"url": uri}},
                                                 {"type": "text", "text": text}]})
    return openai_client.chat.completions.create(model=MODEL, messages=messages, max_tokens=max_tokens,
                                                 temperature=0, **kwargs)


GREEDY = {"temperature": 0, "num_predict": 12}


# -- answers --------------------------------------------------------------------------------------
def test_chat_with_an_image_equals_the_openai_answer(client, openai_client, photo, served):
    reply = client.chat(model=MODEL, messages=ask(photo), options=GREEDY)
    expected = openai_reply(openai_client, photo)
    assert reply.message.role == "assistant"
    assert reply.message.content == expected.choices[0].message.content
    assert reply.done is True and reply.done_reason == expected.choices[0].finish_reason
    assert reply.eval_count == expected.usage.completion_tokens
    assert reply.prompt_eval_count == expected.usage.prompt_tokens
    assert reply.model == MODEL
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z", reply.created_at)
    assert reply.total_duration > 0 and reply.load_duration == 0
    assert reply.prompt_eval_duration > 0 and reply.eval_duration >= 0
    assert reply.total_duration >= reply.prompt_eval_duration + reply.eval_duration
    # the same token ids (the rksmolvlm field, beside Ollama's)
    raw = httpx.post(f"{served.url}/api/chat", headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60, json={
        "model": TAG, "stream": False, "options": GREEDY,
        "messages": [{"role": "user", "content": QUESTION,
                      "images": [base64.b64encode(photo.read_bytes()).decode()]}]})
    assert raw.status_code == 200 and raw.headers["content-type"].startswith("application/json")
    assert raw.json()["rksmolvlm"]["token_ids"] == expected.model_extra["rksmolvlm"]["token_ids"]
    assert raw.json()["model"] == TAG


def test_chat_with_an_image_file_path(client, photo):
    by_bytes = client.chat(model=TAG, messages=ask(photo), options=GREEDY)
    by_path = client.chat(model=TAG, messages=[{"role": "user", "content": QUESTION, "images": [str(photo)]}],
                          options=GREEDY)
    assert by_path.message.content == by_bytes.message.content
    assert by_path.eval_count == by_bytes.eval_count


def test_a_jpeg_image_is_read_from_its_header(client, openai_client, tmp_path):
    jpeg = tmp_path / "photo.jpg"
    jpeg.write_bytes(image_bytes(200, 150, seed=5, fmt="JPEG"))
    reply = client.chat(model=MODEL, messages=ask(jpeg), options=GREEDY)
    uri = "data:image/jpeg;base64," + base64.b64encode(jpeg.read_bytes()).decode()
    expected = openai_client.chat.completions.create(model=MODEL, max_tokens=12, temperature=0, messages=[
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": uri}},
                                     {"type": "text", "text": QUESTION}]}])
    assert reply.message.content == expected.choices[0].message.content


def test_streaming_chat_concatenates_to_the_answer(client, photo, served):
    whole = client.chat(model=MODEL, messages=ask(photo), options=GREEDY)
    chunks = list(client.chat(model=MODEL, messages=ask(photo), options=GREEDY, stream=True))
    assert len(chunks) >= 2
    assert "".join(c.message.content for c in chunks) == whole.message.content
    assert all(c.done is False and c.message.role == "assistant" for c in chunks[:-1])
    last = chunks[-1]
    assert last.done is True and last.done_reason == whole.done_reason and last.message.content == ""
    assert last.eval_count == whole.eval_count and last.prompt_eval_count == whole.prompt_eval_count
    assert last.total_duration > 0
    # stream defaults to true, as in Ollama: NDJSON lines
    with httpx.stream("POST", f"{served.url}/api/chat", headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60,
                      json={"model": MODEL, "options": GREEDY, "messages": [{"role": "user", "content": "Hi"}]}) as r:
        assert r.status_code == 200 and r.headers["content-type"] == "application/x-ndjson"
        lines = [json.loads(line) for line in r.iter_lines() if line]
    assert lines[-1]["done"] is True and all(not line["done"] for line in lines[:-1])


def test_generate_with_images_equals_chat(client, photo):
    chat = client.chat(model=MODEL, options=GREEDY, messages=[
        {"role": "system", "content": "Answer briefly."}, *ask(photo)])
    reply = client.generate(model=MODEL, prompt=QUESTION, system="Answer briefly.", images=[photo.read_bytes()],
                            options=GREEDY)
    assert reply.response == chat.message.content
    assert reply.done is True and reply.eval_count == chat.eval_count
    assert reply.prompt_eval_count == chat.prompt_eval_count
    streamed = list(client.generate(model=MODEL, prompt=QUESTION, system="Answer briefly.", images=[str(photo)],
                                    options=GREEDY, stream=True))
    assert "".join(c.response for c in streamed) == reply.response
    assert streamed[-1].done is True and streamed[-1].eval_count == reply.eval_count


def test_generate_text_only_and_the_openai_answer(client, openai_client):
    reply = client.generate(model=MODEL, prompt="Tell me a story.", options={"num_predict": 10, "temperature": 0})
    expected = openai_client.chat.completions.create(model=MODEL, max_tokens=10, temperature=0,
                                                     messages=[{"role": "user", "content": "Tell me a story."}])
    assert reply.response == expected.choices[0].message.content
    assert reply.done_reason == expected.choices[0].finish_reason == "length"


def test_options_map_to_the_openai_parameters(client, openai_client):
    messages = [{"role": "user", "content": "Pick words."}]
    sampled = {"temperature": 1.0, "top_p": 0.9, "top_k": 20, "seed": 42, "num_predict": 8}
    first = client.chat(model=MODEL, messages=messages, options=sampled)
    assert client.chat(model=MODEL, messages=messages, options=sampled).message.content == first.message.content
    expected = openai_client.chat.completions.create(model=MODEL, messages=messages, max_tokens=8, temperature=1.0,
                                                     top_p=0.9, seed=42, extra_body={"top_k": 20})
    assert first.message.content == expected.choices[0].message.content
    # stop strings cut the answer
    full = client.chat(model=MODEL, messages=[{"role": "user", "content": "Tell me a story."}],
                       options={"num_predict": 24, "temperature": 0}).message.content
    stop = full[len(full) // 2: len(full) // 2 + 3]
    cut = client.chat(model=MODEL, messages=[{"role": "user", "content": "Tell me a story."}],
                      options={"num_predict": 24, "temperature": 0, "stop": [stop]})
    assert cut.message.content == full[:full.index(stop)] and cut.done_reason == "stop"


def test_clients_options_are_accepted_and_ignored_ones_change_nothing(client, photo):
    plain = client.chat(model=MODEL, messages=ask(photo), options=GREEDY)
    # Home Assistant sends num_ctx and keep_alive; unknown options are ignored
    ha = client.chat(model=MODEL, messages=ask(photo), keep_alive=-1, think=False,
                     options={**GREEDY, "num_ctx": 8192, "mirostat": 0, "num_thread": 4, "no_such_option": 1})
    assert ha.message.content == plain.message.content
    # Frigate's defaults: repeat, presence and frequency penalties
    frigate = client.generate(model=MODEL, prompt=QUESTION, images=[photo.read_bytes()], options={
        "temperature": 0.5, "repeat_penalty": 1.05, "presence_penalty": 0.3, "frequency_penalty": 0.1, "seed": 1,
        "num_predict": 8})
    assert frigate.done is True and frigate.eval_count >= 1


def test_an_empty_chat_or_prompt_loads_the_model(client):
    reply = client.chat(model=MODEL, messages=[])
    assert reply.done is True and reply.done_reason == "load" and reply.message.content == ""
    assert client.generate(model=MODEL).done_reason == "load"


def test_history_and_any_model_name(client):
    reply = client.chat(model="llava:7b", options={"num_predict": 3}, messages=[
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "More?"}])
    assert reply.eval_count >= 1 and reply.model == "llava:7b"


def test_tools_are_ignored_and_the_answer_is_text(client):
    parameters = {"type": "object", "properties": {"city": {"type": "string"}}}
    tool = {"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
                                             "parameters": parameters}}
    reply = client.chat(model=MODEL, tools=[tool], options={"num_predict": 3}, messages=[
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "get_weather",
                                                                          "arguments": {"city": "Paris"}}}]},
        {"role": "tool", "content": "{\"temp\": 21}", "tool_name": "get_weather"}])
    assert reply.done is True and reply.message.tool_calls is None


# -- metadata -------------------------------------------------------------------------------------
def test_tags_list_the_served_model(client):
    models = client.list().models
    assert len(models) == 1
    entry = models[0]
    assert entry.model == TAG and entry.size > 0 and re.fullmatch(r"[0-9a-f]{64}", entry.digest)
    assert entry.modified_at.year >= 2024
    assert entry.details.family == "idefics3" and entry.details.families == ["idefics3"]
    assert entry.details.format == "rksmolvlm" and entry.details.parameter_size


def test_show_ps_and_version(client, served):
    for name in (MODEL, TAG):
        shown = client.show(name)
        assert "vision" in shown.capabilities and "completion" in shown.capabilities
        assert shown.modelinfo["idefics3.context_length"] == 2048
        assert shown.details.family == "idefics3"
    running = client.ps().models
    assert [m.model for m in running] == [TAG] and running[0].context_length == 2048
    assert running[0].expires_at.year == 9999
    version = httpx.get(f"{served.url}/api/version")  # no key needed, like /health
    assert version.status_code == 200 and re.fullmatch(r"\d+\.\d+\.\d+", version.json()["version"])


def test_model_names_with_the_strict_policy():
    def api(strict: bool):
        config = with_overrides(ServerConfig(), {"server.strict_model_name": strict})
        model = SimpleNamespace(id="HuggingFaceTB/SmolVLM-256M-Instruct", names=(
            "HuggingFaceTB/SmolVLM-256M-Instruct", "smolvlm-bundle"))
        return OllamaApi(SimpleNamespace(service=None, model=model, config=config))

    strict = api(True)
    assert strict.tag == "HuggingFaceTB/SmolVLM-256M-Instruct:latest"
    for name in ("HuggingFaceTB/SmolVLM-256M-Instruct", "huggingfacetb/smolvlm-256m-instruct:latest",
                 "smolvlm-bundle:latest"):
        assert strict.knows(name)
    assert not strict.knows("llava:7b") and not strict.knows("smolvlm-bundle:7b")
    with pytest.raises(ApiError) as error:
        strict.model_name({"model": "llava:7b"})
    assert error.value.status == 404 and "GET /api/tags" in error.value.message
    assert api(False).knows("llava:7b") and api(False).model_name({}) == strict.tag


# -- limits and errors: the OpenAI side's checks, answered Ollama's way ------------------------------
def _status(call) -> tuple[int, str]:
    with pytest.raises(ollama.ResponseError) as error:
        result = call()
        if not isinstance(result, ollama.ChatResponse | ollama.GenerateResponse):
            list(result)
    return error.value.status_code, error.value.error


def test_too_many_images(client, photo):
    status, message = _status(lambda: client.chat(model=MODEL, messages=[
        {"role": "user", "content": "Describe.", "images": [photo.read_bytes()] * 4}]))
    assert status == 400 and "limits.max_images = 3" in message
    status, message = _status(lambda: client.generate(model=MODEL, prompt="Describe.",
                                                      images=[photo.read_bytes()] * 4, stream=True))
    assert status == 400 and "limits.max_images = 3" in message


@pytest.mark.parametrize("image, expected", [
    (b"this is not an image at all", "cannot be read as a PNG"),
    (flat_png(2100, 2000), "over limits.max_image_pixels"),
])
def test_bad_images_name_the_ollama_field(client, image, expected):
    status, message = _status(lambda: client.chat(model=MODEL, messages=[
        {"role": "user", "content": "Describe.", "images": [image_bytes(), image]}]))
    assert status == 400 and expected in message and message.startswith("messages[0].images[1]")
    status, message = _status(lambda: client.generate(model=MODEL, prompt="Describe.", images=[image]))
    assert status == 400 and expected in message and message.startswith("images[0]")


def test_an_undecodable_image_is_a_400_or_an_error_line_in_the_stream(client):
    messages = [{"role": "user", "content": "Describe.", "images": [CORRUPT_PNG]}]
    status, message = _status(lambda: client.chat(model=MODEL, messages=messages))
    assert status == 400 and "corrupt" in message.lower()
    # a stream has started when the worker finds it: the error is its last line (the client raises it)
    status, message = _status(lambda: client.chat(model=MODEL, stream=True, messages=messages))
    assert status == -1 and "corrupt" in message.lower()


@pytest.mark.parametrize("body, status, expected", [
    ({"messages": [{"role": "user", "content": "hi", "images": ["@@not base64@@"]}]}, 400,
     "messages[0].images[0] is not valid base64"),
    ({"messages": [{"role": "user", "content": "hi", "images": "iVBOR"}]}, 400, "messages[0].images must be an array"),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]}, 400,
     "messages[0].content must be a string"),
    ({"messages": [{"role": "robot", "content": "hi"}]}, 400, "messages[0].role"),
    ({"messages": "hi"}, 400, "messages must be an array"),
    ({"messages": [{"role": "user", "content": "hi"}], "options": {"temperature": 5}}, 400,
     "options.temperature = 5 is out of range"),
    ({"messages": [{"role": "user", "content": "hi"}], "options": {"top_p": "high"}}, 400,
     "options.top_p must be a number"),
    ({"messages": [{"role": "user", "content": "hi"}], "options": {"num_predict": 1.5}}, 400,
     "options.num_predict must be an integer"),
    ({"messages": [{"role": "user", "content": "hi"}], "options": {"repeat_penalty": 0}}, 400,
     "options.repeat_penalty = 0 is out of range"),
    ({"messages": [{"role": "user", "content": "hi"}], "options": [1]}, 400, "options must be an object"),
    ({"messages": [{"role": "user", "content": "hi"}], "format": "yaml"}, 400,
     "format must be \"json\" or a JSON schema object"),
    ({"messages": [{"role": "user", "content": "hi"}], "format": {"type": "object", "properties": {"a": {
        "type": "integer", "not": {"const": 1}}}}}, 400, "schema keyword 'not' at format.properties.a"),
    ({"messages": [{"role": "user", "content": "hi"}], "think": True}, 400, "does not support thinking"),
    ({"messages": [{"role": "user", "content": "hi"}], "stream": "yes"}, 400, "stream must be true or false"),
    ({"messages": [{"role": "user", "content": "hi"}], "model": 7}, 400, "model must be a model name"),
])
def test_bad_chat_requests(served, body, status, expected):
    response = httpx.post(f"{served.url}/api/chat", headers={"Authorization": f"Bearer {API_KEY}"},
                          json={"model": MODEL, "stream": False, **body}, timeout=60)
    assert response.status_code == status
    assert list(response.json()) == ["error"] and expected in response.json()["error"]


@pytest.mark.parametrize("body, expected", [
    ({"prompt": "hi", "raw": True}, "raw is not supported"),
    ({"prompt": "hi", "template": "{{ .Prompt }}"}, "template is not supported"),
    ({"prompt": "hi", "suffix": "end"}, "suffix is not supported"),
    ({"prompt": "hi", "context": [1, 2, 3]}, "context is not supported"),
    ({"prompt": 5}, "prompt must be a string"),
    ({"prompt": "hi", "images": [None]}, "images must be an array of base64"),
])
def test_bad_generate_requests(served, body, expected):
    response = httpx.post(f"{served.url}/api/generate", headers={"Authorization": f"Bearer {API_KEY}"},
                          json={"model": MODEL, "stream": False, **body}, timeout=60)
    assert response.status_code == 400 and expected in response.json()["error"]


def test_body_and_json_limits(served):
    headers = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}
    too_big = httpx.post(f"{served.url}/api/generate", headers=headers, timeout=60,
                         content=b'{"prompt": "' + b"a" * (3 * 1024 * 1024) + b'"}')
    assert too_big.status_code == 413 and "limits.max_body_bytes" in too_big.json()["error"]
    broken = httpx.post(f"{served.url}/api/chat", headers=headers, content=b'{"model": ', timeout=60)
    assert broken.status_code == 400 and "not valid JSON" in broken.json()["error"]


def test_unknown_paths_and_methods_answer_ollama_style(client, served):
    status, message = _status(lambda: client.pull("llava"))
    assert status == 404 and "/api/pull" in message and "/api/chat" in message
    wrong = httpx.get(f"{served.url}/api/chat")
    assert wrong.status_code == 405 and wrong.headers["allow"] == "POST" and "error" in wrong.json()


def test_the_api_key_is_required(served, client):
    for headers in (None, {"Authorization": "Bearer wrong-key-wrong-key"}):
        keyless = ollama.Client(host=served.url, headers=headers, timeout=10)
        for call in (keyless.list, lambda keyless=keyless: keyless.show(MODEL), keyless.ps,
                     lambda keyless=keyless: keyless.chat(model=MODEL, messages=[{"role": "user", "content": "hi"}]),
                     lambda keyless=keyless: keyless.generate(model=MODEL, prompt="hi", stream=True)):
            status, message = _status(call)
            assert status == 401 and "Authorization: Bearer" in message and API_KEY not in message
    assert client.list().models  # the right key works


def test_metrics_count_the_ollama_paths(client, served):
    client.generate(model=MODEL, prompt="Hi", options={"num_predict": 2})
    _status(lambda: client.chat(model=MODEL, messages=[{"role": "user", "content": "x", "images": [b"nope"]}]))
    text = httpx.get(f"{served.url}/metrics").text
    assert re.search(r'rksmolvlm_requests_total\{path="/api/generate",status="200"\} [1-9]', text)
    assert re.search(r'rksmolvlm_requests_total\{path="/api/chat",status="400"\} [1-9]', text)
    assert re.search(r'rksmolvlm_errors_total\{code="invalid_image"\} [1-9]', text)


# -- translation (no server) -----------------------------------------------------------------------
def test_translation_to_a_chat_completion_body():
    chat = translate_chat({"messages": [{"role": "user", "content": "Hi", "images": ["aGk="]}],
                           "options": {"num_predict": -1, "num_ctx": 4096, "top_k": 5}}, TAG)
    assert chat.payload["stream"] is True and "max_tokens" not in chat.payload and chat.payload["top_k"] == 5
    assert chat.payload["messages"][0]["content"] == [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,aGk="}}, {"type": "text", "text": "Hi"}]
    generate = translate_generate({"prompt": "Hi", "system": "Sys", "stream": False,
                                   "options": {"num_predict": 7, "repeat_penalty": 1.1}}, TAG)
    assert generate.payload == {"messages": [{"role": "system", "content": "Sys"}, {"role": "user", "content": "Hi"}],
                                "stream": False, "max_tokens": 7}
    assert generate.repeat_penalty == 1.1
    assert translate_generate({"system": "Sys"}, TAG).load and translate_chat({}, TAG).load
    error = ApiError(400, "max_tokens = 0 is out of range: use at least 1", "invalid_value", "max_tokens")
    assert generate.rename(error).message == "options.num_predict = 0 is out of range: use at least 1"
    error = ApiError(400, "messages[1].content[0].image_url is empty", "invalid_image", "messages[1].content[0]."
                     "image_url")
    assert generate.rename(error).message == "images[0] is empty" and generate.rename(error).param == "images[0]"

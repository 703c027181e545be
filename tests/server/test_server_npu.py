"""The server on the NPU engines, without torch: the OpenAI and Ollama chat endpoints answer an image
question through RknnLiteVisionEncoder (on the rknn-toolkit-lite2 contract double, one runtime per core)
and RkllmEngine on the librkllmrt C double compiled here, which streams a scripted answer. In the board
slice (scripts/board_check/) this is the board's server stack on arm64, the NPU itself aside."""

from __future__ import annotations

import base64
import ctypes
import io
import json
import shutil
import subprocess

import httpx
import pytest

from support import DOUBLES
from support.images import rng_image
from rksmolvlm.runtime.engines import GenerationConfig
from rksmolvlm.runtime.loader import RuntimeBundle
from rksmolvlm.runtime.npu_engines import RkllmEngine, RknnLiteVisionEncoder
from rksmolvlm.runtime.runner import Runner
from rksmolvlm.runtime.server import BackgroundServer, build_app
from rksmolvlm.runtime.server.config import ServerConfig, with_overrides
from rksmolvlm.runtime.server.web import WebPage

pytestmark = pytest.mark.skipif(shutil.which("cc") is None, reason="needs a C compiler (the librkllmrt double)")

MODEL = "idefics3-256m"
BROWSER = "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"
ANSWER = "A small picture."


@pytest.fixture(scope="module")
def library(tmp_path_factory):
    path = tmp_path_factory.mktemp("rkllm130") / "librkllmrt.so"
    subprocess.run(["cc", "-shared", "-fPIC", "-O1", "-Wall", "-Werror", "-DRKLLM_ABI=130", "-o", str(path),
                    str(DOUBLES / "librkllmrt" / "rkllm_double.c"), "-lpthread"], check=True)
    return path


@pytest.fixture
def served(preview_bundles, library, rknnlite_double, tmp_path):
    """(server URL, the double, the answer's token ids, the RKNNLite double class)."""
    bundle_dir = preview_bundles[MODEL]
    lib = ctypes.CDLL(str(library))  # the same handle RkllmEngine opens: the script is shared
    lib.double_script_push.argtypes = [ctypes.c_int32, ctypes.c_char_p, ctypes.c_int]
    lib.double_last_run_json.restype = ctypes.c_char_p
    lib.double_last_error.restype = ctypes.c_char_p
    lib.double_reset()
    model = tmp_path / "llm.rkllm"
    model.write_bytes(b"model")

    def load(bundle: RuntimeBundle) -> Runner:
        lib.double_set_hidden(bundle.manifest.model.text_hidden_size)
        engine = RkllmEngine(model, library, "1.3", bundle.max_context, GenerationConfig(max_new_tokens=64))
        return Runner(bundle, RknnLiteVisionEncoder(bundle.file("vision.rknn"), [1, 2, 4]), engine)

    tokenizer = RuntimeBundle.open(bundle_dir).tokenizer
    answer = [*tokenizer.encode_text(" " + ANSWER), RuntimeBundle.open(bundle_dir).stop_ids[0]]
    config = with_overrides(ServerConfig(), {"bundle": str(bundle_dir), "engine": "npu"})
    with BackgroundServer(build_app(config, load=load), config) as server:
        yield server.url, lib, answer, tokenizer, rknnlite_double


def _script(lib, answer, tokenizer) -> None:
    for token in answer:
        assert lib.double_script_push(token, tokenizer.decode([token]).encode(), 0) == 0


def _photo() -> str:
    buffer = io.BytesIO()
    rng_image(640, 480, seed=5).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def test_openai_chat_with_an_image_on_the_npu_engines(served):
    url, lib, answer, tokenizer, rknnlite = served
    _script(lib, answer, tokenizer)
    body = {"model": MODEL, "temperature": 0, "messages": [{"role": "user", "content": [
        {"type": "text", "text": "What is it?"},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64," + _photo()}}]}]}
    reply = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=300)
    assert reply.status_code == 200, reply.text
    data = reply.json()
    assert data["choices"][0]["message"]["content"].strip() == ANSWER
    assert data["choices"][0]["finish_reason"] == "stop"
    run = json.loads(lib.double_last_run_json())
    assert lib.double_last_error().decode() == ""
    assert run["input_type"] == 2 and run["n_tokens"] == data["usage"]["prompt_tokens"]  # embeddings, spliced
    assert sum(len(r.calls) for r in rknnlite.instances) > 1  # the tiles went through the RKNNLite runtimes


def test_ollama_chat_streams_the_answer_on_the_npu_engines(served):
    url, lib, answer, tokenizer, rknnlite = served
    _script(lib, answer, tokenizer)
    body = {"model": MODEL, "messages": [{"role": "user", "content": "What is it?", "images": [_photo()]}],
            "options": {"temperature": 0}}
    with httpx.stream("POST", f"{url}/api/chat", json=body, timeout=300) as reply:
        assert reply.status_code == 200
        lines = [json.loads(line) for line in reply.iter_lines() if line]
    assert "".join(line["message"]["content"] for line in lines).strip() == ANSWER
    assert lines[-1]["done"] is True and lines[-1]["done_reason"] == "stop"
    assert all(not line["done"] for line in lines[:-1]) and len(lines) > 2  # streamed, not one block
    assert json.loads(lib.double_last_run_json())["input_type"] == 2


def test_the_web_page_and_its_headers_from_the_npu_server(served):
    url = served[0]
    page = httpx.get(url + "/", headers={"Accept": BROWSER}, timeout=60)
    assert page.status_code == 200 and page.content == WebPage.load().body
    assert page.headers["content-type"] == "text/html; charset=utf-8"
    assert page.headers["x-content-type-options"] == "nosniff"
    csp = dict(d.strip().split(" ", 1) for d in page.headers["content-security-policy"].split(";"))
    assert csp["default-src"] == "'none'" and csp["connect-src"] == "'self'" and csp["frame-ancestors"] == "'none'"
    index = httpx.get(url + "/", headers={"Accept": "application/json"}, timeout=60)
    assert index.status_code == 200 and index.headers["content-type"].startswith("application/json")
    health = httpx.get(url + "/health", timeout=60).json()
    assert health["status"] == "ok", health

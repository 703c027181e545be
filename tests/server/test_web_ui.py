"""The web page at GET /, over HTTP: a browser's navigation gets the page (one self-contained file,
a strict Content-Security-Policy allowing exactly its inline style and script by hash, nosniff),
every other client the JSON index as before (Accept negotiation, HEAD alike); ``server.web_ui``
switches it ("auto": on for loopback or with an API key) and is validated."""

import base64
import hashlib
import re

import httpx
import pytest
from starlette.testclient import TestClient

from rksmolvlm.runners import RUNNERS
from rksmolvlm.runtime.server import BackgroundServer, build_app
from rksmolvlm.runtime.server.web import WebPage, page_enabled, prefers_html
from rksmolvlm.runtime.server.config import ConfigError, ServerConfig, config_from_dict, with_overrides

MODEL = "idefics3-256m"
API_KEY = "web-key-0123456789abcdef"
# What Chromium sends when it navigates to a page.
BROWSER = "text/html,application/xhtml+xml,application/xml;q=0.9,image/avif,image/webp,image/apng,*/*;q=0.8"


def _config(bundle, **overrides) -> ServerConfig:
    return with_overrides(ServerConfig(), {"bundle": str(bundle), "engine": "host", "verify_bundle": False,
                                           **overrides})


@pytest.fixture(scope="module")
def served(preview_bundles):
    """A real server (uvicorn on loopback, no key: the page is on by default)."""
    config = _config(preview_bundles[MODEL])
    with BackgroundServer(build_app(config, RUNNERS), config) as server:
        yield server


def _index(app, accept: str | None) -> httpx.Response:
    """GET / on an app without starting its model (the index needs none)."""
    headers = {} if accept is None else {"Accept": accept}
    return TestClient(app, base_url="http://127.0.0.1").get("/", headers=headers)


def test_a_browser_gets_the_page_with_a_strict_csp(served):
    page = httpx.get(served.url + "/", headers={"Accept": BROWSER})
    assert page.status_code == 200
    assert page.headers["content-type"] == "text/html; charset=utf-8"
    assert page.headers["x-content-type-options"] == "nosniff"
    assert "accept" in page.headers["vary"].lower()
    csp = dict(d.strip().split(" ", 1) for d in page.headers["content-security-policy"].split(";"))
    assert csp["default-src"] == "'none'" and csp["connect-src"] == "'self'"
    assert csp["img-src"] == "'self' blob: data:" and csp["media-src"] == "blob: data:"
    assert csp["frame-ancestors"] == "'none'" and csp["form-action"] == "'none'"
    html = page.content
    for tag, directive in (("script", "script-src"), ("style", "style-src")):
        blocks = re.findall(rb"<%s>(.*?)</%s>" % (tag.encode(), tag.encode()), html, re.S)
        assert len(blocks) == 1
        digest = base64.b64encode(hashlib.sha256(blocks[0]).digest()).decode()
        assert csp[directive] == f"'sha256-{digest}'"  # the inline block and nothing else: no 'unsafe-inline'
    text = html.decode()
    assert not re.search(r"https?://", text), "the page must fetch nothing from elsewhere (the board is offline)"
    assert not re.search(r"\son[a-z]+\s*=", text), "inline event handlers are refused by the CSP"
    assert not re.search(r"\sstyle\s*=", text), "style attributes are refused by the CSP"
    assert "<script src" not in text and "<link rel=\"stylesheet\"" not in text
    assert len(html) < 32 * 1024, f"the page is {len(html):,} bytes: keep it small"
    assert html == WebPage.load().body


def test_the_page_asks_the_chat_api_and_labels_its_controls(served):
    text = httpx.get(served.url + "/", headers={"Accept": BROWSER}).text
    assert '"/v1/chat/completions"' in text and "stream: true" in text
    assert 'accept="image/*,video/*"' in text and "capture=" in text
    for control in re.findall(r'<(?:input|textarea|select)[^>]*\sid="([a-z]+)"', text):
        assert f'for="{control}"' in text or control == "keep", f"#{control} has no label"


@pytest.mark.parametrize("accept", [None, "*/*", "application/json", "application/json, text/html;q=0.9",
                                    "text/html;q=0.5, application/json", "text/plain", "text/*, application/*"])
def test_other_clients_still_get_the_json_index(served, accept):
    headers = {} if accept is None else {"Accept": accept}
    index = httpx.get(served.url + "/", headers=headers)
    assert index.status_code == 200 and index.headers["content-type"] == "application/json"
    assert index.json()["name"] == "rksmolvlm" and "POST /v1/chat/completions" in index.json()["endpoints"]
    assert "accept" in index.headers["vary"].lower()  # caches keep the two answers apart


def test_head_answers_as_get_without_a_body(served):
    page = httpx.head(served.url + "/", headers={"Accept": BROWSER})
    assert page.status_code == 200 and page.content == b""
    assert page.headers["content-type"].startswith("text/html")
    assert int(page.headers["content-length"]) == len(WebPage.load().body)
    assert "default-src 'none'" in page.headers["content-security-policy"]
    index = httpx.head(served.url + "/")
    assert index.status_code == 200 and index.content == b""
    assert index.headers["content-type"] == "application/json"
    # the connection still serves the next request after a HEAD
    with httpx.Client() as client:
        assert client.head(served.url + "/", headers={"Accept": BROWSER}).status_code == 200
        assert client.get(served.url + "/health").json()["ready"] is True


@pytest.mark.parametrize("accept, html", [
    (BROWSER, True), ("text/html", True), ("text/html;q=0.9, application/json;q=0.8", True),
    ("text/*", True), ("*/*", False), ("", False), ("application/json", False), ("text/html;q=0", False),
    ("application/json;q=0.1, */*;q=0.5", True), ("text/html;q=abc, application/json;q=0.2", False),
    ("application/*, text/html;q=0.9", False), ("TEXT/HTML", True)])
def test_accept_negotiation(accept, html):
    assert prefers_html(accept) is html


@pytest.mark.parametrize("host, key, setting, on", [
    ("127.0.0.1", False, "auto", True), ("::1", False, "auto", True), ("localhost", False, "auto", True),
    ("0.0.0.0", False, "auto", False), ("192.168.1.20", False, "auto", False), ("0.0.0.0", True, "auto", True),
    ("0.0.0.0", False, True, True), ("127.0.0.1", False, False, False), ("0.0.0.0", True, False, False)])
def test_web_ui_auto_is_on_for_loopback_or_a_key(host, key, setting, on):
    config = config_from_dict({"server": {"host": host, "web_ui": setting}})
    assert page_enabled(config, has_api_key=key) is on


def test_the_switch_decides_what_a_browser_gets(preview_bundles, tmp_path):
    bundle = preview_bundles[MODEL]
    off = build_app(_config(bundle, **{"server.web_ui": False}), RUNNERS)
    assert off.state.api.web_page is None
    assert _index(off, BROWSER).headers["content-type"] == "application/json"
    exposed = build_app(_config(bundle, **{"server.host": "0.0.0.0"}), RUNNERS)  # auto, open network, no key: off
    assert _index(exposed, BROWSER).headers["content-type"] == "application/json"
    key_file = tmp_path / "key"
    key_file.write_text(API_KEY)
    keyed = build_app(_config(bundle, **{"server.host": "0.0.0.0", "server.api_key_file": str(key_file)}), RUNNERS)
    page = _index(keyed, BROWSER)  # the page itself needs no key: it asks for one when the API answers 401
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    forced = build_app(_config(bundle, **{"server.host": "0.0.0.0", "server.web_ui": True}), RUNNERS)
    assert _index(forced, BROWSER).headers["content-type"].startswith("text/html")


@pytest.mark.parametrize("value", ["yes", "on", 1, "true", ["auto"]])
def test_web_ui_takes_true_false_or_auto(value):
    with pytest.raises(ConfigError, match=r"server\.web_ui must be true, false or \"auto\""):
        config_from_dict({"server": {"web_ui": value}})
    assert config_from_dict({"server": {"web_ui": "auto"}}).server.web_ui == "auto"
    assert config_from_dict({"server": {"web_ui": False}}).server.web_ui is False
    assert ServerConfig().server.web_ui == "auto"

"""The web page at ``GET /``: one self-contained HTML file (its CSS and JavaScript inline, nothing
fetched from elsewhere: the board is often offline) that talks to ``/v1/chat/completions`` like any
other client.

- ``WebPage``: the page's bytes and the headers it is served with, a strict Content-Security-Policy
  allowing exactly its one inline style and one inline script by their sha256.
- ``page_enabled``: ``server.web_ui`` resolved ("auto": on when the server listens on loopback or
  has an API key — a page on an open network port without a key would hand the model to anyone
  who browses there).
- ``prefers_html``: whether a request's Accept header asks for HTML over JSON (a browser's
  navigation does; curl's ``*/*``, SDKs and Ollama clients probing ``GET /`` get the JSON index).
"""

from __future__ import annotations

import base64
import hashlib
import re
from dataclasses import dataclass
from importlib import resources

from rksmolvlm.errors import RkSmolVLMError
from rksmolvlm.runtime.server.config import ServerConfig

__all__ = ["WebPage", "page_enabled", "prefers_html", "PAGE_FILE"]

PAGE_FILE = "page.html"
_INLINE = {"style": re.compile(rb"<style>(.*?)</style>", re.S), "script": re.compile(rb"<script>(.*?)</script>", re.S)}


@dataclass(frozen=True)
class WebPage:
    """The page and its response headers."""

    body: bytes
    headers: dict[str, str]

    @classmethod
    def load(cls) -> "WebPage":
        """The page shipped as package data, with a CSP naming the hashes of its inline style and script."""
        body = resources.files(__name__).joinpath(PAGE_FILE).read_bytes()
        sources = {}
        for kind, pattern in _INLINE.items():
            blocks = pattern.findall(body)
            if len(blocks) != 1:  # a second block would be refused by the browser: fail here, in the tests
                raise RkSmolVLMError(f"the web page must hold exactly one <{kind}> block, it holds {len(blocks)}")
            sources[kind] = "'sha256-" + base64.b64encode(hashlib.sha256(blocks[0]).digest()).decode() + "'"
        csp = "; ".join([
            "default-src 'none'", f"script-src {sources['script']}", f"style-src {sources['style']}",
            "connect-src 'self'", "img-src 'self' blob: data:", "media-src blob: data:", "frame-ancestors 'none'",
            "form-action 'none'", "base-uri 'none'"])
        headers = {"Content-Security-Policy": csp, "X-Content-Type-Options": "nosniff", "X-Frame-Options": "DENY",
                   "Referrer-Policy": "no-referrer", "Cache-Control": "no-cache", "Vary": "Accept",
                   "Cross-Origin-Opener-Policy": "same-origin"}
        return cls(body, headers)


def page_enabled(config: ServerConfig, has_api_key: bool) -> bool:
    """``server.web_ui``: true, false, or "auto" = on when listening on loopback or with an API key."""
    from rksmolvlm.runtime.server.guards import is_loopback

    setting = config.server.web_ui
    if setting == "auto":
        return has_api_key or is_loopback(config.server.host)
    return bool(setting)


def prefers_html(accept: str | None) -> bool:
    """True when ``accept`` ranks text/html above application/json (each by its most specific matching
    range, RFC 9110 12.5.1): a browser's navigation, not ``*/*`` (curl) nor a JSON client."""
    if not accept:
        return False
    ranges = []
    for item in accept.split(",")[:64]:  # a header of thousands of ranges is not a browser's
        kind, *params = [p.strip() for p in item.split(";")]
        q = 1.0
        for param in params:
            name, _, value = param.partition("=")
            if name.strip().lower() == "q":
                try:
                    q = min(max(float(value), 0.0), 1.0)
                except ValueError:
                    q = 0.0
        ranges.append((kind.lower(), q))
    return _quality(ranges, "text", "html") > _quality(ranges, "application", "json")


def _quality(ranges: list[tuple[str, float]], main: str, sub: str) -> float:
    best, specificity = 0.0, -1
    for kind, q in ranges:
        rank = {f"{main}/{sub}": 2, f"{main}/*": 1, "*/*": 0}.get(kind, -1)
        if rank > specificity:
            best, specificity = q, rank
    return best

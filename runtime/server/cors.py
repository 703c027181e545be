"""CORS: which web pages (origins) may call the API from a browser (``server.cors_origins``).

A preflight (``OPTIONS`` with ``Access-Control-Request-Method``) is answered here, before routing
and before the API-key check: browsers never send credentials on a preflight. Answers to an allowed
origin carry ``Access-Control-Allow-Origin``; a disallowed origin gets no CORS headers, so its page
cannot read the answer (and its preflight is refused, so a JSON POST never leaves the browser).
With no origins configured this middleware is not installed at all.
"""

from __future__ import annotations

import json
import re
from typing import Sequence

__all__ = ["Cors", "CorsPolicy", "ALLOWED_METHODS"]

ALLOWED_METHODS = "GET, POST, OPTIONS"
_ALWAYS_HEADERS = ("Authorization", "Content-Type")
_EXPOSED = "X-Request-Id, Retry-After"
_MAX_AGE = "600"
_TOKEN = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]{1,64}$")  # an HTTP header name
_MAX_REQUESTED = 32


class CorsPolicy:
    """The allowed origins: exact ``scheme://host[:port]`` strings (case-insensitive), or ``*`` for any."""

    def __init__(self, origins: Sequence[str]):
        self.any = "*" in origins
        self.origins = frozenset(o.lower() for o in origins if o != "*")

    def allows(self, origin: str) -> bool:
        return self.any or origin.lower() in self.origins


class Cors:
    """ASGI middleware applying a CorsPolicy."""

    def __init__(self, app, origins: Sequence[str]):
        self.app = app
        self.policy = CorsPolicy(origins)

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        origin = headers.get("origin")
        if origin is None:
            return await self.app(scope, receive, send)
        allowed = self.policy.allows(origin)
        if scope["method"] == "OPTIONS" and "access-control-request-method" in headers:
            return await self._preflight(origin, allowed, headers.get("access-control-request-headers", ""), send)
        if not allowed:
            return await self.app(scope, receive, send)
        extra = [(b"access-control-allow-origin", origin.encode("latin-1")), (b"vary", b"Origin"),
                 (b"access-control-expose-headers", _EXPOSED.encode())]

        async def send_with_cors(message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), *extra]}
            await send(message)

        await self.app(scope, receive, send_with_cors)

    async def _preflight(self, origin: str, allowed: bool, requested: str, send) -> None:
        if not allowed:
            body = json.dumps({"error": {
                "message": "this origin may not call the API from a browser: add it to server.cors_origins in the "
                           "server config", "type": "permission_error", "param": None,
                "code": "cors_origin_not_allowed"}}).encode()
            await _answer(send, 403, [(b"content-type", b"application/json"), (b"vary", b"Origin")], body)
            return
        names = [h.strip() for h in requested.split(",")[:_MAX_REQUESTED] if h.strip()]
        # the page's own extra headers (e.g. the openai JS client's X-Stainless-*) are allowed: the origin is trusted
        allow = list(dict.fromkeys([*_ALWAYS_HEADERS, *(n for n in names if _TOKEN.match(n))]))
        await _answer(send, 204, [(b"access-control-allow-origin", origin.encode("latin-1")), (b"vary", b"Origin"),
                                  (b"access-control-allow-methods", ALLOWED_METHODS.encode()),
                                  (b"access-control-allow-headers", ", ".join(allow).encode()),
                                  (b"access-control-max-age", _MAX_AGE.encode())], b"")


async def _answer(send, status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [*headers, (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})

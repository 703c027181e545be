"""Guards: requests a web page could make the browser send, refused before any endpoint runs.

A page on any site can make the visitor's browser send a "simple" cross-site request (a form post,
``fetch`` with ``mode: "no-cors"``) to a server on the visitor's own machine or network; with DNS
rebinding it can even read the answers, its own host name now resolving to 127.0.0.1. Three checks:

- ``Content-Type``: a POST must carry ``application/json`` (else 415 ``unsupported_media_type``).
  The types a page may send without a CORS preflight are text/plain, form data and none at all.
- ``Host``: when the server listens on loopback without an API key, the Host header must be one of
  ``server.allowed_hosts`` (any port; default localhost, 127.0.0.1, [::1]), else 403
  ``host_not_allowed`` — a rebinding page's requests carry the page's own host name. With an API key,
  on every path (/health, /metrics, /api/version and the web page need no key, and a rebinding page
  could read them): a request without the valid key must name an IP address, one of
  ``server.allowed_hosts`` or this machine's own name (``hostname``, ``hostname.local``); a rebinding
  page has only its own DNS name. Health checks (``curl http://127.0.0.1:8080/health``, Docker's
  ``localhost``, Kubernetes' pod IP) pass; a client with the key passes whatever name it uses.
- ``Origin``: without an API key, a state-changing request (POST, PUT, PATCH, DELETE) that a browser
  sent from another origin must come from an origin ``server.cors_origins`` allows, else 403
  ``origin_not_allowed``. Programs (curl, SDKs) send no Origin; same-origin requests are allowed.

With an API key a page cannot authenticate, so the Origin check is left to the key.
Refusals have the OpenAI error body, or Ollama's ``{"error": "..."}`` under /api/.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import socket
from typing import Callable, Sequence
from urllib.parse import urlsplit

from rksmolvlm.runtime.server.cors import CorsPolicy
from rksmolvlm.runtime.server.config import ServerConfig
from rksmolvlm.runtime.server.errors import ApiError

__all__ = ["RequestGuard", "HostPolicy", "host_check_summary", "is_loopback"]

_STATE_CHANGING = frozenset({"POST", "PUT", "PATCH", "DELETE"})
_WITH_BODY = frozenset({"POST", "PUT", "PATCH"})


def is_loopback(host: str) -> bool:
    """True for a listening address only this machine can reach (127.0.0.0/8, ::1, localhost)."""
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return host.lower().rstrip(".") == "localhost"


def host_check_summary(host: str, allowed: Sequence[str], has_key: bool) -> str:
    """What the Host check does for a server listening on ``host`` (``serve --check``'s line): always
    saying whether an API key is set."""
    if "*" in allowed:
        return "off (server.allowed_hosts = [\"*\"])" + ("" if has_key else "; no API key is set")
    names = ", ".join(allowed)
    if has_key:
        return (f"on for requests without the API key: IP addresses, {names} and this machine's names "
                f"({', '.join(_own_names())}); with the key, any name")
    if is_loopback(host):
        return f"{names} (no API key is set; the server listens on loopback)"
    return (f"off: no API key is set and the server listens on {host}, beyond loopback, so anyone who can "
            "connect may use the model (set server.api_key_file)")


def _split_host(value: str) -> tuple[str, str | None] | None:
    """``host[:port]`` (``[v6]:port`` too) → (lower-case name without a trailing dot, port or None)."""
    value = value.strip().lower()
    if value.startswith("["):
        name, bracket, rest = value[1:].partition("]")
        if not bracket or (rest and not rest.startswith(":")):
            return None
        port = rest[1:] or None
    else:
        name, colon, port = value.partition(":")
        port = port if colon else None
        if ":" in (port or ""):
            return None
    if port is not None and not port.isdigit():
        return None
    return name.rstrip("."), port


class HostPolicy:
    """``server.allowed_hosts``: names (any port) or ``name:port``; ``*`` allows any."""

    def __init__(self, allowed: Sequence[str]):
        self.any = "*" in allowed
        self.entries = [entry for entry in (_split_host(a) for a in allowed if a != "*") if entry]

    def allows(self, host: str) -> bool:
        if self.any:
            return True
        parsed = _split_host(host)
        if parsed is None:
            return False
        name, port = parsed
        return any(name == n and (p is None or p == port) for n, p in self.entries)


class RequestGuard:
    """ASGI middleware applying the three checks of the module docstring."""

    def __init__(self, app, config: ServerConfig, api_key: str | None,
                 on_refuse: Callable[[dict, ApiError], None] | None = None):
        self.app = app
        server = config.server
        self.hosts = HostPolicy(server.allowed_hosts)
        self.api_key = api_key
        # with a key: every path, for requests without it (the names below, and any IP address)
        self.check_host = (api_key is not None or is_loopback(server.host)) and not self.hosts.any
        self.own_names = HostPolicy(_own_names()) if api_key is not None else None
        self.check_origin = api_key is None
        self.origins = CorsPolicy(server.cors_origins)
        self.allowed_hosts = list(server.allowed_hosts)
        self.on_refuse = on_refuse or (lambda scope, error: None)

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http":
            error = self.check(scope)
            if error is not None:
                self.on_refuse(scope, error)
                return await _answer(send, error, ollama=scope["path"].startswith("/api/"))
        await self.app(scope, receive, send)

    def check(self, scope) -> ApiError | None:
        """The error a request gets, or None to let it through."""
        headers: dict[str, str] = {}
        for key, value in scope.get("headers", []):
            headers.setdefault(key.decode("latin-1").lower(), value.decode("latin-1"))
        method = scope["method"]
        host = headers.get("host")
        if self.check_host and host is not None and not self.hosts.allows(host):
            if self.own_names is None:
                return ApiError(403, f"the Host header {host[:100]!r} is not a name this server answers to: it "
                                "listens on loopback without an API key, so only server.allowed_hosts = "
                                f"{self.allowed_hosts} are (a web page using DNS rebinding sends its own name); if "
                                "you reach the server by this name on purpose, add it to server.allowed_hosts",
                                "host_not_allowed", type="permission_error")
            if not (_is_address(host) or self.own_names.allows(host) or self._has_key(headers)):
                return ApiError(403, f"the Host header {host[:100]!r} is not a name this server answers to without "
                                "its API key: send 'Authorization: Bearer KEY', reach the server by its IP address "
                                f"or its own name, or add this name to server.allowed_hosts = {self.allowed_hosts} "
                                "(a web page using DNS rebinding sends its own name)", "host_not_allowed",
                                type="permission_error")
        origin = headers.get("origin")
        if (self.check_origin and origin is not None and method in _STATE_CHANGING
                and not self.origins.allows(origin) and not _same_origin(origin, host)):
            return ApiError(403, f"a web page on {origin[:100]!r} may not call this API (a browser sent this request "
                            "for it): add the origin to server.cors_origins, or set server.api_key_file",
                            "origin_not_allowed", type="permission_error")
        if method in _WITH_BODY:
            media_type = headers.get("content-type", "").split(";", 1)[0].strip().lower()
            if media_type != "application/json":
                shown = repr(headers["content-type"][:100]) if "content-type" in headers else "none"
                return ApiError(415, f"the request body must be JSON sent with 'Content-Type: application/json' (this "
                                f"request has {shown}); e.g. curl -H 'Content-Type: application/json' -d @body.json",
                                "unsupported_media_type")
        return None


    def _has_key(self, headers: dict[str, str]) -> bool:
        scheme, _, token = headers.get("authorization", "").partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), (self.api_key or "").encode())


def _is_address(host: str) -> bool:
    """``host[:port]`` names an IP address (no DNS name: nothing a rebinding page can send)."""
    parsed = _split_host(host)
    if parsed is None:
        return False
    try:
        ipaddress.ip_address(parsed[0])
    except ValueError:
        return False
    return True


def _own_names() -> list[str]:
    """This machine's names, as a browser on the network reaches it: the host name and its mDNS form."""
    name = socket.gethostname().lower().rstrip(".")
    short = name.split(".", 1)[0]
    return sorted({name, short, f"{short}.local", "localhost"} - {"", ".local"})


def _same_origin(origin: str, host: str | None) -> bool:
    """True when a browser's Origin names this server as the client reached it (the Host header)."""
    if host is None:
        return False
    try:
        parts = urlsplit(origin)
        port = parts.port
    except ValueError:
        return False
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return False
    ours = _split_host(host)
    if ours is None:
        return False
    default = "443" if parts.scheme == "https" else "80"
    return parts.hostname.rstrip(".") == ours[0] and str(port or default) == (ours[1] or "80")


async def _answer(send, error: ApiError, ollama: bool) -> None:
    body = json.dumps({"error": error.message} if ollama else error.body()).encode()  # Ollama's form under /api
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in error.headers.items()]
    await send({"type": "http.response.start", "status": error.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})

"""Remote images and videos (``images.allow_remote``): one fetch of an http(s) URL, bounded in every way.

- Only http and https, without credentials, spaces or control characters in the URL.
- The host is resolved once and every address checked: loopback, private, link-local, multicast,
  reserved and other non-public addresses (IPv4, IPv6 and IPv4-mapped IPv6) are refused unless
  ``allow_private`` — and the connection goes to the address that was checked (no second lookup a
  rebinding DNS server could answer differently); https still verifies the certificate for the name.
- Redirects are followed by hand, at most ``MAX_REDIRECTS``, each hop checked like the first URL
  (so never to another scheme or to a refused address).
- One deadline covers the whole fetch: the lookup, connecting, TLS, every redirect and every read.
  A watchdog shuts the socket when it passes, so a server that sends a byte a second is cut off.
- At most ``max_bytes`` are read. Errors say what failed in our own words: nothing the remote
  server sent (body, headers, reason phrase) is repeated to the client.
"""

from __future__ import annotations

import concurrent.futures
import http.client
import ipaddress
import re
import socket
import ssl
import threading
import time
import urllib.parse
from dataclasses import dataclass

from rksmolvlm.errors import RkSmolVLMError

__all__ = ["FetchError", "Fetched", "fetch", "MAX_REDIRECTS", "is_public_address"]

MAX_REDIRECTS = 3
_REDIRECTS = (301, 302, 303, 307, 308)
_UNSAFE_URL = re.compile(r"[\x00-\x20\x7f-\x9f\\]")  # controls, spaces and backslashes: never in a URL we fetch
_RESOLVER = concurrent.futures.ThreadPoolExecutor(max_workers=4, thread_name_prefix="rksmolvlm-dns")


class FetchError(RkSmolVLMError):
    """A remote image or video that cannot be fetched: ``code`` is the API error code, ``status`` the HTTP
    status."""

    def __init__(self, message: str, code: str = "image_fetch_failed", status: int = 400):
        super().__init__(message)
        self.code, self.status = code, status


@dataclass(frozen=True)
class Fetched:
    """A fetched response: its content type (lower case, no parameters), declared length and bytes."""

    content_type: str
    content_length: int | None
    data: bytes


def fetch(url: str, *, timeout_s: float, max_bytes: int, allow_private: bool = False, user_agent: str = "rksmolvlm",
          what: str = "image") -> Fetched:
    """GET ``url`` (following up to MAX_REDIRECTS checked redirects) within ``timeout_s`` in all;
    the body is read up to ``max_bytes + 1`` bytes (the caller refuses the extra byte). ``what``
    ("image" or "video") names the thing in messages and error codes (``{what}_fetch_failed``,
    ``{what}_url_not_allowed``, ``invalid_{what}_url``) and the Accept header."""
    deadline = time.monotonic() + timeout_s
    for _ in range(MAX_REDIRECTS + 1):
        target = _Target.parse(url, what)
        address = _resolve(target, deadline, allow_private, what)
        answer = _get(target, address, deadline, timeout_s, max_bytes, user_agent, what)
        if isinstance(answer, Fetched):
            return answer
        status, location = answer
        if status in _REDIRECTS:
            if not location:
                raise FetchError(f"the {what} URL answered a redirect (HTTP {status}) without a location",
                                 f"{what}_fetch_failed")
            url = urllib.parse.urljoin(target.url, location.strip())
            if not url.lower().startswith(("http://", "https://")):
                raise FetchError(f"the {what} URL redirects to a URL that is not http(s): only http and https are "
                                 "fetched", f"{what}_url_not_allowed")
            continue
        raise FetchError(f"fetching the {what} failed: the remote server answered HTTP {status}",
                         f"{what}_fetch_failed")
    raise FetchError(f"the {what} URL redirects more than {MAX_REDIRECTS} times: link the {what} itself",
                     f"{what}_fetch_failed")


def is_public_address(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """True for an address on the public internet; false for loopback, private, shared (CGNAT),
    link-local, multicast, reserved, unspecified and documentation ranges, IPv4-mapped (and 6to4)
    IPv6 judged by the IPv4 address they carry."""
    if isinstance(address, ipaddress.IPv6Address):
        embedded = address.ipv4_mapped or address.sixtofour
        if embedded is not None:
            return is_public_address(embedded)
    return address.is_global and not (address.is_multicast or address.is_reserved or address.is_loopback
                                      or address.is_link_local or address.is_private or address.is_unspecified)


# ==============================================================================================
# One hop
# ==============================================================================================
@dataclass(frozen=True)
class _Target:
    url: str
    https: bool
    host: str
    port: int
    path: str

    @classmethod
    def parse(cls, url: str, what: str = "image") -> "_Target":
        invalid = f"invalid_{what}_url"
        if _UNSAFE_URL.search(url):
            raise FetchError(f"the {what} URL holds spaces or control characters: percent-encode them", invalid)
        try:
            parts = urllib.parse.urlsplit(url)
            port = parts.port
        except ValueError:
            raise FetchError(f"the {what} URL is not a valid http(s) URL", invalid) from None
        scheme = parts.scheme.lower()
        if scheme not in ("http", "https"):
            raise FetchError(f"only http and https {what} URLs are fetched", f"{what}_url_not_allowed")
        if parts.username is not None or parts.password is not None:
            raise FetchError(f"the {what} URL holds credentials (user@host): they are never sent, leave them out",
                             invalid)
        host = parts.hostname
        if not host:
            raise FetchError(f"the {what} URL has no host", invalid)
        path = parts.path or "/"
        if parts.query:
            path += "?" + parts.query
        return cls(url, scheme == "https", host, port or (443 if scheme == "https" else 80), path)

    @property
    def host_header(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return host if self.port == (443 if self.https else 80) else f"{host}:{self.port}"


def _resolve(target: _Target, deadline: float, allow_private: bool, what: str = "image") -> str:
    """The address to connect to: the host's first address, after every address it resolves to
    passed the check (a name with one private address among public ones is refused whole)."""
    try:
        literal = ipaddress.ip_address(target.host)
    except ValueError:
        literal = None
    if literal is not None:
        addresses = [literal]
    else:
        lookup = _RESOLVER.submit(socket.getaddrinfo, target.host, target.port, type=socket.SOCK_STREAM)
        try:
            infos = lookup.result(timeout=max(0.0, deadline - time.monotonic()))
        except concurrent.futures.TimeoutError:
            raise FetchError(f"fetching the {what} timed out (looking up its host)", f"{what}_fetch_failed") from None
        except (OSError, UnicodeError):
            raise FetchError(f"fetching the {what} failed: its host name does not resolve",
                             f"{what}_fetch_failed") from None
        hosts = [info[4][0] for info in infos]  # (host, port[, flow, scope]) for the IP families asked for
        addresses = [ipaddress.ip_address(host.split("%", 1)[0]) for host in hosts if isinstance(host, str)]
        if not addresses:
            raise FetchError(f"fetching the {what} failed: its host name does not resolve", f"{what}_fetch_failed")
    if not allow_private and not all(map(is_public_address, addresses)):
        raise FetchError(f"the {what} URL's host is not a public address (loopback, private, link-local or "
                         "reserved): such URLs are refused unless images.allow_private_networks is true",
                         f"{what}_url_not_allowed")
    return str(addresses[0])


class _Watchdog:
    """Shuts the connection's socket when the deadline passes: a blocked connect, handshake or read
    returns at once, however slowly the other side sends."""

    def __init__(self, deadline: float):
        self.fired = False
        self.sock: socket.socket | None = None
        self._lock = threading.Lock()
        self._timer = threading.Timer(max(0.0, deadline - time.monotonic()), self._fire)
        self._timer.daemon = True
        self._timer.start()

    def watch(self, sock: socket.socket) -> None:
        with self._lock:
            self.sock = sock
            if self.fired:
                _shut(sock)

    def _fire(self) -> None:
        with self._lock:
            self.fired = True
            if self.sock is not None:
                _shut(self.sock)

    def cancel(self) -> None:
        self._timer.cancel()


def _shut(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


def _get(target: _Target, address: str, deadline: float, timeout_s: float, max_bytes: int,
         user_agent: str, what: str = "image") -> Fetched | tuple[int, str | None]:
    """One GET to ``address``: the fetched body when it answers 200, else (status, Location)."""
    failed = f"{what}_fetch_failed"
    timed_out = f"fetching the {what} timed out (images.remote_timeout_s = {timeout_s:g} s in all)"
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise FetchError(timed_out, failed)
    watchdog = _Watchdog(deadline)
    sock = socket.socket(socket.AF_INET6 if ":" in address else socket.AF_INET, socket.SOCK_STREAM)
    connection = None
    try:
        watchdog.watch(sock)
        sock.settimeout(remaining)
        sock.connect((address, target.port))
        if target.https:
            context = ssl.create_default_context()
            sock = context.wrap_socket(sock, server_hostname=target.host)
            watchdog.watch(sock)
        connection = http.client.HTTPConnection(target.host, target.port)
        connection.sock = sock  # already connected to the checked address
        connection.putrequest("GET", target.path, skip_host=True, skip_accept_encoding=True)
        connection.putheader("Host", target.host_header)
        connection.putheader("User-Agent", user_agent)
        connection.putheader("Accept", f"{what}/*")
        connection.putheader("Accept-Encoding", "identity")
        connection.endheaders()
        response = connection.getresponse()
        status = response.status
        if status in _REDIRECTS:
            return status, response.getheader("Location")
        if status != 200:
            return status, None
        length = response.getheader("Content-Length", "")
        declared = int(length) if length.strip().isdigit() and len(length) < 20 else None
        content_type = response.headers.get_content_type()
        if declared is not None and declared > max_bytes:
            return Fetched(content_type, declared, b"")
        chunks, size = [], 0
        while size <= max_bytes:
            chunk = response.read1(min(65536, max_bytes + 1 - size))
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
        if watchdog.fired:
            raise FetchError(timed_out, failed)
        return Fetched(content_type, declared, b"".join(chunks))
    except FetchError:
        raise
    except ssl.SSLError:
        raise FetchError(f"fetching the {what} failed: the TLS connection or the server's certificate was refused",
                         failed) from None
    except (OSError, http.client.HTTPException, ValueError):
        if watchdog.fired or time.monotonic() >= deadline:
            raise FetchError(timed_out, failed) from None
        raise FetchError(f"fetching the {what} failed: the remote server could not be reached or broke off the "
                         "answer", failed) from None
    finally:
        watchdog.cancel()
        if connection is not None:
            connection.close()  # the response and its socket
        sock.close()  # the TLS socket when wrapped: the plain one is detached then

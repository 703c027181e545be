"""Connections: uvicorn's HTTP/1.1 (h11) protocol with the time limits and the cap it lacks.

uvicorn waits forever for a request head and for a body, and counts idle sockets against
``limit_concurrency``: 32 idle sockets, or one header byte every 2 s per socket, locked every client
out, /health included. Here every connection is in one phase with its own deadline, checked by one
sweep per server a few times a second:

- ``head``: a new connection, or a kept-alive one that has sent the first byte of its next request,
  must deliver the whole request head within ``header_timeout_s`` (else 408 if it sent something,
  a quiet close if not);
- ``idle``: a kept-alive connection between requests is closed after ``keepalive_timeout_s``;
- ``body``: the body must arrive within ``body_timeout_s`` plus one second per ``body_min_rate``
  bytes received (Apache's mod_reqtimeout rule: a fast upload earns time, a trickle does not);
- ``busy``: the application has the request (``server.request_timeout_s`` bounds it there); a
  client that accepts no byte of the answer for ``send_timeout_s`` is disconnected.

The cap: beyond ``max_connections`` open connections, a new one makes room by closing a connection
that holds no request: first one that has never sent a byte (a silent socket; one whose request is
already waiting in the kernel is not silent), else a kept-alive one idle between requests, else —
only from a peer holding more than half the cap — one that is still trickling its first head. In
each class the peer (address) holding the most connections loses first, so one address's flood
closes its own sockets, not other clients'; a peer's silent and slow sockets go oldest first, its
idle ones newest first (an established client is not pushed out by newer ones). A request in
progress (head under way on a served connection, body, or busy) is never closed for a newcomer:
when nothing else can go, the newcomer is refused (after a small reserve, so a health probe still
gets in). Idle and slow sockets therefore never lock out a client that sends its request promptly.

A client that half-closes (``shutdown(SHUT_WR)`` after its request) is answered: end of input
after a complete request means "no more requests", not "gone". Whether such a peer is really still
there is probed once, with an interim ``100 Continue`` (RFC 9110: a client must accept unexpected
1xx responses), whose reset — if the peer has closed both ways — shows as a hang-up on the socket.
"""

from __future__ import annotations

import json
import logging
import select
import socket
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    from rksmolvlm.runtime.server.config import ServerSection

__all__ = ["ConnectionLimits", "ConnectionBook", "protocol_class"]

log = logging.getLogger("rksmolvlm.server")

SWEEP_S = 0.25  # how often deadlines are checked: their precision
RESERVE = 16  # connections admitted over the cap when every open one is busy (health probes get in)


@dataclass(frozen=True)
class ConnectionLimits:
    """The time limits and the cap of one server's connections (the ``server.*`` keys)."""

    max_connections: int = 256
    header_timeout_s: float = 10.0
    body_timeout_s: float = 30.0
    body_min_rate: int = 16 * 1024
    keepalive_timeout_s: float = 5.0
    send_timeout_s: float = 30.0

    @classmethod
    def from_config(cls, server: "ServerSection") -> "ConnectionLimits":
        return cls(max_connections=server.max_connections, header_timeout_s=server.header_timeout_s,
                   body_timeout_s=server.body_timeout_s, body_min_rate=server.body_min_rate,
                   keepalive_timeout_s=server.keepalive_timeout_s, send_timeout_s=server.send_timeout_s)


class ConnectionBook:
    """The open connections of one server: admission under the cap, and the deadline sweep.
    ``closed`` counts connections closed here, by reason."""

    def __init__(self, limits: ConnectionLimits, on_close: Callable[[str], None] | None = None):
        self.limits = limits
        self.on_close = on_close or (lambda reason: None)
        self.open: dict = {}  # protocol → None, oldest first
        self.peers: dict[str, dict] = {}  # peer address → its open connections (protocol → None), oldest first
        self.closed: dict[str, int] = {}
        self._sweeping = None

    def admit(self, connection) -> bool:
        """Take ``connection`` in, making room under the cap; False: refuse it."""
        if len(self.open) >= self.limits.max_connections:
            victim = self._evictable()
            if victim is not None:
                victim.close_for("evicted")
            elif len(self.open) >= self.limits.max_connections + RESERVE:
                self._count("refused")
                return False
        self.open[connection] = None
        self.peers.setdefault(connection.peer, {})[connection] = None
        if self._sweeping is None:
            self._sweeping = connection.loop.call_later(SWEEP_S, self._sweep, connection.loop)
        return True

    def release(self, connection) -> None:
        if connection in self.open:
            del self.open[connection]
            held = self.peers[connection.peer]
            del held[connection]
            if not held:
                del self.peers[connection.peer]

    def _evictable(self):
        """The connection to close for a new one (see the module's note), or None: every open
        connection holds a request, or is a slow head from a peer that is not flooding."""
        heaviest = sorted(self.peers.values(), key=len, reverse=True)  # stable: first-come peers first among equals
        for held in heaviest:
            for connection in held:  # oldest first
                if connection.phase == "head" and not connection.served and not connection.received \
                        and not _input_waiting(connection):
                    return connection
        for held in heaviest:
            for connection in reversed(held):  # newest first
                if connection.phase == "idle":
                    return connection
        flooding = heaviest[0] if heaviest and len(heaviest[0]) > self.limits.max_connections // 2 else {}
        for connection in flooding:  # a head that has begun and not ended (unread input may be a whole request)
            if connection.phase == "head" and not connection.served and connection.received:
                return connection
        return None

    def _sweep(self, loop) -> None:
        now = time.monotonic()
        for connection in list(self.open):
            connection.check(now)
        self._sweeping = loop.call_later(SWEEP_S, self._sweep, loop) if self.open else None

    def _count(self, reason: str) -> None:
        self.closed[reason] = self.closed.get(reason, 0) + 1
        self.on_close(reason)


def protocol_class(book: ConnectionBook) -> type:
    """A uvicorn h11 protocol class whose connections ``book`` admits and watches (uvicorn's
    ``Config(http=...)``)."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    limits = book.limits

    class GuardedH11Protocol(H11Protocol):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.phase = "head"
            self.since = time.monotonic()
            self.body_bytes = 0
            self.stalled_since: float | None = None
            self.half_closed = False
            self.probed = False
            self.served = 0  # responses completed on this connection
            self.received = 0  # bytes received on this connection
            self.peer = ""

        # -- uvicorn's protocol, watched -------------------------------------------------------
        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self.peer = _peer(transport)
            _no_delay(transport)
            if not book.admit(self):
                self.connections.discard(self)
                transport.abort()

        def connection_lost(self, exc) -> None:
            book.release(self)
            super().connection_lost(exc)

        def data_received(self, data: bytes) -> None:
            self.received += len(data)
            if self.phase == "body":
                self.body_bytes += len(data)
            elif self.phase == "idle":
                self._enter("head")  # the next request's head is on its way: its own deadline
            super().data_received(data)
            self._refresh()

        def on_response_complete(self) -> None:
            self.served += 1
            super().on_response_complete()
            self._refresh()

        def eof_received(self):
            """End of input: after a complete request the client has only said it sends no more;
            answer it (and close afterwards). Anything else: the client is gone."""
            cycle = self.cycle
            done = self.conn.their_state in (h11.DONE, h11.MUST_CLOSE)
            if cycle is None or cycle.response_complete or not done:
                return None  # asyncio closes the transport
            self.half_closed = True
            cycle.keep_alive = False
            if not self.probed and not cycle.response_started and self.scope.get("http_version") == "1.1":
                self.probed = True
                cycle.waiting_for_100_continue = False
                probe = h11.InformationalResponse(status_code=100, headers=[], reason=b"Continue")
                self.transport.write(self.conn.send(probe))
            return True

        def pause_writing(self) -> None:
            super().pause_writing()
            self.stalled_since = self.stalled_since or time.monotonic()

        def resume_writing(self) -> None:
            super().resume_writing()
            self.stalled_since = None

        def shutdown(self) -> None:
            """Server stopping: connections without a request to answer close now (uvicorn's own
            rule waits for a body however slowly it comes)."""
            if self.phase == "body" and self.cycle is not None and not self.cycle.response_started:
                self._refuse(503, "shutting_down", "the server is shutting down: retry in a moment")
                return
            super().shutdown()

        def send_400_response(self, msg: str) -> None:
            self._refuse(400, "bad_http_request", "the request is not valid HTTP/1.1, or its head is too large")

        # -- phases and deadlines ----------------------------------------------------------------
        def _enter(self, phase: str) -> None:
            if phase != self.phase:
                self.phase, self.since = phase, time.monotonic()
                if phase == "body":
                    self.body_bytes = 0

        def _refresh(self) -> None:
            their, cycle = self.conn.their_state, self.cycle
            if their is h11.SEND_BODY:
                self._enter("body")
            elif cycle is not None and not cycle.response_complete and their in (h11.DONE, h11.MUST_CLOSE):
                self._enter("busy")
            elif their is h11.IDLE and (cycle is None or cycle.response_complete):
                buffered = bool(self.conn.trailing_data[0])
                self._enter("head" if buffered or self.phase == "head" else "idle")

        def check(self, now: float) -> None:
            """Close this connection if its phase is over its deadline (called by the sweep)."""
            if self.transport is None or self.transport.is_closing():
                return
            age = now - self.since
            if self.phase == "head" and age > limits.header_timeout_s:
                if self.conn.trailing_data[0]:
                    self._refuse(408, "header_timeout", f"the request head did not arrive within "
                                 f"server.header_timeout_s = {limits.header_timeout_s:g} s", "header_timeout")
                else:
                    self.close_for("header_timeout")
            elif self.phase == "idle" and age > limits.keepalive_timeout_s:
                self.close_for("keepalive_timeout", count=False, gently=True)
            elif self.phase == "body":
                if self.flow.read_paused:  # the application is not reading: not the client's delay
                    self.since += SWEEP_S
                elif age > limits.body_timeout_s + self.body_bytes / limits.body_min_rate:
                    self._refuse(408, "body_timeout", f"the request body arrived too slowly (server.body_timeout_s "
                                 f"= {limits.body_timeout_s:g} s plus 1 s per {limits.body_min_rate:,} bytes)",
                                 "body_timeout")
            elif self.phase == "busy":
                if self.stalled_since is not None and now - self.stalled_since > limits.send_timeout_s:
                    self.close_for("send_timeout")
                elif self.half_closed and self.probed and self._peer_hung_up():
                    self.close_for("client_gone", count=False)

        def _peer_hung_up(self) -> bool:
            sock = self.transport.get_extra_info("socket")
            if sock is None:
                return False
            poller = select.poll()
            poller.register(sock.fileno(), select.POLLERR | select.POLLHUP)
            return bool(poller.poll(0))

        def close_for(self, reason: str, count: bool = True, gently: bool = False) -> None:
            """Close now (``gently``: after what is written), telling a running request its client is gone."""
            if count:
                book._count(reason)
            log.debug("closing a connection from %s: %s", self.client, reason)
            book.release(self)
            if self.cycle is not None and not self.cycle.response_complete:
                self.cycle.disconnected = True
                self.cycle.message_event.set()
            if gently:
                self.transport.close()
            else:
                self.transport.abort()

        def _refuse(self, status: int, code: str, message: str, reason: str | None = None) -> None:
            """Answer a JSON error outside h11's bookkeeping (no request was handed on, or the
            one that was is dropped) and close."""
            if reason:
                book._count(reason)
            cycle = self.cycle
            half_written = cycle is not None and cycle.response_started and not cycle.response_complete
            if cycle is not None and not cycle.response_complete:
                cycle.disconnected = True  # the application's writes stop here
                cycle.message_event.set()
            book.release(self)
            if not half_written and not self.transport.is_closing():
                error = {"message": message, "type": "invalid_request_error" if status < 500 else "server_error",
                         "param": None, "code": code}
                body = json.dumps({"error": error}).encode()
                phrase = {400: "Bad Request", 408: "Request Timeout", 503: "Service Unavailable"}[status]
                head = (f"HTTP/1.1 {status} {phrase}\r\ncontent-type: application/json\r\n"
                        "x-content-type-options: nosniff\r\n"
                        f"content-length: {len(body)}\r\nconnection: close\r\n\r\n")
                self.transport.write(head.encode() + body)
            self.transport.close()

    return GuardedH11Protocol


# ==============================================================================================
# Private helpers
# ==============================================================================================
def _input_waiting(connection) -> bool:
    """True when the kernel holds bytes (or the end) the event loop has not read yet: under a flood of
    new connections a prompt client's request may sit there while the loop accepts the flood."""
    sock = connection.transport.get_extra_info("socket") if connection.transport is not None else None
    if sock is None:
        return False
    poller = select.poll()
    poller.register(sock.fileno(), select.POLLIN)
    return bool(poller.poll(0))


def _peer(transport) -> str:
    """The address a connection comes from ("" for a Unix socket or an unknown peer)."""
    peer = transport.get_extra_info("peername")
    return str(peer[0]) if isinstance(peer, tuple) and peer else ""


def _no_delay(transport) -> None:
    """Small writes (an answer's head, then its body; each stream chunk) go out at once. asyncio sets
    TCP_NODELAY only on sockets whose ``proto`` says TCP, which a listener made with proto 0 (ours,
    systemd's) passes on to none: Nagle then holds every second write for the client's delayed ACK,
    40 ms per request on a kept-alive connection."""
    sock = transport.get_extra_info("socket")
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass

"""``rksmolvlm serve``: an OpenAI-compatible HTTP server over the runner, run by systemd on the board.

One room per responsibility:

- ``errors``: ApiError, the refusal every adapter answers with (status, code, message naming the fix).
- ``model``: ServedModel, the id clients name and the bundle's facts.
- ``requests``: the OpenAI chat completion schema → a checked ChatRequest (RequestReader, parse_json):
  every field, count and size checked, every media part read and checked before the request may queue;
  structured output (response_format, a forced tool call, Ollama's format) compiled there into the
  request's grammar by the bundle's GrammarCompiler (``runtime/structured``), built once by ``process``.
- ``media``: media references → bytes, images and videos alike (data: URIs, files under
  images.local_dir, remote URLs through ``remote``), each within its byte limit, refusals named by kind.
- ``media_checks``: the pre-queue checks of the bytes: an image's header (type, pixels, decode memory,
  never decoded), a video's container (probed, no frame decoded).
- ``exchange``: what every API adapter shares: the Gateway (key, ready model, bounded body, reader,
  queue) and the Exchange (a job's events, the client going away, the deadline) with its event pump.
- ``service``: ModelService, the worker thread that owns the runner (and so the NPU) and runs one
  request at a time from a bounded queue (full: 429 with Retry-After); Answer, Job, open_runner.
- ``metrics``: Metrics, rendered as Prometheus text.
- ``notify``: SystemdNotifier, sd_notify READY / WATCHDOG / STOPPING over ``$NOTIFY_SOCKET``.
- ``openai``: the OpenAI adapter: ``/v1/chat/completions`` (server-sent events when streamed),
  ``/v1/models``, llama.cpp's ``/props``.
- ``ollama``: the Ollama adapter (``/api/chat``, ``/api/generate``, ``/api/tags``, ``/api/show``,
  ``/api/ps``, ``/api/version``): Ollama bodies translated into chat completion bodies for the same
  reader and queue, NDJSON streams, ``{"error": message}`` errors.
- ``http``: create_app, the application assembled from both adapters over one Gateway, with /health,
  /metrics, the page at ``/``, the lifespan and the access log.
- ``remote``: fetching remote images and videos (http/https only, public addresses only unless allowed, redirects
  re-checked, one total deadline, generic errors).
- ``cors``: CORS for browser apps (``server.cors_origins``), preflights answered before the key check.
- ``guards``: what a cross-site page or a rebinding DNS name could send: POST must be JSON, the Host
  allow-list on a keyless loopback server, foreign Origins refused.
- ``connections``: uvicorn's h11 protocol with header, body, keep-alive and send time limits and a
  connection cap that evicts idle sockets, so idle or slow clients never lock out /health.
- ``process``: uvicorn (foreground or BackgroundServer), logging, and the command: add_serve_arguments,
  resolve_config, build_app, serve_command.
- ``web``: the web page served at ``GET /`` to browsers (``server.web_ui``): one self-contained file
  (``web/page.html``) under a hash-based Content-Security-Policy; it talks only to ``/v1/chat/completions``.
"""

from __future__ import annotations

from rksmolvlm.runtime.server.errors import ApiError
from rksmolvlm.runtime.server.http import create_app
from rksmolvlm.runtime.server.metrics import Metrics
from rksmolvlm.runtime.server.model import ServedModel
from rksmolvlm.runtime.server.notify import SystemdNotifier
from rksmolvlm.runtime.server.process import (BackgroundServer, add_serve_arguments, build_app, resolve_config,
                                              serve_command)
from rksmolvlm.runtime.server.requests import RequestReader
from rksmolvlm.runtime.server.service import ModelService, open_runner

__all__ = [
    "add_serve_arguments", "serve_command", "build_app", "create_app", "open_runner", "ModelService", "ServedModel",
    "RequestReader", "ApiError", "Metrics", "SystemdNotifier", "BackgroundServer", "resolve_config",
]

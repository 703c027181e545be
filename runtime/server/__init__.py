"""``rksmolvlm serve``: an OpenAI-compatible HTTP server over the runner, run by systemd on the board.

One room per responsibility:

- ``requests``: ApiError, ChatRequest, ServedModel, RequestReader — every request is checked (body
  size, JSON, parameters, image type, bytes and pixel count, read from the header, never decoded; a
  video's bytes and container, no frame decoded) before it may queue, and refused with an
  OpenAI-style error body naming the limit.
- ``service``: ModelService, the worker thread that owns the runner (and so the NPU) and runs one
  request at a time from a bounded queue (full: 429 with Retry-After); Answer, Job, open_runner.
- ``metrics``: Metrics, rendered as Prometheus text.
- ``notify``: SystemdNotifier, sd_notify READY / WATCHDOG / STOPPING over ``$NOTIFY_SOCKET``.
- ``http``: create_app, the Starlette endpoints, server-sent events, the access log.
- ``ollama``: the Ollama API beside the OpenAI one (``/api/chat``, ``/api/generate``, ``/api/tags``,
  ``/api/show``, ``/api/ps``, ``/api/version``): Ollama bodies translated into chat completion bodies
  for the same reader and queue, NDJSON streams, ``{"error": message}`` errors.
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

from rksmolvlm.runtime.server.http import create_app
from rksmolvlm.runtime.server.metrics import Metrics
from rksmolvlm.runtime.server.notify import SystemdNotifier
from rksmolvlm.runtime.server.process import (BackgroundServer, add_serve_arguments, build_app, resolve_config,
                                              serve_command)
from rksmolvlm.runtime.server.requests import ApiError, RequestReader, ServedModel
from rksmolvlm.runtime.server.service import ModelService, open_runner

__all__ = [
    "add_serve_arguments", "serve_command", "build_app", "create_app", "open_runner", "ModelService", "ServedModel",
    "RequestReader", "ApiError", "Metrics", "SystemdNotifier", "BackgroundServer", "resolve_config",
]

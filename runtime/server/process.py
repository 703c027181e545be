"""Running: uvicorn in the foreground (``rksmolvlm serve``) or in a background thread (tests,
scripts), the logging set-up (journald-aware), and the command: arguments, config, app."""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import logging
import os
import signal
import socket
import sys
import threading
import time
import urllib.error
import urllib.request
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from rksmolvlm import __version__
from rksmolvlm.errors import RkSmolVLMError
from rksmolvlm.runtime.server.config import (CONFIG_ENV, DEFAULT_CONFIG_PATH, ConfigError, ServerConfig, load_config,
                                             read_api_key, with_overrides)
from rksmolvlm.runtime.server.connections import ConnectionBook, ConnectionLimits, protocol_class
from rksmolvlm.runtime.server.guards import host_check_summary, is_loopback
from rksmolvlm.runtime.server.http import create_app
from rksmolvlm.runtime.server.metrics import Metrics
from rksmolvlm.runtime.server.model import ServedModel
from rksmolvlm.runtime.server.notify import SystemdNotifier
from rksmolvlm.runtime.server.service import ModelService, open_runner

if TYPE_CHECKING:
    from rksmolvlm.runtime.jail.decoder import JailedDecoder
    from rksmolvlm.runtime.loader import RuntimeBundle
    from rksmolvlm.runtime.runner import Runner, RunnerFactory
    from rksmolvlm.runtime.structured import GrammarCompiler

__all__ = ["BackgroundServer", "add_serve_arguments", "resolve_config", "build_app", "serve_command"]

log = logging.getLogger("rksmolvlm.server")


# ==============================================================================================
# Running: uvicorn in the foreground (serve) or in a background thread (tests, scripts)
# ==============================================================================================
def _uvicorn():
    try:
        import uvicorn
    except ImportError as exc:
        raise RkSmolVLMError("serve needs the server packages: pip install 'rksmolvlm[serve]'") from exc
    return uvicorn


def _listen(host: str, port: int) -> socket.socket:
    """A listening socket, bound here so that a busy port gives a clear error (and port 0 a free one)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise ConfigError(f"cannot resolve server.host {host!r} ({exc.strerror}): use an IP address such as "
                          "127.0.0.1 or 0.0.0.0") from None
    family, _, _, _, address = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if family == socket.AF_INET6:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    try:
        sock.bind(address)
    except OSError as exc:
        sock.close()
        raise RkSmolVLMError(f"cannot listen on {host}:{port} ({exc.strerror}): another program (or another "
                             "rksmolvlm) uses it; pick another with --port or server.port") from None
    sock.listen(256)
    sock.set_inheritable(True)
    return sock


def _uvicorn_config(app, config: ServerConfig, book: ConnectionBook, log_level: str | None = None):
    """uvicorn on our h11 protocol (runtime/server/connections.py: header, body, idle and send time
    limits, and a connection cap that closes idle sockets rather than refusing requests — so no
    ``limit_concurrency``, whose 503s idle sockets could trigger). A stop waits for the running
    request's grace (service.drain) plus time for its answer to go out."""
    uvicorn = _uvicorn()
    server = config.server
    return uvicorn.Config(app, log_config=None, access_log=False, lifespan="on", http=protocol_class(book),
                          ws="none", loop="asyncio", limit_concurrency=None,
                          timeout_keep_alive=server.keepalive_timeout_s,
                          timeout_graceful_shutdown=server.shutdown_grace_s + _ANSWER_AFTER_GRACE_S,
                          server_header=False, proxy_headers=False, log_level=log_level or server.log_level)


_ANSWER_AFTER_GRACE_S = 10.0  # after the grace: the abort lands (a vision stage is not interruptible) and is answered


def _server_class():
    _uvicorn()  # the serve extra's clear error when uvicorn is missing
    from uvicorn import Server

    class _Server(Server):
        """uvicorn's server, stopping cleanly on SIGTERM/SIGINT: it tells systemd it is stopping,
        finishes, and returns (exit 0) instead of re-raising the signal."""

        notifier: SystemdNotifier | None = None
        on_shutdown: Callable[[], None] | None = None

        @contextlib.contextmanager
        def capture_signals(self):
            if threading.current_thread() is not threading.main_thread():
                yield
                return
            previous = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for sig, handler in previous.items():
                    signal.signal(sig, handler)

        async def shutdown(self, sockets=None) -> None:
            if self.on_shutdown is not None:  # waiting requests get their 503 now, the running one its grace
                self.on_shutdown()
            await super().shutdown(sockets)

        def handle_exit(self, sig, frame) -> None:
            if self.notifier is not None:
                self.notifier.stopping(f"stopping ({signal.Signals(sig).name})")
            if not self.should_exit:
                log.info("%s received: stopping after the running request", signal.Signals(sig).name)
            super().handle_exit(sig, frame)

    return _Server


class BackgroundServer:
    """An app served by uvicorn from a background thread on (by default) a free loopback port:
    for tests, scripts and embedding. ``with BackgroundServer(app) as server: server.url``."""

    def __init__(self, app, config: ServerConfig | None = None, host: str = "127.0.0.1", port: int = 0,
                 log_level: str = "warning"):
        self.app = app
        self.host = host
        self._socket = _listen(host, port)
        self.port = self._socket.getsockname()[1]
        config = config or ServerConfig()
        self.connections = ConnectionBook(ConnectionLimits.from_config(config.server))
        self._server = _server_class()(_uvicorn_config(app, config, self.connections, log_level))
        self._server.on_shutdown = _drain_hook(app, config)
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [self._socket]},
                                        name="rksmolvlm-http", daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, ready_timeout: float | None = 120.0) -> "BackgroundServer":
        """Start serving; with ``ready_timeout``, wait until /health says the model is loaded."""
        self._thread.start()
        deadline = time.monotonic() + (ready_timeout or 30.0)
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RkSmolVLMError("the background server did not start")
            time.sleep(0.01)
        if ready_timeout:
            self.wait_ready(deadline - time.monotonic())
        return self

    def wait_ready(self, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=5) as response:
                    return json.loads(response.read())
            except urllib.error.HTTPError as exc:
                body = json.loads(exc.read() or b"{}")
                if body.get("status") == "failed":
                    raise RkSmolVLMError(f"the model failed to load: {body.get('error')}") from None
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RkSmolVLMError(f"the server at {self.url} was not ready within {timeout:.0f} s")
            time.sleep(0.05)

    def stop(self, timeout: float = 30.0) -> None:
        """Stop as on SIGTERM (the running request gets server.shutdown_grace_s), and wait."""
        self._server.should_exit = True
        if self._thread.is_alive():
            self._thread.join(timeout)
        self._socket.close()

    def __enter__(self) -> "BackgroundServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def _drain_hook(app, config: ServerConfig) -> Callable[[], None] | None:
    api = getattr(getattr(app, "state", None), "api", None)
    if api is None:
        return None
    return lambda: api.service.drain(config.server.shutdown_grace_s)


# ==============================================================================================
# Logging
# ==============================================================================================
class _JournalFormatter(logging.Formatter):
    """journald adds time and unit: prefix the syslog priority (<3> error … <7> debug) instead."""

    _PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3, logging.CRITICAL: 2}

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        priority = self._PRIORITY.get(record.levelno, 6)
        return "\n".join(f"<{priority}>{line}" for line in text.splitlines())


def _under_journald(stream) -> bool:
    value = os.environ.get("JOURNAL_STREAM", "")
    try:
        st = os.fstat(stream.fileno())
        return value == f"{st.st_dev}:{st.st_ino}"
    except (OSError, ValueError, AttributeError):
        return False


class _StdoutHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stdout`` is when a record is logged (not when the handler was made):
    a replaced stdout (a test's capture, a redirected console) never leaves a closed stream behind."""

    def __init__(self):
        super().__init__(sys.stdout)

    @property
    def stream(self):
        return sys.stdout

    @stream.setter
    def stream(self, value) -> None:  # logging.StreamHandler assigns it once; sys.stdout is the stream
        pass


def _configure_logging(level: str) -> None:
    handler = _StdoutHandler()
    if _under_journald(sys.stdout):
        handler.setFormatter(_JournalFormatter("%(name)s: %(message)s"))
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error"):
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = True


# ==============================================================================================
# The command
# ==============================================================================================
def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("bundle", nargs="?", help="bundle directory (default: bundle in the config file)")
    parser.add_argument("--config", type=Path,
                        help=f"config file (default: ${CONFIG_ENV}, else {DEFAULT_CONFIG_PATH} when it exists)")
    parser.add_argument("--no-config", action="store_true", help=f"ignore {DEFAULT_CONFIG_PATH}")
    parser.add_argument("--host", help="address to listen on (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, help="TCP port (default 8080; 0 picks a free one)")
    parser.add_argument("--engine", choices=("auto", "host", "npu"),
                        help="npu on the board, host = x86 preview; auto picks")
    parser.add_argument("--api-key-file", help="file holding the API key clients must send (Authorization: Bearer)")
    parser.add_argument("--queue-size", type=int, help="requests that may wait while one runs (default 4)")
    parser.add_argument("--request-timeout", type=float, help="seconds a request may take, queue included (300)")
    parser.add_argument("--log-level", choices=("debug", "info", "warning", "error"))
    parser.add_argument("--library", help="path of librkllmrt.so (default: $RKLLM_LIBRARY, /usr/lib, /usr/local/lib)")
    parser.add_argument("--threads", type=int, metavar="N",
                        help="CPU threads of the host engines (onnxruntime, torch; default: every core)")
    parser.add_argument("--no-verify", action="store_true", help="skip the sha256 check of the bundle files")
    parser.add_argument("--check", action="store_true",
                        help="check the config, the bundle and the API key file, print the settings, and exit")


def resolve_config(args: argparse.Namespace) -> tuple[ServerConfig, str]:
    """The effective config (file, then flags) and where it came from."""
    path = args.config or (Path(os.environ[CONFIG_ENV]) if os.environ.get(CONFIG_ENV) else None)
    if path is None and not args.no_config and DEFAULT_CONFIG_PATH.is_file():
        path = DEFAULT_CONFIG_PATH
    config = load_config(path)
    overrides = {"bundle": str(args.bundle) if args.bundle else None, "engine": args.engine,
                 "rkllm_library": args.library, "threads": getattr(args, "threads", None),
                 "verify_bundle": False if args.no_verify else None,
                 "server.host": args.host, "server.port": args.port, "server.api_key_file": args.api_key_file,
                 "server.queue_size": args.queue_size, "server.request_timeout_s": args.request_timeout,
                 "server.log_level": args.log_level}
    source = f"{path} with command-line flags" if path else "command-line flags"
    return with_overrides(config, overrides, source), str(path) if path else "defaults"


def _check_cores(config: ServerConfig, bundle) -> None:
    if config.npu_cores is None:
        return
    from rksmolvlm.boards import load_profile

    platform = bundle.manifest.target.platform
    cores = load_profile(platform).npu_cores
    bad = [c for c in config.npu_cores if c >= cores]
    if bad:
        raise ConfigError(f"npu_cores = {list(config.npu_cores)} names core {bad[0]}, but {platform} has {cores} "
                          f"(0–{cores - 1}): e.g. npu_cores = {list(range(cores))}")


def _video_line(config: ServerConfig, bundle) -> str:
    if bundle.video_settings is None:
        return "not taken by this model (SmolVLM2 bundles only)"
    if not config.video.enabled:
        return "off (video.enabled = false)"
    return json.dumps(config.to_dict()["video"])


def _load_video_decoder() -> None:
    """Import PyAV while the model loads: its import holds the GIL for a few hundred milliseconds, which
    the first video request would otherwise spend with /health waiting."""
    try:
        import av  # noqa: F401
    except ImportError:
        log.warning("this model takes video, but PyAV is not installed: video requests will be refused until "
                    "'pip install av' (or set video.enabled = false)")


def build_app(config: ServerConfig, runners: "RunnerFactory | None" = None, *,
              load: Callable[["RuntimeBundle"], "Runner"] | None = None, notifier: SystemdNotifier | None = None,
              on_fatal: Callable[[], None] | None = None, decoder: "JailedDecoder | None" = None):
    """The application for ``config``: the bundle is opened and checked now, its model is loaded by
    the app's lifespan in the worker thread, by ``runners`` (the serve verb passes
    ``rksmolvlm.runners.RUNNERS``: the server does not choose engines itself). ``load(bundle) -> Runner``
    replaces it, e.g. to wrap an engine. Media are decoded in the jail's children (``decoder``, default
    one of ``[decode]``'s size, started and stopped by the app's lifespan; with ``load``, its runner
    decodes as it was built). The service is ``app.state.service``."""
    if config.bundle is None:
        raise ConfigError("no bundle to serve: pass BUNDLE, or set bundle = \"/var/lib/rksmolvlm/bundle\" in "
                          f"{DEFAULT_CONFIG_PATH}")
    from rksmolvlm.runtime.loader import RuntimeBundle

    bundle = RuntimeBundle.open(config.bundle, verify=config.verify_bundle)
    decoder = decoder or media_decoder(config)
    if runners is not None:
        engine = runners.resolve(config.engine)
        load = load or functools.partial(open_runner, config=config, engine=engine, runners=runners, decoder=decoder)
    elif load is None:
        raise TypeError("build_app needs the runners to open the model with (rksmolvlm.runners.RUNNERS) or a load")
    else:
        engine = config.engine
    _check_cores(config, bundle)
    server = config.server
    api_key = read_api_key(server.api_key_file) if server.api_key_file else None
    model = ServedModel.from_bundle(bundle, server.model_name, engine)

    def loading() -> "Runner":
        runner = load(bundle)
        if model.video is not None and config.video.enabled:
            _load_video_decoder()
        return runner

    service = ModelService(loading, model, server.queue_size, Metrics(), server.stall_timeout_s)
    app = create_app(service, config, api_key=api_key, notifier=notifier, on_fatal=on_fatal,
                     grammars=grammar_compiler(bundle), decoder=decoder)
    app.state.service = service
    app.state.bundle = bundle
    return app


def media_decoder(config: ServerConfig) -> "JailedDecoder":
    """The jail of ``[decode]``'s size (its children start with the app): one child kept for the worker."""
    from rksmolvlm.runtime.jail.decoder import JailedDecoder
    from rksmolvlm.runtime.jail import DecodePool

    decode = config.decode
    pool = DecodePool(decode.workers, decode.max_memory, reserved=1)
    return JailedDecoder(pool, probe_timeout_s=decode.probe_timeout_s, image_timeout_s=decode.image_timeout_s,
                         max_memory=decode.max_memory)


def grammar_compiler(bundle: "RuntimeBundle") -> "GrammarCompiler | None":
    """The served bundle's grammar compiler (its tokenizer.json read once, every distinct schema compiled
    once); None, with a warning, when it cannot be built: structured requests are then refused."""
    try:
        from rksmolvlm.runtime.structured import GrammarCompiler

        return GrammarCompiler.for_bundle(bundle)
    except (ImportError, OSError, ValueError) as exc:
        log.warning("structured output is off: the grammar compiler cannot be built for %s (%s)", bundle.path, exc)
        return None


def serve_command(args: argparse.Namespace, runners: "RunnerFactory") -> int:
    config, source = resolve_config(args)
    _configure_logging(config.server.log_level)
    from PIL import Image

    # Requests are held to limits.max_image_pixels (a 400 naming the limit), so Pillow's own warning is noise.
    warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)
    if config.bundle is None and source != "defaults":
        raise ConfigError(f"no bundle to serve: pass BUNDLE, or set bundle = \"...\" in {source}")
    server = config.server
    notifier = SystemdNotifier.from_environ()
    uvicorn_server = None

    def fatal() -> None:
        if uvicorn_server is not None:
            uvicorn_server.should_exit = True

    app = build_app(config, runners, notifier=notifier, on_fatal=fatal)
    service, bundle = app.state.service, app.state.bundle
    api_key = app.state.api.api_key
    if args.check:
        print(f"config: {source}\nbundle: {bundle.path} ({service.model.id}, context {bundle.max_context})\n"
              f"engine: {service.model.engine}\nlisten: {server.host}:{server.port}\n"
              f"api key: {'required' if api_key else 'none (anyone who can connect may use the model)'}\n"
              f"queue: {server.queue_size} waiting, timeout {server.request_timeout_s:g} s\n"
              f"connections: at most {server.max_connections}; head {server.header_timeout_s:g} s, body "
              f"{server.body_timeout_s:g} s + 1 s per {server.body_min_rate:,} bytes, idle "
              f"{server.keepalive_timeout_s:g} s, send {server.send_timeout_s:g} s; stop grace "
              f"{server.shutdown_grace_s:g} s\n"
              f"host check: {host_check_summary(server.host, server.allowed_hosts, api_key is not None)}\n"
              f"limits: {json.dumps(config.to_dict()['limits'])}\n"
              f"video: {_video_line(config, bundle)}\nok")
        return 0
    if api_key is None and not is_loopback(server.host):
        log.warning("listening on %s without an API key: anyone on the network can use the model; set "
                    "server.api_key_file", server.host)
    sock = _listen(server.host, server.port)
    book = ConnectionBook(ConnectionLimits.from_config(server))
    uvicorn_server = _server_class()(_uvicorn_config(app, config, book))
    uvicorn_server.notifier = notifier
    uvicorn_server.on_shutdown = _drain_hook(app, config)
    host, port = sock.getsockname()[:2]
    log.info("rksmolvlm %s: config %s; listening on http://%s:%d; loading %s (%s engine)%s", __version__, source,
             host, port, bundle.path, service.model.engine, "; API key required" if api_key else "")
    try:
        uvicorn_server.run(sockets=[sock])
    finally:
        sock.close()
    if service.state == "failed" or service.exit_code:
        return service.exit_code or 1
    return 0

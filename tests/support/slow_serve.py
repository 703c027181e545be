"""A test server in a process of its own: the real app (``build_app``) on a bundle's host engines,
the LLM slowed to ``delay`` seconds a token, plus two test-only routes (this script adds them; the
product has none):

- ``GET /_test/state``: the engine (running, tokens produced) and the connections (open, closed by
  reason);
- ``POST /_test/llm``: set ``delay`` and ``abort_lag`` (seconds an abort takes to land).

    python tests/support/slow_serve.py BUNDLE '{"server.header_timeout_s": 1.5, ...}'

prints ``listening on URL`` once ready, serves until SIGTERM. In its own process the server's loop
shares the GIL with nothing of the test's (clients, probes), as on a board.
"""

from __future__ import annotations

import json
import signal
import sys
import threading
import time


class SlowLlm:
    """The real LLM engine, ``delay`` seconds per token; counts the tokens it produced and says whether
    a generation is under way; an abort may be made to land ``abort_lag`` seconds late."""

    def __init__(self, llm, delay: float):
        self.llm, self.delay = llm, delay
        self.abort_lag = 0.0
        self.produced = 0
        self.running = False
        self._late: threading.Timer | None = None

    def generate(self, embeddings, config, keep_history, stats):
        self.running = True
        try:
            for token in self.llm.generate(embeddings, config, keep_history, stats):
                time.sleep(self.delay)
                self.produced += 1
                yield token
        finally:
            self.running = False

    def abort(self) -> None:
        if not self.abort_lag:
            return self.llm.abort()
        if self._late is None or not self._late.is_alive():
            self._late = threading.Timer(self.abort_lag, self.llm.abort)
            self._late.start()

    @property
    def settled(self) -> bool:
        """No late abort pending (it would hit the next request)."""
        return self._late is None or not self._late.is_alive()

    # the rest of the engine interface, forwarded (a script of its own: support.fakes.LlmWrapper is not importable yet)
    def clear_history(self) -> None:
        self.llm.clear_history()

    @property
    def history_tokens(self) -> int:
        return self.llm.history_tokens

    def embedding_table(self):
        return self.llm.embedding_table()

    def close(self) -> None:
        self.llm.close()


def main(bundle: str, settings: str) -> None:
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    from rksmolvlm.runtime.engines import EngineOptions
    from rksmolvlm.runners import open_engines
    from rksmolvlm.runtime.runner import Runner
    from rksmolvlm.runtime.server import BackgroundServer, build_app
    from rksmolvlm.runtime.server.config import ServerConfig, with_overrides

    config = with_overrides(ServerConfig(), {"bundle": bundle, "engine": "host", "verify_bundle": False,
                                             **json.loads(settings)})
    slow = {}

    def load(opened):
        vision, llm = open_engines(opened, "host", EngineOptions(max_new_tokens=2048))
        slow["llm"] = SlowLlm(llm, 0.02)
        return Runner(opened, vision, slow["llm"])

    app = build_app(config, load=load)
    server = BackgroundServer(app, config, log_level="error")

    async def state(request):
        llm = slow["llm"]
        return JSONResponse({"llm": {"running": llm.running, "produced": llm.produced, "settled": llm.settled},
                             "connections": {"open": len(server.connections.open),
                                             "closed": server.connections.closed}})

    async def set_llm(request: Request):
        for key, value in (await request.json()).items():
            setattr(slow["llm"], key, float(value))
        return JSONResponse({"ok": True})

    app.router.routes[:0] = [Route("/_test/state", state, methods=["GET"]),
                             Route("/_test/llm", set_llm, methods=["POST"])]
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    with server:
        print(f"listening on {server.url}", flush=True)
        stop.wait()


if __name__ == "__main__":
    sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1]))  # tests/: the support package
    main(*sys.argv[1:3])

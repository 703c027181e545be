"""The server's layers: no module reaches into another's private names, the server's modules import
one another without a cycle, and the media module turns every kind of reference into bytes (or its
named refusal) for images and videos alike."""

from __future__ import annotations

import ast
import base64
import os
import socket
from pathlib import Path

import pytest

from support import DATA, ROOT
from support.images import rng_image
from support.net import LoopbackHandler, loopback_http
from rksmolvlm.runtime.server.config import ServerConfig, with_overrides
from rksmolvlm.runtime.server.errors import ApiError
from rksmolvlm.runtime.server.media import IMAGE, VIDEO, MediaKind, MediaRef, MediaSource

# Source folder → its import name (pyproject's [tool.setuptools.package-dir]).
PACKAGES = {"rksmolvlm": "rksmolvlm", "runtime": "rksmolvlm.runtime"}
SERVER = "rksmolvlm.runtime.server"
ALLOWED_PRIVATE = {"__version__"}


# ==============================================================================================
# The import graph, from the AST (imports inside functions and TYPE_CHECKING blocks included)
# ==============================================================================================
def _modules() -> dict[str, tuple[Path, bool]]:
    """Import name → (file, is a package's __init__) of every module under the walked folders."""
    found = {}
    for folder, package in PACKAGES.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = list(path.relative_to(ROOT / folder).with_suffix("").parts)
            init = parts[-1] == "__init__"
            if init:
                parts.pop()
            found[".".join([package, *parts])] = (path, init)
    return found


MODULES = _modules()


def _imports(name: str) -> list[tuple[int, str, str | None]]:
    """(line, module imported from, name imported or None for ``import module``) of every import in
    module ``name``, relative imports resolved."""
    path, init = MODULES[name]
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, alias.name, None) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = name.split(".")
                anchor = anchor[:len(anchor) - node.level + (1 if init else 0)]
                base = ".".join([*anchor, *([base] if base else [])])
            out += [(node.lineno, base, alias.name) for alias in node.names]
    return out


def _private_imports() -> list[str]:
    bad = []
    for name in MODULES:
        for line, source, imported in _imports(name):
            if source == "__future__" or source == name:
                continue
            names = source.split(".") + ([imported] if imported else [])
            private = [part for part in names if part.startswith("_") and part not in ALLOWED_PRIVATE]
            if private:
                bad.append(f"{MODULES[name][0].relative_to(ROOT)}:{line} imports {private[0]} from {source}")
    return bad


def _server_graph() -> dict[str, set[str]]:
    """Server module → the server modules it imports by name (a package's name counts as its __init__)."""
    graph: dict[str, set[str]] = {name: set() for name in MODULES if name == SERVER or name.startswith(SERVER + ".")}
    for name in graph:
        for _, source, imported in _imports(name):
            target = f"{source}.{imported}" if imported and f"{source}.{imported}" in graph else source
            if target in graph and target != name:
                graph[name].add(target)
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of ``graph`` (its modules in order, the first repeated at the end), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_the_walk_sees_the_server_and_the_core():
    for name in (SERVER, f"{SERVER}.exchange", f"{SERVER}.media", f"{SERVER}.web", "rksmolvlm.errors",
                 "rksmolvlm.runtime.runner"):
        assert name in MODULES, name


def test_no_module_imports_a_private_name_from_another():
    assert _private_imports() == []


def test_the_private_import_check_catches_one(tmp_path, monkeypatch):
    """The check itself: a module importing another's private name, relatively or absolutely, is named."""
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "__init__.py").write_text("from __future__ import annotations\nfrom rksmolvlm import "
                                                  "__version__\n")
    (tmp_path / "pkg" / "a.py").write_text("def f():\n    from .b import _hidden\n")
    (tmp_path / "pkg" / "b.py").write_text("from rksmolvlm.runtime.server.exchange import Gateway\n_hidden = 1\n")
    monkeypatch.setitem(globals(), "ROOT", tmp_path)
    monkeypatch.setitem(globals(), "PACKAGES", {"pkg": "pkg"})
    monkeypatch.setitem(globals(), "MODULES", _modules())
    assert _private_imports() == ["pkg/a.py:2 imports _hidden from pkg.b"]


def test_the_server_modules_import_one_another_without_a_cycle():
    graph = _server_graph()
    assert f"{SERVER}.exchange" in graph[f"{SERVER}.openai"] and f"{SERVER}.exchange" in graph[f"{SERVER}.ollama"]
    assert _cycle(graph) is None, " → ".join(_cycle(graph))


def test_the_adapters_meet_only_in_the_app():
    """The OpenAI and Ollama adapters know the exchange, not each other; http.py assembles both."""
    graph = _server_graph()
    openai, ollama, http = f"{SERVER}.openai", f"{SERVER}.ollama", f"{SERVER}.http"
    assert ollama not in graph[openai] and openai not in graph[ollama]
    assert http not in graph[openai] | graph[ollama]
    assert {openai, ollama} <= graph[http]


def test_the_cycle_check_finds_one_inside_a_function():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_an_import_inside_a_function_is_an_edge(tmp_path, monkeypatch):
    package = tmp_path / "runtime" / "server"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "one.py").write_text("from rksmolvlm.runtime.server import two\n")
    (package / "two.py").write_text("def later():\n    from rksmolvlm.runtime.server.one import thing\n")
    monkeypatch.setitem(globals(), "ROOT", tmp_path)
    monkeypatch.setitem(globals(), "PACKAGES", {"runtime": "rksmolvlm.runtime"})
    monkeypatch.setitem(globals(), "MODULES", _modules())
    assert _cycle(_server_graph()) == [f"{SERVER}.one", f"{SERVER}.two", f"{SERVER}.one"]


# ==============================================================================================
# Media references → bytes, images and videos alike
# ==============================================================================================
MIB = 1024 * 1024
KINDS = pytest.mark.parametrize("kind", [IMAGE, VIDEO], ids=["image", "video"])


def _png() -> bytes:
    import io

    buffer = io.BytesIO()
    rng_image(32, 24, seed=5).save(buffer, format="PNG")
    return buffer.getvalue()


SAMPLES = {"image": (_png(), "image/png", "cat.png"),
           "video": ((DATA / "video" / "h264_24fps_96x64.mp4").read_bytes(), "video/mp4", "clip.mp4")}


def _source(**overrides) -> MediaSource:
    return MediaSource(with_overrides(ServerConfig(), overrides))


def _data_uri(data: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def _read(kind: MediaKind, url: str, source: MediaSource | None = None) -> bytes:
    return (source or _source()).read(MediaRef.parse(kind, url, f"messages[0].content[0].{kind.name}_url"))


def _refused(kind: MediaKind, url: str, source: MediaSource | None = None) -> ApiError:
    with pytest.raises(ApiError) as info:
        _read(kind, url, source)
    error = info.value
    assert error.param == f"messages[0].content[0].{kind.name}_url"
    return error


@KINDS
def test_a_data_uri_gives_its_bytes(kind):
    data, mime, _ = SAMPLES[kind.name]
    assert _read(kind, _data_uri(data, mime)) == data
    encoded = base64.b64encode(data).decode()
    wrapped = "\n".join(encoded[i:i + 76] for i in range(0, len(encoded), 76))
    assert _read(kind, f"data:{mime};base64,{wrapped}") == data  # a client's line-wrapped base64


def test_a_generic_data_type_is_typed_from_the_bytes_for_images_and_kept_for_videos():
    png, _, _ = SAMPLES["image"]
    ref = MediaRef.parse(IMAGE, _data_uri(png, "application/octet-stream"), "p")
    assert ref.url.startswith("data:image/png;base64,") and _source().read(ref) == png
    clip, _, _ = SAMPLES["video"]
    ref = MediaRef.parse(VIDEO, _data_uri(clip, "application/octet-stream"), "p")
    assert ref.url.startswith("data:application/octet-stream;") and _source().read(ref) == clip


@KINDS
@pytest.mark.parametrize("case, url, code, words", [
    ("no comma", "data:{mime};base64", "invalid_{kind}_url", "not a valid data: URI"),
    ("not base64", "data:{mime};base64,@@@@", "invalid_{kind}", "not valid base64"),
    ("not base64-encoded", "data:{mime},abcd", "invalid_{kind}_url", "must be base64-encoded"),
    ("the other kind's type", "data:{other};base64,AAAA", "unsupported_{kind}_type", "goes in a"),
    ("a type of neither", "data:text/html;base64,AAAA", "unsupported_{kind}_type", "send "),
    ("NUL in a data URI", "data:{mime};base64,AA\x00AA", "invalid_{kind}_url", "NUL"),
    ("CR/LF in a URL", "http://127.0.0.1:9/a\r\nX-Injected: 1", "invalid_{kind}_url", "control characters"),
    ("a lone surrogate", "/srv/media/\ud800", "invalid_{kind}_url", "invalid Unicode"),
    ("an ftp URL", "ftp://example.com/a", "invalid_{kind}_url", "'ftp'"),
    ("a relative path", "media/a", "invalid_{kind}_url", "a relative path"),
])
def test_a_bad_reference_is_refused_by_name(kind, case, url, code, words):
    mime, other = ("image/png", "video/mp4") if kind is IMAGE else ("video/mp4", "image/png")
    error = _refused(kind, url.format(mime=mime, other=other))
    assert (error.status, error.code) == (400, code.format(kind=kind.name)), (case, error.message)
    assert words in error.message, (case, error.message)


@KINDS
def test_a_data_uri_over_the_byte_limit_is_refused_before_decoding(kind):
    source = _source(**{kind.limit_key: 1000})
    error = _refused(kind, f"data:{SAMPLES[kind.name][1]};base64," + "A" * 4000, source)
    assert (error.status, error.code) == (413, f"{kind.name}_too_large")
    assert f"{kind.limit_key} = 1,000" in error.message and "about 3,000" in error.message


@KINDS
def test_a_local_file_under_local_dir_gives_its_bytes(kind, tmp_path):
    data, _, name = SAMPLES[kind.name]
    (tmp_path / name).write_bytes(data)
    source = _source(**{"images.local_dir": str(tmp_path)})
    assert _read(kind, str(tmp_path / name), source) == data
    assert _read(kind, (tmp_path / name).as_uri(), source) == data
    assert _read(kind, f"file://localhost{tmp_path / name}", source) == data


@KINDS
def test_local_files_are_refused_by_name(kind, tmp_path):
    data, _, name = SAMPLES[kind.name]
    inside, outside = tmp_path / "media", tmp_path / "elsewhere"
    inside.mkdir()
    outside.mkdir()
    (inside / name).write_bytes(data)
    (outside / name).write_bytes(data)
    (inside / "folder").mkdir()
    os.mkfifo(inside / "fifo")
    (inside / "escape").symlink_to(outside / name)
    source = _source(**{"images.local_dir": str(inside), kind.limit_key: len(data) - 1})
    cases = {
        "local_dir unset": (str(inside / name), _source(), f"local_{kind.name}s_disabled", "images.local_dir"),
        "outside local_dir": (str(outside / name), source, f"{kind.name}_path_not_allowed", "outside"),
        "a .. escape": (f"{inside}/../elsewhere/{name}", source, f"{kind.name}_path_not_allowed", "outside"),
        "a symlink out": (str(inside / "escape"), source, f"{kind.name}_path_not_allowed", "outside"),
        "another host": (f"file://example.com{inside / name}", source, f"invalid_{kind.name}_url", "this machine"),
        "%00 in a file URL": (f"file://{inside}/a%00b", source, f"invalid_{kind.name}_url", "NUL"),
        "missing": (str(inside / "missing"), source, f"invalid_{kind.name}", "no such file"),
        "a directory": (str(inside / "folder"), source, f"invalid_{kind.name}", "cannot read the file"),
        "a FIFO": (str(inside / "fifo"), source, f"invalid_{kind.name}", "not a regular file"),
    }
    for case, (url, reader, code, words) in cases.items():
        error = _refused(kind, url, reader)
        assert (error.status, error.code) == (400, code), (case, error.message)
        assert words in error.message, (case, error.message)
    error = _refused(kind, str(inside / name), source)
    assert (error.status, error.code) == (413, f"{kind.name}_too_large") and kind.limit_key in error.message


class _Media(LoopbackHandler):
    """/cat.png and /clip.mp4 with their types, /typeless, /page (HTML), /big (declares more than it sends)."""

    def do_GET(self):  # noqa: N802 - the handler's name
        image, video = SAMPLES["image"], SAMPLES["video"]
        routes = {"/cat.png": (image[0], image[1]), "/clip.mp4": (video[0], video[1]),
                  "/typeless": (video[0], "application/octet-stream"), "/page": (b"<p>hi</p>", "text/html")}
        if self.path == "/big":
            self.send_response(200)
            self.send_header("Content-Type", "video/mp4" if "video" in self.headers.get("Accept", "") else "image/png")
            self.send_header("Content-Length", str(100 * MIB))
            self.end_headers()
            return
        if self.path not in routes:
            self.send_error(404)
            return
        self.reply(200, *routes[self.path])


@pytest.fixture(scope="module")
def remote():
    with loopback_http(_Media) as url:
        yield url


def _remote_source(**more) -> MediaSource:
    return _source(**{"images.allow_remote": True, "images.allow_private_networks": True, **more})


@KINDS
def test_a_remote_url_gives_its_bytes(kind, remote):
    data, _, name = SAMPLES[kind.name]
    assert _read(kind, f"{remote}/{name}", _remote_source()) == data


def test_a_remote_video_may_come_untyped_but_an_image_may_not(remote):
    assert _read(VIDEO, f"{remote}/typeless", _remote_source()) == SAMPLES["video"][0]
    error = _refused(IMAGE, f"{remote}/typeless", _remote_source())
    assert error.code == "unsupported_image_type" and "PNG, JPEG" in error.message


@KINDS
def test_remote_urls_are_refused_by_name(kind, remote):
    name = SAMPLES[kind.name][2]
    cases = {
        "remote off": (f"{remote}/{name}", _source(), 400, f"remote_{kind.name}s_disabled", "images.allow_remote"),
        "a private address": (f"{remote}/{name}", _source(**{"images.allow_remote": True}), 400,
                              f"{kind.name}_url_not_allowed", "images.allow_private_networks"),
        "not found": (f"{remote}/missing", _remote_source(), 400, f"{kind.name}_fetch_failed", "HTTP 404"),
        "another type": (f"{remote}/page", _remote_source(), 400, f"unsupported_{kind.name}_type", "did not answer"),
        "declared too big": (f"{remote}/big", _remote_source(), 413, f"{kind.name}_too_large", kind.limit_key),
        "credentials": ("http://user:pw@127.0.0.1/a", _remote_source(), 400, f"invalid_{kind.name}_url",
                        "credentials"),
    }
    for case, (url, source, status, code, words) in cases.items():
        error = _refused(kind, url, source)
        assert (error.status, error.code) == (status, code), (case, error.message)
        assert words in error.message, (case, error.message)


@KINDS
def test_a_remote_body_over_the_limit_is_cut_off(kind, remote):
    data, _, name = SAMPLES[kind.name]
    error = _refused(kind, f"{remote}/{name}", _remote_source(**{kind.limit_key: len(data) // 2}))
    assert (error.status, error.code) == (413, f"{kind.name}_too_large")


def test_the_kinds_differ_only_in_data():
    """One reading path: what an image and a video reference differ in is their kind's fields."""
    assert IMAGE.limit(ServerConfig()) == ServerConfig().limits.max_image_bytes
    assert VIDEO.limit(ServerConfig()) == ServerConfig().video.max_bytes
    assert IMAGE.accepts("image/jpeg") and not IMAGE.accepts("video/mp4") and not IMAGE.accepts("")
    assert VIDEO.accepts("video/webm") and VIDEO.accepts("application/octet-stream") and not VIDEO.accepts("image/png")
    assert not [name for name in vars(MediaSource) if "image" in name or "video" in name]


def test_loopback_is_really_refused_without_private_networks(remote):
    """The loopback server is reachable (so the refusal above is the address check, not a dead port)."""
    host, port = remote.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=2):
        pass


# ==============================================================================================
# The exchange: one event pump, whatever the adapter's wire format
# ==============================================================================================
class _FakeService:
    """A ModelService as the Gateway uses it: ready, queues jobs, records cancels."""

    def __init__(self):
        from rksmolvlm.runtime.server.metrics import Metrics
        from rksmolvlm.runtime.server.model import ServedModel

        self.model = ServedModel("tiny", (), 2048, 0, "host")
        self.metrics = Metrics()
        self.state = "ready"
        self.jobs, self.cancels = [], []

    def submit(self, chat, loop, request_id, client=""):
        from rksmolvlm.runtime.server.service import Job

        self.jobs.append(Job(chat, loop, request_id, client))
        return self.jobs[-1]

    def cancel(self, job, reason, answer=None):
        self.cancels.append(reason)
        return True


class _TaggedFrames:
    """A third adapter's wire format (as a Responses API would bring): one tagged line per event."""

    def opening(self) -> bytes:
        return b"created"

    def delta(self, text: str) -> bytes:
        return b"delta:" + text.encode()

    def done(self, answer):
        yield b"completed:" + answer.finish_reason.encode()

    def error(self, error):
        yield b"failed:" + error.code.encode()


def _pumped(events: list[tuple[str, object]], leave: bool = False):
    """The frames a stream of ``events`` becomes through the Gateway, the request's scope, the service."""
    import asyncio
    from types import SimpleNamespace

    from rksmolvlm.runtime.engines import GenerationConfig
    from rksmolvlm.runtime.server.exchange import Gateway
    from rksmolvlm.runtime.server.requests import ChatRequest

    async def run():
        gone = asyncio.Event()

        async def receive():
            await gone.wait()
            return {"type": "http.disconnect"}

        service = _FakeService()
        gateway = Gateway(service, ServerConfig())
        request = SimpleNamespace(scope={"state": {"request_id": "r1"}}, receive=receive)
        exchange = gateway.enqueue(request, ChatRequest([], GenerationConfig(max_new_tokens=8), stream=True))
        for kind, value in events:
            service.jobs[0].post(kind, value)
        if leave:
            gone.set()
        stream = gateway.stream(request, exchange, _TaggedFrames(), {"Content-Type": "text/plain"})
        return [chunk async for chunk in stream.chunks], request.scope, service

    return asyncio.run(run())


def test_the_pump_writes_a_finished_answer_in_the_adapters_frames():
    from rksmolvlm.runtime.server.service import Answer

    answer = Answer("A cup.", [5, 6], "stop", 12, None, 3.0)
    chunks, scope, service = _pumped([("delta", "A "), ("delta", "cup."), ("done", answer)])
    assert chunks == [b"created", b"delta:A ", b"delta:cup.", b"completed:stop"]
    log = scope["state"]["log"]
    assert (log["prompt_tokens"], log["completion_tokens"], log["finish"], log["max_tokens"]) == (12, 2, "stop", 8)
    assert service.cancels == ["client_disconnect"]  # the closing cancel, a no-op on a finished job


def test_the_pump_counts_an_error_and_ends_with_the_adapters_error_frame():
    chunks, scope, service = _pumped([("delta", "A"), ("error", ApiError(504, "too slow", "request_timeout"))])
    assert chunks == [b"created", b"delta:A", b"failed:request_timeout"]
    assert scope["state"]["log"]["error"] == "request_timeout"
    assert service.metrics.value("rksmolvlm_errors_total", code="request_timeout") == 1


def test_the_pump_stops_and_cancels_the_job_when_the_client_leaves():
    chunks, scope, service = _pumped([], leave=True)
    assert chunks == [b"created"]
    assert service.cancels[0] == "client_disconnect" and "finish" not in scope["state"]["log"]


class _StalledBody:
    """A request whose head declares ``declared`` body bytes and whose body never comes."""

    def __init__(self, declared: str):
        self.headers = {"content-length": declared}
        self.read = 0

    async def stream(self):
        import asyncio

        self.read += 1
        await asyncio.Event().wait()
        yield b""  # pragma: no cover - never reached


@pytest.mark.parametrize("declared", ["1000000000", str(10 ** 30)])
def test_a_declared_length_over_the_limit_is_413_before_any_byte_is_read(declared):
    """A Content-Length of 10^9 waited for a body it would refuse anyway: the head alone answers."""
    import asyncio

    from rksmolvlm.runtime.server.exchange import read_body

    request = _StalledBody(declared)
    with pytest.raises(ApiError) as refused:
        asyncio.run(asyncio.wait_for(read_body(request, 1024 * 1024), timeout=2))
    error = refused.value
    assert (error.status, error.code) == (413, "request_too_large") and "limits.max_body_bytes" in error.message
    assert request.read == 0

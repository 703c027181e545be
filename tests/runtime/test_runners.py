"""The one Runner factory (rksmolvlm/runners.py): engine names and "auto", the engines it opens for
each name, engines closed again when the Runner refuses its settings, the simulator's need for its
tiles, and the serve verb handing the factory to the server (which does not import it)."""

from types import SimpleNamespace

import numpy as np
import pytest

from support.fakes import FakeLlm, FakeVision
from rksmolvlm import runners
from rksmolvlm.errors import BundleError
from rksmolvlm.runtime.engines import EngineOptions


def test_auto_is_the_npu_on_a_rockchip_board_and_the_host_preview_elsewhere(tmp_path, monkeypatch):
    tree = tmp_path / "proc" / "device-tree"
    tree.mkdir(parents=True)
    assert not runners.on_rockchip_board(str(tmp_path))
    (tree / "compatible").write_bytes(b"radxa,rock-5b\x00rockchip,rk3588\x00")
    assert runners.on_rockchip_board(str(tmp_path))
    for board, expected in ((True, "npu"), (False, "host")):
        monkeypatch.setattr(runners, "on_rockchip_board", lambda root="/", board=board: board)
        assert runners.resolve_engine("auto") == expected == runners.RUNNERS.resolve("auto")
    assert [runners.resolve_engine(e) for e in ("host", "npu", "sim")] == ["host", "npu", "sim"]
    with pytest.raises(BundleError, match="unknown engine 'gpu': choose one of auto, host, npu, sim"):
        runners.resolve_engine("gpu")


@pytest.mark.parametrize("engine, module, maker", [("host", "rksmolvlm.preview.host_engines", "make_host_engines"),
                                                   ("npu", "rksmolvlm.runtime.npu_engines", "make_npu_engines")])
def test_each_name_opens_its_engines_with_the_options(engine, module, maker, monkeypatch):
    import importlib

    seen = {}

    def make(bundle, options):
        seen.update(bundle=bundle, options=options)
        return FakeVision(2, 4), FakeLlm()

    monkeypatch.setattr(importlib.import_module(module), maker, make)
    bundle, options = object(), EngineOptions(threads=2, cores=(1,), max_new_tokens=64)
    vision, llm = runners.open_engines(bundle, engine, options)
    assert isinstance(vision, FakeVision) and isinstance(llm, FakeLlm)
    assert seen == {"bundle": bundle, "options": options}


def test_the_engines_are_closed_when_the_runner_refuses_its_settings(monkeypatch):
    import rksmolvlm.preview.host_engines as host

    opened = [FakeVision(2, 4), FakeLlm()]
    monkeypatch.setattr(host, "make_host_engines", lambda bundle, options: tuple(opened))
    with pytest.raises(ValueError, match="default_detail 'sometimes'"):
        runners.open_runner(object(), "host", default_detail="sometimes")
    assert [engine.closed for engine in opened] == [True, True]


def test_the_simulator_needs_the_tiles_it_will_encode():
    with pytest.raises(BundleError, match="pass a Simulation"):
        runners.open_engines(object(), "sim")
    bundle = SimpleNamespace(manifest=SimpleNamespace(llm=SimpleNamespace(decoder_dir=None)), path="/b")
    with pytest.raises(BundleError, match="no host-preview decoder"):
        runners.open_engines(bundle, "sim", simulation=runners.Simulation(np.zeros((0, 4, 4, 3), np.uint8), "/tmp"))
    assert runners.engine_notes(bundle, "host") == []


def test_the_serve_verb_hands_the_server_the_factory(monkeypatch):
    import rksmolvlm.runtime.server as server
    from rksmolvlm.cli import main

    handed = []
    monkeypatch.setattr(server, "serve_command", lambda args, factory: handed.append(factory) or 0)
    assert main(["serve", "/srv/bundle"]) == 0
    assert handed == [runners.RUNNERS]

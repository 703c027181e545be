"""One engine contract: every vision encoder and LLM engine — the NPU's, the host preview's, the
simulator's tower and the tests' fakes and wrappers — defines every member of its interface itself
(no ``__getattr__`` forwarding that would hide a missing one), with the interface's parameter names,
so the pipeline never probes an engine for what it can do."""

import inspect

import pytest

from support.fakes import FakeLlm, FakeVision, LlmWrapper, RecordingLlm, VisionWrapper
from rksmolvlm.convert.simulator import SimulatedVisionEncoder
from rksmolvlm.preview.host_engines import OnnxVisionEncoder, TorchLlmEngine
from rksmolvlm.runtime.engines import LlmEngine, VisionEncoder
from rksmolvlm.runtime.npu_engines import RkllmEngine, RknnLiteVisionEncoder, RknnRuntimeVisionEncoder

VISION = [RknnLiteVisionEncoder, RknnRuntimeVisionEncoder, OnnxVisionEncoder, SimulatedVisionEncoder, FakeVision,
          VisionWrapper]
LLM = [RkllmEngine, TorchLlmEngine, FakeLlm, LlmWrapper, RecordingLlm]


def _members(protocol) -> set[str]:
    return {name for name in vars(protocol) if not name.startswith("_")}


def test_the_interfaces_are_complete():
    assert _members(VisionEncoder) == {"encode", "encode_frames", "close"}
    assert _members(LlmEngine) == {"generate", "abort", "clear_history", "history_tokens", "embedding_table", "close"}


@pytest.mark.parametrize("engine, protocol", [(e, VisionEncoder) for e in VISION] + [(e, LlmEngine) for e in LLM],
                         ids=lambda x: getattr(x, "__name__", ""))
def test_every_engine_implements_the_whole_interface(engine, protocol):
    assert "__getattr__" not in vars(engine), f"{engine.__name__} forwards unknown names: define the members"
    for name in _members(protocol):
        assert hasattr(engine, name), f"{engine.__name__} has no {name}"
        want = vars(protocol)[name]
        got = inspect.getattr_static(engine, name)
        assert isinstance(got, property) == isinstance(want, property), f"{engine.__name__}.{name}"
        if callable(want):
            assert list(inspect.signature(got).parameters) == list(inspect.signature(want).parameters), \
                f"{engine.__name__}.{name}{inspect.signature(got)} is not {name}{inspect.signature(want)}"


def test_the_fakes_are_engines():
    vision, llm = FakeVision(4, 8), FakeLlm()
    assert isinstance(vision, VisionEncoder) and isinstance(llm, LlmEngine)
    assert isinstance(VisionWrapper(vision), VisionEncoder) and isinstance(RecordingLlm(llm), LlmEngine)

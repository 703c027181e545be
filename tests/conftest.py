"""Shared fixtures: tiny random SmolVLM checkpoints (both classes, both token layouts), built
offline once per session, host-preview bundles of them, a small set of calibration images, and
fake engines that cost nothing (``FakeVision``, ``FakeLlm``) for tests of the runner's wiring.

Nothing at module level imports torch or transformers: ``tests/board_path.py`` imports the fakes
from here in a process where those imports are blocked.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

ROOT = Path(__file__).resolve().parents[1]
TINY_NAMES = ("idefics3-256m", "idefics3-2b", "smolvlm2")


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory) -> dict[str, Path]:
    from rksmolvlm.convert.tiny_checkpoint import build_tiny_checkpoint

    root = tmp_path_factory.mktemp("checkpoints")
    return {name: build_tiny_checkpoint(name, root / name) for name in TINY_NAMES}


@pytest.fixture(scope="session", params=TINY_NAMES)
def tiny_checkpoint(request, tiny_checkpoints) -> Path:
    return tiny_checkpoints[request.param]


@pytest.fixture(scope="session")
def calibration_dir(tmp_path_factory) -> Path:
    """Five small synthetic photos-like images of varied shapes (fast to tile)."""
    from PIL import Image

    root = tmp_path_factory.mktemp("calibration")
    rng = np.random.RandomState(7)
    for i, (w, h) in enumerate([(640, 480), (300, 800), (900, 700), (200, 200), (1024, 300)]):
        ramp = np.linspace(0, 255, w)[None, :, None] * np.ones((h, 1, 3))
        pixels = (ramp * 0.6 + rng.randint(0, 100, (h, w, 3))).clip(0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(root / f"image_{i}.png")
    return root


def rng_image(width: int, height: int, mode: str = "RGB", seed: int = 0):
    """A random image in any PIL mode, built from smooth gradients plus noise."""
    from PIL import Image

    rng = np.random.RandomState(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 / max(width - 1, 1), y * 255 / max(height - 1, 1),
                     (x + y) * 127 / max(width + height - 2, 1), rng.randint(0, 256, (height, width))], -1)
    noisy = (base * 0.8 + rng.randint(0, 50, base.shape)).clip(0, 255).astype(np.uint8)
    return Image.fromarray(noisy, "RGBA").convert(mode)


DOUBLES = ROOT / "tests" / "doubles"


def _purge_rkllm():
    import sys

    for name in [m for m in sys.modules if m == "rkllm" or m.startswith("rkllm.")]:
        del sys.modules[name]


@pytest.fixture
def rkllm_double(monkeypatch):
    """Install the rkllm-toolkit contract double at a given version; returns its RKLLM class
    (whose ``calls`` list records every call)."""
    import sys

    def install(version: str = "1.3.0"):
        _purge_rkllm()
        monkeypatch.setenv("RKLLM_DOUBLE_VERSION", version)
        monkeypatch.setattr(sys, "path", [str(DOUBLES), *sys.path])
        from rkllm.api import RKLLM

        RKLLM.calls = []
        return RKLLM

    yield install
    _purge_rkllm()


@pytest.fixture
def no_rkllm(monkeypatch):
    """Make ``import rkllm`` fail, whatever is installed."""
    import builtins

    _purge_rkllm()
    real_import = builtins.__import__

    def guarded(name, *args, **kwargs):
        if name == "rkllm" or name.startswith("rkllm."):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", guarded)
    yield
    _purge_rkllm()


@pytest.fixture(scope="session")
def preview_bundles(tiny_checkpoints, tmp_path_factory) -> dict[str, Path]:
    """Host-preview bundles (vision.onnx + decoder/) of the three tiny checkpoints, built once."""
    from rksmolvlm.convert.pipeline import ConvertOptions, convert
    from rksmolvlm.convert.progress import Progress

    root = tmp_path_factory.mktemp("preview-bundles")
    out = {}
    for name, path in tiny_checkpoints.items():
        out[name] = root / name
        convert(ConvertOptions(model=str(path), output=out[name], host_preview=True, llm_host_only=True,
                               llm_dataset_format="text"), Progress(0, quiet=True))
    return out


@pytest.fixture(scope="session")
def runtime_bundles(preview_bundles) -> dict:
    """The preview bundles opened for inference (RuntimeBundle), by tiny layout name."""
    from rksmolvlm.runtime.loader import RuntimeBundle

    return {name: RuntimeBundle.open(path) for name, path in preview_bundles.items()}


@pytest.fixture(scope="session")
def demo_preview_bundle(tmp_path_factory) -> Path:
    """The trained tiny demo model (convert/demo_model.py, Idefics3 class) converted as ``rksmolvlm demo``
    does (host preview, decoder for the host only), built once on first use (~20 s). Asked "What is on
    the table?" it answers "A coffee cup." about the shipped coffee photo and "There is no table." about
    the cat."""
    from rksmolvlm.convert.demo_model import build_demo_checkpoint
    from rksmolvlm.convert.pipeline import ConvertOptions, convert
    from rksmolvlm.convert.progress import Progress

    root = tmp_path_factory.mktemp("demo-preview")
    checkpoint = build_demo_checkpoint(root / "demo-idefics3", "idefics3")
    convert(ConvertOptions(model=str(checkpoint), output=root / "bundle", host_preview=True, llm_host_only=True,
                           llm_dataset_format="text"), Progress(0, quiet=True))
    return root / "bundle"


# -- transformers' side of parity checks ------------------------------------------------------------
class HfProcessor:
    """transformers' own chat template, tokenizer and processor for one checkpoint: the reference
    the prompt ids are compared with."""

    def __init__(self, path: Path):
        import json

        import transformers as tf

        self.path = path
        config = json.loads((path / "config.json").read_text())
        self.smolvlm = config["model_type"] == "smolvlm"
        if self.smolvlm:  # SmolVLMProcessor needs torchvision for its video part: use its pieces
            self.tokenizer = tf.AutoTokenizer.from_pretrained(path)
            self.images = tf.SmolVLMImageProcessorPil.from_pretrained(path)
            self.seq_len = json.loads((path / "processor_config.json").read_text())["image_seq_len"]
        else:
            self.processor = tf.AutoProcessor.from_pretrained(path)
            self.tokenizer = self.processor.tokenizer

    def template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        return self.tokenizer.apply_chat_template(template_messages(messages), tokenize=False,
                                                  add_generation_prompt=add_generation_prompt)

    def inputs(self, text: str, images: list):
        """(input ids, pixel values or None) of a rendered prompt and its images."""
        if not self.smolvlm:
            out = self.processor(text=text, images=[images] if images else None, return_tensors="pt")
            return out["input_ids"][0].tolist(), out.get("pixel_values")
        import torch
        from transformers.models.smolvlm.processing_smolvlm import get_image_prompt_string

        pixel_values = None
        if images:
            processed = self.images(images=[images], return_tensors="np", return_row_col_info=True)
            pieces = text.split("<image>")
            text = pieces[0] + "".join(
                get_image_prompt_string(r, c, self.seq_len, "<fake_token_around_image>", "<image>", "<global-img>") + p
                for r, c, p in zip(processed["rows"][0], processed["cols"][0], pieces[1:]))
            pixel_values = torch.from_numpy(processed["pixel_values"])
        return self.tokenizer(text, add_special_tokens=False)["input_ids"], pixel_values


def template_messages(messages: list[dict]) -> list[dict]:
    """Dict messages as transformers' chat template takes them (image parts without their source)."""
    out = []
    for m in messages:
        content = m["content"]
        if isinstance(content, str):
            content = [{"type": "text", "text": content}]
        out.append({"role": m["role"], "content": [{"type": p["type"], **({"text": p["text"]} if p["type"] == "text"
                                                                          else {})} for p in content]})
    return out


def message_images(messages: list[dict]) -> list:
    return [p["image"] for m in messages if not isinstance(m["content"], str) for p in m["content"]
            if p["type"] == "image"]


# -- fake engines ---------------------------------------------------------------------------------
class FakeVision:
    """A vision encoder with the real output shape that costs nothing: tile i's features are its
    mean pixel value plus a ramp, so different tiles and images give different features."""

    def __init__(self, seq: int, hidden: int):
        self.seq, self.hidden = seq, hidden
        self.calls: list[int] = []  # tiles per encode() call
        self.closed = False

    @classmethod
    def for_bundle(cls, bundle) -> "FakeVision":
        _, seq, hidden = bundle.manifest.vision.output_shape
        return cls(seq, hidden)

    def encode(self, tiles: np.ndarray) -> np.ndarray:
        self.calls.append(len(tiles))
        means = tiles.reshape(len(tiles), -1).mean(axis=1, dtype=np.float32) / 255
        ramp = np.linspace(-1, 1, self.seq * self.hidden, dtype=np.float32).reshape(self.seq, self.hidden)
        return means[:, None, None] + ramp[None]

    @property
    def tiles(self) -> int:
        return sum(self.calls)

    def close(self) -> None:
        self.closed = True


@dataclass
class Prefill:
    """One generate() call as the fake LLM saw it."""

    embeddings: np.ndarray
    keep_history: bool
    history_before: int


class FakeLlm:
    """An LLM engine that records the embeddings it was given and yields ``script`` (a list of
    ids, settable between requests) until a stop id (yielded too), ``max_new_tokens``, the end of
    the script or an abort. Like the real engines its history counts the prefill and every
    generated token."""

    def __init__(self, script: Sequence[int] = ()):
        self.script = list(script)
        self.prefills: list[Prefill] = []
        self.yielded: list[list[int]] = []  # the ids each generate() call yielded
        self.aborts = 0
        self.clears = 0
        self.closed = False
        self._history = 0
        self._abort = threading.Event()

    @property
    def history_tokens(self) -> int:
        return self._history

    def embedding_table(self):
        return None

    def generate(self, embeddings, config, keep_history, stats):
        self._abort.clear()
        if not keep_history:
            self._history = 0
        self.prefills.append(Prefill(np.array(embeddings, copy=True), keep_history, self._history))
        self._history += len(embeddings)
        stats.prefill_tokens += len(embeddings)
        out: list[int] = []
        self.yielded.append(out)
        for token in self.script[:config.max_new_tokens]:
            if self._abort.is_set():
                return
            out.append(token)
            self._history += 1
            stats.generate_tokens += 1
            yield token
            if token in config.stop_ids:
                return

    def abort(self) -> None:
        self.aborts += 1
        self._abort.set()

    def clear_history(self) -> None:
        self.clears += 1
        self._history = 0

    def close(self) -> None:
        self.closed = True


def fake_runner(bundle, script: Sequence[int] = (), **kwargs):
    """A Runner on ``bundle`` with a FakeVision and a FakeLlm(script)."""
    from rksmolvlm.runtime.runner import Runner

    return Runner(bundle, FakeVision.for_bundle(bundle), FakeLlm(script), **kwargs)


@pytest.fixture
def rknnlite_double(monkeypatch):
    """The rknn-toolkit-lite2 contract double on sys.path; returns its RKNNLite class."""
    import sys

    for name in [m for m in sys.modules if m == "rknnlite" or m.startswith("rknnlite.")]:
        del sys.modules[name]
    monkeypatch.setattr(sys, "path", [str(DOUBLES), *sys.path])
    from rknnlite.api import RKNNLite

    RKNNLite.instances = []
    yield RKNNLite
    for name in [m for m in sys.modules if m == "rknnlite" or m.startswith("rknnlite.")]:
        del sys.modules[name]


def minimal_manifest() -> dict:
    """The smallest manifest dict the reader accepts, without schema_version, created_by and files
    (the bundle writer adds those)."""
    return {
        "source": {"model_id": "tiny"},
        "model": {"family": "idefics3", "architecture": "Idefics3ForConditionalGeneration", "size": "tiny",
                  "vision": {"image_seq_len": 4}, "text": {"hidden_size": 8, "vocab_size": 32}},
        "target": {"platform": "rk3588", "npu_cores": 3}, "toolkits": {}, "min_runtime": {},
        "processor": {"tile_size": 32, "longest_edge": 64, "do_image_splitting": True, "resample": 1,
                      "rescale_factor": 1 / 255, "image_mean": [0.5] * 3, "image_std": [0.5] * 3,
                      "image_seq_len": 4},
        "tokens": {"image": "<image>", "image_id": 3, "fake_image": "<fake_token_around_image>",
                   "global_image": "<global-img>", "end_of_utterance": "<end_of_utterance>", "eos_ids": [2]},
        "chat_template": "", "tokenizer": "tokenizer.json",
    }


HEALTH_LIMIT_S = 0.1  # /health answers within 100 ms throughout a hostile case


def health_within_limit(latencies: list[float], slowest_s: float = 0.5) -> bool:
    """Every /health probe within HEALTH_LIMIT_S, but for rare scheduling hiccups of the test
    process or a loaded machine: one probe in twenty, never past ``slowest_s``. A lock-out shows as
    refusals or seconds, which this still catches."""
    slow = [t for t in latencies if t >= HEALTH_LIMIT_S]
    return bool(latencies) and len(slow) <= max(1, len(latencies) // 20) and max(latencies) < slowest_s


@contextlib.contextmanager
def loopback_http(handler):
    """A threaded HTTP server on 127.0.0.1 answering with ``handler``; yields its base URL."""
    from http.server import ThreadingHTTPServer

    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


class RecordingLlm:
    """The real engine, recording the GenerationConfig of every generation and slowed down per
    token when asked (so that requests overlap)."""

    def __init__(self, llm):
        self.llm = llm
        self.configs: list = []  # GenerationConfig of each generation
        self.delay = 0.0

    def generate(self, embeddings, config, keep_history, stats):
        self.configs.append(config)
        for token in self.llm.generate(embeddings, config, keep_history, stats):
            if self.delay:
                time.sleep(self.delay)
            yield token

    def __getattr__(self, name):
        return getattr(self.llm, name)

"""Host-preview engines: onnxruntime on ``vision.onnx`` and torch on the extracted decoder.

They run the board's pipeline on x86 without an NPU. torch and onnxruntime are imported only when
these engines are built, never on the board path.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Generator

import numpy as np

from rksmolvlm.errors import BundleError
from rksmolvlm.processing.image import ImageSettings, normalize
from rksmolvlm.runtime.engines import EngineOptions, GenerationConfig, PerfStats

if TYPE_CHECKING:
    from rksmolvlm.processing.video_frames import VideoSettings
    from rksmolvlm.runtime.loader import RuntimeBundle

__all__ = ["OnnxVisionEncoder", "TorchLlmEngine", "make_host_engines", "make_host_vision"]


class OnnxVisionEncoder:
    """The bundle's ``vision.onnx`` (normalized float NCHW input) in onnxruntime."""

    def __init__(self, onnx_path: Path, settings: ImageSettings, threads: int | None = None,
                 video_settings: "VideoSettings | None" = None):
        try:
            import onnxruntime as ort
        except ImportError as exc:
            raise BundleError("the host preview needs onnxruntime: pip install 'rksmolvlm[host]'") from exc
        if not onnx_path.is_file():
            raise BundleError(f"{onnx_path} is missing: convert with --host-preview to run the host preview")
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name
        self.batch = int(self.session.get_inputs()[0].shape[0])
        self.settings = settings
        self.video_settings = video_settings

    def encode(self, tiles: np.ndarray) -> np.ndarray:
        return self._run(normalize(tiles, self.settings))

    def encode_frames(self, frames: np.ndarray) -> np.ndarray:
        """Video frames (unsplit tiles): normalised as transformers' video processor does (its fused
        ``(x − 127.5)/127.5``, one float32 rounding away from the image path's on some levels; without
        video settings, SmolVLM2's)."""
        from rksmolvlm.processing.video_frames import normalize_frames

        return self._run(normalize_frames(frames, self.video_settings))

    def _run(self, x: np.ndarray) -> np.ndarray:
        outs = [self.session.run(None, {self.input_name: x[i:i + self.batch]})[0] for i in range(0, len(x), self.batch)]
        return np.concatenate(outs, axis=0).astype(np.float32, copy=False)

    def close(self) -> None:
        self.session = None


def cache_keyword(model) -> str:
    """The name the model's forward takes its KV cache by: ``cache`` from transformers 5.x (where
    ``past_key_values`` is deprecated, to be removed in 5.40), ``past_key_values`` before."""
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


class TorchLlmEngine:
    """The extracted LlamaForCausalLM with a KV cache kept across turns."""

    def __init__(self, decoder_dir: Path, threads: int | None = None):
        try:
            import torch
            import transformers
        except ImportError as exc:
            raise BundleError("the host preview needs torch and transformers: pip install 'rksmolvlm[host]'") from exc
        if not (decoder_dir / "config.json").is_file():
            raise BundleError(f"{decoder_dir} is missing: convert with --host-preview to run the host preview")
        if threads:
            torch.set_num_threads(threads)
        transformers.utils.logging.disable_progress_bar()
        transformers.utils.logging.set_verbosity_error()
        self.torch = torch
        self.model = transformers.LlamaForCausalLM.from_pretrained(str(decoder_dir), dtype=torch.float32).eval()
        self._cache_keyword = cache_keyword(self.model)
        self._cache = None
        self._cached = 0
        self._abort = threading.Event()

    def embedding_table(self) -> np.ndarray:
        """Full-precision token embeddings (the host preview matches transformers exactly)."""
        return self.model.get_input_embeddings().weight.detach().numpy()

    @property
    def history_tokens(self) -> int:
        return self._cached

    def clear_history(self) -> None:
        self._cache, self._cached = None, 0

    def abort(self) -> None:
        self._abort.set()

    def close(self) -> None:
        self.clear_history()
        self.model = None

    def _forward(self, embeds):
        from transformers import DynamicCache

        torch = self.torch
        if self._cache is None:
            self._cache = DynamicCache()
        n = embeds.shape[1]
        positions = torch.arange(self._cached, self._cached + n)[None]
        # logits_to_keep=1: lm_head on the last position only (a prefill needs no other logits);
        # the model derives its cache positions from the cache's own length
        out = self.model(inputs_embeds=embeds, use_cache=True, position_ids=positions, logits_to_keep=1,
                         **{self._cache_keyword: self._cache})
        self._cached += n
        return out.logits[0, -1]

    def _pick(self, logits, config: GenerationConfig, generator, previous: list[int]) -> int:
        torch = self.torch
        logits = logits.float().clone()
        if config.repeat_penalty != 1.0 and previous:
            index = torch.tensor(sorted(set(previous)))
            values = logits[index]
            logits[index] = torch.where(values > 0, values / config.repeat_penalty, values * config.repeat_penalty)
        if (config.frequency_penalty or config.presence_penalty) and previous:
            counts = torch.bincount(torch.tensor(previous), minlength=logits.numel())[:logits.numel()].float()
            logits -= counts * config.frequency_penalty + (counts > 0).float() * config.presence_penalty
        if config.greedy:
            return int(torch.argmax(logits))
        logits = logits / config.temperature
        if config.top_k:
            kth = torch.topk(logits, min(config.top_k, logits.numel())).values[-1]
            logits[logits < kth] = -float("inf")
        probs = torch.softmax(logits, dim=-1)
        if config.top_p < 1.0:
            sorted_probs, order = torch.sort(probs, descending=True)
            keep = torch.cumsum(sorted_probs, dim=-1) - sorted_probs < config.top_p
            keep[0] = True  # the top token always: a top_p under float32's least (1e-300) compares as 0
            mask = torch.zeros_like(probs, dtype=torch.bool)
            mask[order[keep]] = True
            probs = torch.where(mask, probs, torch.zeros_like(probs))
            probs = probs / probs.sum()
        return int(torch.multinomial(probs, 1, generator=generator))

    def generate(self, embeddings: np.ndarray, config: GenerationConfig, keep_history: bool,
                 stats: PerfStats) -> Generator[int, None, None]:
        if config.grammar is not None:
            return self._generate_structured(embeddings, config, keep_history, stats)
        return self._generate_free(embeddings, config, keep_history, stats)

    def _generate_free(self, embeddings: np.ndarray, config: GenerationConfig, keep_history: bool,
                       stats: PerfStats) -> Generator[int, None, None]:
        torch = self.torch
        self._abort.clear()
        if not keep_history:
            self.clear_history()
        generator = torch.Generator().manual_seed(config.seed) if config.seed is not None else None
        embed = self.model.get_input_embeddings()
        produced: list[int] = []
        with torch.no_grad():
            start = time.perf_counter()
            logits = self._forward(torch.from_numpy(np.ascontiguousarray(embeddings, dtype=np.float32))[None])
            stats.prefill_tokens += len(embeddings)
            stats.prefill_ms += (time.perf_counter() - start) * 1000
            start = time.perf_counter()
            while len(produced) < config.max_new_tokens and not self._abort.is_set():
                token = self._pick(logits, config, generator, produced)
                produced.append(token)
                stats.generate_tokens += 1
                stats.generate_ms = (time.perf_counter() - start) * 1000
                yield token
                if token in config.stop_ids or len(produced) >= config.max_new_tokens:
                    break
                logits = self._forward(embed(torch.tensor([[token]])))
        # The last token was yielded but never fed: put it in the cache so history is complete.
        if produced and not self._abort.is_set():
            with torch.no_grad():
                self._forward(embed(torch.tensor([[produced[-1]]])))

    def _generate_structured(self, embeddings: np.ndarray, config: GenerationConfig, keep_history: bool,
                             stats: PerfStats) -> Generator[int, None, None]:
        """The answer under ``config.grammar``, chosen on the CPU by a ``Guide`` (runtime/structured):
        the ids the grammar forces at the start go in with the prompt, then each step samples one id
        under the mask and the run the grammar forces after it is yielded and fed in one forward. The
        KV cache holds exactly the prompt and the yielded ids. A complete grammar ends the answer with
        ``config.stop_ids[0]`` (the bundle's end of utterance), which counts against max_new_tokens
        as the model's own stop id does; without room for it the answer ends by length."""
        from rksmolvlm.runtime.structured.guide import Guide

        torch = self.torch
        grammar = config.grammar
        assert grammar is not None
        self._abort.clear()
        if not keep_history:
            self.clear_history()
        stop_ids = config.stop_ids or grammar.stop_ids
        guide = Guide(config, grammar.constraint())
        embed = self.model.get_input_embeddings()
        limit = config.max_new_tokens
        produced = 0
        with torch.no_grad():
            start = time.perf_counter()
            run = _with_end(guide, guide.begin(), stop_ids)[:limit]
            x = torch.from_numpy(np.ascontiguousarray(embeddings, dtype=np.float32))[None]
            if run:  # the forced head (e.g. '{"') is prefilled with the prompt
                x = torch.cat([x, embed(torch.tensor([run]))], dim=1)
            logits = self._forward(x)
            stats.prefill_tokens += len(embeddings)
            stats.prefill_ms += (time.perf_counter() - start) * 1000
            start = time.perf_counter()
            in_cache = True  # whether ``run`` is in the KV cache yet
            while True:
                for token in run:
                    if self._abort.is_set():
                        break
                    produced += 1
                    stats.generate_tokens += 1
                    stats.generate_ms = (time.perf_counter() - start) * 1000
                    yield token
                if self._abort.is_set() or produced >= limit or (run and run[-1] in stop_ids):
                    break
                if not in_cache:
                    logits = self._forward(embed(torch.tensor([run])))
                run = _with_end(guide, guide.step(logits.numpy()), stop_ids)[:limit - produced]
                in_cache = False
            # The last run was yielded but never fed: put it in the cache so history is complete.
            if run and not in_cache and not self._abort.is_set():
                self._forward(embed(torch.tensor([run])))


def _with_end(guide, run: list[int], stop_ids: tuple[int, ...]) -> list[int]:
    """``run`` ended by the first stop id when the grammar is complete and the run does not end in one."""
    if guide.done and not (run and run[-1] in stop_ids):
        return [*run, stop_ids[0]]
    return run


def make_host_engines(bundle: "RuntimeBundle", options: EngineOptions) -> tuple[OnnxVisionEncoder, TorchLlmEngine]:
    """The host-preview engines of a bundle converted with --host-preview."""
    manifest = bundle.manifest
    if not manifest.vision.onnx or not manifest.llm.decoder_dir:
        raise BundleError(f"{bundle.path} has no host-preview files (vision.onnx, decoder/): convert with "
                          "--host-preview, or run on the board with --engine npu")
    vision = make_host_vision(bundle, options)
    try:
        return vision, TorchLlmEngine(bundle.file(manifest.llm.decoder_dir), options.threads)
    except BaseException:
        vision.close()
        raise


def make_host_vision(bundle: "RuntimeBundle", options: EngineOptions) -> OnnxVisionEncoder:
    """The bundle's ``vision.onnx`` in onnxruntime with ``options.threads`` intra-op threads."""
    if not bundle.manifest.vision.onnx:
        raise BundleError(f"{bundle.path} has no vision.onnx: convert with --host-preview, or run on the board "
                          "with --engine npu")
    return OnnxVisionEncoder(bundle.file(bundle.manifest.vision.onnx), bundle.settings, options.threads,
                             bundle.video_settings)

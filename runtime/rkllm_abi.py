"""ctypes layouts of librkllmrt's C API (rkllm.h), for the two incompatible ABIs.

``1.2``: runtime 1.2.1–1.2.3 (RKLLMParam 208 bytes with img_* fields, RKLLMInput 64,
RKLLMInferParam 32, ``rkllm_init`` takes the bare result callback). ``1.3``: runtime 1.3.0
(RKLLMParam 184 with ignore_eos_token, RKLLMInput 160, RKLLMInferParam 40 with sampling
parameters and max_new_tokens, ``rkllm_init`` takes an RKLLMCallback struct). The structs are
written here from the published header facts; ``Abi.check_sizes`` asserts them at load, so a
wrong layout is an error, never a segfault.
"""

from __future__ import annotations

import ctypes as C
from dataclasses import dataclass
from typing import Any

from rksmolvlm.errors import BundleError

__all__ = ["Abi", "ABIS", "abi_for_version", "LLMCallState", "INPUT_EMBED", "INPUT_TOKEN", "INFER_GENERATE",
           "INFER_GET_LOGITS", "probe_default_param", "OPTIONAL_SYMBOLS"]

# LLMCallState
RUN_NORMAL, RUN_WAITING, RUN_FINISH, RUN_ERROR = 0, 1, 2, 3
LLMCallState = {RUN_NORMAL: "NORMAL", RUN_WAITING: "WAITING", RUN_FINISH: "FINISH", RUN_ERROR: "ERROR"}
INPUT_PROMPT, INPUT_TOKEN, INPUT_EMBED, INPUT_MULTIMODAL = 0, 1, 2, 3
# RKLLMInferMode. GET_LOGITS: the callback's ``logits`` member (RKLLMResultLogits, offset 32 of
# RKLLMResult in both ABIs) holds num_tokens × vocab_size floats, valid during the callback only:
# every input position in the prefill (rknn-llm #245), then 1 × vocab per step while the runtime
# keeps sampling by itself; refused with n_batch > 1 (#406).
INFER_GENERATE, INFER_GET_LAST_HIDDEN_LAYER, INFER_GET_LOGITS = 0, 1, 2

# Symbols not every librkllmrt exports: probed with hasattr, never required at load.
# rkllm_get_kv_cache_size(handle, int* cache_sizes /* n_batch entries */) is in the headers of
# 1.2.1, 1.2.2, 1.2.3 and 1.3.0 (not in 1.2.0, whose rkllm_clear_kv_cache takes two arguments).
OPTIONAL_SYMBOLS = ("rkllm_get_kv_cache_size",)


class ExtendParam(C.Structure):
    _fields_ = [("base_domain_id", C.c_int32), ("embed_flash", C.c_int8), ("enabled_cpus_num", C.c_int8),
                ("enabled_cpus_mask", C.c_uint32), ("n_batch", C.c_uint8), ("use_cross_attn", C.c_int8),
                ("reserved", C.c_uint8 * 104)]


# typed as ctypes field entries so it can be spliced into both Param structs' _fields_
_SAMPLING_HEAD: list[tuple[str, type[C._SimpleCData[Any]]]] = [
    ("max_context_len", C.c_int32), ("max_new_tokens", C.c_int32), ("top_k", C.c_int32), ("n_keep", C.c_int32),
    ("top_p", C.c_float), ("temperature", C.c_float), ("repeat_penalty", C.c_float),
    ("frequency_penalty", C.c_float), ("presence_penalty", C.c_float), ("mirostat", C.c_int32),
    ("mirostat_tau", C.c_float), ("mirostat_eta", C.c_float)]


class Param12(C.Structure):
    _fields_ = [("model_path", C.c_char_p), *_SAMPLING_HEAD, ("skip_special_token", C.c_bool),
                ("is_async", C.c_bool), ("img_start", C.c_char_p), ("img_end", C.c_char_p),
                ("img_content", C.c_char_p), ("extend_param", ExtendParam)]


class Param13(C.Structure):
    _fields_ = [("model_path", C.c_char_p), *_SAMPLING_HEAD, ("skip_special_token", C.c_bool),
                ("ignore_eos_token", C.c_bool), ("is_async", C.c_bool), ("extend_param", ExtendParam)]


class EmbedInput(C.Structure):
    _fields_ = [("embed", C.POINTER(C.c_float)), ("n_tokens", C.c_size_t)]


class TokenInput(C.Structure):
    _fields_ = [("input_ids", C.POINTER(C.c_int32)), ("n_tokens", C.c_size_t)]


class MultiModal12(C.Structure):
    _fields_ = [("prompt", C.c_char_p), ("image_embed", C.POINTER(C.c_float)), ("n_image_tokens", C.c_size_t),
                ("n_image", C.c_size_t), ("image_width", C.c_size_t), ("image_height", C.c_size_t)]


class _Image13(C.Structure):
    _fields_ = [("image_embed", C.POINTER(C.c_float)), ("n_image_tokens", C.c_size_t), ("n_image", C.c_size_t),
                ("image_start", C.c_char_p), ("image_end", C.c_char_p), ("image_content", C.c_char_p),
                ("image_width", C.c_size_t), ("image_height", C.c_size_t)]


class _Video13(C.Structure):
    _fields_ = [("video_embed", C.POINTER(C.c_float)), ("n_frame_tokens", C.c_size_t),
                ("n_frame_per_video", C.c_size_t), ("n_video", C.c_size_t), ("video_start", C.c_char_p),
                ("video_end", C.c_char_p), ("video_content", C.c_char_p), ("frame_width", C.c_size_t),
                ("frame_height", C.c_size_t)]


class MultiModal13(C.Structure):
    _fields_ = [("prompt", C.c_char_p), ("image", _Image13), ("video", _Video13)]


def _input(multimodal):
    class Union(C.Union):
        _fields_ = [("prompt_input", C.c_char_p), ("embed_input", EmbedInput), ("token_input", TokenInput),
                    ("multimodal_input", multimodal)]

    class Input(C.Structure):
        _anonymous_ = ("u",)
        _fields_ = [("role", C.c_char_p), ("enable_thinking", C.c_bool), ("input_type", C.c_int), ("u", Union)]

    return Input


Input12, Input13 = _input(MultiModal12), _input(MultiModal13)


class LoraParam(C.Structure):
    _fields_ = [("lora_adapter_name", C.c_char_p)]


class PromptCacheParam(C.Structure):
    _fields_ = [("save_prompt_cache", C.c_int), ("prompt_cache_path", C.c_char_p)]


class SamplingParam(C.Structure):
    _fields_ = [("top_k", C.c_int32), ("top_p", C.c_float), ("temperature", C.c_float),
                ("repeat_penalty", C.c_float), ("frequency_penalty", C.c_float), ("presence_penalty", C.c_float),
                ("mirostat", C.c_int32), ("mirostat_tau", C.c_float), ("mirostat_eta", C.c_float)]


class InferParam12(C.Structure):
    _fields_ = [("mode", C.c_int), ("lora_params", C.POINTER(LoraParam)),
                ("prompt_cache_params", C.POINTER(PromptCacheParam)), ("keep_history", C.c_int)]


class InferParam13(C.Structure):
    _fields_ = [("mode", C.c_int), ("lora_params", C.POINTER(LoraParam)),
                ("prompt_cache_params", C.POINTER(PromptCacheParam)),
                ("sampling_params", C.POINTER(SamplingParam)), ("keep_history", C.c_int),
                ("max_new_tokens", C.c_int32)]


class LastHiddenLayer(C.Structure):
    _fields_ = [("hidden_states", C.POINTER(C.c_float)), ("embd_size", C.c_int), ("num_tokens", C.c_int)]


class Logits(C.Structure):
    _fields_ = [("logits", C.POINTER(C.c_float)), ("vocab_size", C.c_int), ("num_tokens", C.c_int)]


class PerfStat(C.Structure):
    _fields_ = [("prefill_time_ms", C.c_float), ("prefill_tokens", C.c_int), ("generate_time_ms", C.c_float),
                ("generate_tokens", C.c_int), ("memory_usage_mb", C.c_float)]


class Result(C.Structure):
    _fields_ = [("text", C.c_char_p), ("token_id", C.c_int32), ("last_hidden_layer", LastHiddenLayer),
                ("logits", Logits), ("perf", PerfStat)]


ResultCallback = C.CFUNCTYPE(C.c_int, C.POINTER(Result), C.c_void_p, C.c_int)
TokenizerCallback = C.CFUNCTYPE(C.c_int, C.c_void_p, C.c_char_p, C.c_int32, C.POINTER(C.c_int32), C.c_int32)
EmbedCallback = C.CFUNCTYPE(C.c_int, C.c_void_p, C.POINTER(C.c_int32), C.c_uint64, C.c_void_p, C.c_uint64)


class Callback13(C.Structure):
    _fields_ = [("result_callback", ResultCallback), ("result_userdata", C.c_void_p),
                ("tokenizer_callback", TokenizerCallback), ("tokenizer_userdata", C.c_void_p),
                ("embed_callback", EmbedCallback), ("embed_userdata", C.c_void_p)]


@dataclass(frozen=True)
class Abi:
    """One ABI: its structs, the sizes/offsets they must have on LP64, and how init is called."""

    name: str
    param: type
    input: type
    infer: type
    sizes: dict
    offsets: dict
    init_takes_struct: bool
    has_sampling: bool

    def check_sizes(self) -> None:
        if C.sizeof(C.c_void_p) != 8:
            raise BundleError("librkllmrt layouts are defined for 64-bit Linux (aarch64) only")
        problems = [f"sizeof({n}) {C.sizeof(t)} != {want}" for n, (t, want) in self.sizes.items()
                    if C.sizeof(t) != want]
        problems += [f"offsetof({t.__name__}.{f}) {getattr(t, f).offset} != {want}"
                     for (t, f), want in self.offsets.items() if getattr(t, f).offset != want]
        if problems:
            raise BundleError(f"internal: librkllmrt {self.name} layout is wrong: {'; '.join(problems)}")


ABIS = {
    "1.2": Abi("1.2", Param12, Input12, InferParam12,
               sizes={"RKLLMExtendParam": (ExtendParam, 120), "RKLLMParam": (Param12, 208), "RKLLMInput": (Input12, 64),
                      "RKLLMInferParam": (InferParam12, 32), "RKLLMResult": (Result, 72),
                      "RKLLMResultLogits": (Logits, 16), "RKLLMTokenInput": (TokenInput, 16),
                      "RKLLMMultiModalInput": (MultiModal12, 48), "RKLLMPerfStat": (PerfStat, 20)},
               offsets={(Param12, "extend_param"): 88, (Input12, "input_type"): 12, (Input12, "u"): 16,
                        (InferParam12, "keep_history"): 24, (Result, "logits"): 32, (Result, "perf"): 48,
                        (TokenInput, "n_tokens"): 8},
               init_takes_struct=False, has_sampling=False),
    "1.3": Abi("1.3", Param13, Input13, InferParam13,
               sizes={"RKLLMExtendParam": (ExtendParam, 120), "RKLLMParam": (Param13, 184),
                      "RKLLMInput": (Input13, 160),
                      "RKLLMInferParam": (InferParam13, 40), "RKLLMResult": (Result, 72),
                      "RKLLMResultLogits": (Logits, 16), "RKLLMTokenInput": (TokenInput, 16),
                      "RKLLMMultiModalInput": (MultiModal13, 144), "RKLLMSamplingParam": (SamplingParam, 36),
                      "RKLLMCallback": (Callback13, 48), "RKLLMPerfStat": (PerfStat, 20)},
               offsets={(Param13, "extend_param"): 60, (Input13, "input_type"): 12, (Input13, "u"): 16,
                        (InferParam13, "keep_history"): 32, (InferParam13, "max_new_tokens"): 36,
                        (Result, "logits"): 32, (Result, "perf"): 48, (TokenInput, "n_tokens"): 8},
               init_takes_struct=True, has_sampling=True),
}


def abi_for_version(version: str | None) -> Abi | None:
    """1.2.1–1.2.x → ABI 1.2, 1.3.x → ABI 1.3; None for an unknown or missing version."""
    if not version:
        return None
    parts = version.split(".")
    try:
        major, minor = int(parts[0]), int(parts[1])
        patch = int("".join(ch for ch in (parts[2] if len(parts) > 2 else "0") if ch.isdigit()) or 0)
    except (ValueError, IndexError):
        return None
    if (major, minor) == (1, 3):
        return ABIS["1.3"]
    if (major, minor) == (1, 2) and patch >= 1:
        return ABIS["1.2"]
    return None


class _Oversized(C.Structure):
    _fields_ = [("raw", C.c_uint8 * 512)]  # larger than any RKLLMParam: safe for the struct return


def probe_default_param(lib) -> str | None:
    """Guess the library's ABI from ``rkllm_createDefaultParam``: its default n_batch (1) sits in
    extend_param at offset 60 + 12 (1.3) or 88 + 12 (1.2). Returns "1.2", "1.3" or None."""
    fn = lib.rkllm_createDefaultParam
    fn.argtypes, fn.restype = [], _Oversized
    raw = bytes(fn().raw)
    at13, at12 = raw[60 + 12] == 1, raw[88 + 12] == 1
    if at13 and not at12:
        return "1.3"
    if at12 and not at13:
        return "1.2"
    return None

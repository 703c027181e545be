"""The board engines: the vision tower on RKNNLite or on librknnrt directly through ctypes (one
context and one worker per NPU core, so a split image's tiles run in parallel; ``make_npu_vision``
chooses) and the decoder on librkllmrt through ctypes (embedding input, streamed through the result
callback, abortable, KV cache kept across turns)."""

from __future__ import annotations

import ctypes
import ctypes.util
import importlib.util
import mmap
import os
import queue
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Generator, Sequence

import numpy as np

from rksmolvlm.boards import BoardProfile, load_profile
from rksmolvlm.errors import BundleError, RkSmolVLMError, ToolkitMissingError
from rksmolvlm.runtime import rkllm_abi as abi_mod
from rksmolvlm.runtime import rknn_abi
from rksmolvlm.runtime.engines import EngineOptions, GenerationConfig, PerfStats

if TYPE_CHECKING:
    from rksmolvlm.runtime.loader import RuntimeBundle

__all__ = ["RknnLiteVisionEncoder", "RknnRuntimeVisionEncoder", "RkllmEngine", "find_rkllm_library",
           "find_rknn_library", "choose_vision_backend", "make_npu_engines", "make_npu_vision", "LIBRARY_DIRS",
           "VISION_BACKENDS",
           "EngineError", "BatchedLogitsError", "KvCacheMismatchError"]

LIBRARY_DIRS = ("/usr/lib", "/usr/local/lib", "/usr/lib/aarch64-linux-gnu")
LIBRARY_ENV = "RKLLM_LIBRARY"
RKNN_LIBRARY_ENV = "RKNN_LIBRARY"
VISION_BACKEND_ENV = "RKSMOLVLM_VISION_BACKEND"
VISION_BACKENDS = ("auto", "rknnlite", "librknnrt")
_RKNNRT_SOURCE = "rknpu2/runtime/Linux/librknn_api/aarch64/librknnrt.so of github.com/airockchip/rknn-toolkit2"
ABI_ENV = "RKSMOLVLM_RKLLM_ABI"


class EngineError(RkSmolVLMError):
    """An NPU runtime call failed."""


class BatchedLogitsError(EngineError):
    """Structured output needs RKLLM_INFER_GET_LOGITS, which librkllmrt refuses with n_batch > 1 (rknn-llm #406)."""


class KvCacheMismatchError(EngineError):
    """After a GET_LOGITS step librkllmrt's KV cache does not hold exactly the prompt and the chosen tokens."""


# -- vision ------------------------------------------------------------------------------------
class RknnLiteVisionEncoder:
    """``vision.rknn`` on RKNNLite: one runtime per NPU core (core masks from the board profile),
    one worker thread per runtime; tiles are spread over them and come back in tile order."""

    def __init__(self, rknn_path: Path, core_masks: Sequence[int]):
        try:
            from rknnlite.api import RKNNLite
        except ImportError as exc:
            raise ToolkitMissingError("rknn-toolkit-lite2 is not installed: pip install 'rksmolvlm[board]' "
                                      "(or pip install rknn-toolkit-lite2) on the board") from exc
        if not rknn_path.is_file():
            raise BundleError(f"{rknn_path} is missing: the bundle has no vision model")
        if not core_masks:
            raise BundleError("no NPU cores selected: pass at least one core")
        self.runtimes = []
        try:
            for mask in core_masks:
                runtime = RKNNLite()
                self.runtimes.append(runtime)  # released by close() even if its set-up fails
                if runtime.load_rknn(str(rknn_path)) != 0:
                    raise EngineError(f"RKNNLite could not load {rknn_path}: the file is damaged or was built "
                                      "by an rknn-toolkit2 newer than this rknn-toolkit-lite2")
                if runtime.init_runtime(core_mask=mask) != 0:
                    raise EngineError(
                        f"RKNNLite init_runtime(core_mask={mask}) failed: check that librknnrt.so is installed "
                        "(/usr/lib/librknnrt.so from the board image or rknn-toolkit2's rknpu2 runtime), that the "
                        "bundle's target matches this SoC, and that you may open the NPU device")
        except BaseException:
            self.close()
            raise
        self.core_masks = tuple(core_masks)
        self._locks = [threading.Lock() for _ in self.runtimes]
        self._pool = ThreadPoolExecutor(max_workers=len(self.runtimes), thread_name_prefix="rknn-core")

    def _run_share(self, index: int, tiles: np.ndarray, positions: list[int], out: list) -> None:
        runtime = self.runtimes[index]
        with self._locks[index]:
            for position in positions:
                result = runtime.inference(inputs=[np.ascontiguousarray(tiles[position:position + 1])],
                                           data_format="nhwc")
                if result is None:
                    raise EngineError(f"RKNNLite inference failed on NPU core mask {self.core_masks[index]}")
                out[position] = np.asarray(result[0], dtype=np.float32)[0]

    def encode(self, tiles: np.ndarray) -> np.ndarray:
        tiles = np.asarray(tiles)
        if tiles.dtype != np.uint8 or tiles.ndim != 4 or tiles.shape[-1] != 3:
            raise ValueError("tiles must be uint8 (N, T, T, 3)")
        out: list = [None] * len(tiles)
        shares = [list(range(i, len(tiles), len(self.runtimes))) for i in range(len(self.runtimes))]
        futures = [self._pool.submit(self._run_share, i, tiles, share, out) for i, share in enumerate(shares) if share]
        for future in futures:
            future.result()
        return np.stack(out)

    def encode_frames(self, frames: np.ndarray) -> np.ndarray:
        """Video frames are unsplit tiles to the RKNN model: it bakes (x − 127.5) / 127.5 in for both."""
        return self.encode(frames)

    def close(self) -> None:
        pool = getattr(self, "_pool", None)
        if pool is not None:
            pool.shutdown(wait=True)
        for runtime in self.runtimes:
            runtime.release()
        self.runtimes = []


class RknnRuntimeVisionEncoder:
    """``vision.rknn`` on librknnrt through ctypes (rknn_api.h), for boards without rknn-toolkit-lite2
    (Python 3.13): one context per NPU core (rknn_init once, rknn_dup_context for the others, core
    masks from the board profile), one worker per context. Zero-copy by default: each context's input
    and output live in runtime memory (rknn_create_mem + rknn_set_io_mem), a tile is written there
    once and the float32 features are read back from there; ``zero_copy=False`` uses rknn_inputs_set
    and rknn_outputs_get into the result array instead."""

    def __init__(self, rknn_path: Path, core_masks: Sequence[int], library: Path | None = None,
                 zero_copy: bool = True):
        rknn_abi.check_layout()
        if not rknn_path.is_file():
            raise BundleError(f"{rknn_path} is missing: the bundle has no vision model")
        if not core_masks:
            raise BundleError("no NPU cores selected: pass at least one core")
        library = library or find_rknn_library()
        try:
            self.lib = ctypes.CDLL(str(library))
        except OSError as exc:
            raise ToolkitMissingError(f"cannot load {library} ({exc}): it must be the aarch64 librknnrt.so from "
                                      f"Rockchip's rknn-toolkit2 release ({_RKNNRT_SOURCE})") from exc
        missing = rknn_abi.declare(self.lib)
        if missing:
            raise ToolkitMissingError(f"{library} lacks {', '.join(missing)}: it is not librknnrt.so ≥ 1.6.0; install "
                                      f"the one from Rockchip's rknn-toolkit2 release ({_RKNNRT_SOURCE})")
        self.core_masks = tuple(core_masks)
        self.zero_copy = zero_copy
        self._cores: list[_RknnCore] = []
        try:
            first = self._init_context(rknn_path, library)
            self._cores.append(_RknnCore(self.lib, first, self.core_masks[0], zero_copy))
            for mask in self.core_masks[1:]:
                ctx = rknn_abi.rknn_context()
                code = self.lib.rknn_dup_context(ctypes.byref(first), ctypes.byref(ctx))
                if code != 0:
                    raise EngineError(f"rknn_dup_context returned {code} ({rknn_abi.error_name(code)}): the runtime "
                                      "could not add a context for another NPU core; choose fewer cores")
                self._cores.append(_RknnCore(self.lib, ctx, mask, zero_copy))
            self.sdk_version = self._cores[0].sdk_version()
        except BaseException:
            self.close()
            raise
        self.tile_shape = self._cores[0].tile_shape
        self.feature_shape = self._cores[0].feature_shape
        self._pool: ThreadPoolExecutor | None = ThreadPoolExecutor(max_workers=len(self._cores),
                                                                   thread_name_prefix="rknn-core")

    def _init_context(self, rknn_path: Path, library: Path) -> ctypes.c_uint64:
        """rknn_init from the model mapped in memory (copy-on-write: no Python copy of a 200–900 MB file);
        the runtime keeps its own copy, the mapping is closed after."""
        ctx = rknn_abi.rknn_context()
        if rknn_path.stat().st_size == 0:
            raise BundleError(f"{rknn_path} is empty: copy the bundle again")
        with open(rknn_path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY) as blob:
            size = len(blob)
            buffer = (ctypes.c_uint8 * size).from_buffer(blob)
            try:
                code = self.lib.rknn_init(ctypes.byref(ctx), ctypes.addressof(buffer), size, 0, None)
            finally:
                del buffer  # the mapping cannot close while a ctypes view holds it
        if code != 0:
            raise EngineError(
                f"rknn_init returned {code} ({rknn_abi.error_name(code)}) for {rknn_path}: check that {library} is the "
                "librknnrt.so of the rknn-toolkit2 version that built the bundle (or newer), that the bundle's target "
                "matches this SoC, and that you may open the NPU device (/dev/dri/renderD129 or /dev/rknpu)")
        return ctx

    def _run_share(self, index: int, tiles: np.ndarray, positions: list[int], out: np.ndarray) -> None:
        core = self._cores[index]
        for position in positions:
            core.run(tiles[position], out[position])

    def encode(self, tiles: np.ndarray) -> np.ndarray:
        tiles = np.asarray(tiles)
        if tiles.dtype != np.uint8 or tiles.ndim != 4 or tiles.shape[-1] != 3:
            raise ValueError("tiles must be uint8 (N, T, T, 3)")
        if tiles.shape[1:3] != self.tile_shape:
            raise EngineError(f"vision.rknn takes {self.tile_shape[0]}×{self.tile_shape[1]} tiles, got "
                              f"{tiles.shape[1]}×{tiles.shape[2]}: the bundle's settings and its tower disagree; "
                              "convert the bundle again")
        out = np.empty((len(tiles), *self.feature_shape), dtype=np.float32)
        shares = [list(range(i, len(tiles), len(self._cores))) for i in range(len(self._cores))]
        if self._pool is None:
            raise EngineError("the vision encoder is closed")
        futures = [self._pool.submit(self._run_share, i, tiles, share, out) for i, share in enumerate(shares) if share]
        for future in futures:
            future.result()
        return out

    def encode_frames(self, frames: np.ndarray) -> np.ndarray:
        """Video frames are unsplit tiles to the RKNN model: it bakes (x − 127.5) / 127.5 in for both."""
        return self.encode(frames)

    def close(self) -> None:
        pool = getattr(self, "_pool", None)
        if pool is not None:
            pool.shutdown(wait=True)
            self._pool = None
        problems = []
        for core in getattr(self, "_cores", []):
            problems += core.close()
        self._cores = []
        if problems:
            raise EngineError(f"librknnrt refused to release: {'; '.join(problems)}")


class _RknnCore:
    """One librknnrt context on one NPU core mask, with its input/output memory; one caller at a time."""

    def __init__(self, lib, ctx: ctypes.c_uint64, mask: int, zero_copy: bool):
        self.lib, self.ctx, self.mask = lib, ctx, mask
        self.mems: list = []
        self.lock = threading.Lock()
        try:
            self._set_up(zero_copy)
        except BaseException:
            self.close()  # the context and any memory made so far: the caller never sees this core
            raise

    def _set_up(self, zero_copy: bool) -> None:
        lib, ctx, mask = self.lib, self.ctx, self.mask
        code = lib.rknn_set_core_mask(ctx, mask)
        if code != 0:
            raise EngineError(f"rknn_set_core_mask({mask}) returned {code} ({rknn_abi.error_name(code)}): the core "
                              "mask is not one of this SoC's; check the board profile and the cores option")
        counts = rknn_abi.InputOutputNum()
        self._query(rknn_abi.QUERY_IN_OUT_NUM, counts)
        if (counts.n_input, counts.n_output) != (1, 1):
            raise EngineError(f"vision.rknn has {counts.n_input} inputs and {counts.n_output} outputs, expected 1 and "
                              "1: it is not a tower rksmolvlm converted")
        self.input = rknn_abi.TensorAttr(index=0)
        self._query(rknn_abi.QUERY_INPUT_ATTR, self.input)
        self.output = rknn_abi.TensorAttr(index=0)
        self._query(rknn_abi.QUERY_OUTPUT_ATTR, self.output)
        dims = self.input.shape
        if len(dims) != 4 or dims[0] != 1 or 3 not in (dims[1], dims[3]):
            raise EngineError(f"vision.rknn's input is {dims}, expected one 3-channel image (1, H, W, 3)")
        height, width = (dims[1], dims[2]) if self.input.fmt == rknn_abi.FORMAT_NHWC else (dims[2], dims[3])
        self.tile_shape = (height, width)
        self.feature_shape = self.output.shape[1:] if self.output.shape[:1] == (1,) else self.output.shape
        self.n_out = int(self.output.n_elems)
        self.zero_copy = zero_copy
        if zero_copy:
            self._bind_memory(height, width)

    def _query(self, cmd: int, info) -> None:
        code = self.lib.rknn_query(self.ctx, cmd, ctypes.byref(info), ctypes.sizeof(info))
        if code != 0:
            raise EngineError(f"rknn_query({cmd}) returned {code} ({rknn_abi.error_name(code)})")

    def _bind_memory(self, height: int, width: int) -> None:
        """Input as uint8 NHWC rows of the runtime's width stride, output as float32 (converted by the runtime)."""
        attr = self.input
        attr.type, attr.fmt, attr.pass_through = rknn_abi.TENSOR_UINT8, rknn_abi.FORMAT_NHWC, 0
        stride = int(attr.w_stride) or width
        in_mem = self._create(max(int(attr.size_with_stride), height * stride * 3))
        self._bind(in_mem, attr, "input")
        self.in_view = _mem_array(in_mem, height * stride * 3, np.uint8).reshape(height, stride, 3)[:, :width]
        out_attr = self.output
        out_attr.type = rknn_abi.TENSOR_FLOAT32
        out_mem = self._create(self.n_out * 4)
        self._bind(out_mem, out_attr, "output")
        self.out_view = _mem_array(out_mem, self.n_out * 4, np.float32).reshape(self.feature_shape)

    def _create(self, size: int):
        mem = self.lib.rknn_create_mem(self.ctx, size)
        if not mem:
            raise EngineError(f"rknn_create_mem({size}) failed on NPU core mask {self.mask}: out of NPU memory?")
        self.mems.append(mem)
        return mem

    def _bind(self, mem, attr, what: str) -> None:
        code = self.lib.rknn_set_io_mem(self.ctx, mem, ctypes.byref(attr))
        if code != 0:
            raise EngineError(f"rknn_set_io_mem ({what}) returned {code} ({rknn_abi.error_name(code)}): this "
                              f"librknnrt cannot bind the tower's {what} ({rknn_abi.type_name(attr.type)}); set "
                              f"{VISION_BACKEND_ENV}=rknnlite or report the tower's tensor attributes")

    def sdk_version(self) -> tuple[str, str]:
        version = rknn_abi.SdkVersion()
        self._query(rknn_abi.QUERY_SDK_VERSION, version)
        return version.api_version.decode(errors="replace"), version.drv_version.decode(errors="replace")

    def run(self, tile: np.ndarray, out: np.ndarray) -> None:
        """One tile → its features in ``out`` (float32, feature_shape)."""
        with self.lock:
            if self.zero_copy:  # rknn_run syncs the cacheable memory both ways (no DISABLE_FLUSH flag at init)
                np.copyto(self.in_view, tile)
                self._check(self.lib.rknn_run(self.ctx, None), "rknn_run")
                np.copyto(out, self.out_view)
                return
            tile = np.ascontiguousarray(tile)
            inputs = rknn_abi.Input(index=0, buf=tile.ctypes.data, size=tile.nbytes, pass_through=0,
                                    type=rknn_abi.TENSOR_UINT8, fmt=rknn_abi.FORMAT_NHWC)
            self._check(self.lib.rknn_inputs_set(self.ctx, 1, ctypes.byref(inputs)), "rknn_inputs_set")
            self._check(self.lib.rknn_run(self.ctx, None), "rknn_run")
            # the runtime writes the float32 features into ``out`` itself (is_prealloc)
            output = rknn_abi.Output(want_float=1, is_prealloc=1, index=0, buf=out.ctypes.data, size=out.nbytes)
            self._check(self.lib.rknn_outputs_get(self.ctx, 1, ctypes.byref(output), None), "rknn_outputs_get")
            self._check(self.lib.rknn_outputs_release(self.ctx, 1, ctypes.byref(output)), "rknn_outputs_release")

    def _check(self, code: int, call: str) -> None:
        if code != 0:
            raise EngineError(f"{call} returned {code} ({rknn_abi.error_name(code)}) on NPU core mask {self.mask}")

    def close(self) -> list[str]:
        """Free the memory, then the context; the problems met (empty when all went well)."""
        problems = []
        with self.lock:
            for mem in self.mems:
                code = self.lib.rknn_destroy_mem(self.ctx, mem)
                if code != 0:
                    problems.append(f"rknn_destroy_mem returned {code}")
            self.mems = []
            if self.ctx.value:
                code = self.lib.rknn_destroy(self.ctx)
                if code != 0:
                    problems.append(f"rknn_destroy returned {code}")
                self.ctx = rknn_abi.rknn_context()
        return problems


def _mem_array(mem, size: int, dtype) -> np.ndarray:
    """A numpy view of runtime memory (rknn_tensor_mem.virt_addr + offset), valid until rknn_destroy_mem."""
    base = mem.contents.virt_addr + mem.contents.offset
    raw = (ctypes.c_uint8 * size).from_address(base)
    return np.ctypeslib.as_array(raw).view(dtype)


def find_rknn_library(explicit: str | os.PathLike | None = None) -> Path:
    """librknnrt.so: the explicit path, then $RKNN_LIBRARY, then /usr/lib, /usr/local/lib."""
    found, looked = _find_library("librknnrt.so", "rknnrt", RKNN_LIBRARY_ENV, explicit)
    if found is None:
        raise ToolkitMissingError(f"librknnrt.so not found (looked at {looked}): copy {_RKNNRT_SOURCE} to /usr/lib "
                                  f"(many board images ship it there), or set {RKNN_LIBRARY_ENV}")
    return found


def choose_vision_backend(explicit: str | None = None) -> str:
    """``rknnlite`` or ``librknnrt``: the one asked for (argument, then $RKSMOLVLM_VISION_BACKEND); ``auto`` is
    RKNNLite where rknn-toolkit-lite2 is installed (the path proven on boards), librknnrt directly elsewhere
    (Python 3.13, where rknn-toolkit-lite2 has no wheel)."""
    choice = explicit or os.environ.get(VISION_BACKEND_ENV) or "auto"
    if choice not in VISION_BACKENDS:
        raise BundleError(f"unknown vision backend {choice!r} in {VISION_BACKEND_ENV}: choose one of "
                          f"{', '.join(VISION_BACKENDS)}")
    if choice != "auto":
        return choice
    return "rknnlite" if importlib.util.find_spec("rknnlite") is not None else "librknnrt"


# -- decoder -----------------------------------------------------------------------------------
def find_rkllm_library(explicit: str | os.PathLike | None = None) -> Path:
    """librkllmrt.so: the explicit path, then $RKLLM_LIBRARY, then /usr/lib, /usr/local/lib."""
    found, looked = _find_library("librkllmrt.so", "rkllmrt", LIBRARY_ENV, explicit)
    if found is not None:
        return found
    raise ToolkitMissingError(
        f"librkllmrt.so not found (looked at {looked}): copy rkllm-runtime/Linux/librkllm_api/aarch64/librkllmrt.so "
        f"from Rockchip's rknn-llm release (the version the bundle was built for) to /usr/lib, or set {LIBRARY_ENV}")


def _find_library(filename: str, short: str, env: str, explicit: str | os.PathLike | None) -> tuple[Path | None, str]:
    """A vendor library: the explicit path, then ``$env``, then LIBRARY_DIRS, then the linker's search; the
    path found (None) and the places looked at, for the error."""
    candidates = [Path(explicit)] if explicit else []
    if os.environ.get(env):
        candidates.append(Path(os.environ[env]))
    candidates += [Path(d) / filename for d in LIBRARY_DIRS]
    for path in candidates:
        if path.is_file():
            return path, ""
    found = ctypes.util.find_library(short)
    if found and Path(found).is_file():
        return Path(found), ""
    return None, ", ".join(str(p) for p in candidates)


class RkllmEngine:
    """The decoder in librkllmrt, fed with our embeddings (RKLLM_INPUT_EMBED). Free text runs in one
    RKLLM_INFER_GENERATE call sampled by the runtime; with ``config.grammar`` the runtime only computes
    logits (RKLLM_INFER_GET_LOGITS) and the CPU chooses (``_generate_structured``)."""

    def __init__(self, model_path: Path, library: Path, abi: str, max_context: int,
                 config: GenerationConfig | None = None, base_domain_id: int = 1,
                 enabled_cpus_mask: int = 0, enabled_cpus_num: int = 0):
        if abi not in abi_mod.ABIS:
            raise BundleError(f"unsupported librkllmrt ABI {abi!r}: rksmolvlm drives runtime 1.2.1–1.2.x and 1.3.x")
        self.abi = abi_mod.ABIS[abi]
        self.abi.check_sizes()
        if not model_path.is_file():
            raise BundleError(f"{model_path} is missing: convert the bundle with rkllm-toolkit (no --llm-host-only)")
        try:
            self.lib = ctypes.CDLL(str(library))
        except OSError as exc:
            raise ToolkitMissingError(f"cannot load {library} ({exc}): it must be the aarch64 librkllmrt.so from "
                                      "Rockchip's rknn-llm release") from exc
        probed = abi_mod.probe_default_param(self.lib)
        if probed is not None and probed != abi:
            raise BundleError(
                f"{library} has the librkllmrt {probed} layout but the bundle was built for {abi} (runtime and "
                "toolkit versions differ; 1.2.x and 1.3.x are not ABI-compatible): install the librkllmrt.so that "
                "matches the bundle's rkllm-toolkit version, or convert again with the matching toolkit")
        self._declare()
        config = config or GenerationConfig()
        param = self.lib.rkllm_createDefaultParam()
        param.model_path = str(model_path).encode()
        param.max_context_len = max_context
        param.max_new_tokens = config.max_new_tokens
        self._apply_sampling(param, config)
        param.skip_special_token = True
        param.is_async = False
        param.extend_param.base_domain_id = base_domain_id  # advised when the tower shares the NPU
        if enabled_cpus_num:  # else keep the runtime's default CPU set
            param.extend_param.enabled_cpus_mask = enabled_cpus_mask
            param.extend_param.enabled_cpus_num = enabled_cpus_num
        self._init_sampling = config
        self.n_batch = int(param.extend_param.n_batch)  # the runtime's default (1); never raised by this engine
        self._callback = abi_mod.ResultCallback(self._on_result)
        self.handle = ctypes.c_void_p()
        if self.abi.init_takes_struct:
            self._callbacks = abi_mod.Callback13(result_callback=self._callback)
            code = self.lib.rkllm_init(ctypes.byref(self.handle), ctypes.byref(param), ctypes.byref(self._callbacks))
        else:
            code = self.lib.rkllm_init(ctypes.byref(self.handle), ctypes.byref(param), self._callback)
        if code != 0:
            raise EngineError(f"rkllm_init returned {code} for {model_path}: check the runtime's messages above "
                              "(NPU driver ≥ 0.9.8, model built for this SoC, enough memory)")
        self.max_context = max_context
        self._queue: queue.Queue = queue.Queue()
        self._history = 0
        self._running = threading.Lock()
        self._aborted = threading.Event()  # structured decoding checks it between its rkllm_run calls
        self._logits: _LogitsSink | None = None  # set while a GET_LOGITS call runs (structured output)

    def _declare(self) -> None:
        L, A = self.lib, self.abi
        L.rkllm_createDefaultParam.argtypes, L.rkllm_createDefaultParam.restype = [], A.param
        init_cb = ctypes.POINTER(abi_mod.Callback13) if A.init_takes_struct else abi_mod.ResultCallback
        L.rkllm_init.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.POINTER(A.param), init_cb]
        L.rkllm_run.argtypes = [ctypes.c_void_p, ctypes.POINTER(A.input), ctypes.POINTER(A.infer), ctypes.c_void_p]
        L.rkllm_abort.argtypes = [ctypes.c_void_p]
        L.rkllm_clear_kv_cache.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.POINTER(ctypes.c_int),
                                           ctypes.POINTER(ctypes.c_int)]
        L.rkllm_destroy.argtypes = [ctypes.c_void_p]
        for name in ("rkllm_init", "rkllm_run", "rkllm_abort", "rkllm_clear_kv_cache", "rkllm_destroy"):
            getattr(L, name).restype = ctypes.c_int
        # optional (abi_mod.OPTIONAL_SYMBOLS): the KV check of structured decoding is skipped without it
        self._kv_cache_size = getattr(L, "rkllm_get_kv_cache_size", None)
        if self._kv_cache_size is not None:
            self._kv_cache_size.argtypes = [ctypes.c_void_p, ctypes.POINTER(ctypes.c_int)]
            self._kv_cache_size.restype = ctypes.c_int

    @staticmethod
    def _apply_sampling(target, config: GenerationConfig) -> None:
        greedy = config.greedy
        target.top_k = 1 if greedy else (config.top_k or 0)
        target.top_p = 1.0 if greedy else config.top_p
        target.temperature = 1.0 if greedy else config.temperature
        target.repeat_penalty = config.repeat_penalty
        target.frequency_penalty = config.frequency_penalty
        target.presence_penalty = config.presence_penalty
        target.mirostat = 0

    # The runtime calls this from its own thread.
    def _on_result(self, result, userdata, state) -> int:
        if self._logits is not None:
            return self._on_logits(result, state)
        try:
            r = result.contents
            if state in (abi_mod.RUN_NORMAL, abi_mod.RUN_WAITING):
                self._queue.put(("token", int(r.token_id)))
            elif state == abi_mod.RUN_FINISH:
                p = r.perf
                self._queue.put(("finish", {"prefill_time_ms": p.prefill_time_ms, "prefill_tokens": p.prefill_tokens,
                                            "generate_time_ms": p.generate_time_ms,
                                            "generate_tokens": p.generate_tokens,
                                            "memory_usage_mb": p.memory_usage_mb}))
            elif state == abi_mod.RUN_ERROR:
                self._queue.put(("error", None))
        except Exception as exc:  # never let an exception cross the C boundary
            self._queue.put(("error", repr(exc)))
        return 0

    def _on_logits(self, result, state) -> int:
        """GET_LOGITS callback: copies the last row of the call's first logits (the prompt's or the fed
        run's last position; never the other rows) and ignores what the runtime samples by itself.
        1.3.0 is told to release the logits buffer at once (return 2): a prompt's is N × vocab floats."""
        sink = self._logits
        assert sink is not None
        release = 0
        try:
            r = result.contents
            if state == abi_mod.RUN_NORMAL and r.logits.num_tokens > 0 and sink.rows == 0:
                vocab, rows = int(r.logits.vocab_size), int(r.logits.num_tokens)
                if sink.row is None or sink.row.shape[0] != vocab:
                    sink.row = np.empty(vocab, dtype=np.float32)
                base = ctypes.cast(r.logits.logits, ctypes.c_void_p).value
                if not base or vocab <= 0:
                    sink.error = "the runtime delivered no logits"
                else:
                    ctypes.memmove(sink.row.ctypes.data, base + (rows - 1) * vocab * 4, vocab * 4)
                    sink.rows, sink.bytes = rows, sink.bytes + vocab * 4
                    if not self.abi.has_sampling:  # 1.2.x: no per-run max_new_tokens, stop it here
                        self.lib.rkllm_abort(self.handle)
                release = 2 if self.abi.init_takes_struct else 0  # 1.3.0's "release the output buffer"
            elif state == abi_mod.RUN_NORMAL and r.logits.num_tokens > 0:
                sink.extra += 1  # a step the runtime took by itself: it must not have reached the KV cache
                release = 2 if self.abi.init_takes_struct else 0
            elif state == abi_mod.RUN_FINISH:
                p = r.perf
                sink.perf = {"prefill_time_ms": p.prefill_time_ms, "generate_time_ms": p.generate_time_ms}
            elif state == abi_mod.RUN_ERROR:
                sink.error = "the runtime reported RKLLM_RUN_ERROR"
        except Exception as exc:  # never let an exception cross the C boundary
            sink.error = repr(exc)
        return release

    @property
    def history_tokens(self) -> int:
        return self._history

    def kv_cache_size(self) -> int | None:
        """The runtime's own count of cached positions (rkllm_get_kv_cache_size), None where it lacks it."""
        if self._kv_cache_size is None:
            return None
        sizes = (ctypes.c_int * max(1, self.n_batch))()
        if self._kv_cache_size(self.handle, sizes) != 0:
            raise EngineError("rkllm_get_kv_cache_size failed: check the runtime's messages")
        return int(sizes[0])

    def embedding_table(self) -> None:
        return None  # the bundle's table is the one the runtime was built for

    def clear_history(self) -> None:
        code = self.lib.rkllm_clear_kv_cache(self.handle, 0, None, None)
        if code != 0:
            raise EngineError(f"rkllm_clear_kv_cache returned {code}")
        self._history = 0

    def abort(self) -> None:
        self._aborted.set()
        self.lib.rkllm_abort(self.handle)

    def close(self) -> None:
        if getattr(self, "handle", None) and self.handle.value:
            self.lib.rkllm_destroy(self.handle)
            self.handle = ctypes.c_void_p()

    def generate(self, embeddings: np.ndarray, config: GenerationConfig, keep_history: bool,
                 stats: PerfStats) -> Generator[int, None, None]:
        if not self._running.acquire(blocking=False):
            raise EngineError("the decoder is busy with another request")
        try:
            yield from self._generate(embeddings, config, keep_history, stats)
        finally:
            self._running.release()

    # -- structured output: librkllmrt has no grammar, so the choice is made on the CPU ---------------
    def _generate_structured(self, embeddings, config: GenerationConfig, keep_history: bool,
                             stats: PerfStats) -> Generator[int, None, None]:
        """Constrained decoding through RKLLM_INFER_GET_LOGITS: the prompt in one call (only the last
        row of its logits is read), then one call per choice with the chosen ids as TOKEN input
        (keep_history=1, one new token: a forced run goes in one call and its last position's logits
        are read). The KV cache holds exactly the prompt and the yielded ids (checked with
        rkllm_get_kv_cache_size after every call where the runtime has it)."""
        from rksmolvlm.runtime.structured.guide import Guide

        grammar = config.grammar
        assert grammar is not None
        if self.n_batch > 1:
            raise BatchedLogitsError(f"structured output reads logits (RKLLM_INFER_GET_LOGITS), which librkllmrt "
                                     f"refuses with n_batch {self.n_batch} > 1 (rknn-llm #406): start the decoder "
                                     "with n_batch 1")
        embeds = np.ascontiguousarray(embeddings, dtype=np.float32)
        if not keep_history and self._history:
            self.clear_history()
        if len(embeds) + self._history + config.max_new_tokens > self.max_context:
            raise EngineError(f"{self._history} cached + {len(embeds)} new tokens + max_new_tokens "
                              f"{config.max_new_tokens} exceed the decoder context of {self.max_context}")
        stop_id = (config.stop_ids or grammar.stop_ids)[0]
        stops = set(config.stop_ids) | set(grammar.stop_ids)
        self._aborted.clear()
        guide = Guide(config, grammar.constraint())
        counters = {"rkllm_runs": 0, "logits_bytes": 0}
        stats.engine["structured"] = counters
        sink = _LogitsSink(None, 0)
        start = time.perf_counter()
        try:
            sink = self._logits_call(embeds, None, sink, counters)
            stats.prefill_tokens += len(embeds)
            stats.prefill_ms += (time.perf_counter() - start) * 1000
            if sink.rows == 0:
                return  # aborted during the prefill
            first = time.perf_counter()
            produced = 0
            chosen = guide.begin()
            while True:
                ids = chosen[:config.max_new_tokens - produced]
                done = guide.done and len(ids) == len(chosen)
                if done and (not ids or ids[-1] not in stops) and produced + len(ids) < config.max_new_tokens:
                    # the grammar is complete: end the answer (finish_reason "stop"); the stop id counts against
                    # max_new_tokens as the host engine's does, so without room the answer ends "length"
                    ids = [*ids, stop_id]
                for token in ids:
                    produced += 1
                    stats.generate_tokens += 1
                    stats.generate_ms = (time.perf_counter() - first) * 1000
                    yield token
                    if self._aborted.is_set():
                        return
                ended = done or produced >= config.max_new_tokens
                if ended:  # the cache keeps the last ids too (a next turn continues after them) when they fit
                    if ids and self._history + len(ids) + 1 <= self.max_context:
                        self._logits_call(None, ids, sink, counters)
                    return
                if ids:
                    sink = self._logits_call(None, ids, sink, counters)
                    if sink.rows == 0:
                        return  # aborted during the call
                assert sink.row is not None  # rows > 0: the callback filled it
                chosen = guide.step(sink.row)
        finally:
            counters["forced_ids"] = guide.forced_ids
            counters["masks"] = guide.sampler.masks
            counters["fast_path_hits"] = guide.sampler.fast_path_hits
            if sink.perf:
                stats.engine.update(sink.perf)

    def _logits_call(self, embeds: np.ndarray | None, ids: list[int] | None, sink: _LogitsSink,
                     counters: dict) -> _LogitsSink:
        """One rkllm_run in GET_LOGITS mode (embeddings or token ids, keep_history=1, one new token) on
        this thread; returns the sink with the last row of the input's logits (rows 0 if aborted)."""
        A = self.abi
        inp = A.input()
        inp.role = b"user"
        inp.enable_thinking = False
        if embeds is not None:
            inp.input_type = abi_mod.INPUT_EMBED
            inp.embed_input.embed = embeds.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
            inp.embed_input.n_tokens = n = len(embeds)
        else:
            assert ids
            tokens = (ctypes.c_int32 * len(ids))(*ids)
            inp.input_type = abi_mod.INPUT_TOKEN
            inp.token_input.input_ids = tokens
            inp.token_input.n_tokens = n = len(ids)
        infer = A.infer()
        infer.mode = abi_mod.INFER_GET_LOGITS
        infer.keep_history = 1
        if A.has_sampling:
            infer.max_new_tokens = 1  # 1.2.x has no per-run value: the callback aborts after the first logits
        fresh = _LogitsSink(sink.row, sink.bytes)
        self._logits = fresh
        try:
            code = self.lib.rkllm_run(self.handle, ctypes.byref(inp), ctypes.byref(infer), None)
        finally:
            self._logits = None
        counters["rkllm_runs"] += 1
        counters["logits_bytes"] = fresh.bytes
        if code != 0 or fresh.error:
            self._history = 0
            raise EngineError(f"rkllm_run (GET_LOGITS) failed ({fresh.error or 'return code ' + str(code)}): the KV "
                              "cache was dropped; check the runtime's messages")
        aborted = fresh.rows == 0 and self._aborted.is_set()
        if fresh.rows == 0 and not aborted:
            self._history = 0
            raise EngineError("rkllm_run in RKLLM_INFER_GET_LOGITS mode delivered no logits: this librkllmrt does not "
                              "support the mode; send the request without response_format/format")
        expected = self._history + n
        cached = self.kv_cache_size()
        if cached is not None and cached != expected and not aborted:
            self._history = cached
            raise KvCacheMismatchError(
                f"after a GET_LOGITS call of {n} tokens librkllmrt {self.abi.name} holds {cached} positions, expected "
                f"{expected} (the prompt and the chosen tokens; {fresh.extra} steps of its own were reported): it "
                "keeps tokens it sampled itself, so structured output cannot run on it; send the request without "
                "response_format/format")
        self._history = expected if cached is None else cached
        return fresh

    def _generate(self, embeddings, config, keep_history, stats) -> Generator[int, None, None]:
        if config.grammar is not None:
            yield from self._generate_structured(embeddings, config, keep_history, stats)
            return
        A = self.abi
        embeds = np.ascontiguousarray(embeddings, dtype=np.float32)
        if not keep_history and self._history:
            self.clear_history()  # start over, but keep this turn for a possible next one
        if len(embeds) + self._history + config.max_new_tokens > self.max_context:
            raise EngineError(f"{self._history} cached + {len(embeds)} new tokens + max_new_tokens "
                              f"{config.max_new_tokens} exceed the decoder context of {self.max_context}")
        inp = A.input()
        inp.role = b"user"
        inp.enable_thinking = False
        inp.input_type = abi_mod.INPUT_EMBED
        inp.embed_input.embed = embeds.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
        inp.embed_input.n_tokens = len(embeds)
        infer = A.infer()
        infer.mode = abi_mod.INFER_GENERATE
        infer.keep_history = 1  # the runtime keeps this turn; a fresh start cleared the cache above
        if A.has_sampling:
            sampling = abi_mod.SamplingParam(mirostat_tau=5.0, mirostat_eta=0.1)
            self._apply_sampling(sampling, config)
            infer.sampling_params = ctypes.pointer(sampling)
            infer.max_new_tokens = config.max_new_tokens
        elif _sampling(config) != _sampling(self._init_sampling) \
                or config.max_new_tokens > self._init_sampling.max_new_tokens:
            raise EngineError("librkllmrt 1.2.x takes sampling settings and max_new_tokens only at start-up: "
                              "restart with these settings, or use runtime 1.3")
        while not self._queue.empty():
            self._queue.get_nowait()
        outcome: dict = {}

        def run() -> None:
            outcome["code"] = self.lib.rkllm_run(self.handle, ctypes.byref(inp), ctypes.byref(infer), None)
            self._queue.put(("returned", None))

        worker = threading.Thread(target=run, name="rkllm-run", daemon=True)
        start = time.perf_counter()
        worker.start()
        produced, ended, error = 0, False, None
        try:
            while True:
                kind, value = self._queue.get()
                if kind == "token":
                    if ended:  # sent before the runtime saw our abort
                        continue
                    if produced == 0:
                        stats.prefill_ms += (time.perf_counter() - start) * 1000
                        first = time.perf_counter()
                    produced += 1
                    stats.generate_tokens += 1
                    stats.generate_ms = (time.perf_counter() - first) * 1000
                    yield value
                    if value in config.stop_ids or produced >= config.max_new_tokens:
                        ended = True
                        self.lib.rkllm_abort(self.handle)  # the runtime may not stop on our stop ids
                elif kind == "finish":
                    stats.engine.update(value)
                elif kind == "error":
                    error = value or "the runtime reported RKLLM_RUN_ERROR"
                elif kind == "returned":
                    break
        except GeneratorExit:  # the consumer went away (client disconnect): stop the NPU
            self.lib.rkllm_abort(self.handle)
            worker.join()
            raise
        finally:
            worker.join()
        stats.prefill_tokens += len(embeds)
        if error or outcome.get("code", 0) != 0:
            self._history = 0
            raise EngineError(f"rkllm_run failed ({error or 'return code ' + str(outcome.get('code'))}): the KV "
                              "cache was dropped; check the runtime's messages")
        self._history += len(embeds) + produced


class _LogitsSink:
    """What the GET_LOGITS callback hands over from one rkllm_run: the last row of its first logits."""

    def __init__(self, row: np.ndarray | None, copied: int):
        self.row = row  # reused across the answer's calls: one vocab-sized buffer
        self.rows = 0  # num_tokens of the first logits callback (0: none came)
        self.extra = 0  # further logits callbacks (steps the runtime took by itself)
        self.bytes = copied  # bytes copied out of the runtime so far in this answer
        self.perf: dict = {}
        self.error: str | None = None


def _sampling(config: GenerationConfig) -> tuple:
    """The values librkllmrt 1.2.x takes at start-up only (temperature and top-k/p mean nothing when greedy)."""
    shape = () if config.greedy else (config.temperature, config.top_k, config.top_p)
    return (config.greedy, *shape, config.frequency_penalty, config.presence_penalty)


def make_npu_engines(bundle: "RuntimeBundle", options: EngineOptions
                     ) -> tuple[RknnLiteVisionEncoder | RknnRuntimeVisionEncoder, RkllmEngine]:
    """(the vision encoder ``make_npu_vision`` chooses, RkllmEngine) for a bundle on its board."""
    manifest = bundle.manifest
    llm = manifest.require_llm()
    if not llm.file or manifest.require_vision().file is None:
        raise BundleError(f"{bundle.path} has no board decoder (llm.rkllm; converted with --llm-host-only): convert "
                          "it again on a host with rkllm-toolkit installed")
    version = llm.toolkit_version
    known = abi_mod.abi_for_version(version)
    abi = os.environ.get(ABI_ENV) or (known.name if known else None)
    if abi is None:
        raise BundleError(f"the bundle was built with rkllm-toolkit {version!r}, whose runtime ABI rksmolvlm does not "
                          f"know: set {ABI_ENV}=1.2 or 1.3 if you are sure")
    vision = make_npu_vision(bundle, options)
    try:
        # librkllmrt 1.2.x takes max_new_tokens at start-up only: room for the largest request
        startup = GenerationConfig(max_new_tokens=max(1, min(options.max_new_tokens, bundle.max_context - 1)))
        engine = RkllmEngine(bundle.file(llm.file), find_rkllm_library(options.library), abi, bundle.max_context,
                             config=startup, base_domain_id=1)
    except BaseException:
        vision.close()
        raise
    return vision, engine


def make_npu_vision(bundle: "RuntimeBundle", options: EngineOptions,
                    backend: str | None = None) -> RknnLiteVisionEncoder | RknnRuntimeVisionEncoder:
    """The bundle's tower on the NPU cores of ``options`` (all of the SoC's when it names none), on the
    backend ``choose_vision_backend`` picks: the one place the vision backend is chosen."""
    tower = bundle.manifest.require_vision().file
    if tower is None:
        raise BundleError(f"{bundle.path} has no vision.rknn: convert the vision part for the board")
    profile: BoardProfile = load_profile(bundle.manifest.target.platform)
    masks = _core_masks(options.cores, profile.core_masks)
    if choose_vision_backend(backend) == "rknnlite":
        return RknnLiteVisionEncoder(bundle.file(tower), masks)
    return RknnRuntimeVisionEncoder(bundle.file(tower), masks)


def _core_masks(cores: Sequence[int] | None, masks: Sequence[int]) -> list[int]:
    """Core masks of the chosen cores (all of the SoC's when none are chosen)."""
    return [masks[i] for i in cores] if cores is not None else list(masks)

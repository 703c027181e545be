"""ctypes layouts and prototypes of librknnrt's C API (rknn_api.h, RKNN SDK 1.6.0–2.3.2), for the calls
the vision tower needs: init from a model blob in memory, dup per NPU core, query, core mask, copy
input/output (rknn_inputs_set, rknn_outputs_get/release) and zero-copy memory (rknn_create_mem,
rknn_set_io_mem, rknn_destroy_mem).

Written here from the published header facts (field order, C types, enum values); the structs used
here are unchanged from SDK 1.6.0 to 2.3.2 (only rknn_init_extend's reserved tail was split, at the same
size). ``check_layout`` asserts every size and offset at load: a wrong layout is an error, never a
write past a struct. LP64 only (aarch64 boards, x86_64 tests): on 32-bit ARM rknn_context is 32-bit.
"""

from __future__ import annotations

import ctypes as C

from rksmolvlm.errors import BundleError

__all__ = ["TensorAttr", "TensorMem", "Input", "Output", "InputOutputNum", "SdkVersion", "InitExtend", "RunExtend",
           "OutputExtend", "SIZES", "OFFSETS", "REQUIRED_SYMBOLS", "check_layout", "declare", "error_name",
           "type_name", "ELEMENT_SIZE"]

rknn_context = C.c_uint64  # uint32_t on __arm__ (not supported here)

# rknn_query_cmd
QUERY_IN_OUT_NUM, QUERY_INPUT_ATTR, QUERY_OUTPUT_ATTR = 0, 1, 2
QUERY_PERF_DETAIL, QUERY_PERF_RUN, QUERY_SDK_VERSION, QUERY_MEM_SIZE, QUERY_CUSTOM_STRING = 3, 4, 5, 6, 7
QUERY_NATIVE_INPUT_ATTR, QUERY_NATIVE_OUTPUT_ATTR = 8, 9  # = the NC1HWC2 variants
QUERY_NATIVE_NHWC_INPUT_ATTR, QUERY_NATIVE_NHWC_OUTPUT_ATTR = 10, 11

# rknn_tensor_type
TENSOR_FLOAT32, TENSOR_FLOAT16, TENSOR_INT8, TENSOR_UINT8, TENSOR_INT16, TENSOR_UINT16 = 0, 1, 2, 3, 4, 5
TENSOR_INT32, TENSOR_UINT32, TENSOR_INT64, TENSOR_BOOL, TENSOR_INT4, TENSOR_BFLOAT16 = 6, 7, 8, 9, 10, 11
_TYPE_NAMES = ("FP32", "FP16", "INT8", "UINT8", "INT16", "UINT16", "INT32", "UINT32", "INT64", "BOOL", "INT4", "BF16")
ELEMENT_SIZE = {TENSOR_FLOAT32: 4, TENSOR_FLOAT16: 2, TENSOR_INT8: 1, TENSOR_UINT8: 1, TENSOR_INT16: 2,
                TENSOR_UINT16: 2, TENSOR_INT32: 4, TENSOR_UINT32: 4, TENSOR_INT64: 8, TENSOR_BOOL: 1,
                TENSOR_BFLOAT16: 2}

# rknn_tensor_qnt_type, rknn_tensor_format
QNT_NONE, QNT_DFP, QNT_AFFINE_ASYMMETRIC = 0, 1, 2
FORMAT_NCHW, FORMAT_NHWC, FORMAT_NC1HWC2, FORMAT_UNDEFINED = 0, 1, 2, 3

# rknn_core_mask
NPU_CORE_AUTO, NPU_CORE_0, NPU_CORE_1, NPU_CORE_2, NPU_CORE_0_1, NPU_CORE_0_1_2, NPU_CORE_ALL = 0, 1, 2, 4, 3, 7, 0xFFFF

# rknn_init flags (the few this runtime side may pass) and rknn_tensor_mem flags
FLAG_PRIOR_HIGH, FLAG_PRIOR_MEDIUM, FLAG_PRIOR_LOW = 0x0, 0x1, 0x2
MEMORY_FLAGS_ALLOC_INSIDE = 1

MAX_DIMS, MAX_NAME_LEN = 16, 256

# error codes (RKNN_SUCC = 0)
_ERRORS = {-1: "RKNN_ERR_FAIL", -2: "RKNN_ERR_TIMEOUT", -3: "RKNN_ERR_DEVICE_UNAVAILABLE", -4: "RKNN_ERR_MALLOC_FAIL",
           -5: "RKNN_ERR_PARAM_INVALID", -6: "RKNN_ERR_MODEL_INVALID", -7: "RKNN_ERR_CTX_INVALID",
           -8: "RKNN_ERR_INPUT_INVALID", -9: "RKNN_ERR_OUTPUT_INVALID", -10: "RKNN_ERR_DEVICE_UNMATCH",
           -11: "RKNN_ERR_INCOMPATILE_PRE_COMPILE_MODEL", -12: "RKNN_ERR_INCOMPATILE_OPTIMIZATION_LEVEL_VERSION",
           -13: "RKNN_ERR_TARGET_PLATFORM_UNMATCH"}


class InputOutputNum(C.Structure):
    _fields_ = [("n_input", C.c_uint32), ("n_output", C.c_uint32)]


class TensorAttr(C.Structure):
    _fields_ = [("index", C.c_uint32), ("n_dims", C.c_uint32), ("dims", C.c_uint32 * MAX_DIMS),
                ("name", C.c_char * MAX_NAME_LEN), ("n_elems", C.c_uint32), ("size", C.c_uint32),
                ("fmt", C.c_int), ("type", C.c_int), ("qnt_type", C.c_int), ("fl", C.c_int8), ("zp", C.c_int32),
                ("scale", C.c_float), ("w_stride", C.c_uint32), ("size_with_stride", C.c_uint32),
                ("pass_through", C.c_uint8), ("h_stride", C.c_uint32)]

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(int(self.dims[i]) for i in range(self.n_dims))


class SdkVersion(C.Structure):
    _fields_ = [("api_version", C.c_char * 256), ("drv_version", C.c_char * 256)]


class TensorMem(C.Structure):
    _fields_ = [("virt_addr", C.c_void_p), ("phys_addr", C.c_uint64), ("fd", C.c_int32), ("offset", C.c_int32),
                ("size", C.c_uint32), ("flags", C.c_uint32), ("priv_data", C.c_void_p)]


class Input(C.Structure):
    _fields_ = [("index", C.c_uint32), ("buf", C.c_void_p), ("size", C.c_uint32), ("pass_through", C.c_uint8),
                ("type", C.c_int), ("fmt", C.c_int)]


class Output(C.Structure):
    _fields_ = [("want_float", C.c_uint8), ("is_prealloc", C.c_uint8), ("index", C.c_uint32), ("buf", C.c_void_p),
                ("size", C.c_uint32)]


class InitExtend(C.Structure):
    _fields_ = [("ctx", rknn_context), ("real_model_offset", C.c_int32), ("real_model_size", C.c_uint32),
                ("model_buffer_fd", C.c_int32), ("model_buffer_flags", C.c_uint32), ("reserved", C.c_uint8 * 112)]


class RunExtend(C.Structure):
    _fields_ = [("frame_id", C.c_uint64), ("non_block", C.c_int32), ("timeout_ms", C.c_int32),
                ("fence_fd", C.c_int32)]


class OutputExtend(C.Structure):
    _fields_ = [("frame_id", C.c_uint64)]


# LP64 sizes and offsets computed from the header's C types (uint32_t, int8_t, enums as int, pointers 8)
SIZES = {"rknn_input_output_num": (InputOutputNum, 8), "rknn_tensor_attr": (TensorAttr, 376),
         "rknn_sdk_version": (SdkVersion, 512), "rknn_tensor_mem": (TensorMem, 40), "rknn_input": (Input, 32),
         "rknn_output": (Output, 24), "rknn_init_extend": (InitExtend, 136), "rknn_run_extend": (RunExtend, 24),
         "rknn_output_extend": (OutputExtend, 8)}
OFFSETS = {
    "rknn_input_output_num": {"n_input": 0, "n_output": 4},
    "rknn_tensor_attr": {"index": 0, "n_dims": 4, "dims": 8, "name": 72, "n_elems": 328, "size": 332, "fmt": 336,
                         "type": 340, "qnt_type": 344, "fl": 348, "zp": 352, "scale": 356, "w_stride": 360,
                         "size_with_stride": 364, "pass_through": 368, "h_stride": 372},
    "rknn_sdk_version": {"api_version": 0, "drv_version": 256},
    "rknn_tensor_mem": {"virt_addr": 0, "phys_addr": 8, "fd": 16, "offset": 20, "size": 24, "flags": 28,
                        "priv_data": 32},
    "rknn_input": {"index": 0, "buf": 8, "size": 16, "pass_through": 20, "type": 24, "fmt": 28},
    "rknn_output": {"want_float": 0, "is_prealloc": 1, "index": 4, "buf": 8, "size": 16},
    "rknn_init_extend": {"ctx": 0, "real_model_offset": 8, "real_model_size": 12, "model_buffer_fd": 16,
                         "model_buffer_flags": 20, "reserved": 24},
    "rknn_run_extend": {"frame_id": 0, "non_block": 8, "timeout_ms": 12, "fence_fd": 16},
    "rknn_output_extend": {"frame_id": 0},
}

# (name, restype, argtypes): every function the engine calls; a library without one is refused at load
_PROTOTYPES = [
    ("rknn_init", C.c_int, [C.POINTER(rknn_context), C.c_void_p, C.c_uint32, C.c_uint32, C.POINTER(InitExtend)]),
    ("rknn_dup_context", C.c_int, [C.POINTER(rknn_context), C.POINTER(rknn_context)]),
    ("rknn_destroy", C.c_int, [rknn_context]),
    ("rknn_query", C.c_int, [rknn_context, C.c_int, C.c_void_p, C.c_uint32]),
    ("rknn_set_core_mask", C.c_int, [rknn_context, C.c_int]),
    ("rknn_inputs_set", C.c_int, [rknn_context, C.c_uint32, C.POINTER(Input)]),
    ("rknn_run", C.c_int, [rknn_context, C.POINTER(RunExtend)]),
    ("rknn_outputs_get", C.c_int, [rknn_context, C.c_uint32, C.POINTER(Output), C.POINTER(OutputExtend)]),
    ("rknn_outputs_release", C.c_int, [rknn_context, C.c_uint32, C.POINTER(Output)]),
    ("rknn_create_mem", C.POINTER(TensorMem), [rknn_context, C.c_uint32]),
    ("rknn_set_io_mem", C.c_int, [rknn_context, C.POINTER(TensorMem), C.POINTER(TensorAttr)]),
    ("rknn_destroy_mem", C.c_int, [rknn_context, C.POINTER(TensorMem)]),
]
REQUIRED_SYMBOLS = tuple(name for name, _, _ in _PROTOTYPES)


def check_layout() -> None:
    """Every struct's size and every field's offset as the header's C types give them on LP64."""
    if C.sizeof(C.c_void_p) != 8:
        raise BundleError("librknnrt layouts are defined for 64-bit Linux (aarch64) only")
    problems = [f"sizeof({n}) {C.sizeof(t)} != {want}" for n, (t, want) in SIZES.items() if C.sizeof(t) != want]
    for name, fields in OFFSETS.items():
        struct = SIZES[name][0]
        problems += [f"offsetof({name}.{f}) {getattr(struct, f).offset} != {want}"
                     for f, want in fields.items() if getattr(struct, f).offset != want]
    if problems:
        raise BundleError(f"internal: librknnrt layout is wrong: {'; '.join(problems)}")


def declare(lib: C.CDLL) -> list[str]:
    """Set the prototypes on ``lib``; returns the required symbols it lacks (declared: none missing)."""
    missing = []
    for name, restype, argtypes in _PROTOTYPES:
        fn = getattr(lib, name, None)
        if fn is None:
            missing.append(name)
            continue
        fn.restype, fn.argtypes = restype, argtypes
    return missing


def error_name(code: int) -> str:
    """``-6`` → ``RKNN_ERR_MODEL_INVALID``."""
    return _ERRORS.get(code, f"error {code}")


def type_name(tensor_type: int) -> str:
    return _TYPE_NAMES[tensor_type] if 0 <= tensor_type < len(_TYPE_NAMES) else f"type {tensor_type}"

"""The librknnrt C double refuses what it must (a double that accepts anything would prove nothing):
every misuse below is refused with an RKNN error code and a message naming it, and zero-copy memory
is the caller's memory, read and written at rknn_run time."""

import ctypes
import shutil

import numpy as np
import pytest

from support.rknn_double import FLOAT16, FLOAT32, RknnDouble, compile_double, expected_features, model_blob

from rksmolvlm.runtime import rknn_abi as A

pytestmark = pytest.mark.skipif(shutil.which("cc") is None, reason="needs a C compiler")

H, W, T, D = 32, 32, 4, 8
PARAM, MODEL, CTX, INPUT, OUTPUT, PLATFORM = -5, -6, -7, -8, -9, -13


@pytest.fixture(scope="module")
def library(tmp_path_factory):
    return compile_double(tmp_path_factory.mktemp("librknnrt"))


@pytest.fixture
def double(library):
    d = RknnDouble(library)
    assert A.declare(d.lib) == []
    yield d
    d.lib.double_reset()


def init(double, blob=None, flag=0):
    blob = model_blob(H, W, T, D) if blob is None else blob
    buffer = ctypes.create_string_buffer(blob, len(blob))
    ctx = A.rknn_context()
    return double.lib.rknn_init(ctypes.byref(ctx), buffer, len(blob), flag, None), ctx


def attr(double, ctx, cmd):
    a = A.TensorAttr(index=0)
    assert double.lib.rknn_query(ctx, cmd, ctypes.byref(a), ctypes.sizeof(a)) == 0
    return a


def tile(seed=0):
    return np.random.RandomState(seed).randint(0, 256, (1, H, W, 3)).astype(np.uint8)


def set_input(double, ctx, x, **overrides):
    fields = dict(index=0, buf=x.ctypes.data, size=x.nbytes, pass_through=0, type=A.TENSOR_UINT8, fmt=A.FORMAT_NHWC)
    fields.update(overrides)
    return double.lib.rknn_inputs_set(ctx, 1, ctypes.byref(A.Input(**fields)))


def refused(double, code, got, words):
    assert got == code, (got, double.last_error())
    assert words in double.last_error(), double.last_error()


def test_a_full_copy_run_gives_the_linear_map(double):
    rc, ctx = init(double)
    assert rc == 0 and ctx.value
    x = tile()
    assert set_input(double, ctx, x) == 0 and double.lib.rknn_run(ctx, None) == 0
    out = A.Output(want_float=1)
    assert double.lib.rknn_outputs_get(ctx, 1, ctypes.byref(out), None) == 0
    got = np.ctypeslib.as_array(ctypes.cast(out.buf, ctypes.POINTER(ctypes.c_float)), shape=(T, D)).copy()
    assert double.lib.rknn_outputs_release(ctx, 1, ctypes.byref(out)) == 0
    assert np.array_equal(got, expected_features(x, T, D)[0])
    assert double.lib.rknn_destroy(ctx) == 0 and double.live() == (0, 0)
    assert [c["fn"] for c in double.calls()] == ["rknn_init", "rknn_inputs_set", "rknn_run", "rknn_outputs_get",
                                                 "rknn_outputs_release", "rknn_destroy"]


def test_queries_describe_the_model(double):
    _, ctx = init(double, model_blob(H, W, T, D, w_stride=48, out_type=FLOAT16))
    counts = A.InputOutputNum()
    assert double.lib.rknn_query(ctx, A.QUERY_IN_OUT_NUM, ctypes.byref(counts), 8) == 0
    assert (counts.n_input, counts.n_output) == (1, 1)
    i, o = attr(double, ctx, A.QUERY_INPUT_ATTR), attr(double, ctx, A.QUERY_OUTPUT_ATTR)
    assert i.shape == (1, H, W, 3) and i.fmt == A.FORMAT_NHWC and i.type == A.TENSOR_UINT8
    assert i.w_stride == 48 and i.size_with_stride == H * 48 * 3 and i.n_elems == H * W * 3
    assert o.shape == (1, T, D) and o.type == A.TENSOR_FLOAT16 and o.size == T * D * 2
    assert attr(double, ctx, A.QUERY_NATIVE_NHWC_OUTPUT_ATTR).shape == (1, T, D)
    version = A.SdkVersion()
    assert double.lib.rknn_query(ctx, A.QUERY_SDK_VERSION, ctypes.byref(version), 512) == 0
    assert version.drv_version == b"0.9.8"
    assert double.lib.rknn_destroy(ctx) == 0


@pytest.mark.parametrize("case", ["null context", "null model", "unknown flag", "flag not emulated", "reserved",
                                  "not ours", "damaged", "truncated", "platform", "told to fail", "missing path"])
def test_init_refuses(double, case):
    blob = model_blob(H, W, T, D, payload=b"weights")
    ctx = A.rknn_context()
    buffer = ctypes.create_string_buffer(blob, len(blob))
    lib = double.lib
    if case == "null context":
        refused(double, PARAM, lib.rknn_init(None, buffer, len(blob), 0, None), "context is NULL")
    elif case == "null model":
        refused(double, PARAM, lib.rknn_init(ctypes.byref(ctx), None, len(blob), 0, None), "model is NULL")
    elif case == "unknown flag":
        refused(double, PARAM, init(double, flag=0x80000)[0], "unknown flag bits 0x80000")
    elif case == "flag not emulated":
        refused(double, PARAM, init(double, flag=0x4)[0], "not emulated")  # RKNN_FLAG_ASYNC_MASK
    elif case == "reserved":
        extend = A.InitExtend()
        extend.reserved[5] = 1
        refused(double, PARAM, lib.rknn_init(ctypes.byref(ctx), buffer, len(blob), 0, ctypes.byref(extend)),
                "reserved[5]")
    elif case == "not ours":
        refused(double, MODEL, init(double, b"RKNN" + bytes(200))[0], "not a model the double wrote")
    elif case == "damaged":
        refused(double, MODEL, init(double, blob[:-1] + b"X")[0], "checksum")
    elif case == "truncated":
        refused(double, MODEL, init(double, blob[:-2])[0], "size")
    elif case == "platform":
        refused(double, PLATFORM, init(double, model_blob(H, W, T, D, platform="rk3576"))[0], "built for rk3576")
    elif case == "told to fail":
        lib.double_fail_init(-3)
        refused(double, -3, init(double)[0], "failing as told")
    elif case == "missing path":
        refused(double, MODEL, lib.rknn_init(ctypes.byref(ctx), b"/nonexistent/vision.rknn", 0, 0, None), "cannot open")
    assert double.live() == (0, 0)


def test_init_from_a_path(double, tmp_path):
    (tmp_path / "vision.rknn").write_bytes(model_blob(H, W, T, D))
    ctx = A.rknn_context()
    assert double.lib.rknn_init(ctypes.byref(ctx), str(tmp_path / "vision.rknn").encode(), 0, 0, None) == 0
    assert double.lib.rknn_destroy(ctx) == 0


def test_misuse_is_refused(double):
    lib = double.lib
    _, ctx = init(double)
    x = tile()
    a = A.TensorAttr(index=0)
    refused(double, PARAM, lib.rknn_query(ctx, A.QUERY_INPUT_ATTR, ctypes.byref(a), 300), "size 300 != 376")
    refused(double, PARAM, lib.rknn_query(ctx, A.QUERY_INPUT_ATTR, None, 376), "info is NULL")
    a.index = 1
    refused(double, PARAM, lib.rknn_query(ctx, A.QUERY_OUTPUT_ATTR, ctypes.byref(a), 376), "index 1")
    refused(double, PARAM, lib.rknn_query(ctx, 3, ctypes.byref(a), 376), "not emulated")  # PERF_DETAIL
    refused(double, PARAM, lib.rknn_set_core_mask(ctx, 5), "not a core mask of rk3588")
    refused(double, INPUT, lib.rknn_run(ctx, None), "no input")  # run before inputs are set
    out = A.Output(want_float=1)
    refused(double, -1, lib.rknn_outputs_get(ctx, 1, ctypes.byref(out), None), "no rknn_run")
    refused(double, PARAM, lib.rknn_inputs_set(ctx, 2, ctypes.byref(A.Input())), "n_inputs 2")
    refused(double, PARAM, lib.rknn_inputs_set(ctx, 1, None), "inputs is NULL")
    refused(double, INPUT, set_input(double, ctx, x, size=x.nbytes - 1), "size 3071 != 3072")
    refused(double, INPUT, set_input(double, ctx, x, buf=None), "buf is NULL")
    refused(double, INPUT, set_input(double, ctx, x, fmt=A.FORMAT_NCHW), "not emulated")
    refused(double, INPUT, set_input(double, ctx, x, type=A.TENSOR_FLOAT32), "not emulated")
    refused(double, INPUT, set_input(double, ctx, x, pass_through=1), "pass_through")
    assert set_input(double, ctx, x) == 0 and lib.rknn_run(ctx, None) == 0
    small = (ctypes.c_float * 3)()
    pre = A.Output(want_float=1, is_prealloc=1, buf=ctypes.addressof(small), size=12)
    refused(double, OUTPUT, lib.rknn_outputs_get(ctx, 1, ctypes.byref(pre), None), "too small")
    refused(double, PARAM, lib.rknn_outputs_get(ctx, 1, ctypes.byref(A.Output(want_float=2)), None), "want_float")
    assert lib.rknn_outputs_get(ctx, 1, ctypes.byref(out), None) == 0
    refused(double, -1, lib.rknn_run(ctx, None), "not released")
    refused(double, -1, lib.rknn_destroy(ctx), "outputs not released")
    refused(double, OUTPUT, lib.rknn_outputs_release(ctx, 1, ctypes.byref(A.Output(want_float=1, buf=8))),
            "not the one rknn_outputs_get returned")
    assert lib.rknn_outputs_release(ctx, 1, ctypes.byref(out)) == 0
    refused(double, -1, lib.rknn_outputs_release(ctx, 1, ctypes.byref(out)), "released twice")
    assert lib.rknn_destroy(ctx) == 0
    # use after destroy, and a handle it never gave out
    refused(double, CTX, lib.rknn_run(ctx, None), "was destroyed")
    refused(double, CTX, lib.rknn_destroy(ctx), "was destroyed")
    refused(double, CTX, lib.rknn_query(12345, A.QUERY_IN_OUT_NUM, ctypes.byref(A.InputOutputNum()), 8), "unknown")
    assert not lib.rknn_create_mem(ctx, 64)


def test_zero_copy_memory_is_the_callers(double):
    lib = double.lib
    _, ctx = init(double, model_blob(H, W, T, D, w_stride=40))
    i, o = attr(double, ctx, A.QUERY_INPUT_ATTR), attr(double, ctx, A.QUERY_OUTPUT_ATTR)
    in_mem = lib.rknn_create_mem(ctx, i.size_with_stride)
    out_mem = lib.rknn_create_mem(ctx, o.n_elems * 4)
    assert in_mem and out_mem and in_mem.contents.flags == A.MEMORY_FLAGS_ALLOC_INSIDE
    o.type = A.TENSOR_FLOAT32
    assert lib.rknn_set_io_mem(ctx, in_mem, ctypes.byref(i)) == 0
    assert lib.rknn_set_io_mem(ctx, out_mem, ctypes.byref(o)) == 0
    rows = np.ctypeslib.as_array(ctypes.cast(in_mem.contents.virt_addr, ctypes.POINTER(ctypes.c_uint8)),
                                 shape=(H, 40, 3))
    result = np.ctypeslib.as_array(ctypes.cast(out_mem.contents.virt_addr, ctypes.POINTER(ctypes.c_float)),
                                   shape=(T, D))
    before = double.bytes_copied()
    for seed in (1, 2):  # new pixels written in place are what the next run reads: no rknn_inputs_set
        x = tile(seed)
        rows[:, :W] = x[0]
        rows[:, W:] = 255  # the stride padding is not part of the image
        assert lib.rknn_run(ctx, None) == 0
        assert np.array_equal(result, expected_features(x, T, D)[0])
    assert double.bytes_copied() - before == 2 * T * D * 4  # only the runtime's output conversion
    assert [c["zero_copy_in"] for c in double.calls("rknn_run")] == [1, 1]
    # what a bound tensor refuses, and memory misuse
    refused(double, INPUT, set_input(double, ctx, tile()), "bound to a tensor mem")
    refused(double, OUTPUT, lib.rknn_outputs_get(ctx, 1, ctypes.byref(A.Output(want_float=1)), None), "bound")
    _, other = init(double)
    refused(double, PARAM, lib.rknn_set_io_mem(other, in_mem, ctypes.byref(i)), "another context")
    wrong = A.TensorAttr.from_buffer_copy(i)
    wrong.name = b"something"
    refused(double, PARAM, lib.rknn_set_io_mem(ctx, in_mem, ctypes.byref(wrong)), "names no tensor")
    wrong = A.TensorAttr.from_buffer_copy(i)
    wrong.w_stride = W
    refused(double, INPUT, lib.rknn_set_io_mem(ctx, in_mem, ctypes.byref(wrong)), "w_stride")
    tiny = lib.rknn_create_mem(ctx, 16)
    refused(double, OUTPUT, lib.rknn_set_io_mem(ctx, tiny, ctypes.byref(o)), "mem size 16")
    o16 = A.TensorAttr.from_buffer_copy(o)
    o16.type = A.TENSOR_INT8
    refused(double, OUTPUT, lib.rknn_set_io_mem(ctx, out_mem, ctypes.byref(o16)), "not emulated")
    refused(double, -1, lib.rknn_destroy(ctx), "tensor memory still allocated")
    assert lib.rknn_destroy_mem(ctx, tiny) == 0
    refused(double, PARAM, lib.rknn_destroy_mem(ctx, tiny), "destroyed twice")
    refused(double, CTX, lib.rknn_destroy_mem(other, in_mem), "another context")
    assert lib.rknn_destroy_mem(ctx, in_mem) == 0
    refused(double, INPUT, lib.rknn_run(ctx, None), "no input")  # the destroyed mem is no longer bound
    assert lib.rknn_destroy_mem(ctx, out_mem) == 0
    assert lib.rknn_destroy(ctx) == 0 and lib.rknn_destroy(other) == 0 and double.live() == (0, 0)


def test_dup_context_shares_the_model_and_takes_its_own_core(double):
    lib = double.lib
    _, first = init(double, model_blob(H, W, T, D, out_type=FLOAT16))
    second = A.rknn_context()
    assert lib.rknn_dup_context(ctypes.byref(first), ctypes.byref(second)) == 0 and second.value != first.value
    refused(double, PARAM, lib.rknn_dup_context(None, ctypes.byref(second)), "NULL")
    assert lib.rknn_set_core_mask(first, A.NPU_CORE_0) == 0 and lib.rknn_set_core_mask(second, A.NPU_CORE_2) == 0
    assert lib.rknn_destroy(first) == 0  # the model lives on in the duplicate
    x = tile(3)
    assert set_input(double, second, x) == 0 and lib.rknn_run(second, None) == 0
    out = A.Output(want_float=0)
    assert lib.rknn_outputs_get(second, 1, ctypes.byref(out), None) == 0
    half = np.ctypeslib.as_array(ctypes.cast(out.buf, ctypes.POINTER(ctypes.c_uint16)), shape=(T * D,)).copy()
    assert out.size == T * D * 2  # the native float16, not converted
    assert np.array_equal(half.view(np.float16).astype(np.float32).reshape(T, D),
                          expected_features(x, T, D, fp16=True)[0])
    assert lib.rknn_outputs_release(second, 1, ctypes.byref(out)) == 0 and lib.rknn_destroy(second) == 0
    assert [c["mask"] for c in double.calls("rknn_run")] == [4]


def test_core_masks_follow_the_soc(double):
    lib = double.lib
    lib.double_set_soc(b"rk3576")
    _, ctx = init(double, model_blob(H, W, T, D, platform="rk3576"))
    assert lib.rknn_set_core_mask(ctx, A.NPU_CORE_0_1) == 0
    refused(double, PARAM, lib.rknn_set_core_mask(ctx, A.NPU_CORE_2), "not a core mask of rk3576")
    assert lib.rknn_destroy(ctx) == 0


def test_a_failing_provider_fails_the_run(double):
    from support.rknn_double import PROVIDER

    callback = PROVIDER(lambda _ud, _x, _n, _out, _m: 1)
    double.set_provider(callback)
    _, ctx = init(double)
    assert set_input(double, ctx, tile()) == 0
    refused(double, -1, double.lib.rknn_run(ctx, None), "provider failed")
    double.set_provider(None)
    assert double.lib.rknn_destroy(ctx) == 0


@pytest.mark.parametrize("bound", [FLOAT32, FLOAT16])
def test_a_float16_model_writes_its_output_as_the_bound_type(double, bound):
    lib = double.lib
    _, ctx = init(double, model_blob(H, W, T, D, out_type=FLOAT16))
    i, o = attr(double, ctx, A.QUERY_INPUT_ATTR), attr(double, ctx, A.QUERY_OUTPUT_ATTR)
    in_mem, out_mem = lib.rknn_create_mem(ctx, i.size_with_stride), lib.rknn_create_mem(ctx, T * D * 4)
    o.type = bound
    assert lib.rknn_set_io_mem(ctx, in_mem, ctypes.byref(i)) == 0
    assert lib.rknn_set_io_mem(ctx, out_mem, ctypes.byref(o)) == 0
    x = tile(4)
    ctypes.memmove(in_mem.contents.virt_addr, x.ctypes.data, x.nbytes)
    assert lib.rknn_run(ctx, None) == 0
    raw = ctypes.string_at(out_mem.contents.virt_addr, T * D * (4 if bound == FLOAT32 else 2))
    got = np.frombuffer(raw, dtype=np.float32 if bound == FLOAT32 else np.float16).astype(np.float32)
    assert np.array_equal(got.reshape(T, D), expected_features(x, T, D, fp16=True)[0])
    assert lib.rknn_destroy_mem(ctx, in_mem) == 0 and lib.rknn_destroy_mem(ctx, out_mem) == 0
    assert lib.rknn_destroy(ctx) == 0

"""librknnrt's structs as runtime/rknn_abi.py lays them out: every size and offset as rknn_api.h's C
types give them on LP64, checked against the C compiler (a probe built here against the double's
header, which the double itself is compiled from) and the enum values the engine passes."""

import ctypes
import json
import shutil
import subprocess

import pytest

from support import DOUBLES

from rksmolvlm.errors import BundleError
from rksmolvlm.runtime import rknn_abi

HEADER = DOUBLES / "librknnrt" / "rknn_double_api.h"
ENUMS = {"RKNN_QUERY_IN_OUT_NUM": rknn_abi.QUERY_IN_OUT_NUM, "RKNN_QUERY_INPUT_ATTR": rknn_abi.QUERY_INPUT_ATTR,
         "RKNN_QUERY_OUTPUT_ATTR": rknn_abi.QUERY_OUTPUT_ATTR, "RKNN_QUERY_SDK_VERSION": rknn_abi.QUERY_SDK_VERSION,
         "RKNN_QUERY_NATIVE_INPUT_ATTR": rknn_abi.QUERY_NATIVE_INPUT_ATTR,
         "RKNN_QUERY_NATIVE_OUTPUT_ATTR": rknn_abi.QUERY_NATIVE_OUTPUT_ATTR,
         "RKNN_QUERY_NATIVE_NHWC_INPUT_ATTR": rknn_abi.QUERY_NATIVE_NHWC_INPUT_ATTR,
         "RKNN_QUERY_NATIVE_NHWC_OUTPUT_ATTR": rknn_abi.QUERY_NATIVE_NHWC_OUTPUT_ATTR,
         "RKNN_TENSOR_FLOAT32": rknn_abi.TENSOR_FLOAT32, "RKNN_TENSOR_FLOAT16": rknn_abi.TENSOR_FLOAT16,
         "RKNN_TENSOR_INT8": rknn_abi.TENSOR_INT8, "RKNN_TENSOR_UINT8": rknn_abi.TENSOR_UINT8,
         "RKNN_TENSOR_NCHW": rknn_abi.FORMAT_NCHW, "RKNN_TENSOR_NHWC": rknn_abi.FORMAT_NHWC,
         "RKNN_TENSOR_NC1HWC2": rknn_abi.FORMAT_NC1HWC2, "RKNN_TENSOR_UNDEFINED": rknn_abi.FORMAT_UNDEFINED,
         "RKNN_NPU_CORE_AUTO": rknn_abi.NPU_CORE_AUTO, "RKNN_NPU_CORE_0": rknn_abi.NPU_CORE_0,
         "RKNN_NPU_CORE_1": rknn_abi.NPU_CORE_1, "RKNN_NPU_CORE_2": rknn_abi.NPU_CORE_2,
         "RKNN_NPU_CORE_0_1": rknn_abi.NPU_CORE_0_1, "RKNN_NPU_CORE_0_1_2": rknn_abi.NPU_CORE_0_1_2,
         "RKNN_NPU_CORE_ALL": rknn_abi.NPU_CORE_ALL,
         "RKNN_TENSOR_MEMORY_FLAGS_ALLOC_INSIDE": rknn_abi.MEMORY_FLAGS_ALLOC_INSIDE,
         "RKNN_MAX_DIMS": rknn_abi.MAX_DIMS, "RKNN_MAX_NAME_LEN": rknn_abi.MAX_NAME_LEN}


@pytest.fixture(scope="module")
def probe(tmp_path_factory):
    """sizeof/offsetof of every struct and field, and the enum values, as the C compiler sees them."""
    if shutil.which("cc") is None:
        pytest.skip("needs a C compiler")
    lines = ['#include <stddef.h>', '#include <stdio.h>', f'#include "{HEADER}"', "int main(void) {",
             '  printf("{\\"sizes\\": {");']
    for i, name in enumerate(rknn_abi.SIZES):
        lines.append(f'  printf("{"," if i else ""}\\"{name}\\": %zu", sizeof({name}));')
    lines.append('  printf("}, \\"offsets\\": {");')
    for i, (name, fields) in enumerate(rknn_abi.OFFSETS.items()):
        lines.append(f'  printf("{"," if i else ""}\\"{name}\\": {{");')
        for j, field in enumerate(fields):
            lines.append(f'  printf("{"," if j else ""}\\"{field}\\": %zu", offsetof({name}, {field}));')
        lines.append('  printf("}");')
    lines.append('  printf("}, \\"enums\\": {");')
    for i, name in enumerate(ENUMS):
        lines.append(f'  printf("{"," if i else ""}\\"{name}\\": %ld", (long){name});')
    lines += ['  printf("}}");', "  return 0;", "}"]
    root = tmp_path_factory.mktemp("rknn-probe")
    (root / "probe.c").write_text("\n".join(lines) + "\n")
    subprocess.run(["cc", "-Wall", "-Werror", "-o", str(root / "probe"), str(root / "probe.c")], check=True)
    return json.loads(subprocess.run([str(root / "probe")], check=True, capture_output=True, text=True).stdout)


def test_the_declared_layout_holds():
    rknn_abi.check_layout()


@pytest.mark.parametrize("name", list(rknn_abi.SIZES))
def test_sizes_match_the_c_compiler(probe, name):
    struct, want = rknn_abi.SIZES[name]
    assert ctypes.sizeof(struct) == want == probe["sizes"][name]


@pytest.mark.parametrize("name", list(rknn_abi.OFFSETS))
def test_every_field_offset_matches_the_c_compiler(probe, name):
    struct = rknn_abi.SIZES[name][0]
    assert [f for f, *_ in struct._fields_] == list(rknn_abi.OFFSETS[name]), "a field is missing from the table"
    for field, want in rknn_abi.OFFSETS[name].items():
        assert getattr(struct, field).offset == want == probe["offsets"][name][field], (name, field)


def test_enum_values_match_the_header(probe):
    assert probe["enums"] == ENUMS


def test_fixed_arrays_have_the_header_lengths():
    attr = rknn_abi.TensorAttr()
    assert len(attr.dims) == 16 and rknn_abi.TensorAttr.name.size == 256
    assert rknn_abi.SdkVersion.api_version.size == rknn_abi.SdkVersion.drv_version.size == 256
    assert len(rknn_abi.InitExtend().reserved) == 112


def test_a_wrong_layout_is_an_error_not_a_segfault(monkeypatch):
    monkeypatch.setitem(rknn_abi.OFFSETS, "rknn_input", {**rknn_abi.OFFSETS["rknn_input"], "fmt": 24})
    with pytest.raises(BundleError, match=r"offsetof\(rknn_input.fmt\) 28 != 24"):
        rknn_abi.check_layout()


def test_declare_names_the_missing_symbols():
    libc = ctypes.CDLL(None)
    assert rknn_abi.declare(libc) == list(rknn_abi.REQUIRED_SYMBOLS)
    assert rknn_abi.error_name(-6) == "RKNN_ERR_MODEL_INVALID" and rknn_abi.error_name(-99) == "error -99"

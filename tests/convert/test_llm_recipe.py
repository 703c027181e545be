"""Decoder recipes: valid combinations per SoC; everything else refused with the choices listed."""

import pytest

from rksmolvlm.boards import load_profile
from rksmolvlm.convert.llm_recipe import make_recipe
from rksmolvlm.errors import TargetError


@pytest.mark.parametrize("target,dtype", [("rk3588", "w8a8"), ("rk3588", "w8a8_g256"), ("rk3576", "w4a16_g64"),
                                          ("rk3576", "w8a8"), ("rk3562", "w4a8_g32"), ("rk3562", "w8a8")])
def test_valid(target, dtype):
    r = make_recipe(load_profile(target), dtype)
    assert (r.target, r.dtype, r.num_npu_core) == (target, dtype, load_profile(target).llm_max_npu_cores)


def test_defaults_per_soc():
    assert make_recipe(load_profile("rk3588")).dtype == "w8a8"
    assert make_recipe(load_profile("rk3576")).dtype == "w4a16"
    assert make_recipe(load_profile("rk3588")).max_context == 4096


@pytest.mark.parametrize("target,kwargs,match", [
    ("rk3588", dict(dtype="w4a16"), "w8a8, w8a8_g128, w8a8_g256, w8a8_g512"),
    ("rk3562", dict(dtype="w8a8_g128"), "w8a8, w4a16_g32"),
    ("rk3588", dict(algorithm="gdq"), "normal, grq"),
    ("rk3588", dict(algorithm="grq"), "only applies to w4a16"),
    ("rk3576", dict(num_npu_core=3), "choose 1 to 2"),
    ("rk3562", dict(num_npu_core=2), "choose 1 to 1"),
    ("rk3588", dict(max_context=1000), "multiple of 32"),
    ("rk3588", dict(max_context=16416), "multiple of 32 from 32 to 16384"),
    ("rk3588", dict(max_context=8192, model_context=2048), "at most 2048"),
    ("rk3588", dict(optimization_level=2), "0 or 1"),
])
def test_invalid(target, kwargs, match):
    with pytest.raises(TargetError, match=match):
        make_recipe(load_profile(target), **kwargs)

"""Board profiles are data; unknown targets list the valid ones."""

import pytest

from rksmolvlm.boards import load_profile, profile_names
from rksmolvlm.errors import TargetError


def test_three_socs():
    assert profile_names() == ["rk3562", "rk3576", "rk3588"]


@pytest.mark.parametrize("name,cores,llm_default", [("rk3588", 3, "w8a8"), ("rk3576", 2, "w4a16"),
                                                    ("rk3562", 1, "w8a8")])
def test_profile_values(name, cores, llm_default):
    p = load_profile(name)
    assert p.npu_cores == cores == len(p.core_masks) == p.llm_max_npu_cores
    assert p.llm_default_dtype == llm_default in p.llm_dtypes
    assert p.min_npu_driver == "0.9.8"
    assert p.rknn_target == name


def test_unknown_target_lists_choices():
    with pytest.raises(TargetError, match="rk3562, rk3576, rk3588"):
        load_profile("rk3399")

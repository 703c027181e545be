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


def test_readme_puts_two_boards_behind_the_litellm_proxy(monkeypatch):
    """README's LiteLLM config as scripts/litellm_two_boards.py fills it in (that script runs the real proxy)."""
    import importlib.util
    import sys

    import yaml

    from support import ROOT

    spec = importlib.util.spec_from_file_location("litellm_two_boards", ROOT / "scripts" / "litellm_two_boards.py")
    script = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, script)  # its dataclasses look their module up
    spec.loader.exec_module(script)
    boards = ["http://127.0.0.1:18080/v1", "http://127.0.0.1:18081/v1"]
    config = yaml.safe_load(script.proxy_config(boards, "tiny"))
    deployments = config["model_list"]
    assert [d["model_name"] for d in deployments] == ["smolvlm", "smolvlm"]  # one name, two boards
    assert [d["litellm_params"]["api_base"] for d in deployments] == boards
    assert {d["litellm_params"]["model"] for d in deployments} == {"openai/tiny"}
    assert [d["litellm_params"]["api_key"] for d in deployments] == ["os.environ/BOARD1_API_KEY",
                                                                     "os.environ/BOARD2_API_KEY"]
    router = config["router_settings"]
    assert router["routing_strategy"] == "simple-shuffle" and router["enable_weighted_failover"] is True
    assert router["allowed_fails_policy"]["RateLimitErrorAllowedFails"] >= 100  # a 429 keeps a board in rotation

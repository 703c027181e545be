"""Flags shared by the verbs that answer from a bundle (ask, chat, bench), and what they open."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from rksmolvlm.errors import RkSmolVLMError

if TYPE_CHECKING:
    from rksmolvlm.runtime.engines import GenerationConfig
    from rksmolvlm.runtime.runner import Runner

__all__ = ["add_engine_arguments", "add_runtime_arguments", "generation_config", "open_runner"]

ENGINES = ("auto", "host", "npu")  # rksmolvlm.runtime.engines.ENGINES, without importing numpy for --help


def add_engine_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--engine", default="auto", choices=ENGINES,
                   help="npu on the board, host = x86 preview (onnxruntime + torch); auto picks")
    p.add_argument("--library", help="path of librkllmrt.so (default: $RKLLM_LIBRARY, /usr/lib, /usr/local/lib)")


def add_runtime_arguments(p: argparse.ArgumentParser) -> None:
    """The bundle, the engine and the generation options of ask and chat."""
    p.add_argument("bundle", type=Path, help="bundle directory")
    add_engine_arguments(p)
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int)
    p.add_argument("--no-verify", action="store_true", help="skip the sha256 check of the bundle files")


def generation_config(args: argparse.Namespace) -> "GenerationConfig":
    from rksmolvlm.runtime.engines import GenerationConfig

    try:
        return GenerationConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    except ValueError as exc:
        raise RkSmolVLMError(f"invalid generation option: {exc}") from exc


def open_runner(args: argparse.Namespace) -> tuple["Runner", "GenerationConfig"]:
    """The bundle's runner on the chosen engine, and the generation options of the flags."""
    from rksmolvlm.runtime.engines import EngineOptions, open_engines
    from rksmolvlm.runtime.loader import RuntimeBundle
    from rksmolvlm.runtime.runner import Runner

    config = generation_config(args)  # before loading anything: a bad option fails fast
    bundle = RuntimeBundle.open(args.bundle, verify=not args.no_verify)
    vision, llm = open_engines(bundle, args.engine,
                               EngineOptions(library=args.library, max_new_tokens=config.max_new_tokens))
    return Runner(bundle, vision, llm), config

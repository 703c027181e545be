"""Flags shared by the verbs that answer from a bundle (ask, chat, bench), and what they open."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from rksmolvlm.errors import RkSmolVLMError

if TYPE_CHECKING:
    from rksmolvlm.runtime.engines import GenerationConfig
    from rksmolvlm.runtime.runner import Runner

__all__ = ["add_engine_arguments", "add_runtime_arguments", "add_resolution_arguments", "generation_config",
           "open_runner", "resolution_choice"]

ENGINES = ("auto", "host", "npu")  # of rksmolvlm.runners.ENGINES (sim is verify's), without importing numpy for --help


def add_engine_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--engine", default="auto", choices=ENGINES,
                   help="npu on the board, host = x86 preview (onnxruntime + torch); auto picks")
    p.add_argument("--library", help="path of librkllmrt.so (default: $RKLLM_LIBRARY, /usr/lib, /usr/local/lib)")
    p.add_argument("--threads", type=_threads, metavar="N",
                   help="CPU threads of the host engines: onnxruntime's intra-op threads (tower) and torch's "
                        "(decoder); default: the libraries' own, every core")


def _threads(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be at least 1")
    return value


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
    add_resolution_arguments(p)


def add_resolution_arguments(p: argparse.ArgumentParser, prefix: str = "",
                             title: str = "image resolution (each equal to transformers' processor with the same "
                                          "settings)") -> None:
    """--image-size / --max-tiles / --no-split: the images' resolution budget (README "Resolution budgets");
    ``prefix`` names another set of them (convert's --llm-calibration-*)."""
    g = p.add_argument_group(title)
    g.add_argument(f"--{prefix}image-size", type=int, metavar="N",
                   help="the processor's size longest_edge: a multiple of the model's tile size T (512 for "
                        "256M/500M, 384 for 2.2B); smaller = fewer tiles, faster (default: the model's, 4·T)")
    g.add_argument(f"--{prefix}max-tiles", type=int, metavar="N",
                   help="at most N split tiles per image (plus the global image): the largest longest_edge k·T "
                        f"(at most --{prefix}image-size) whose split of that image gives rows·cols <= N")
    g.add_argument(f"--{prefix}no-split", action="store_true",
                   help="each image as one tile (the processor's do_image_splitting=False)")


def generation_config(args: argparse.Namespace) -> "GenerationConfig":
    from rksmolvlm.runtime.engines import GenerationConfig

    try:
        return GenerationConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    except ValueError as exc:
        raise RkSmolVLMError(f"invalid generation option: {exc}") from exc


def resolution_choice(args: argparse.Namespace, prefix: str = ""):
    """The Resolution of --image-size / --max-tiles / --no-split (checked against the tile size
    once the bundle is open); with ``prefix``, of that set of flags."""
    from rksmolvlm.processing.image import Resolution

    dest = prefix.replace("-", "_")
    try:
        return Resolution(longest_edge=getattr(args, f"{dest}image_size", None),
                          max_tiles=getattr(args, f"{dest}max_tiles", None),
                          split=not getattr(args, f"{dest}no_split", False))
    except ValueError as exc:
        raise RkSmolVLMError(f"invalid {'--' + prefix + '* ' if prefix else 'image resolution '}option: {exc}") \
            from None


def open_runner(args: argparse.Namespace) -> tuple["Runner", "GenerationConfig"]:
    """The bundle's runner on the chosen engine, and the generation options of the flags."""
    from rksmolvlm.runners import open_runner as open_bundle_runner
    from rksmolvlm.runtime.engines import EngineOptions
    from rksmolvlm.runtime.loader import RuntimeBundle

    config = generation_config(args)  # before loading anything: a bad option fails fast
    resolution = resolution_choice(args)
    bundle = RuntimeBundle.open(args.bundle, verify=not args.no_verify)
    try:
        resolution.check(bundle.settings.tile_size)
    except ValueError as exc:
        raise RkSmolVLMError(f"invalid --image-size: {exc}") from exc
    options = EngineOptions(threads=args.threads, library=args.library, max_new_tokens=config.max_new_tokens)
    return open_bundle_runner(bundle, args.engine, options, resolution=resolution), config

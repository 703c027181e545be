"""The ``rksmolvlm`` command: verbs over the converter and the runtime.

Heavy imports (torch, transformers, rknn) happen inside the verbs, so ``--help`` is instant and
the board never imports host-only packages.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import tempfile
from pathlib import Path

from rksmolvlm import __version__
from rksmolvlm.errors import RkSmolVLMError

__all__ = ["main", "build_parser"]


def _add_convert_args(p: argparse.ArgumentParser, with_model: bool = True) -> None:
    if with_model:
        p.add_argument("model", help="checkpoint directory or hub id (e.g. HuggingFaceTB/SmolVLM-256M-Instruct)")
        p.add_argument("-o", "--output", required=True, type=Path, help="bundle directory to create")
        p.add_argument("--revision", help="hub revision (branch, tag or commit)")
    p.add_argument("--target", default="rk3588", help="rk3588 (default), rk3576 or rk3562")
    p.add_argument("--parts", default="vision,llm", help="comma-separated parts: vision, llm (default: both)")
    p.add_argument("--vision-dtype", default="fp16", choices=["fp16", "int8"],
                   help="fp16 (default) or int8 (w8a8, calibrated)")
    p.add_argument("--quant-algorithm", default="normal", help="int8 algorithm: normal, mmse, kl_divergence")
    p.add_argument("--calibration", type=Path, help="folder of your own calibration images (default: shipped set)")
    p.add_argument("--calibration-tiles", type=int, default=24, help="tiles used to calibrate int8 (default 24)")
    p.add_argument("--evaluation-tiles", type=int, default=3,
                   help="held-out tiles run in the simulator for the accuracy check (default 3)")
    p.add_argument("--min-cosine", type=float, default=0.99,
                   help="accuracy floor: worst held-out tile cosine vs torch (default 0.99)")
    p.add_argument("--accept-low-accuracy", action="store_true", help="keep a model below --min-cosine")
    p.add_argument("--host-preview", action="store_true",
                   help="also keep vision.onnx and the decoder directory for the x86 host preview")
    p.add_argument("--llm-dtype", help="decoder quantization (rk3588: w8a8 [default], w8a8_g128/256/512; "
                   "rk3576: w4a16 [default], w4a16_g32/64/128, w8a8; rk3562: w8a8 [default], w4a16_gN, w4a8_g32)")
    p.add_argument("--llm-algorithm", default="normal", help="normal (default) or grq (w4a16 only)")
    p.add_argument("--llm-npu-cores", type=int, help="NPU cores the decoder uses (default: all of the SoC's)")
    p.add_argument("--max-context", type=int,
                   help="decoder context (multiple of 32, ≤ 16384; default min(4096, the model's))")
    p.add_argument("--llm-optimization", type=int, default=1, choices=[0, 1], help="rkllm optimization level")
    p.add_argument("--llm-dataset-format", choices=["text", "embed", "multimodal"],
                   help="decoder calibration format (default: the one the installed rkllm-toolkit takes)")
    p.add_argument("--llm-prompts", type=Path,
                   help="your own decoder calibration chats (JSON like calibration/prompts.json; images are "
                        "looked up in --calibration)")
    p.add_argument("--llm-host-only", action="store_true",
                   help="build without rkllm-toolkit: no llm.rkllm, the bundle runs in the host preview only")
    p.add_argument("--force", action="store_true", help="replace an existing bundle")
    p.add_argument("-q", "--quiet", action="store_true", help="print only the summary")
    p.add_argument("--json", action="store_true", help="print the result as JSON")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rksmolvlm", description="SmolVLM on Rockchip NPUs")
    parser.add_argument("--version", action="version", version=f"rksmolvlm {__version__}")
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="VERB")
    convert = verbs.add_parser("convert", help="convert a SmolVLM checkpoint into a bundle (x86 host)")
    _add_convert_args(convert)
    demo = verbs.add_parser("demo", help="build a tiny SmolVLM offline and convert it (no download)")
    demo.add_argument("-o", "--output", type=Path, default=Path("demo-bundle"), help="bundle directory")
    demo.add_argument("--model", default="idefics3-256m", help="tiny layout: idefics3-256m, idefics3-2b, smolvlm2")
    _add_convert_args(demo, with_model=False)
    demo.set_defaults(force=True)
    ask = verbs.add_parser("ask", help="answer one question about images (one user message)")
    _add_runtime_args(ask)
    ask.add_argument("--image", action="append", default=[], type=Path, help="an image (repeat for several)")
    ask.add_argument("--prompt", required=True, help="the question or instruction")
    ask.add_argument("--json", action="store_true", help="print text, token ids and timings as JSON")
    chat = verbs.add_parser("chat", help="interactive chat with streaming (/image PATH, /reset, /quit)")
    _add_runtime_args(chat)
    doctor = verbs.add_parser("doctor", help="check this board (SoC, NPU driver, runtimes, permissions, memory)")
    doctor.add_argument("bundle", nargs="?", type=Path, help="also check this bundle against the board")
    doctor.add_argument("--root", default="/", help=argparse.SUPPRESS)
    doctor.add_argument("--json", action="store_true")
    serve = verbs.add_parser("serve", help="OpenAI-compatible HTTP server (run by systemd on the board)")
    from rksmolvlm.runtime.server import add_serve_arguments

    add_serve_arguments(serve)
    bench = verbs.add_parser("bench", help="measure vision, TTFT, prefill and decode speed of a bundle")
    bench.add_argument("bundle", type=Path)
    bench.add_argument("--engine", default="auto", choices=["auto", "host", "npu"])
    bench.add_argument("--repeats", type=int, default=3)
    bench.add_argument("--warmup", type=int, default=1)
    bench.add_argument("--prompt-tokens", type=int, default=128)
    bench.add_argument("--new-tokens", type=int, default=32)
    bench.add_argument("--library", help="path of librkllmrt.so (default: $RKLLM_LIBRARY, /usr/lib, /usr/local/lib)")
    bench.add_argument("--json", action="store_true")
    return parser


def _add_runtime_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("bundle", type=Path, help="bundle directory")
    p.add_argument("--engine", default="auto", choices=["auto", "host", "npu"],
                   help="npu on the board, host = x86 preview (onnxruntime + torch); auto picks")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int)
    p.add_argument("--no-verify", action="store_true", help="skip the sha256 check of the bundle files")
    p.add_argument("--library", help="path of librkllmrt.so (default: $RKLLM_LIBRARY, /usr/lib, /usr/local/lib)")


def _options(args: argparse.Namespace, model: str):
    from rksmolvlm.convert.pipeline import ConvertOptions

    return ConvertOptions(
        model=model, output=args.output, target=args.target,
        parts=tuple(p.strip() for p in args.parts.split(",") if p.strip()),
        vision_dtype=args.vision_dtype, quant_algorithm=args.quant_algorithm, calibration=args.calibration,
        calibration_tiles=args.calibration_tiles, evaluation_tiles=args.evaluation_tiles,
        min_cosine=args.min_cosine, accept_low_accuracy=args.accept_low_accuracy,
        host_preview=args.host_preview, force=args.force, revision=getattr(args, "revision", None),
        llm_dtype=args.llm_dtype, llm_algorithm=args.llm_algorithm, llm_npu_cores=args.llm_npu_cores,
        max_context=args.max_context, llm_optimization=args.llm_optimization,
        llm_dataset_format=args.llm_dataset_format, llm_host_only=args.llm_host_only, llm_prompts=args.llm_prompts)


def _run_convert(args: argparse.Namespace, model: str) -> int:
    from rksmolvlm.convert.pipeline import convert
    from rksmolvlm.convert.progress import Progress

    options = _options(args, model)
    result = convert(options, Progress(0, quiet=args.quiet))
    if args.json:
        print(json.dumps({"bundle": str(result.bundle), "files": result.manifest["files"],
                          "report": result.report, "timings": result.timings}, indent=2))
    else:
        print(result.summary())
    return 0


def _cmd_convert(args: argparse.Namespace) -> int:
    return _run_convert(args, args.model)


def _cmd_demo(args: argparse.Namespace) -> int:
    from rksmolvlm.convert.tiny_checkpoint import TINY_SPECS, build_tiny_checkpoint

    if args.model not in TINY_SPECS:
        raise RkSmolVLMError(f"unknown demo model {args.model!r}: choose one of {', '.join(sorted(TINY_SPECS))}")
    from rksmolvlm.convert.llm_rkllm import toolkit_info

    if "llm" in args.parts and not args.llm_host_only and toolkit_info() is None:
        args.llm_host_only = True
        if not args.quiet:
            print("demo: rkllm-toolkit is not installed, so the decoder is built for the host preview only "
                  "(no llm.rkllm)", file=sys.stderr)
    args.host_preview = True
    with tempfile.TemporaryDirectory(prefix="rksmolvlm-demo-") as tmp:
        checkpoint = build_tiny_checkpoint(args.model, Path(tmp) / f"tiny-{args.model}")
        if not args.quiet:
            print(f"demo: built a tiny random {args.model} checkpoint at {checkpoint}", file=sys.stderr)
        code = _run_convert(args, str(checkpoint))
    if code or "llm" not in args.parts:
        return code
    return _demo_answer(args.output)


def _demo_answer(bundle_dir: Path) -> int:
    """Answer one question about a shipped image with the host preview of the demo bundle."""
    from rksmolvlm.calibration.vision_set import shipped_images_dir
    from rksmolvlm.runtime.engines import GenerationConfig
    from rksmolvlm.runtime.loader import RuntimeBundle
    from rksmolvlm.runtime.pipeline import Pipeline

    image = shipped_images_dir() / "photo_coffee_cup_table.jpg"
    bundle = RuntimeBundle.open(bundle_dir)
    pipeline = Pipeline(bundle, *bundle.make_engines("host"))
    question = "What is on the table?"
    generation = pipeline.generate(
        [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": question}]}],
        GenerationConfig(max_new_tokens=16)).consume()
    s = generation.stats
    print(f"\nhost preview: {image.name} + {question!r}\n"
          f"answer ({len(generation.token_ids)} tokens, random weights so it is noise): {generation.text!r}\n"
          f"token ids: {generation.token_ids}\n"
          f"{s.vision_tiles} tiles in {s.vision_ms:.0f} ms, prefill {s.prefill_tokens} tokens in {s.prefill_ms:.0f} ms, "
          f"first token after {s.first_token_ms:.0f} ms")
    return 0


def _open_pipeline(args: argparse.Namespace):
    from rksmolvlm.runtime.engines import GenerationConfig
    from rksmolvlm.runtime.loader import RuntimeBundle
    from rksmolvlm.runtime.pipeline import Pipeline

    bundle = RuntimeBundle.open(args.bundle, verify=not args.no_verify)
    try:
        config = GenerationConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                  top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    except ValueError as exc:
        raise RkSmolVLMError(f"invalid generation option: {exc}") from exc
    vision, llm = bundle.make_engines(args.engine, library=args.library, config=config)
    return Pipeline(bundle, vision, llm), config


def _cmd_ask(args: argparse.Namespace) -> int:
    pipeline, config = _open_pipeline(args)
    content = [{"type": "image", "image": path} for path in args.image]
    content.append({"type": "text", "text": args.prompt})
    generation = pipeline.generate([{"role": "user", "content": content}], config, keep_history=False)
    if args.json:
        generation.consume()
        print(json.dumps({"text": generation.text, "token_ids": generation.token_ids,
                          "finish_reason": generation.finish_reason, "prompt_tokens": generation.prompt_tokens,
                          "timings": generation.stats.to_dict()}, indent=2))
    else:
        for delta in generation:
            print(delta, end="", flush=True)
        print()
    return 0


def _cmd_chat(args: argparse.Namespace) -> int:
    from rksmolvlm.processing.prompt import assistant_content

    pipeline, config = _open_pipeline(args)
    messages: list[dict] = []
    pending: list[dict] = []
    print("rksmolvlm chat — /image PATH attaches an image to your next message, /reset starts over, /quit ends",
          file=sys.stderr)
    while True:
        try:
            line = input("you> ").strip()
        except EOFError:
            print()
            return 0
        if not line:
            continue
        if line in ("/quit", "/exit"):
            return 0
        if line == "/reset":
            messages, pending = [], []
            pipeline.reset()
            continue
        if line.startswith("/image "):
            path = Path(line[len("/image "):].strip()).expanduser()
            if not path.is_file():
                print(f"no such image: {path}", file=sys.stderr)
                continue
            pending.append({"type": "image", "image": path})
            continue
        messages.append({"role": "user", "content": [*pending, {"type": "text", "text": line}]})
        pending = []
        print("assistant> ", end="", flush=True)
        try:
            generation = pipeline.generate(messages, config)
            for delta in generation:
                print(delta, end="", flush=True)
        except KeyboardInterrupt:
            pipeline.abort()
            print(" [stopped]")
            messages.pop()
            continue
        except RkSmolVLMError as exc:
            print(f"\nerror: {exc}", file=sys.stderr)
            messages.pop()
            continue
        print()
        messages.append({"role": "assistant",
                         "content": [{"type": "text", "text": assistant_content(generation.text)}]})


def _cmd_doctor(args: argparse.Namespace) -> int:
    from rksmolvlm.bundle import read_manifest
    from rksmolvlm.runtime.doctor import run_doctor

    manifest = read_manifest(args.bundle) if args.bundle else None
    size = sum(r["size"] for r in manifest["files"].values()) if manifest else 0
    findings = run_doctor(manifest, args.root, bundle_size_bytes=size)
    if args.json:
        print(json.dumps([f.__dict__ for f in findings], indent=2))
    else:
        marks = {"ok": "ok  ", "warn": "WARN", "fail": "FAIL", "info": "info"}
        for f in findings:
            print(f"[{marks[f.status]}] {f.check}: {f.message}" + (f"\n       fix: {f.fix}" if f.fix else ""))
    return 1 if any(f.status == "fail" for f in findings) else 0


def _cmd_bench(args: argparse.Namespace) -> int:
    from rksmolvlm.runtime.bench import format_table, run_bench
    from rksmolvlm.runtime.loader import RuntimeBundle, on_rockchip_board

    engine = args.engine if args.engine != "auto" else ("npu" if on_rockchip_board() else "host")
    result = run_bench(RuntimeBundle.open(args.bundle), engine, repeats=args.repeats, warmup=args.warmup,
                       prompt_tokens=args.prompt_tokens, new_tokens=args.new_tokens, library=args.library)
    print(json.dumps(result, indent=2) if args.json else format_table(result))
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    from rksmolvlm.runtime.server import serve_command

    return serve_command(args)


def _terminate(signum, frame):  # SIGTERM → the same clean-up path as Ctrl-C
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    signal.signal(signal.SIGTERM, _terminate)
    handlers = {"convert": _cmd_convert, "demo": _cmd_demo, "ask": _cmd_ask, "chat": _cmd_chat,
                "doctor": _cmd_doctor, "bench": _cmd_bench, "serve": _cmd_serve}
    try:
        return handlers[args.verb](args)
    except RkSmolVLMError as exc:
        print(f"rksmolvlm {args.verb}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"rksmolvlm {args.verb}: interrupted; nothing was left behind", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

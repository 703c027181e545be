"""``rksmolvlm bench BUNDLE``: vision, TTFT, prefill and decode speed of a bundle on this machine (and
for SmolVLM2 bundles video frames/s, decode cost and a 16-frame clip's TTFT)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from rksmolvlm.cli.options import add_engine_arguments

__all__ = ["add_parser", "run"]


def add_parser(verbs) -> None:
    p = verbs.add_parser("bench", help="measure vision, TTFT, prefill and decode speed of a bundle")
    p.add_argument("bundle", type=Path)
    add_engine_arguments(p)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--video-frames", type=int,
                   help="video bundles: frames of the clip for the tower throughput and the TTFT (default 16, the "
                        "runtime's default per video)")
    p.add_argument("--video-clip", type=Path,
                   help="video bundles: time this clip (default: a generated 1280x720 30 fps H.264 clip)")
    p.add_argument("--no-video", action="store_true", help="skip the video section")
    p.add_argument("--json", action="store_true")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from rksmolvlm.errors import RkSmolVLMError
    from rksmolvlm.tools.bench import VIDEO_FRAMES, format_table, run_bench
    from rksmolvlm.runtime.loader import RuntimeBundle

    if args.video_frames is not None and args.video_frames < 1:
        raise RkSmolVLMError(f"--video-frames {args.video_frames} must be at least 1")
    if args.video_clip is not None and not args.video_clip.is_file():
        raise RkSmolVLMError(f"--video-clip {args.video_clip} is not a file: pass a video file")
    result = run_bench(RuntimeBundle.open(args.bundle), args.engine, repeats=args.repeats, warmup=args.warmup,
                       prompt_tokens=args.prompt_tokens, new_tokens=args.new_tokens, library=args.library,
                       video=not args.no_video, video_frames=args.video_frames or VIDEO_FRAMES,
                       video_clip=args.video_clip, threads=args.threads)
    print(json.dumps(result, indent=2) if args.json else format_table(result))
    return 0

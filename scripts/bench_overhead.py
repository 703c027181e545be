#!/usr/bin/env python3
"""Per-request CPU time outside the engines, before and after the runtime re-cut, in one run.

Engines that cost nothing (the vision engine returns preallocated zero features, the LLM yields
scripted ids) make every millisecond CPU work of the runtime itself: decode/tile, template +
tokenize, splice, text stream, and the whole request end to end. Two requests at SmolVLM-256M size
(vocab 49280, hidden 576, 64 image tokens per 512² tile, longest edge 2048): (a) a 640×480 photo +
a 32-token question, (b) a 2048×1536 photo + the same question, each answered with 64 tokens; plus
the text stream's cost per token at 100 and 2,000 tokens (flat when linear). The previous code
(``--old``, default feaebce: Pipeline/PromptBuilder/_IncrementalDecoder) runs beside the working
tree (Runner/Assembler/TextStream) on the same bundle and inputs, each in its own process
(``bench_overhead_stages.py``). Goal: ≤ 30 ms per request excluding image decode and tiling.

The bundle is the tiny ``idefics3-256m`` checkpoint (the real token layout and ids) converted
once, its manifest rewritten to the real 256M sizes and its embedding table replaced by a random
49280×576 float16 one. Needs no board and no network; torch is used only to build the bundle.

    .venv/bin/python scripts/bench_overhead.py [--repeats 7] [--json] [--old REF] [--bundle DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
STAGES_SCRIPT = Path(__file__).resolve().with_name("bench_overhead_stages.py")
OLD_REF = "feaebce"  # the last commit before the runtime re-cut
GOAL_MS = 30.0
QUESTION_TOKENS = 32
ANSWER_TOKENS = 64
STREAM_TOKENS = (100, 2000)
CASES = (("a", "640×480 photo + 32-token question", (640, 480)),
         ("b", "2048×1536 photo + 32-token question", (2048, 1536)))
# Folder → package, as pyproject's package-dir maps them (the old tree uses relative imports).
PACKAGE_DIRS = {"rksmolvlm": "rksmolvlm", "runtime": "rksmolvlm/runtime", "convert": "rksmolvlm/convert",
                "calibration": "rksmolvlm/calibration", "boards": "rksmolvlm/boards"}
# SmolVLM-256M-Instruct: SigLIP-B/16 at 512², pixel shuffle 4, SmolLM2-135M-sized decoder.
REAL_256M = {"tile_size": 512, "longest_edge": 2048, "image_seq_len": 64, "vision_hidden": 768,
             "text_hidden": 576, "vocab_size": 49280, "image_id": 49190, "eos_id": 49279, "max_context": 4096}
QUESTION = ("Describe this image in detail. What is written on the sign, how many people are standing near "
            "the bus stop, and what color is the chair next to the window with green curtains?")
ANSWER = (" The picture shows a cat sitting on a red chair next to a window with green curtains. Three people "
          "are standing near a bus stop; the sign says 25 °C at the café. A chart on the wall shows revenue by "
          "quarter: Q1 12, Q2 15, Q3 9, Q4 21 million dollars.")

STAGE_ROWS = (("decode_tile", "decode/tile"), ("template_tokenize", "template+tokenize"), ("splice", "splice"),
              ("text_stream", f"text stream ({ANSWER_TOKENS} tokens)"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=7, help="measured runs per figure, after warm-up (default 7)")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    parser.add_argument("--old", default=OLD_REF, help=f"the git ref of the previous code (default {OLD_REF})")
    parser.add_argument("--bundle", type=Path, help="keep the real-size bundle here (built when missing)")
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="rksmolvlm-bench-overhead-") as tmp:
        work = Path(tmp)
        bundle = args.bundle.expanduser().absolute() if args.bundle else work / "bundle"
        if not (bundle / "manifest.json").is_file():
            _build_bundle(bundle, work / "checkpoint")
        _check_real_size(bundle)
        old_root = _old_tree(REPO, args.old, work / "old")
        plan = _plan(bundle, work, args.repeats)
        results = {"old": _run_stages("old", plan, work, old_root), "new": _run_stages("new", plan, work, None)}
    report = _report(args.old, plan, results, time.perf_counter() - started)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(_table(report))


# -- the bundle ---------------------------------------------------------------------------------
def _build_bundle(bundle: Path, checkpoint: Path) -> None:
    """Convert the tiny 256M-layout checkpoint, then give the bundle the real 256M sizes."""
    from rksmolvlm.convert.pipeline import ConvertOptions, convert
    from rksmolvlm.convert.progress import Progress
    from rksmolvlm.convert.tiny_checkpoint import build_tiny_checkpoint

    with _stdout_to_stderr():  # the converter and rknn-toolkit2 talk; stdout is for the report
        build_tiny_checkpoint("idefics3-256m", checkpoint)
        convert(ConvertOptions(model=str(checkpoint), output=bundle, llm_host_only=True, llm_dataset_format="text",
                               force=True), Progress(0, quiet=True))
    _real_size(bundle)


def _real_size(bundle: Path) -> None:
    from rksmolvlm.hashing import sha256_file

    path = bundle / "manifest.json"
    manifest = json.loads(path.read_text(encoding="utf-8"))
    r = REAL_256M
    tokens = manifest["tokens"]
    if (tokens["image_id"], tokens["eos_ids"], manifest["model"]["text"]["vocab_size"]) != \
            (r["image_id"], [r["eos_id"]], r["vocab_size"]):
        raise SystemExit("the tiny idefics3-256m checkpoint no longer has the real 256M token layout: "
                         "update REAL_256M or the checkpoint")
    model = manifest["model"]
    model["size"] = "256M"
    model["vision"].update(tile_size=r["tile_size"], patch_size=16, hidden_size=r["vision_hidden"], layers=12,
                           heads=12, scale_factor=4, image_seq_len=r["image_seq_len"])
    model["text"].update(hidden_size=r["text_hidden"], layers=30, heads=9, kv_heads=3,
                         max_position_embeddings=8192)
    manifest["vision"]["input"]["shape"] = [1, r["tile_size"], r["tile_size"], 3]
    manifest["vision"]["output"]["shape"] = [1, r["image_seq_len"], r["text_hidden"]]
    llm = manifest["llm"]
    llm["max_context"] = r["max_context"]
    if llm.get("recipe"):
        llm["recipe"]["max_context"] = r["max_context"]
    llm["embed_tokens"]["shape"] = [r["vocab_size"], r["text_hidden"]]
    manifest["processor"].update(tile_size=r["tile_size"], longest_edge=r["longest_edge"],
                                 image_seq_len=r["image_seq_len"])
    table = bundle / llm["embed_tokens"]["file"]
    rng = np.random.default_rng(0)
    np.save(table, (rng.standard_normal((r["vocab_size"], r["text_hidden"]), dtype=np.float32) * 0.02)
            .astype(np.float16))
    manifest["files"][llm["embed_tokens"]["file"]] = {"size": table.stat().st_size, "sha256": sha256_file(table)}
    path.write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")


def _check_real_size(bundle: Path) -> None:
    processor = json.loads((bundle / "manifest.json").read_text(encoding="utf-8"))["processor"]
    if (processor["tile_size"], processor["longest_edge"], processor["image_seq_len"]) != \
            (REAL_256M["tile_size"], REAL_256M["longest_edge"], REAL_256M["image_seq_len"]):
        raise SystemExit(f"{bundle} is not a real-size benchmark bundle: remove it or pass another --bundle")


@contextlib.contextmanager
def _stdout_to_stderr():
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


# -- the old tree -------------------------------------------------------------------------------
def _old_tree(repo: Path, ref: str, dest: Path) -> Path:
    """The package tree of ``ref`` assembled as installed (runtime/ → rksmolvlm/runtime/, …), for
    PYTHONPATH."""
    folders = [f for f in PACKAGE_DIRS
               if _git(repo, "ls-tree", "-d", "--name-only", ref, f).strip()]
    if "rksmolvlm" not in folders or "runtime" not in folders:
        raise SystemExit(f"{ref} has no rksmolvlm/ and runtime/ folders: pass --old with a commit of this repository")
    source = dest / "src"
    with tarfile.open(fileobj=io.BytesIO(_git(repo, "archive", "--format=tar", ref, *folders, text=False))) as tar:
        tar.extractall(source, filter="data")
    for folder in folders:  # rksmolvlm first: the others move into it
        shutil.move(source / folder, dest / PACKAGE_DIRS[folder])
    return dest


def _git(repo: Path, *args: str, text: bool = True):
    done = subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=text)
    if done.returncode != 0:
        raise SystemExit(f"git {' '.join(args[:2])} failed ({(done.stderr or b'')!s:.200}): "
                         "run from a git checkout of rksmolvlm and pass an existing --old ref")
    return done.stdout


# -- the inputs ---------------------------------------------------------------------------------
def _plan(bundle: Path, work: Path, repeats: int) -> dict:
    """What both trees run on: bundle, JPEG files, a 32-token question and scripted answers."""
    from tokenizers import Tokenizer

    manifest = json.loads((bundle / "manifest.json").read_text(encoding="utf-8"))
    tokenizer = Tokenizer.from_file(str(bundle / manifest["tokenizer"]))
    eos = manifest["tokens"]["eos_ids"][0]
    answer_ids = tokenizer.encode(ANSWER, add_special_tokens=False).ids

    def answer(n: int) -> list[int]:  # ordinary BPE ids of the tokenizer, then end-of-utterance
        return (answer_ids * (n // len(answer_ids) + 1))[:n - 1] + [eos]

    cases = []
    for name, label, (width, height) in CASES:
        image = work / f"{name}-{width}x{height}.jpg"
        image.write_bytes(_photo(width, height))
        cases.append({"name": name, "label": label, "image": str(image), "image_bytes": image.stat().st_size,
                      "answer": answer(ANSWER_TOKENS)})
    processor, text = manifest["processor"], manifest["model"]["text"]
    tile, longest = processor["tile_size"], processor["longest_edge"]
    question = _question(tokenizer, QUESTION_TOKENS)
    return {"bundle": str(bundle), "repeats": repeats, "warmup": 2, "question": question,
            "question_tokens": len(tokenizer.encode(question, add_special_tokens=False).ids),
            "image_seq_len": processor["image_seq_len"], "text_hidden": text["hidden_size"],
            "vocab_size": text["vocab_size"], "tile_size": tile, "longest_edge": longest,
            "max_tiles": (longest // tile) ** 2 + 1, "cases": cases,
            "stream": {str(n): answer(n) for n in STREAM_TOKENS}}


def _question(tokenizer, tokens: int) -> str:
    """The longest run of QUESTION's words (skipping any that overshoot) of at most ``tokens`` tokens."""
    words: list[str] = []
    for word in QUESTION.split():
        if len(tokenizer.encode(" ".join([*words, word]), add_special_tokens=False).ids) <= tokens:
            words.append(word)
    return " ".join(words)


def _photo(width: int, height: int) -> bytes:
    """A photo-like JPEG: smooth colour fields, a few shapes, sensor noise."""
    from PIL import Image, ImageDraw, ImageFilter

    rng = np.random.default_rng(width * height)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    base = np.stack([120 + 80 * np.sin(x / width * 3.1 + 0.4), 110 + 70 * np.cos(y / height * 2.3),
                     90 + 60 * np.sin((x + y) / (width + height) * 5.0)], -1)
    image = Image.fromarray(base.clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(12):
        x0, y0 = rng.integers(0, width), rng.integers(0, height)
        w, h = rng.integers(width // 16, width // 4), rng.integers(height // 16, height // 4)
        draw.ellipse((x0, y0, x0 + w, y0 + h), fill=tuple(int(v) for v in rng.integers(0, 255, 3)))
    pixels = np.asarray(image.filter(ImageFilter.GaussianBlur(2)), dtype=np.float32)
    pixels += rng.normal(0, 6, pixels.shape)
    buffer = io.BytesIO()
    Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


# -- running the two trees ----------------------------------------------------------------------
def _run_stages(tree: str, plan: dict, work: Path, pythonpath: Path | None) -> dict:
    """Run bench_overhead_stages.py in its own process under ``tree`` and check where it imported from."""
    plan_file = work / f"plan-{tree}.json"
    plan_file.write_text(json.dumps(plan), encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    if pythonpath is not None:
        env["PYTHONPATH"] = str(pythonpath)
    done = subprocess.run([sys.executable, str(STAGES_SCRIPT), tree, str(plan_file)], capture_output=True,
                          text=True, env=env, cwd=str(work))
    if done.returncode != 0:
        raise SystemExit(f"the {tree} tree failed:\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout)
    home = (pythonpath or REPO).resolve()
    for module, file in result["files"].items():
        if not Path(file).resolve().is_relative_to(home):
            raise SystemExit(f"the {tree} tree imported {module} from {file}, not from {home}: "
                             "install this checkout with 'pip install -e .'")
    return result


# -- the report ---------------------------------------------------------------------------------
def _report(old_ref: str, plan: dict, results: dict, elapsed: float) -> dict:
    old, new = results["old"], results["new"]
    cases = []
    for case in plan["cases"]:
        o, n = old["cases"][case["name"]], new["cases"][case["name"]]
        rows = {key: {"old_ms": o["stages"][key]["cpu_ms"], "new_ms": n["stages"][key]["cpu_ms"]}
                for key, _ in STAGE_ROWS}
        rows["end_to_end_cpu"] = {"old_ms": o["end_to_end"]["cpu_ms"], "new_ms": n["end_to_end"]["cpu_ms"]}
        rows["end_to_end_wall"] = {"old_ms": o["end_to_end"]["wall_ms"], "new_ms": n["end_to_end"]["wall_ms"]}
        rows["decode_tile_in_request"] = {"old_ms": o["end_to_end"]["decode_tile_cpu_ms"],
                                          "new_ms": n["end_to_end"]["decode_tile_cpu_ms"]}
        rows["overhead_excl_decode_tile"] = {"old_ms": o["end_to_end"]["overhead_cpu_ms"],
                                             "new_ms": n["end_to_end"]["overhead_cpu_ms"]}
        rows["other_in_request"] = {tree: rows["overhead_excl_decode_tile"][tree] - sum(
            rows[key][tree] for key, _ in STAGE_ROWS if key != "decode_tile") for tree in ("old_ms", "new_ms")}
        for row in rows.values():
            row["old_over_new"] = row["old_ms"] / row["new_ms"] if row["new_ms"] > 0 else None
        same_answer = o["answer"][1:] if o["answer"].startswith(" ") else o["answer"]
        cases.append({"name": case["name"], "label": case["label"], "image_bytes": case["image_bytes"],
                      "tiles": n["tiles"], "prompt_tokens": {"old": o["prompt_tokens"], "new": n["prompt_tokens"]},
                      "answer_tokens": n["answer_tokens"],
                      "same_prompt_and_answer": o["prompt_tokens"] == n["prompt_tokens"] and same_answer == n["answer"],
                      "stages_cpu_ms": rows})
    stream = {}
    for tree, result in results.items():
        per = {n: result["stream"][str(n)]["us_per_token"] for n in STREAM_TOKENS}
        stream[tree] = {**{f"us_per_token_at_{n}": v for n, v in per.items()},
                        "ratio": per[STREAM_TOKENS[-1]] / per[STREAM_TOKENS[0]]}
    worst = max(c["stages_cpu_ms"]["overhead_excl_decode_tile"]["new_ms"] for c in cases)
    return {"old": old_ref, "new": "working tree", "repeats": plan["repeats"], "warmup": plan["warmup"],
            "model": {k: plan[k] for k in ("vocab_size", "text_hidden", "image_seq_len", "tile_size", "longest_edge")},
            "question": plan["question"], "question_tokens": plan["question_tokens"], "cases": cases,
            "text_stream": stream, "torch_imported": {tree: r["torch_imported"] for tree, r in results.items()},
            "goal": {"limit_ms": GOAL_MS, "worst_new_ms": worst, "holds": worst <= GOAL_MS},
            "elapsed_s": elapsed}


def _table(report: dict) -> str:
    m = report["model"]
    lines = [f"per-request CPU ms outside the engines (fake engines), median of {report['repeats']} after "
             f"{report['warmup']} warm-up runs",
             f"old = {report['old']} (Pipeline), new = {report['new']} (Runner); SmolVLM-256M layout: vocab "
             f"{m['vocab_size']}, hidden {m['text_hidden']}, {m['image_seq_len']} tokens per {m['tile_size']}² tile, "
             f"longest edge {m['longest_edge']}"]
    head = f"{'':34} {'old ms':>9} {'new ms':>9} {'old/new':>8}"
    labels = dict(STAGE_ROWS, end_to_end_cpu="end to end, CPU", end_to_end_wall="end to end, wall",
                  decode_tile_in_request="  of which decode/tile",
                  overhead_excl_decode_tile="overhead excl. decode/tile",
                  other_in_request="  of which outside the stages")
    for case in report["cases"]:
        same = "same prompt and answer in both" if case["same_prompt_and_answer"] else \
            "WARNING: the trees built different prompts or answers"
        lines += ["", f"({case['name']}) {case['label']}: {case['tiles']} tiles, {case['prompt_tokens']['new']} prompt "
                      f"tokens, {case['answer_tokens']} answer tokens ({same})", head]
        for key, row in case["stages_cpu_ms"].items():
            ratio = f"{row['old_over_new']:7.1f}×" if row["old_over_new"] else f"{'-':>8}"
            lines.append(f"{labels[key]:34} {row['old_ms']:9.2f} {row['new_ms']:9.2f} {ratio}")
    old, new = report["text_stream"]["old"], report["text_stream"]["new"]
    lines += ["", f"{'text stream, µs per token':34} {'old':>9} {'new':>9} {'old/new':>8}"]
    for n in STREAM_TOKENS:
        key = f"us_per_token_at_{n}"
        lines.append(f"{f'  at {n:,} tokens':34} {old[key]:9.1f} {new[key]:9.1f} {old[key] / new[key]:7.1f}×")
    lines.append(f"{f'  ratio {STREAM_TOKENS[-1]:,}/{STREAM_TOKENS[0]} (flat ≈ 1)':34} "
                 f"{old['ratio']:9.2f} {new['ratio']:9.2f}")
    goal = report["goal"]
    lines += ["", "CPU time is the measure (time.process_time); wall time also counts whatever else shares the machine.",
              f"goal ≤ {goal['limit_ms']:.0f} ms per request excluding image decode and tiling: new worst case "
                  f"{goal['worst_new_ms']:.1f} ms → {'holds' if goal['holds'] else 'does NOT hold'}",
              f"question: {report['question_tokens']} tokens; torch imported while measuring: "
              f"{', '.join(f'{t} {imported}' for t, imported in report['torch_imported'].items())}; "
              f"ran in {report['elapsed_s']:.0f} s"]
    return "\n".join(lines)


if __name__ == "__main__":
    main()

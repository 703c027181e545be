#!/usr/bin/env python3
"""Per-request CPU time outside the engines: an older commit against this checkout, side by side.

    .venv/bin/python scripts/bench_overhead.py --old 83c9be7 [--repeats 9] [--bundle DIR] [--json]

The old commit is checked out in a temporary ``git worktree``; each tree is laid out as the installed
``rksmolvlm`` namespace (``scripts/namespace_tree.py``: runtime/ → rksmolvlm.runtime, …) and this same
script measures it in its own process, importing only that tree. The engines are defined here and cost
nothing (the vision engine returns zero features, the LLM yields a scripted answer), so every millisecond
measured is the runtime's own work: decoding and tiling images, the template and tokenizer, the
embedding splice, the text stream. Four request shapes, each answered with 64 tokens: text only, one
photo (split into tiles), three photos, and a follow-up turn (photo, answer, second question). Figures
are the median CPU milliseconds (``time.process_time``) of ``Runner.generate(...).consume()`` over
``--repeats`` runs after warm-up; every run sends new image bytes, so no feature cache hides the work.

Only APIs both trees share are used: ``RuntimeBundle.open``, ``Runner(bundle, vision, llm)``,
``runner.generate(messages, GenerationConfig(max_new_tokens=...)).consume()``. Each tree converts the
tiny ``idefics3-256m`` checkpoint (host preview, as the tests do) with its own converter, unless
``--bundle`` names a bundle both can open. Needs a git checkout, no board and no network.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np

REPO = Path(__file__).resolve().parents[1]
CHECKPOINT = "idefics3-256m"  # the tiny checkpoint with the 256M token layout
ANSWER_TOKENS = 64
WARMUP = 2
QUESTION = "Describe this image in detail: what is written on the sign and how many people stand near the bus stop?"
FOLLOW_UP = "And what colour is the chair next to the window?"
ANSWER = (" The picture shows a cat sitting on a red chair next to a window with green curtains. Three people "
          "are standing near a bus stop; the sign says 25 °C at the café. A chart on the wall shows revenue by "
          "quarter: Q1 12, Q2 15, Q3 9, Q4 21 million dollars.")
# request shape → (label, photo sizes of the first user turn, follow-up turn)
SHAPES = {
    "text": ("text only", (), False),
    "one_image": ("one 1024×768 photo, split", ((1024, 768),), False),
    "three_images": ("three photos (800×600, 600×900, 1280×400)", ((800, 600), (600, 900), (1280, 400)), False),
    "follow_up": ("follow-up turn after a 1024×768 photo", ((1024, 768),), True),
}


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if args[:1] == ["--worker"]:
        _worker(args[1:])
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--old", required=True, metavar="COMMIT", help="the commit to compare against (e.g. 83c9be7)")
    parser.add_argument("--repeats", type=int, default=9, help="measured runs per shape, after warm-up (default 9)")
    parser.add_argument("--bundle", type=Path, help="a bundle both trees can open (default: each tree converts the "
                                                    "tiny checkpoint itself)")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    options = parser.parse_args(args)
    if options.repeats < 1:
        parser.error("--repeats must be at least 1")
    started = time.perf_counter()
    commit = _git("rev-parse", "--verify", "--quiet", f"{options.old}^{{commit}}").strip()
    with tempfile.TemporaryDirectory(prefix="rksmolvlm-bench-overhead-") as tmp:
        work = Path(tmp)
        with _worktree(commit, work / "old-checkout") as old_checkout:
            trees = {"old": old_checkout, "new": REPO}
            bundles = _bundles(trees, options.bundle, work)
            plan = _plan(bundles["new"], work, options.repeats)
            results = {name: _run(name, checkout, work, "measure", str(bundles[name]), plan)
                       for name, checkout in trees.items()}
    report = _report(options.old, commit, plan, results, time.perf_counter() - started)
    print(json.dumps(report, indent=2) if options.json else _table(report))


# -- the two trees ----------------------------------------------------------------------------------
@contextlib.contextmanager
def _worktree(commit: str, dest: Path) -> Iterator[Path]:
    """``commit`` checked out at ``dest`` for the duration, then removed from git's worktree list."""
    _git("worktree", "add", "--detach", "--quiet", str(dest), commit)
    try:
        yield dest
    finally:
        _git("worktree", "remove", "--force", str(dest), check=False)


def _bundles(trees: dict[str, Path], given: Path | None, work: Path) -> dict[str, Path]:
    if given is not None:
        if not (given / "manifest.json").is_file():
            raise SystemExit(f"{given} holds no manifest.json: pass a converted bundle, or leave --bundle out")
        return {name: given.absolute() for name in trees}
    from rksmolvlm.convert.tiny_checkpoint import build_tiny_checkpoint

    with _stdout_to_stderr():  # stdout is for the report
        checkpoint = build_tiny_checkpoint(CHECKPOINT, work / "checkpoint")
    out = {}
    for name, checkout in trees.items():
        out[name] = work / f"bundle-{name}"
        _run(name, checkout, work, "convert", str(checkpoint), str(out[name]))
    return out


def _run(name: str, checkout: Path, work: Path, *task: Any) -> Any:
    """This script as a worker inside ``checkout``'s namespace tree; returns the JSON it printed."""
    tree = work / f"namespace-{name}"
    if not tree.exists():
        from namespace_tree import build

        build(checkout, tree)
    args = [a if isinstance(a, str) else json.dumps(a) for a in task]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--worker", str(tree), str(checkout),
                           *args], capture_output=True, text=True, env=env, cwd=str(work))
    if done.returncode != 0:
        raise SystemExit(f"the {name} tree ({checkout}) failed to {task[0]}:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.splitlines()[-1])


def _git(*args: str, check: bool = True) -> str:
    done = subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True)
    if check and done.returncode != 0:
        raise SystemExit(f"git {' '.join(args)} failed ({done.stderr.strip()[:300]}): run from a git checkout of "
                         "rksmolvlm and pass --old with a commit of its history")
    return done.stdout


@contextlib.contextmanager
def _stdout_to_stderr() -> Iterator[None]:
    """Send what converters print (also from C code) to stderr."""
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


# -- the inputs -------------------------------------------------------------------------------------
def _plan(bundle: Path, work: Path, repeats: int) -> dict:
    """What both trees run: feature shape, scripted answer ids, and per run fresh photo files."""
    from tokenizers import Tokenizer

    manifest = json.loads((bundle / "manifest.json").read_text(encoding="utf-8"))
    try:
        _, seq, hidden = manifest["vision"]["output"]["shape"]
        tokenizer = Tokenizer.from_file(str(bundle / manifest["tokenizer"]))
        eos = manifest["tokens"]["eos_ids"][0]
    except (KeyError, TypeError, ValueError) as exc:
        raise SystemExit(f"the bundle's manifest.json moved a field this script reads ({exc!r}): update _plan "
                         "(vision.output.shape, tokenizer, tokens.eos_ids)") from exc
    ids = tokenizer.encode(ANSWER, add_special_tokens=False).ids
    answer = (ids * (ANSWER_TOKENS // len(ids) + 1))[:ANSWER_TOKENS - 1] + [eos]
    photos = work / "photos"
    photos.mkdir()
    runs = []  # per run, per shape: its photo files (each photo once in the whole benchmark: no cache hits)
    for run in range(repeats + WARMUP):
        files: dict[str, list[str]] = {}
        for number, (shape, (_, sizes, _)) in enumerate(SHAPES.items()):
            files[shape] = []
            for index, (width, height) in enumerate(sizes):
                path = photos / f"{run}-{shape}-{index}.jpg"
                path.write_bytes(_photo(width, height, seed=(run * len(SHAPES) + number) * 8 + index))
                files[shape].append(str(path))
        runs.append(files)
    return {"repeats": repeats, "warmup": WARMUP, "seq": seq, "hidden": hidden, "answer": answer, "runs": runs,
            "answer_text": tokenizer.decode(answer, skip_special_tokens=True)}


def _photo(width: int, height: int, seed: int) -> bytes:
    """A photo-like JPEG (smooth colour fields, shapes, sensor noise); another seed, other bytes."""
    from PIL import Image, ImageDraw, ImageFilter

    rng = np.random.default_rng([width, height, seed])
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    base = np.stack([120 + 80 * np.sin(x / width * 3.1 + 0.4), 110 + 70 * np.cos(y / height * 2.3),
                     90 + 60 * np.sin((x + y) / (width + height) * 5.0)], -1)
    image = Image.fromarray(base.clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(12):
        x0, y0 = int(rng.integers(0, width)), int(rng.integers(0, height))
        w, h = int(rng.integers(width // 16, width // 4)), int(rng.integers(height // 16, height // 4))
        draw.ellipse((x0, y0, x0 + w, y0 + h), fill=tuple(int(v) for v in rng.integers(0, 255, 3)))
    pixels = np.asarray(image.filter(ImageFilter.GaussianBlur(2)), dtype=np.float32)
    pixels += rng.normal(0, 6, pixels.shape)
    buffer = io.BytesIO()
    Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def _messages(shape: str, files: list[str], answer_text: str) -> list[dict]:
    """The request of ``shape`` with its photo ``files``, as dicts both trees accept; images as bytes."""
    _, _, follow_up = SHAPES[shape]
    content: list[dict] = [{"type": "image", "image": Path(file).read_bytes()} for file in files]
    messages = [{"role": "user", "content": [*content, {"type": "text", "text": QUESTION}]}]
    if follow_up:
        messages += [{"role": "assistant", "content": [{"type": "text", "text": answer_text}]},
                     {"role": "user", "content": [{"type": "text", "text": FOLLOW_UP}]}]
    return messages


# -- inside one tree --------------------------------------------------------------------------------
def _worker(args: list[str]) -> None:
    """``--worker TREE CHECKOUT convert CHECKPOINT OUT`` or ``--worker TREE CHECKOUT measure BUNDLE PLAN``:
    import rksmolvlm from TREE only, do the task, print its JSON as the last line."""
    tree, checkout, task, *rest = args
    sys.path.insert(0, tree)
    # the editable install's finder would hand out this checkout's modules: the tree decides here
    sys.meta_path[:] = [f for f in sys.meta_path if "__editable__" not in str(getattr(f, "__module__", ""))]
    import rksmolvlm.runtime

    home = os.path.realpath(rksmolvlm.runtime.__file__)
    if not home.startswith(os.path.realpath(checkout) + os.sep):
        raise SystemExit(f"rksmolvlm.runtime came from {home}, not from {checkout}")
    if task == "convert":
        from rksmolvlm.convert.pipeline import ConvertOptions, convert
        from rksmolvlm.convert.progress import Progress

        checkpoint, out = rest
        with _stdout_to_stderr():
            convert(ConvertOptions(model=checkpoint, output=Path(out), host_preview=True, llm_host_only=True,
                                   llm_dataset_format="text"), Progress(0, quiet=True))
        print(json.dumps({"bundle": out}))
    elif task == "measure":
        bundle, plan = rest[0], json.loads(rest[1])
        print(json.dumps({"runtime": home, **_measure(bundle, plan)}))
    else:
        raise SystemExit(f"unknown worker task {task!r}")


class _Vision:
    """A vision engine that costs nothing: zero features of the bundle's shape."""

    def __init__(self, seq: int, hidden: int):
        self._zeros = np.zeros((64, seq, hidden), np.float32)

    def encode(self, tiles: np.ndarray) -> np.ndarray:
        if len(tiles) > len(self._zeros):
            self._zeros = np.zeros((len(tiles), *self._zeros.shape[1:]), np.float32)
        return self._zeros[:len(tiles)]

    def encode_frames(self, frames: np.ndarray) -> np.ndarray:
        return self.encode(frames)

    def close(self) -> None:
        pass


class _Llm:
    """An LLM engine that costs nothing: ignores the embeddings, yields the scripted ids."""

    def __init__(self, ids: list[int]):
        self.ids = list(ids)
        self._history = 0

    def generate(self, embeddings: np.ndarray, config: Any, keep_history: bool = False,
                 stats: Any = None) -> Iterator[int]:
        self._history = (self._history if keep_history else 0) + len(embeddings)
        for token in self.ids[:config.max_new_tokens]:
            self._history += 1
            yield token

    @property
    def history_tokens(self) -> int:
        return self._history

    def embedding_table(self) -> None:
        return None  # the runner uses the bundle's table, as on the board

    def abort(self) -> None:
        pass

    def clear_history(self) -> None:
        self._history = 0

    def close(self) -> None:
        pass


def _measure(bundle_dir: str, plan: dict) -> dict:
    from rksmolvlm.runtime.engines import GenerationConfig
    from rksmolvlm.runtime.loader import RuntimeBundle
    from rksmolvlm.runtime.runner import Runner

    runner = Runner(RuntimeBundle.open(bundle_dir), _Vision(plan["seq"], plan["hidden"]), _Llm(plan["answer"]))
    config = GenerationConfig(max_new_tokens=len(plan["answer"]))
    shapes = {}
    for shape in SHAPES:
        cpu, wall = [], []
        for run, files in enumerate(plan["runs"]):
            messages = _messages(shape, files[shape], plan["answer_text"])
            gc.collect()
            cpu_start, wall_start = time.process_time(), time.perf_counter()
            result = runner.generate(messages, config).consume()
            if run >= plan["warmup"]:
                cpu.append((time.process_time() - cpu_start) * 1000)
                wall.append((time.perf_counter() - wall_start) * 1000)
        shapes[shape] = {"cpu_ms": statistics.median(cpu), "wall_ms": statistics.median(wall),
                         "prompt_tokens": result.prompt_tokens, "answer": result.text.strip()}
    runner.close()
    return {"shapes": shapes, "torch_imported": "torch" in sys.modules}


# -- the report -------------------------------------------------------------------------------------
def _report(old_ref: str, commit: str, plan: dict, results: dict, elapsed: float) -> dict:
    old, new = results["old"]["shapes"], results["new"]["shapes"]
    shapes = {}
    for shape, (label, _, _) in SHAPES.items():
        o, n = old[shape], new[shape]
        shapes[shape] = {"label": label, "old_cpu_ms": o["cpu_ms"], "new_cpu_ms": n["cpu_ms"],
                         "new_over_old": n["cpu_ms"] / o["cpu_ms"] if o["cpu_ms"] > 0 else None,
                         "old_wall_ms": o["wall_ms"], "new_wall_ms": n["wall_ms"],
                         "prompt_tokens": {"old": o["prompt_tokens"], "new": n["prompt_tokens"]},
                         "same_prompt_and_answer": (o["prompt_tokens"], o["answer"]) == (n["prompt_tokens"],
                                                                                         n["answer"])}
    return {"old": {"ref": old_ref, "commit": commit}, "new": "this checkout (with uncommitted changes)",
            "repeats": plan["repeats"], "warmup": plan["warmup"], "answer_tokens": len(plan["answer"]),
            "shapes": shapes, "torch_imported": {t: r["torch_imported"] for t, r in results.items()},
            "elapsed_s": elapsed}


def _table(report: dict) -> str:
    lines = [f"per-request CPU ms outside the engines (engines that cost nothing), median of {report['repeats']} "
             f"runs after {report['warmup']} warm-up; {report['answer_tokens']} answer tokens each",
             f"old = {report['old']['ref']} ({report['old']['commit'][:12]}), new = {report['new']}", "",
             f"{'request':46} {'old ms':>8} {'new ms':>8} {'new/old':>8}  prompt tokens"]
    for row in report["shapes"].values():
        ratio = f"{row['new_over_old']:7.2f}×" if row["new_over_old"] is not None else f"{'-':>8}"
        same = "" if row["same_prompt_and_answer"] else "  WARNING: the trees built different prompts or answers"
        lines.append(f"{row['label']:46} {row['old_cpu_ms']:8.2f} {row['new_cpu_ms']:8.2f} {ratio}  "
                     f"{row['prompt_tokens']['new']}{same}")
    torch = ", ".join(f"{tree} {imported}" for tree, imported in report["torch_imported"].items())
    lines += ["", "CPU time is time.process_time (wall time also counts whatever else shares the machine); "
                  f"torch imported while measuring: {torch}; ran in {report['elapsed_s']:.0f} s"]
    return "\n".join(lines)


if __name__ == "__main__":
    main()

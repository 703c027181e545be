#!/usr/bin/env python3
"""The measuring half of ``scripts/bench_overhead.py``: runs inside one tree of rksmolvlm and prints
its figures as JSON on stdout.

``old`` is the code before the runtime re-cut (``Pipeline``, ``PromptBuilder``, ``splice``,
``_IncrementalDecoder``), imported from the tree the driver put on PYTHONPATH; ``new`` is the
working tree (``Runner``, ``Assembler``, ``TextStream``). Both run the same stages on the same
inputs (the plan file the driver wrote: bundle, images, question, scripted answers) with engines
that cost nothing, so every millisecond measured is CPU work outside the engines.

    python scripts/bench_overhead_stages.py old|new PLAN.json
"""

from __future__ import annotations

import gc
import json
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, Callable, Iterator

import numpy as np

__all__ = ["Tree", "FakeVision", "ScriptedLlm", "main"]

Generate = Callable[[list, int], tuple[str, int]]  # (messages, max_new_tokens) → (answer text, prompt tokens)


@dataclass
class Tree:
    """One tree's per-request stages as callables over the same inputs."""

    name: str
    files: dict[str, str]  # where its modules were imported from
    tile: Callable[[bytes], tuple[Any, int]]  # image bytes → (layout, tile count): decode + tile
    prompt: Callable[[list, Any], Any]  # messages, layout → prompt: template + tokenize
    prompt_ids: Callable[[Any], list[int]]
    splice: Callable[[Any, np.ndarray], np.ndarray]  # prompt, features → decoder input
    stream: Callable[[list[int]], str]  # generated ids → answer text
    answerer: Callable[[Any, Any], Generate]  # (vision, llm) engines → the whole request
    pipeline_module: ModuleType  # where the request path looks up load_image and tile_image


class FakeVision:
    """A vision engine that costs nothing: a view of preallocated zero features."""

    def __init__(self, max_tiles: int, seq_len: int, hidden: int):
        self._zeros = np.zeros((max_tiles, seq_len, hidden), np.float32)

    def encode(self, tiles: np.ndarray) -> np.ndarray:
        return self._zeros[:len(tiles)]

    def close(self) -> None:
        pass


class ScriptedLlm:
    """An LLM engine that costs nothing: ignores the embeddings and yields the scripted ids."""

    history_tokens = 0

    def __init__(self, ids: list[int]):
        self.ids = list(ids)

    def generate(self, embeddings, config, keep_history: bool = False, stats=None) -> Iterator[int]:
        yield from self.ids[:config.max_new_tokens]

    def abort(self) -> None:
        pass

    def clear_history(self) -> None:
        pass

    def close(self) -> None:
        pass


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2 or args[0] not in TREES:
        raise SystemExit("usage: bench_overhead_stages.py old|new PLAN.json")
    plan = json.loads(Path(args[1]).read_text(encoding="utf-8"))
    tree = TREES[args[0]](plan["bundle"])
    clock = _DecodeTileClock(tree.pipeline_module)
    repeats, warmup = plan["repeats"], plan["warmup"]
    out = {"tree": tree.name, "files": tree.files, "cases": {}, "stream": {}}
    for case in plan["cases"]:
        out["cases"][case["name"]] = _case(tree, case, plan, clock)
    for n, ids in plan["stream"].items():
        timing = _measure(lambda: tree.stream(ids), repeats, warmup)
        out["stream"][n] = {"us_per_token": timing["cpu_ms"] * 1000 / len(ids), **timing}
    out["torch_imported"] = "torch" in sys.modules
    print(json.dumps(out))


# -- the two trees ------------------------------------------------------------------------------
def _old_tree(bundle_dir: str) -> Tree:
    import rksmolvlm
    from rksmolvlm.runtime import pipeline
    from rksmolvlm.runtime.embed import splice
    from rksmolvlm.runtime.engines import GenerationConfig
    from rksmolvlm.runtime.loader import RuntimeBundle
    from rksmolvlm.runtime.preprocess import load_image, tile_image

    bundle = RuntimeBundle.open(bundle_dir)
    table = bundle.embedding_table()
    prompts = bundle.prompts

    def tile(data: bytes):
        tiled = tile_image(load_image(data), bundle.settings)
        return (tiled.rows, tiled.cols), tiled.count

    def prompt(messages, layout):
        return prompts.encode(prompts.expand(prompts.render(messages), [layout]))

    def stream(ids):
        decoder = pipeline._IncrementalDecoder(prompts)
        text = "".join(decoder.push(token, final=token in bundle.stop_ids) for token in ids)
        return text + decoder.flush()

    def answerer(vision, llm) -> Generate:
        runner = pipeline.Pipeline(bundle, vision, llm, image_cache_size=0)

        def generate(messages, n):
            result = runner.generate(messages, GenerationConfig(max_new_tokens=n), keep_history=False).consume()
            return result.text, result.prompt_tokens
        return generate

    return Tree("old", {"rksmolvlm": rksmolvlm.__file__, "pipeline": pipeline.__file__}, tile, prompt,
                lambda ids: ids, lambda ids, features: splice(table.lookup(ids), ids, bundle.image_id, features),
                stream, answerer, pipeline)


def _new_tree(bundle_dir: str) -> Tree:
    import rksmolvlm
    from rksmolvlm.processing.assembler import Layout
    from rksmolvlm.processing.content import conversation
    from rksmolvlm.processing.image import load_image, tile_image
    from rksmolvlm.runtime import runner as runner_module
    from rksmolvlm.runtime import vision
    from rksmolvlm.runtime.engines import GenerationConfig
    from rksmolvlm.runtime.loader import RuntimeBundle
    from rksmolvlm.runtime.text_stream import TextStream

    bundle = RuntimeBundle.open(bundle_dir)
    table = bundle.embedding_table()
    assembler = bundle.assembler

    def tile(data: bytes):
        tiled = tile_image(load_image(data), bundle.settings)
        return Layout(tiled.rows, tiled.cols), tiled.count

    def stream(ids):
        text_stream = TextStream(bundle.tokenizer, bundle.stop_ids, len(ids))
        text = "".join(text_stream.push(token) for token in ids)
        return text + text_stream.close()

    def answerer(vision_engine, llm) -> Generate:
        runner = runner_module.Runner(bundle, vision_engine, llm, image_cache_size=0)

        def generate(messages, n):
            result = runner.generate(messages, GenerationConfig(max_new_tokens=n)).consume()
            return result.text, result.prompt_tokens
        return generate

    return Tree("new", {"rksmolvlm": rksmolvlm.__file__, "runner": runner_module.__file__}, tile,
                lambda messages, layout: assembler.assemble(conversation(messages), [layout]),
                lambda prompt: prompt.ids, lambda prompt, features: assembler.embed(prompt, table, [features]),
                stream, answerer, vision)


TREES: dict[str, Callable[[str], Tree]] = {"old": _old_tree, "new": _new_tree}


# -- measuring ----------------------------------------------------------------------------------
def _case(tree: Tree, case: dict, plan: dict, clock: "_DecodeTileClock") -> dict:
    repeats, warmup = plan["repeats"], plan["warmup"]
    data = Path(case["image"]).read_bytes()
    messages = [{"role": "user", "content": [{"type": "image", "image": data},
                                             {"type": "text", "text": plan["question"]}]}]
    answer = case["answer"]
    seq_len, hidden = plan["image_seq_len"], plan["text_hidden"]
    layout, tiles = tree.tile(data)
    prompt = tree.prompt(messages, layout)
    features = np.zeros((tiles, seq_len, hidden), np.float32)
    stages = {
        "decode_tile": _measure(lambda: tree.tile(data), repeats, warmup),
        "template_tokenize": _measure(lambda: tree.prompt(messages, layout), repeats, warmup),
        "splice": _measure(lambda: tree.splice(prompt, features), repeats, warmup),
        "text_stream": _measure(lambda: tree.stream(answer), repeats, warmup),
    }
    generate = tree.answerer(FakeVision(plan["max_tiles"], seq_len, hidden), ScriptedLlm(answer))
    for _ in range(warmup):
        generate(messages, len(answer))
    cpu, wall, inside = [], [], []
    for _ in range(repeats):
        gc.collect()
        clock.ms = 0.0
        cpu_start, wall_start = time.process_time(), time.perf_counter()
        text, prompt_tokens = generate(messages, len(answer))
        cpu.append((time.process_time() - cpu_start) * 1000)
        wall.append((time.perf_counter() - wall_start) * 1000)
        inside.append(clock.ms)
    return {"tiles": tiles, "prompt_tokens": prompt_tokens, "prompt_ids": len(tree.prompt_ids(prompt)),
            "answer_tokens": len(answer), "answer": text, "stages": stages,
            "end_to_end": {"cpu_ms": statistics.median(cpu), "wall_ms": statistics.median(wall),
                           "decode_tile_cpu_ms": statistics.median(inside),
                           "overhead_cpu_ms": statistics.median(c - d for c, d in zip(cpu, inside))}}


def _measure(fn: Callable[[], Any], repeats: int, warmup: int) -> dict:
    """Median CPU and wall milliseconds of ``fn`` over ``repeats`` runs after ``warmup`` runs."""
    for _ in range(warmup):
        fn()
    cpu, wall = [], []
    for _ in range(repeats):
        gc.collect()
        cpu_start, wall_start = time.process_time(), time.perf_counter()
        fn()
        cpu.append((time.process_time() - cpu_start) * 1000)
        wall.append((time.perf_counter() - wall_start) * 1000)
    return {"cpu_ms": statistics.median(cpu), "wall_ms": statistics.median(wall)}


class _DecodeTileClock:
    """Adds up the CPU time of load_image and tile_image where the request path calls them, so an
    end-to-end run can be split into decode/tile and everything else."""

    def __init__(self, module: ModuleType):
        self.ms = 0.0
        for name in ("load_image", "tile_image"):
            setattr(module, name, self._timed(getattr(module, name)))

    def _timed(self, fn: Callable) -> Callable:
        def timed(*args, **kwargs):
            start = time.process_time()
            try:
                return fn(*args, **kwargs)
            finally:
                self.ms += (time.process_time() - start) * 1000
        return timed


if __name__ == "__main__":
    main()

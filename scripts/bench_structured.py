#!/usr/bin/env python3
"""Per-token cost of structured output at SmolVLM's real 49,280-id vocabulary (issue 20's goal:
≤ 0.5 ms median, ≤ 5 ms p99 per mask on x86).

Drives whole answers under Frigate 0.18's ReviewMetadata schema and a small Home Assistant AI Task
schema, choosing each next id at random among the allowed ones, and times per step: the packed
mask (what llguidance computes), the bool mask (plus unpacking), the check-first test of one id,
accepting an id, the forced run, and the sampler's whole pick over 49,280 float32 logits (greedy
through the check-first path and with the mask first, and with top-k where the mask always comes
first), beside the same picks without a grammar.

The tokenizer: ``--tokenizer tokenizer.json`` (e.g. a bundle's, on a board), else a byte-level BPE
trained here on a synthetic corpus to SmolVLM's layout (49,152 BPE ids, added special tokens up to
49,279 = <end_of_utterance>; about 20 s to build; ``--cache`` keeps it).

    .venv/bin/python scripts/bench_structured.py [--answers 5] [--tokenizer PATH] [--json]
"""

from __future__ import annotations

import argparse
import json
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from rksmolvlm.runtime.structured import (
    GrammarCompiler,
    Sampler,
    from_ollama_format,
    from_openai_response_format,
)

VOCAB = 49_280
EOU = 49_279

FRIGATE = {
    "type": "object",
    "properties": {
        "title": {"type": "string", "maxLength": 80},
        "scene": {"type": "string", "minLength": 150, "maxLength": 600},
        "shortSummary": {"type": "string", "minLength": 70, "maxLength": 140},
        "confidence": {"type": "number", "minimum": 0, "maximum": 1},
        "potential_threat_level": {"type": "integer", "minimum": 0, "maximum": 2},
        "observations": {"type": "array", "minItems": 3, "maxItems": 8,
                         "items": {"type": "string", "minLength": 20, "maxLength": 200}},
    },
    "required": ["title", "scene", "shortSummary", "confidence", "potential_threat_level", "observations"],
    "additionalProperties": False,
}
SMALL = {"type": "object", "properties": {"color": {"type": "string", "maxLength": 40},
                                          "count": {"type": "integer", "minimum": 0, "maximum": 99},
                                          "kind": {"type": "string", "enum": ["car", "truck", "bike"]}},
         "required": ["color", "count", "kind"]}


@dataclass
class Greedy:
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    repeat_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    seed: int | None = 0

    @property
    def greedy(self) -> bool:
        return self.temperature < 1e-5


def synthetic_tokenizer() -> str:
    """A byte-level BPE with SmolVLM's id layout, trained on pseudo-English with JSON punctuation."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    rng = random.Random(0)
    onsets = "b c d f g h j k l m n p r s t v w y z bl br ch cl cr dr fl fr gl gr pl pr sc sh sk sl sm sn sp st " \
             "str sw th tr wh".split()
    vowels = "a e i o u ai ea ee oo ou ie y".split()
    codas = ["", "", "n", "r", "s", "t", "l", "m", "nd", "nt", "st", "ng", "ck", "rd", "ll", "ss", "x"]
    words = ["".join(rng.choice(onsets) + rng.choice(vowels) + rng.choice(codas)
                     for _ in range(rng.choice([1, 1, 1, 2, 2, 3]))) for _ in range(60_000)]
    punct = [".", ",", ":", ";", "!", "?", '"', "'", "(", ")", "{", "}", "[", "]", "-", "\n", '":', '",', "0.5"]

    def line() -> str:
        out = []
        for _ in range(rng.randint(5, 20)):
            word = rng.choice(words)
            word = word.capitalize() if rng.random() < 0.1 else word
            out.append(str(rng.randint(0, 100_000)) if rng.random() < 0.05 else word)
            if rng.random() < 0.2:
                out.append(rng.choice(punct))
        return " ".join(out)

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=49_152, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    bpe.train_from_iterator((line() for _ in range(200_000)), trainer=trainer)
    data = json.loads(bpe.to_str())
    for token_id in range(49_152, VOCAB):
        content = {EOU: "<end_of_utterance>", 49_190: "<image>"}.get(token_id, f"<|reserved_special_{token_id}|>")
        data["added_tokens"].append({"id": token_id, "content": content, "single_word": False, "lstrip": False,
                                     "rstrip": False, "normalized": False, "special": True})
    return Tokenizer.from_str(json.dumps(data)).to_str()


def bench_schema(compiler: GrammarCompiler, fmt, answers: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    times: dict[str, list[float]] = {k: [] for k in ("bitmask", "mask", "allows", "accept", "forced")}
    steps = forced_ids = 0
    for _ in range(answers):
        c = compiler.constraint(fmt)
        start = steps
        while not c.done and steps - start < 3_000:  # a random walk in an open object can go on: cap each answer
            t0 = time.perf_counter()
            c.bitmask()
            t1 = time.perf_counter()
            allowed = np.flatnonzero(c.mask())
            t2 = time.perf_counter()
            token = int(rng.choice(allowed))
            t3 = time.perf_counter()
            assert c.allows(token)
            t4 = time.perf_counter()
            c.accept(token)
            t5 = time.perf_counter()
            forced = c.forced()
            t6 = time.perf_counter()
            forced_ids += len(forced)
            if forced:
                c.accept_many(forced)
            for key, dt in zip(times, (t1 - t0, t2 - t1, t4 - t3, t5 - t4, t6 - t5)):
                times[key].append(dt * 1000)
            steps += 1
    out = {key: _stats(v) for key, v in times.items()}
    out["steps"] = steps
    out["forced_ids_per_step"] = round(forced_ids / max(steps, 1), 3)
    for name, options, check_first in (("pick_greedy_check_first", Greedy(), True),
                                       ("pick_greedy_mask_first", Greedy(), False),
                                       ("pick_top_k", Greedy(temperature=0.7, top_k=40), True)):
        out[name] = _bench_pick(compiler, fmt, options, np.random.default_rng(seed), check_first)
    for name, options in (("pick_free_greedy", Greedy()), ("pick_free_top_k", Greedy(temperature=0.7, top_k=40))):
        out[name] = _bench_free_pick(options, rng)
    return out


def _bench_free_pick(options, rng: np.random.Generator, steps: int = 1_000) -> dict:
    """The same sampler without a grammar: the baseline the constrained picks add to."""
    sampler = Sampler(options)
    times = []
    for _ in range(steps):
        logits = rng.standard_normal(VOCAB, dtype=np.float32)
        t0 = time.perf_counter()
        sampler.pick(logits)
        times.append((time.perf_counter() - t0) * 1000)
    return _stats(times)


def _bench_pick(compiler: GrammarCompiler, fmt, options, rng: np.random.Generator, check_first: bool) -> dict:
    """The sampler's whole pick (penalties, check-first or mask, choice) over float32 logits shaped
    like a model's: peaked, so the free pick is often allowed, as with a model that follows the prompt."""
    c = compiler.constraint(fmt)
    sampler = Sampler(options, check_first=check_first)
    times, ids = [], []
    while not c.done and len(ids) < 3_000:
        logits = rng.standard_normal(VOCAB, dtype=np.float32)
        allowed = np.flatnonzero(c.mask()) if rng.random() < 0.7 else None
        if allowed is not None:  # 70% of steps the model's favourite is allowed
            logits[int(rng.choice(allowed))] += 20.0
        t0 = time.perf_counter()
        token = sampler.pick(logits, ids, c)
        times.append((time.perf_counter() - t0) * 1000)
        c.accept(token)
        ids.append(token)
    stats = _stats(times)
    stats["check_first_hits"] = sampler.fast_path_hits
    stats["masks"] = sampler.masks
    return stats


def _stats(values: list[float]) -> dict:
    a = np.asarray(values)
    return {"median_ms": round(float(np.median(a)), 4), "p99_ms": round(float(np.percentile(a, 99)), 4),
            "max_ms": round(float(a.max()), 3), "n": int(a.size)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--answers", type=int, default=5, help="answers per schema (default 5)")
    parser.add_argument("--tokenizer", type=Path, help="a tokenizer.json with the 49,280-id layout")
    parser.add_argument("--cache", type=Path, help="where to keep the synthetic tokenizer between runs")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args()

    started = time.perf_counter()
    if args.tokenizer:
        text = args.tokenizer.read_text(encoding="utf-8")
    elif args.cache and args.cache.is_file():
        text = args.cache.read_text(encoding="utf-8")
    else:
        text = synthetic_tokenizer()
        if args.cache:
            args.cache.write_text(text, encoding="utf-8")
    built = time.perf_counter()
    compiler = GrammarCompiler(text, VOCAB, [EOU])
    ready = time.perf_counter()
    report: dict = {"vocab": VOCAB, "tokenizer": str(args.tokenizer or "synthetic byte-level BPE"),
                    "tokenizer_build_s": round(built - started, 2), "llguidance_tokenizer_s": round(ready - built, 3)}
    frigate = from_openai_response_format(
        {"type": "json_schema", "json_schema": {"name": "review_metadata", "strict": True, "schema": FRIGATE}})
    # a small answer is ~20 steps: more of them, so its p99 rests on as many steps as Frigate's
    for name, fmt, answers in (("frigate_review_metadata", frigate, args.answers),
                               ("small_ha_task", from_ollama_format(SMALL), args.answers * 40)):
        t0 = time.perf_counter()
        compiler.compile(fmt)
        compile_ms = (time.perf_counter() - t0) * 1000
        report[name] = {"compile_ms": round(compile_ms, 2), **bench_schema(compiler, fmt, answers, seed=0)}
    if args.json:
        print(json.dumps(report, indent=1))
        return
    print(f"vocabulary {VOCAB}, tokenizer: {report['tokenizer']} "
          f"(llguidance tokenizer {report['llguidance_tokenizer_s']} s)")
    for name in ("frigate_review_metadata", "small_ha_task"):
        r = report[name]
        print(f"\n{name}: compile {r['compile_ms']} ms, {r['steps']} steps, {r['forced_ids_per_step']} forced ids/step")
        for key in ("bitmask", "mask", "allows", "accept", "forced", "pick_greedy_check_first",
                    "pick_greedy_mask_first", "pick_top_k",
                    "pick_free_greedy", "pick_free_top_k"):
            s = r[key]
            extra = (f"  (check-first hits {s['check_first_hits']}, masks {s['masks']})"
                     if "check_first_hits" in s else "")
            print(f"  {key:24s} median {s['median_ms']:.4f} ms  p99 {s['p99_ms']:.4f} ms  "
                  f"max {s['max_ms']:.3f} ms{extra}")


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Per-token cost of structured output at SmolVLM's real 49,280-id vocabulary (issue 20's goal:
≤ 0.5 ms median, ≤ 5 ms p99 per mask on x86).

Drives whole answers under Frigate 0.18's ReviewMetadata schema and a small Home Assistant AI Task
schema, choosing each next id at random among the allowed ones, and times per step: the packed
mask (what llguidance computes), the bool mask (plus unpacking), the check-first test of one id,
accepting an id, the forced run, and the sampler's whole pick over 49,280 float32 logits (greedy
through the check-first path and with the mask first, and with top-k where the mask always comes
first), beside the same picks without a grammar.

The NPU double section (``--npu-double``, also in the default run: ~5 s; ``--no-npu-double`` skips
it; needs a C compiler) compiles the librkllmrt contract double (tests/doubles/librkllmrt) for the
1.2 and 1.3 ABIs and answers an 800-row prompt of embeddings (hidden 576) through
``RkllmEngine.generate`` with ``GenerationConfig(grammar=...)``: both schemas, greedy and
temperature 0.5 with seeds 1-3. The double's logits are a hash of (KV position, input), so the
answers are deterministic. Per answer: generated ids (forced of them), rkllm_run calls (the engine's
counters, checked against the double's call log and its KV cache), calls per id, logits bytes copied
out of C per call (and what the double offered), and x86 ms per id (Python + double; no NPU time).
Every answer is validated with jsonschema; the script exits 1 if one fails.

The tokenizer: ``--tokenizer tokenizer.json`` (e.g. a bundle's, on a board), else a byte-level BPE
trained here on a synthetic corpus to SmolVLM's layout (49,152 BPE ids, added special tokens up to
49,279 = <end_of_utterance>; about 20 s to build; ``--cache`` keeps it).

    .venv/bin/python scripts/bench_structured.py [--answers 5] [--tokenizer PATH] [--json]
        [--npu-double | --no-npu-double]
"""

from __future__ import annotations

import argparse
import ctypes
import json
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # tests/support: the shared schemas
from support.frigate import FRIGATE  # noqa: E402

from rksmolvlm.runtime.engines import GenerationConfig  # noqa: E402
from rksmolvlm.runtime.structured import (  # noqa: E402
    GrammarCompiler,
    Sampler,
    from_ollama_format,
    from_openai_response_format,
)

VOCAB = 49_280
EOU = 49_279

SMALL = {"type": "object", "properties": {"color": {"type": "string", "maxLength": 40},
                                          "count": {"type": "integer", "minimum": 0, "maximum": 99},
                                          "kind": {"type": "string", "enum": ["car", "truck", "bike"]}},
         "required": ["color", "count", "kind"]}


def Greedy(**kwargs) -> GenerationConfig:  # noqa: N802 - reads like the record it builds
    """Seeded generation options (greedy unless a temperature is given)."""
    return GenerationConfig(**{"seed": 0, **kwargs})


def tokenizer_text(path: Path | None, cache: Path | None) -> str:
    """tokenizer.json text: ``path`` when given, else the synthetic one (kept in ``cache`` when given)."""
    if path:
        return path.read_text(encoding="utf-8")
    if cache and cache.is_file():
        return cache.read_text(encoding="utf-8")
    text = synthetic_tokenizer()
    if cache:
        cache.write_text(text, encoding="utf-8")
    return text


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


# ------------------------------------------------------------------ the NPU engine on the librkllmrt double

DOUBLE_SOURCE = Path(__file__).resolve().parent.parent / "tests" / "doubles" / "librkllmrt" / "rkllm_double.c"
HIDDEN_256M = 576  # SmolVLM-256M's text hidden size: the width of the prompt's embedding rows
NPU_PROMPT = 800
NPU_CONTEXT = 8192
NPU_MAX_NEW = 4000
NPU_CASES = (("greedy", 0.0, None), ("t0.5 seed 1", 0.5, 1), ("t0.5 seed 2", 0.5, 2), ("t0.5 seed 3", 0.5, 3))


def build_doubles(out: Path) -> dict[str, Path]:
    """The contract double compiled for both librkllmrt ABIs (as tests/runtime/test_npu_structured.py does)."""
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise SystemExit("the NPU double section needs a C compiler (cc or gcc); skip it with --no-npu-double")
    libraries = {}
    for abi, flag in (("1.2", "123"), ("1.3", "130")):
        path = out / f"librkllmrt-{abi}.so"
        subprocess.run([compiler, "-shared", "-fPIC", "-O2", f"-DRKLLM_ABI={flag}", "-o", str(path),
                        str(DOUBLE_SOURCE), "-lpthread"], check=True)
        libraries[abi] = path
    return libraries


def bench_npu_double(tokenizer_text: str, compiler: GrammarCompiler, schemas: dict) -> dict:
    """Each schema × case × ABI answered by RkllmEngine on the double; returns per-answer rows and failures."""
    import jsonschema
    from tokenizers import Tokenizer

    from rksmolvlm.runtime.engines import GenerationConfig, PerfStats
    from rksmolvlm.runtime.npu_engines import RkllmEngine

    tokenizer = Tokenizer.from_str(tokenizer_text)
    embeds = np.random.default_rng(0).standard_normal((NPU_PROMPT, HIDDEN_256M)).astype(np.float32)
    rows, failures = [], []
    with tempfile.TemporaryDirectory(prefix="bench-npu-double-") as tmp:
        libraries = build_doubles(Path(tmp))
        model = Path(tmp) / "llm.rkllm"
        model.write_bytes(b"model")  # the double only checks that the file exists
        for abi, library in libraries.items():
            lib = ctypes.CDLL(str(library))  # the same loaded object the engine drives
            lib.double_calls_json.restype = ctypes.c_char_p
            lib.double_logits_floats.restype = ctypes.c_ulonglong
            lib.double_reset()
            lib.double_set_hidden(HIDDEN_256M)
            lib.double_set_vocab(VOCAB)
            engine = RkllmEngine(model, library, abi, NPU_CONTEXT, GenerationConfig(max_new_tokens=NPU_MAX_NEW))
            in_run = _time_rkllm_run(engine)
            try:
                for name, (fmt, schema) in schemas.items():
                    grammar = compiler.compile(fmt)
                    for case, temperature, seed in NPU_CASES:
                        config = GenerationConfig(grammar=grammar, stop_ids=(EOU,), max_new_tokens=NPU_MAX_NEW,
                                                  temperature=temperature, seed=seed)
                        lib.double_reset()
                        lib.double_set_hidden(HIDDEN_256M)
                        lib.double_set_vocab(VOCAB)
                        stats = PerfStats()
                        in_run.clear()
                        t0 = time.perf_counter()
                        ids = list(engine.generate(embeds, config, False, stats))
                        wall_ms = (time.perf_counter() - t0) * 1000
                        counters = stats.engine["structured"]
                        calls = json.loads(lib.double_calls_json())
                        row = _npu_row(abi, name, case, ids, counters, calls, wall_ms, stats.prefill_ms,
                                       int(lib.double_logits_floats()), engine.kv_cache_size(), in_run)
                        error = _validate(tokenizer, ids, schema, jsonschema)
                        if row["runs"] != len(calls):
                            error = f"engine counted {row['runs']} rkllm_run calls, the double logged {len(calls)}"
                        if row["kv_cache"] != NPU_PROMPT + len(ids):
                            error = f"KV cache holds {row['kv_cache']}, expected {NPU_PROMPT + len(ids)}"
                        row["valid"] = error is None
                        if error:
                            failures.append(f"{abi} {name} {case}: {error}")
                        rows.append(row)
            finally:
                engine.close()
    return {"prompt_rows": NPU_PROMPT, "hidden": HIDDEN_256M, "vocab": VOCAB, "answers": rows, "failures": failures}


def _time_rkllm_run(engine) -> list[float]:
    """Times each rkllm_run of ``engine`` (the double's work and the engine's logits callback inside it)."""
    run = engine.lib.rkllm_run
    times: list[float] = []

    def timed(*args):
        t0 = time.perf_counter()
        try:
            return run(*args)
        finally:
            times.append((time.perf_counter() - t0) * 1000)

    engine.lib.rkllm_run = timed  # the engine looks the symbol up on its CDLL at each call
    return times


def _npu_row(abi, name, case, ids, counters, calls, wall_ms, prefill_ms, offered_floats, kv_cache,
             in_run: list[float]) -> dict:
    runs = counters["rkllm_runs"]
    n = len(ids)
    return {"abi": abi, "schema": name, "case": case, "ids": n, "forced": counters["forced_ids"],
            "masks": counters["masks"], "runs": runs, "token_runs": sum(1 for c in calls if c["input_type"] == 1),
            "calls_per_id": round(runs / max(n, 1), 3),
            "bytes_per_call": round(counters["logits_bytes"] / max(runs, 1), 1),
            # what the double handed the callback in all (the prefill alone gives prompt × vocab floats)
            "offered_mb": round(offered_floats * 4 / 1e6, 1),
            "prefill_ms": round(prefill_ms, 1), "ms_per_id": round((wall_ms - prefill_ms) / max(n, 1), 3),
            "run_ms_per_id": round(sum(in_run[1:]) / max(n, 1), 3),
            "stop": n > 0 and ids[-1] == EOU, "kv_cache": kv_cache}


def _validate(tokenizer, ids: list[int], schema: dict, jsonschema) -> str | None:
    if not ids or ids[-1] != EOU:
        return f"no stop id after {len(ids)} ids (cut by max_new_tokens {NPU_MAX_NEW})"
    text = tokenizer.decode(ids[:-1], skip_special_tokens=False)
    try:
        jsonschema.validate(json.loads(text), schema)
    except (ValueError, jsonschema.ValidationError) as exc:
        return f"invalid answer ({exc.__class__.__name__}: {str(exc)[:200]}): {text[:200]!r}"
    return None


def print_npu_double(report: dict) -> None:
    print(f"\nNPU engine on the librkllmrt double: prompt {report['prompt_rows']} embedding rows × {report['hidden']}, "
          f"vocabulary {report['vocab']} (x86 time: Python + double, no NPU time)")
    print("  ids: generated ids with the stop id (forced: placed by the grammar without a choice; masks: picks that\n"
          "  computed the whole mask); runs: rkllm_run calls (1 prefill + TOKEN calls, = the double's log);\n"
          "  copied B/call: logits copied out of C per call; offered MB: what the double handed the callback;\n"
          "  ms/id: x86 wall time per id after the prefill call, of it in rkllm_run (the double's work and the\n"
          "  engine's logits callback); the rest is the engine's Python and the Guide (mask, sampler)")
    print(f"  {'abi':3s} {'schema':24s} {'case':12s} {'ids':>5s} {'forced':>6s} {'masks':>5s} {'runs':>5s} "
          f"{'runs/id':>7s} {'copied B/call':>13s} {'offered MB':>10s} {'prefill ms':>10s} {'ms/id':>6s} "
          f"{'in run':>6s}  valid")
    for r in report["answers"]:
        print(f"  {r['abi']:3s} {r['schema']:24s} {r['case']:12s} {r['ids']:5d} {r['forced']:6d} {r['masks']:5d} "
              f"{r['runs']:5d} {r['calls_per_id']:7.3f} {r['bytes_per_call']:13.0f} {r['offered_mb']:10.1f} "
              f"{r['prefill_ms']:10.1f} {r['ms_per_id']:6.3f} {r['run_ms_per_id']:6.3f}  "
              f"{'yes' if r['valid'] else 'NO'}")
    for failure in report["failures"]:
        print(f"  FAILED {failure}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--answers", type=int, default=5, help="answers per schema (default 5)")
    parser.add_argument("--tokenizer", type=Path, help="a tokenizer.json with the 49,280-id layout")
    parser.add_argument("--cache", type=Path, help="where to keep the synthetic tokenizer between runs")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    section = parser.add_mutually_exclusive_group()
    section.add_argument("--npu-double", dest="sections", action="store_const", const="npu",
                         help="only the NPU engine on the librkllmrt double (rkllm_run calls per id)")
    section.add_argument("--no-npu-double", dest="sections", action="store_const", const="mask",
                         help="only the per-token mask costs")
    args = parser.parse_args()

    started = time.perf_counter()
    text = tokenizer_text(args.tokenizer, args.cache)
    built = time.perf_counter()
    compiler = GrammarCompiler(text, VOCAB, [EOU])
    ready = time.perf_counter()
    report: dict = {"vocab": VOCAB, "tokenizer": str(args.tokenizer or "synthetic byte-level BPE"),
                    "tokenizer_build_s": round(built - started, 2), "llguidance_tokenizer_s": round(ready - built, 3)}
    frigate = from_openai_response_format(
        {"type": "json_schema", "json_schema": {"name": "review_metadata", "strict": True, "schema": FRIGATE}})
    small = from_ollama_format(SMALL)
    names = ("frigate_review_metadata", "small_ha_task")
    if args.sections != "npu":
        # a small answer is ~20 steps: more of them, so its p99 rests on as many steps as Frigate's
        for name, fmt, answers in ((names[0], frigate, args.answers), (names[1], small, args.answers * 40)):
            t0 = time.perf_counter()
            compiler.compile(fmt)
            compile_ms = (time.perf_counter() - t0) * 1000
            report[name] = {"compile_ms": round(compile_ms, 2), **bench_schema(compiler, fmt, answers, seed=0)}
    if args.sections != "mask":
        t0 = time.perf_counter()
        report["npu_double"] = bench_npu_double(text, compiler, {names[0]: (frigate, FRIGATE),
                                                                 names[1]: (small, SMALL)})
        report["npu_double"]["seconds"] = round(time.perf_counter() - t0, 1)
    failed = bool(report.get("npu_double", {}).get("failures"))
    if args.json:
        print(json.dumps(report, indent=1))
        sys.exit(1 if failed else 0)
    print(f"vocabulary {VOCAB}, tokenizer: {report['tokenizer']} "
          f"(llguidance tokenizer {report['llguidance_tokenizer_s']} s)")
    for name in names:
        if name not in report:
            continue
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
    if "npu_double" in report:
        print_npu_double(report["npu_double"])
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()

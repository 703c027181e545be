#!/usr/bin/env python3
"""Tokens/s of constrained against free decoding on the host engine (TorchLlmEngine) at SmolVLM-256M's
real decoder dimensions (issue 20's "tokens/s constrained vs free on the host engine at the real 256M
dimensions").

The decoder is a LlamaForCausalLM with SmolVLM-256M's text config (hidden 576, intermediate 1536,
30 layers, 9 heads, 3 KV heads, head_dim 64, vocabulary 49,280) and random weights, saved and
loaded the way the engine loads a bundle's decoder/. One prompt of random embeddings is answered,
in turns so that a load change on the machine hits every mode alike: free text (grammar None, the
unchanged path), Frigate 0.18's ReviewMetadata and a small Home Assistant AI Task schema; greedy,
with Frigate's Ollama options (temperature 0.5, repeat 1.05, presence 0.3) and with top-p 0.95.
The grammar runs over the same tokenizer as scripts/bench_structured.py (a bundle's with
``--tokenizer``, else its synthetic 49,280-id byte-level BPE, ~20 s to build; ``--cache`` keeps it).

Reported per mode: decode tokens/s (generated ids over the decode time, prefill excluded), model
forwards per generated id (forced runs go in one forward), the time of one decode step (forward +
pick: what the mask adds to each sampled id) and the ratios to free text; for constrained answers
the time of the Guide's step alone (penalties, mask, choice, forced run). Random weights give a
flat next-token distribution: the worst case for top-p (nearly every allowed id is in the nucleus).

    .venv/bin/python scripts/bench_structured_host.py [--tokens 160] [--rounds 3] [--threads 2] [--json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_structured import EOU, FRIGATE, SMALL, VOCAB, tokenizer_text  # noqa: E402

from rksmolvlm.runtime.engines import GenerationConfig, PerfStats  # noqa: E402
from rksmolvlm.runtime.structured import GrammarCompiler, from_ollama_format, from_openai_response_format  # noqa: E402

# SmolVLM-256M's text decoder (HuggingFaceTB/SmolVLM-256M-Instruct text_config; scripts/bench_convert.py)
DECODER_256M = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                    num_key_value_heads=3, head_dim=64, max_position_embeddings=8192, rope_theta=100000.0,
                    rms_norm_eps=1e-5, vocab_size=VOCAB, tie_word_embeddings=False)


def build_decoder(out: Path) -> Path:
    """A random LlamaForCausalLM of the 256M decoder's size saved as a bundle's decoder/ is."""
    import torch
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(**DECODER_256M, bos_token_id=1, eos_token_id=EOU, pad_token_id=2)
    model = transformers.LlamaForCausalLM(config).eval()
    model.save_pretrained(out)
    return out


PICKS: list[float] = []  # seconds in each Guide.step (penalties, mask, choice, forced run) of the running answer


def _timed_step(step):
    def timed(self, logits):
        t0 = time.perf_counter()
        try:
            return step(self, logits)
        finally:
            PICKS.append(time.perf_counter() - t0)
    return timed


def run_once(engine, prompt: np.ndarray, config: GenerationConfig) -> dict:
    forwards = 0
    inner = engine._forward
    PICKS.clear()

    def counted(embeds):
        nonlocal forwards
        forwards += 1
        return inner(embeds)

    engine._forward = counted
    try:
        stats = PerfStats()
        started = time.perf_counter()
        ids = list(engine.generate(prompt, config, False, stats))
        total = time.perf_counter() - started
    finally:
        del engine._forward
    # decode: from the end of the prefill to the last id (the trailing cache feed excluded, as for free text)
    decode_s = stats.generate_ms / 1000
    steps = max(forwards - 2, 1)  # decode forwards: not the prefill, not the trailing feed of the last ids
    return {"ids": len(ids), "decode_s": decode_s, "total_s": total, "forwards": forwards,
            "tokens_per_s": (len(ids) - 1) / decode_s if decode_s and len(ids) > 1 else 0.0,
            "ms_per_step": decode_s * 1000 / steps, "picks_ms": [t * 1000 for t in PICKS]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=160, help="max_new_tokens per answer (default 160)")
    parser.add_argument("--prompt", type=int, default=96, help="prompt length in tokens (default 96)")
    parser.add_argument("--rounds", type=int, default=3, help="answers per mode, interleaved (default 3)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    parser.add_argument("--tokenizer", type=Path, help="a tokenizer.json with the 49,280-id layout")
    parser.add_argument("--cache", type=Path, help="where to keep the synthetic tokenizer between runs")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args()

    from rksmolvlm.preview.host_engines import TorchLlmEngine
    from rksmolvlm.runtime.structured.guide import Guide

    Guide.step = _timed_step(Guide.step)  # type: ignore[method-assign]

    text = tokenizer_text(args.tokenizer, args.cache)
    compiler = GrammarCompiler(text, VOCAB, [EOU])
    grammars = {
        "frigate": compiler.compile(from_openai_response_format(
            {"type": "json_schema", "json_schema": {"name": "review_metadata", "strict": True, "schema": FRIGATE}})),
        "small": compiler.compile(from_ollama_format(SMALL)),
    }
    with tempfile.TemporaryDirectory(prefix="bench-structured-host-") as tmp:
        engine = TorchLlmEngine(build_decoder(Path(tmp) / "decoder"), args.threads)
    params = sum(p.numel() for p in engine.model.parameters())
    prompt = np.random.default_rng(0).normal(0, 0.02, (args.prompt, DECODER_256M["hidden_size"])).astype(np.float32)

    modes = {}
    samplings = (("greedy", {}),
                 # Frigate's Ollama provider's options: the sampler's check-first path stays exact
                 ("frigate-options", {"temperature": 0.5, "repeat_penalty": 1.05, "presence_penalty": 0.3, "seed": 1}),
                 # top-p: the mask comes first at every step
                 ("top-p", {"temperature": 0.8, "top_p": 0.95, "seed": 1}))
    for sampling, options in samplings:
        modes[f"free/{sampling}"] = GenerationConfig(max_new_tokens=args.tokens, stop_ids=(EOU,), **options)
        for name, grammar in grammars.items():
            modes[f"{name}/{sampling}"] = GenerationConfig(max_new_tokens=args.tokens, stop_ids=(EOU,),
                                                           grammar=grammar, **options)
    run_once(engine, prompt, modes["free/greedy"])  # warm-up
    runs: dict[str, list[dict]] = {m: [] for m in modes}
    for _ in range(args.rounds):
        for mode, config in modes.items():
            runs[mode].append(run_once(engine, prompt, config))

    report: dict = {"decoder": {**DECODER_256M, "parameters": params}, "threads": args.threads,
                    "prompt_tokens": args.prompt, "max_new_tokens": args.tokens, "rounds": args.rounds, "modes": {}}
    for mode, results in runs.items():
        report["modes"][mode] = {
            "tokens_per_s": round(statistics.median(r["tokens_per_s"] for r in results), 2),
            "ids": statistics.median(r["ids"] for r in results),
            "forwards_per_id": round(sum(r["forwards"] for r in results) / sum(r["ids"] for r in results), 3),
            "ms_per_step": round(statistics.median(r["ms_per_step"] for r in results), 2),
        }
        picks = [t for r in results for t in r["picks_ms"]]
        if picks:  # the constrained answers' own CPU choice per step, apart from the model
            report["modes"][mode]["guide_step_ms"] = {"median": round(float(np.median(picks)), 3),
                                                      "p99": round(float(np.percentile(picks, 99)), 3)}
    for mode, r in report["modes"].items():
        free = report["modes"][f"free/{mode.split('/')[1]}"]["tokens_per_s"]
        r["ratio_to_free"] = round(r["tokens_per_s"] / free, 3) if free else None
        free_step = report["modes"][f"free/{mode.split('/')[1]}"]["ms_per_step"]
        r["step_ratio_to_free"] = round(r["ms_per_step"] / free_step, 3)
    engine.close()
    if args.json:
        print(json.dumps(report, indent=1))
        return
    print(f"host engine, SmolVLM-256M decoder dimensions ({params / 1e6:.0f} M parameters, random weights), "
          f"{args.threads} threads, prompt {args.prompt} tokens, max_new_tokens {args.tokens}, "
          f"median of {args.rounds} interleaved answers")
    for mode, r in report["modes"].items():
        print(f"  {mode:28s} {r['tokens_per_s']:7.2f} tokens/s  ratio to free {r['ratio_to_free']:.3f}  "
              f"{r['ids']:5.0f} ids  {r['forwards_per_id']:.3f} forwards/id  {r['ms_per_step']:6.2f} ms/step "
              f"(×{r['step_ratio_to_free']:.3f})"
              + (f"  guide step median {r['guide_step_ms']['median']:.3f} ms p99 {r['guide_step_ms']['p99']:.3f} ms"
                 if "guide_step_ms" in r else ""))


if __name__ == "__main__":
    main()

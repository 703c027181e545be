"""Train the demo model (rksmolvlm/convert/demo_model.py) and write its committed weights.

Seeded, CPU, deterministic: run it again after changing the Q&A set (convert/demo_qa.json) or the tiny
tokenizer. It trains, writes convert/demo_weights/demo-smolvlm-256m.npz (float16) and
demo-smolvlm-256m.json (training stats and every answer transformers generates from the float16
checkpoint), and exits 1 unless every answer is right.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from rksmolvlm.convert.demo_model import (DEMO_WEIGHTS_FILE, build_demo_checkpoint, load_demo_qa, save_demo_weights,
                                          train_demo_weights, transformers_answers)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=450)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lr", type=float, default=5e-3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--output", type=Path, default=DEMO_WEIGHTS_FILE)
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    weights, stats = train_demo_weights(args.steps, args.seed, args.lr, log=lambda m: print(m, file=sys.stderr))
    print(f"trained in {stats['train_s']} s", file=sys.stderr)
    qa = load_demo_qa()
    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="rksmolvlm-demo-check-") as tmp:
        checkpoint = build_demo_checkpoint(Path(tmp) / "demo", "idefics3", weights)
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(checkpoint)
        answers = transformers_answers(checkpoint, qa.items)
    texts = [tokenizer.decode(a, skip_special_tokens=True).strip() for a in answers]
    wrong = [(item, got) for item, got in zip(qa.items, texts) if got != item.answer]
    for item, got in wrong:
        print(f"WRONG {item.images} {item.question!r}: {got!r} (want {item.answer!r})", file=sys.stderr)
    size = save_demo_weights(weights, args.output)
    stats.update({"check_s": round(time.monotonic() - start, 1), "right": len(texts) - len(wrong),
                  "items": len(texts), "bytes": size,
                  "answers": [{"images": list(i.images), "question": i.question, "answer": t}
                              for i, t in zip(qa.items, texts)]})
    args.output.with_suffix(".json").write_text(json.dumps(stats, indent=1) + "\n", encoding="utf-8")
    print(f"{len(texts) - len(wrong)}/{len(texts)} answers right; wrote {args.output} ({size} bytes)", file=sys.stderr)
    return 1 if wrong else 0


if __name__ == "__main__":
    sys.exit(main())

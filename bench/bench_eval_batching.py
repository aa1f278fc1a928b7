"""Generation throughput of the eval stage by batch size, as ratios to batch size 1 (same run, same prompts).

Usage: python bench/bench_eval_batching.py [--model smollm2-135m-instruct] [--prompts 8] [--new-tokens 32]
       [--test runs/medical-zh/data/test.jsonl]   (default: examples/runs/medical-zh/data/test.jsonl)
Greedy answers must be the same whatever the batch size (left padding); the script reports how many differ.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from domaintune.config import config_from_dict
from domaintune.eval.config import DecodingConfig
from domaintune.eval.items import load_items
from domaintune.eval.models import build_models
from domaintune.layout import RunLayout


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--batch-sizes", default="1,4,8")
    parser.add_argument(
        "--test", default=str(Path(__file__).resolve().parents[1] / "examples/runs/medical-zh/data/test.jsonl")
    )
    args = parser.parse_args()
    items = load_items(Path(args.test), args.prompts, "test")
    cfg = config_from_dict({"name": "bench", "model": {"name_or_path": args.model}, "eval": {"tuned": False}})
    (model,) = build_models(cfg, RunLayout(Path("/nonexistent")))
    prompts = [it.prompt for it in items]
    model.generate(prompts[:1], DecodingConfig(max_new_tokens=2, batch_size=1), 0, desc="warm-up")
    results = {}
    for bs in (int(b) for b in args.batch_sizes.split(",")):
        t0 = time.perf_counter()
        answers = model.generate(
            prompts, DecodingConfig(max_new_tokens=args.new_tokens, batch_size=bs), 0, desc=f"batch {bs}"
        )
        elapsed = time.perf_counter() - t0
        results[bs] = (elapsed, sum(a.n_tokens for a in answers), [a.text for a in answers])
    base_elapsed, base_tokens, base_texts = results[min(results)]
    print(f"{len(prompts)} prompts, up to {args.new_tokens} new tokens, model {args.model}")
    print(f"baseline: batch size {min(results)} = {base_tokens / base_elapsed:.1f} tokens/s")
    for bs, (elapsed, tokens, texts) in results.items():
        differ = sum(a != b for a, b in zip(texts, base_texts))
        print(
            f"batch {bs:>3}: {tokens / elapsed:7.1f} tokens/s  speed-up x{(tokens / elapsed) / (base_tokens / base_elapsed):.2f}"
            f"  answers differing from batch {min(results)}: {differ}/{len(texts)}"
        )


if __name__ == "__main__":
    main()

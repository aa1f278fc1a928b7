"""Export artefacts compared in one run: load time, greedy tokens/s and answer perplexity.

Baseline: the merged float32 model (`export/merged/`, transformers). Compared: the dynamic INT8
model (`export/int8/`, torch), and each GGUF file read back by transformers (`gguf_file=`,
dequantised to float32, so its speed is the transformers runtime, not llama.cpp's).
Every artefact does the same work: the same prompts, a fixed number of new tokens (greedy,
min_new_tokens = max_new_tokens), `--repeats` timed passes after one warm-up; the median pass
is reported. Ratios are against the baseline measured in this same run.

Usage: python bench/bench_export.py RUN_DIR [--prompts 4] [--new-tokens 32] [--repeats 3] [--rows 32]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rows", type=int, default=32)
    args = parser.parse_args()

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from domaintune.export.measure import eval_examples, folder_size, perplexity
    from domaintune.export.quantize import load_int8
    from domaintune.layout import RunLayout
    from domaintune.utils.io import read_jsonl

    layout = RunLayout(args.run_dir)
    export = layout.export_dir
    if not layout.export_manifest.is_file():
        print(f"{layout.export_manifest} not found: run `domaintune export` first", file=sys.stderr)
        return 2
    tokenizer = AutoTokenizer.from_pretrained(export / "merged")
    rows = list(read_jsonl(layout.val_file))[: max(args.rows, args.prompts)]
    examples = eval_examples(tokenizer, rows[: args.rows], 512)
    prompts = [r["messages"][:-1] for r in rows[: args.prompts]]
    encoded = [
        tokenizer.apply_chat_template(p, add_generation_prompt=True, return_tensors="pt", return_dict=True)
        for p in prompts
    ]

    def loaders():
        yield (
            "merged (baseline)",
            export / "merged",
            lambda: AutoModelForCausalLM.from_pretrained(export / "merged", dtype=torch.float32),
        )
        if (export / "int8").is_dir():
            yield "int8 (torch dynamic)", export / "int8", lambda: load_int8(export / "int8")[0]
        for gguf in sorted((export / "gguf").glob("*.gguf")):
            yield (
                f"{gguf.stem.rsplit('-', 1)[-1]} gguf (transformers)",
                gguf,
                (lambda g=gguf: AutoModelForCausalLM.from_pretrained(g.parent, gguf_file=g.name, dtype=torch.float32)),
            )

    results = []
    for label, path, load in loaders():
        start = time.perf_counter()
        model = load().eval()
        load_s = time.perf_counter() - start
        with torch.inference_mode():
            model.generate(**encoded[0], max_new_tokens=2, do_sample=False, pad_token_id=tokenizer.pad_token_id)
            passes = []
            for _ in range(args.repeats):
                start = time.perf_counter()
                for batch in encoded:
                    model.generate(
                        **batch,
                        max_new_tokens=args.new_tokens,
                        min_new_tokens=args.new_tokens,
                        do_sample=False,
                        pad_token_id=tokenizer.pad_token_id,
                    )
                passes.append(time.perf_counter() - start)
        tps = len(encoded) * args.new_tokens / statistics.median(passes)
        ppl = perplexity(model, examples)["perplexity"] if examples else float("nan")
        results.append(
            {"artefact": label, "bytes": folder_size(path), "load_s": load_s, "tokens_per_s": tps, "perplexity": ppl}
        )
        del model

    base = results[0]
    print(
        f"{'artefact':28} {'size MB':>9} {'x':>6} {'load s':>8} {'x':>6} {'tok/s':>8} {'x':>6} {'ppl':>9} {'Δppl':>8}"
    )
    for r in results:
        print(
            f"{r['artefact']:28} {r['bytes'] / 1e6:9.1f} {r['bytes'] / base['bytes']:6.2f} {r['load_s']:8.2f} "
            f"{r['load_s'] / base['load_s']:6.2f} {r['tokens_per_s']:8.1f} {r['tokens_per_s'] / base['tokens_per_s']:6.2f} "
            f"{r['perplexity']:9.3f} {r['perplexity'] - base['perplexity']:+8.3f}"
        )
    print(
        json.dumps(
            {
                "threads": torch.get_num_threads(),
                "prompts": len(encoded),
                "new_tokens": args.new_tokens,
                "repeats": args.repeats,
                "ppl_rows": len(examples),
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

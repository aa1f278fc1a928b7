"""Eval's answers and reference perplexity: one llama.cpp prompt pass for both (each reference scored on the
prompt's cache when its answer ends), against answering with llama.cpp and scoring in a separate transformers
pass (what eval did before), on the same CPU, threads and items.

The items are the main job's kind: the Chinese internal-medicine questions (title + ask, its system prompt) with
their doctors' answers of 10-130 characters as references (examples/medical-zh.yaml's filter). Decoding is the
main job's (greedy, repetition penalty 1.05, 128 new tokens, 32 sequences together).

    python bench/bench_eval_perplexity.py --items 64 --json /tmp/eval_ppl.json
    python bench/bench_eval_perplexity.py --model-dir <a merged tuned model folder>

Prints seconds per phase, the ratio (baseline: llama.cpp answers + transformers scoring, measured in this run),
the perplexity under each scorer and whether the answers stayed identical.
"""

from __future__ import annotations

import argparse
import csv
import functools
import json
import time
from pathlib import Path

from bench_llamacpp import ZH_TEST, cpu_model

SYSTEM = "你是一名专业的内科医生，请用简洁、准确的中文回答患者的问题。"  # examples/medical-zh.yaml


def medical_items(n: int) -> tuple[list[list[dict]], list[str]]:
    """The first `n` rows whose answer has 10-130 characters: (chat prompts, reference answers)."""
    prompts, references = [], []
    with (ZH_TEST / "internal_medicine_sample.csv").open(encoding="gb18030", newline="") as handle:
        for row in csv.DictReader(handle):
            if 10 <= len(row["answer"].strip()) <= 130:
                prompts.append(
                    [
                        {"role": "system", "content": SYSTEM},
                        {"role": "user", "content": f"{row['title']}\n{row['ask']}"},
                    ]
                )
                references.append(row["answer"].strip())
            if len(prompts) == n:
                break
    return prompts, references


def eval_models(model_dir: Path):
    """The folder as eval sees it twice: answering through llama.cpp, and through transformers (for scoring)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from domaintune.eval.models import EvalModel, _hf_source

    def load():
        return AutoModelForCausalLM.from_pretrained(model_dir, dtype="float32"), AutoTokenizer.from_pretrained(
            model_dir
        )

    cpp = EvalModel("m", "local", "bench", str(model_dir), loader=load, engine="llamacpp", scorer="llamacpp")
    cpp.hf_source = functools.partial(_hf_source, model_dir, None, None)
    hf = EvalModel("m", "local", "bench", str(model_dir), loader=load)
    return cpp, hf


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", type=Path, help="a plain HF folder (default: the bundled SmolLM2-135M-Instruct)")
    parser.add_argument("--items", type=int, default=64)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    from domaintune.eval.config import DecodingConfig, EvalConfig
    from domaintune.eval.models import perplexity
    from domaintune.eval.runner import _scoring_precision
    from domaintune.model.config import ModelConfig
    from domaintune.model.loader import resolve_model_dir

    model_dir = args.model_dir or resolve_model_dir(ModelConfig(name_or_path="smollm2-135m-instruct"))
    prompts, references = medical_items(args.items)
    decoding = DecodingConfig(max_new_tokens=args.max_new_tokens, repetition_penalty=1.05, batch_size=args.batch_size)
    precision = _scoring_precision(EvalConfig()).value  # what eval's transformers scoring runs in on this CPU
    cpp, hf = eval_models(model_dir)
    cpp.generate(prompts[:2], decoding, seed=0)  # the q8_0 GGUF built and flash attention chosen outside the timings

    answers, t_answer = timed(lambda: cpp.generate(prompts, decoding, seed=0))
    hf_nll, t_hf = timed(
        lambda: hf.reference_nll(prompts, references, 2048, max(1, args.batch_size // 2), "transformers", precision)
    )
    hf.unload()
    shared, t_shared = timed(lambda: cpp.generate(prompts, decoding, seed=0, references=references))
    alone, t_alone = timed(lambda: cpp.reference_nll(prompts, references, 2048, 16, "llama.cpp alone"))

    baseline = t_answer + t_hf
    result = {
        "cpu": cpu_model(),
        "model": str(model_dir),
        "items": len(prompts),
        "transformers_precision": precision,
        "seconds": {
            "llamacpp_answers": t_answer,
            "transformers_scoring": t_hf,
            "baseline_total": baseline,
            "llamacpp_answers_and_scoring_one_pass": t_shared,
            "llamacpp_scoring_alone": t_alone,
        },
        "speedup_vs_baseline": baseline / t_shared,
        "scoring_cost_s": {"transformers_pass": t_hf, "inside_the_answer_pass": t_shared - t_answer},
        "perplexity": {
            "transformers": perplexity(hf_nll),
            "llamacpp_one_pass": perplexity([a.nll for a in shared if a.nll]),
            "llamacpp_alone": perplexity(alone),
        },
        "answers_identical": sum(a.text == b.text for a, b in zip(answers, shared)),
        "reference_tokens_mean": sum(a.nll[1] for a in shared if a.nll) / len(shared),
    }
    print(json.dumps(result, indent=2, ensure_ascii=False))
    print(
        f"\n{result['cpu']}: answers + perplexity of {len(prompts)} items in {t_shared:.1f} s with one llama.cpp pass, "
        f"{baseline:.1f} s as llama.cpp answers ({t_answer:.1f} s) + transformers {precision} scoring ({t_hf:.1f} s): "
        f"{baseline / t_shared:.2f}x; scoring inside the answer pass costs {t_shared - t_answer:.1f} s "
        f"({t_hf / max(1e-9, t_shared - t_answer):.1f}x less than transformers' pass)"
    )
    if args.json:
        args.json.write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()

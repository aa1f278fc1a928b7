"""Verifier pass rates and reward-model scores, base vs tuned, with intervals: what eval reports for these methods.

`compare_models` generates an answer per held-out prompt row with each model, scores the answers with the
configured verifiers (and/or a reward model), and returns per model: mean reward per component, the pass rate
with a 95% Wilson interval, and for tuned vs base the paired difference in pass rate with a 95% bootstrap
interval. Eval can call it with the run's test rows (`rows.read_rows(test_file, "prompt")`).
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from typing import Any

from domaintune.train.preference.verifiers import Verifier, applies, combined_scores, passes, score_components


def wilson_interval(successes: int, n: int, z: float = 1.96) -> tuple[float | None, float | None]:
    if n == 0:
        return None, None
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def paired_bootstrap(a: Sequence[float], b: Sequence[float], seed: int = 0, n_boot: int = 2000) -> dict[str, Any]:
    """Mean of b - a over paired items with a 95% percentile bootstrap interval."""
    diffs = [y - x for x, y in zip(a, b, strict=True)]
    if not diffs:
        return {"delta": None, "ci95": [None, None]}
    rng = random.Random(seed)
    n = len(diffs)
    means = sorted(sum(diffs[rng.randrange(n)] for _ in range(n)) / n for _ in range(n_boot))
    return {"delta": sum(diffs) / n, "ci95": [means[int(0.025 * n_boot)], means[int(0.975 * n_boot) - 1]]}


def generate_answers(model, tokenizer, prompts: Sequence[Any], max_new_tokens: int, batch_size: int = 8) -> list[str]:
    """Greedy answers to chat prompts (lists of messages), batched with left padding."""
    import torch

    from domaintune.model.loader import end_of_turn_token_ids

    tokenizer.padding_side = "left"
    texts = [tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True) for p in prompts]
    answers: list[str] = []
    model.eval()
    for start in range(0, len(texts), batch_size):
        batch = tokenizer(
            texts[start : start + batch_size], return_tensors="pt", padding=True, add_special_tokens=False
        )
        with torch.no_grad():
            out = model.generate(
                **batch,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                eos_token_id=end_of_turn_token_ids(tokenizer),
                pad_token_id=tokenizer.pad_token_id,
            )
        new = out[:, batch["input_ids"].shape[1] :]
        answers += tokenizer.batch_decode(new, skip_special_tokens=True)
    return [a.strip() for a in answers]


def score_answers(verifiers: Sequence[Verifier], rows: Sequence[dict[str, Any]], answers: Sequence[str]) -> dict:
    """Per-component mean, combined reward and pass rate (95% Wilson interval) of one model's answers."""
    prompts = [r["prompt"] for r in rows]
    fields = {k: [r.get(k) for r in rows] for k in rows[0] if k != "prompt"} if rows else {}
    components = score_components(verifiers, prompts, list(answers), **fields)
    total = combined_scores(verifiers, components)
    passed = passes(verifiers, components)
    low, high = wilson_interval(sum(passed), len(passed))
    return {
        "n": len(passed),
        "components": {name: sum(v) / len(v) for name, v in components.items() if v},
        "component_pass_rate": {
            v.__name__: sum(s >= v.spec.pass_at for s in components[v.__name__]) / max(1, len(passed))
            for v in verifiers
        },
        "component_applicable": {v.__name__: sum(applies(v.spec, p) for p in prompts) for v in verifiers},
        "component_pass_rate_where_applicable": {
            v.__name__: _applicable_rate(v, prompts, components) for v in verifiers
        },
        "reward_mean": sum(total) / len(total) if total else None,
        "pass_rate": sum(passed) / len(passed) if passed else None,
        "pass_rate_ci95": [low, high],
        "passed": [bool(x) for x in passed],
    }


def _applicable_rate(v: Verifier, prompts: Sequence[Any], components: dict[str, list[float]]) -> float | None:
    hits = [s >= v.spec.pass_at for p, s in zip(prompts, components[v.__name__], strict=True) if applies(v.spec, p)]
    return sum(hits) / len(hits) if hits else None


def compare_models(
    models: dict[str, tuple[Any, Any]],
    rows: Sequence[dict[str, Any]],
    verifiers: Sequence[Verifier],
    max_new_tokens: int = 64,
    seed: int = 0,
) -> dict[str, Any]:
    """{name: scores} for each (model, tokenizer), the answers, and `tuned - base` pass-rate delta when both exist."""
    out: dict[str, Any] = {"models": {}, "answers": {}}
    for name, (model, tokenizer) in models.items():
        answers = generate_answers(model, tokenizer, [r["prompt"] for r in rows], max_new_tokens)
        out["answers"][name] = answers
        out["models"][name] = score_answers(verifiers, rows, answers)
    if "base" in out["models"] and "tuned" in out["models"]:
        base = [float(x) for x in out["models"]["base"]["passed"]]
        tuned = [float(x) for x in out["models"]["tuned"]["passed"]]
        out["pass_rate_delta"] = paired_bootstrap(base, tuned, seed=seed)
    return out

"""Verifier pass rates and reward-model scores, base vs tuned, with intervals: what eval reports for these methods.

`compare_models` generates an answer per held-out prompt row with each model, scores the answers with the
configured verifiers (and/or a reward model), and returns per model: mean reward per component, the pass rate
with a 95% Wilson interval, and for tuned vs base the paired difference in pass rate with a 95% bootstrap
interval. Eval can call it with the run's test rows (`rows.read_rows(test_file, "prompt")`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from domaintune.train.preference.stats import paired_bootstrap, wilson_interval
from domaintune.train.preference.verifiers import Verifier, applies, combined_scores, passes, score_components


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
    """Per-component mean, combined reward per answer and on average, and pass rate (95% Wilson interval) of one
    model's answers."""
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
        "component_applicable": {v.__name__: sum(applies(v.spec, r["prompt"], r) for r in rows) for v in verifiers},
        "component_pass_rate_where_applicable": {v.__name__: _applicable_rate(v, rows, components) for v in verifiers},
        "rewards": total,
        "reward_mean": sum(total) / len(total) if total else None,
        "pass_rate": sum(passed) / len(passed) if passed else None,
        "pass_rate_ci95": [low, high],
        "passed": [bool(x) for x in passed],
    }


def _applicable_rate(v: Verifier, rows: Sequence[dict[str, Any]], components: dict[str, list[float]]) -> float | None:
    scores = components[v.__name__]
    hits = [s >= v.spec.pass_at for r, s in zip(rows, scores, strict=True) if applies(v.spec, r["prompt"], r)]
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


def compare_run(cfg: Any, model_dir: Any, rows_file: Any, max_new_tokens: int = 64, limit: int | None = None) -> dict:
    """The eval hook: base (`cfg.model`) vs tuned (`model_dir`) answers to `rows_file`'s prompts (data-stage rows or
    prompt rows), scored by `cfg.train.grpo.rewards`; see `compare_models`."""
    from pathlib import Path

    from transformers import AutoModelForCausalLM

    from domaintune.model.loader import load_tokenizer, load_trained, resolve_model_dir
    from domaintune.train.preference.rows import read_rows
    from domaintune.train.preference.verifiers import build_verifiers

    rows, _ = read_rows(Path(rows_file), "prompt", limit)
    base_dir = resolve_model_dir(cfg.model)
    base = AutoModelForCausalLM.from_pretrained(base_dir)
    models = {"base": (base, load_tokenizer(cfg.model, base_dir)), "tuned": load_trained(model_dir)}
    result = compare_models(models, rows, build_verifiers(cfg.train.grpo.rewards), max_new_tokens, cfg.seed)
    result["rows_file"] = str(rows_file)
    return result

"""How far the fast engine's answers are from the transformers path, on a sample of the test set.

Base and tuned are always scored by the same engine, so the comparison between them is fair whichever engine
runs; this check says how far the absolute figures could move had transformers generated them (q8_0 weights,
other kernels): identical answers, token agreement up to the first difference, and the primary metric on
both engines' answers to the same items; where llama.cpp also scored the references, both engines'
perplexity of the same references.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

import numpy as np

from domaintune.eval import metrics as M

if TYPE_CHECKING:
    from collections.abc import Callable

    from domaintune.eval.items import Item
    from domaintune.eval.models import EvalModel

LLAMACPP_SUFFIX = "|engine:llamacpp-q8_0"


def engine_summary(models: list[EvalModel]) -> dict[str, Any]:
    """Which engine generated each local model's answers and scored its references, and why."""
    local = [m for m in models if m.kind == "local"]
    engines = sorted({m.engine for m in local})
    reasons = sorted({m.engine_reason for m in local if m.engine_reason})
    scorer = "/".join(sorted({m.scorer for m in local})) or "none"
    settings = {m.name: m.engine_settings for m in local if m.engine_settings}
    return {
        "name": "/".join(engines) or "none",
        "reason": "; ".join(reasons),
        "perplexity_by": scorer,
        "settings": settings,
        "check": {},
    }


def transformers_twin(model: EvalModel) -> EvalModel:
    """The same weights answering through transformers (its own cache identity, nothing loaded yet)."""
    return dataclasses.replace(
        model,
        engine="transformers",
        scorer="transformers",
        identity=model.identity.removesuffix(LLAMACPP_SUFFIX),
        hf_source=None,
        notes=[],
        engine_settings={},
        _loaded=None,
    )


def check_engine_agreement(
    models: list[EvalModel],
    items: list[Item],
    fast_rows: dict[str, list[dict[str, Any]]],
    n_items: int,
    primary_metric: str,
    answer: Callable[[EvalModel, list[str], list[list[dict]]], list[dict[str, Any]]],
) -> dict[str, Any]:
    """Per llama.cpp model: agreement of its first `n_items` test answers with transformers' greedy answers.

    `answer(model, ids, prompts)` generates (through the eval answer cache) and returns rows with `prediction`.
    """
    sample = items[: max(0, n_items)]
    if not sample:
        return {}
    out: dict[str, Any] = {}
    for model in models:
        if model.kind != "local" or model.engine != "llamacpp":
            continue
        twin = transformers_twin(model)
        try:
            slow = answer(twin, [it.id for it in sample], [it.prompt for it in sample])
        finally:
            twin.unload()
        out[model.name] = agreement(
            [r["prediction"] for r in fast_rows[model.name][: len(sample)]],
            [r["prediction"] for r in slow],
            [it.reference for it in sample],
            primary_metric,
        )
    return out


def agreement(fast: list[str], slow: list[str], references: list[str], primary_metric: str) -> dict[str, Any]:
    """Identical answers, mean shared-prefix share of characters, and the primary metric under both engines."""
    prefix_shares = []
    for a, b in zip(fast, slow):
        longest = max(len(a), len(b))
        common = next((k for k, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        prefix_shares.append(1.0 if longest == 0 else common / longest)
    fast_scores = [_metric(p, r, primary_metric) for p, r in zip(fast, references)]
    slow_scores = [_metric(p, r, primary_metric) for p, r in zip(slow, references)]
    return {
        "items": len(fast),
        "identical_answers": int(sum(a == b for a, b in zip(fast, slow))),
        "prefix_agreement": float(np.mean(prefix_shares)),
        "metric": primary_metric,
        "metric_llamacpp": _mean(fast_scores),
        "metric_transformers": _mean(slow_scores),
        "metric_difference": _difference(fast_scores, slow_scores),
    }


def perplexity_agreement(
    fast: list[tuple[float, int]], slow: list[tuple[float, int]], precision: str
) -> dict[str, Any]:
    """The same references' perplexity under llama.cpp (q8_0) and transformers (`precision`), and the change."""
    from domaintune.eval.models import perplexity

    ppl_fast, ppl_slow = perplexity(fast), perplexity(slow)
    if ppl_fast is None or ppl_slow is None:
        return {}
    return {
        "perplexity_items": len(fast),
        "perplexity_llamacpp": ppl_fast,
        "perplexity_transformers": ppl_slow,
        "perplexity_transformers_precision": precision,
        "perplexity_change": ppl_fast / ppl_slow - 1.0,
    }


TEXT_METRICS = ("rouge", "bleu", "chrf", "exact_match", "token_f1", "json")


def _metric(prediction: str, reference: str, metric: str) -> float | None:
    value = M.score_item(prediction, reference, TEXT_METRICS).get(metric)
    return float(value) if isinstance(value, int | float) and np.isfinite(value) else None


def _mean(values: list[float | None]) -> float | None:
    kept = [v for v in values if v is not None]
    return float(np.mean(kept)) if kept else None


def _difference(fast: list[float | None], slow: list[float | None]) -> float | None:
    pairs = [(a, b) for a, b in zip(fast, slow) if a is not None and b is not None]
    return float(np.mean([a - b for a, b in pairs])) if pairs else None


def describe_engine(engine: dict[str, Any] | None) -> list[str]:
    """One line for the engine and one per agreement check, for the CLI and the HTML report."""
    if not engine:
        return []
    lines = [f"engine: {engine['name']} ({engine['reason']})" if engine.get("reason") else f"engine: {engine['name']}"]
    if engine.get("perplexity_by") == "llamacpp":
        lines.append("reference perplexity scored by llama.cpp (q8_0), each reference on its answer's prompt")
    elif engine.get("perplexity_by") and engine["perplexity_by"] != engine["name"]:
        lines.append(f"reference perplexity scored by {engine['perplexity_by']} (in the report's perplexity_precision)")
    for name, c in engine.get("check", {}).items():
        lines.append(
            f"engine check ({name}, first {c['items']} test items, transformers vs llama.cpp): "
            f"{c['identical_answers']}/{c['items']} identical, prefix agreement {c['prefix_agreement']:.2f}, "
            f"{c['metric']} {_fmt(c['metric_transformers'])} vs {_fmt(c['metric_llamacpp'])}"
        )
        if "perplexity_items" in c:
            lines.append(
                f"perplexity check ({name}, first {c['perplexity_items']} test references): transformers "
                f"({c['perplexity_transformers_precision']}) {c['perplexity_transformers']:.3f} vs llama.cpp "
                f"{c['perplexity_llamacpp']:.3f} ({c['perplexity_change']:+.2%})"
            )
    return lines


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"

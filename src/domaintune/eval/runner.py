"""`run_eval`: every model on the same prompts, every metric, deltas with bootstrap CIs, retention, gates.

Outputs in `<output_dir>/eval/`: predictions.jsonl (the answer cache), perplexity.jsonl and judge.jsonl
(caches), items.jsonl (per item: prompt, reference, every model's answer and scores), report.json and
report.html.
"""

from __future__ import annotations

import logging
import math
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from domaintune.errors import UserError
from domaintune.eval import metrics as M
from domaintune.eval.gates import evaluate_gates, parse_gate
from domaintune.eval.items import (
    Item,
    JsonlCache,
    cache_key,
    classification_gold,
    detect_stratum_field,
    load_items,
)
from domaintune.eval.models import EvalModel, build_models, clean_answer, decoding_key, perplexity
from domaintune.eval.perturb import perturb_prompt
from domaintune.eval.stats import paired_bootstrap_delta
from domaintune.utils.io import write_json, write_jsonl

log = logging.getLogger(__name__)

# Metrics where lower is better (their delta is good when negative).
LOWER_IS_BETTER = {"perplexity", "latency_p50_s", "latency_p95_s"}
_ALIASES = {"rouge1": "rouge1_char", "rouge2": "rouge2_char", "rougeL": "rougeL_char"}


def _seed(cfg) -> int:
    return cfg.eval.decoding.seed if cfg.eval.decoding.seed is not None else cfg.seed


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not (isinstance(x, float) and math.isnan(x))


class _Generations:
    """Answers per (set, model), through the cache."""

    def __init__(self, cfg, eval_dir: Path):
        self.cfg = cfg
        self.seed = _seed(cfg)
        self.settings = decoding_key(cfg.eval.decoding, self.seed)
        self.cache = JsonlCache(eval_dir / "predictions.jsonl")
        self.generated = 0
        self.generation_s: dict[str, float] = defaultdict(float)

    def answers(self, model: EvalModel, set_name: str, ids: list[str], prompts: list[list[dict]]) -> list[dict]:
        keys = [cache_key("generate", model.identity, p, self.settings) for p in prompts]
        rows: list[dict | None] = [self.cache.get(k) if model.cacheable else None for k in keys]
        rows = [dict(r, prediction=clean_answer(r["prediction"])) if r else None for r in rows]
        todo = [i for i, row in enumerate(rows) if row is None]
        if todo:

            def store(batch: list[int], answers: list) -> None:
                # Saved after every batch, so an interrupted run keeps what it made.
                for k, answer in zip(batch, answers):
                    i = todo[k]
                    row = {
                        "key": keys[i],
                        "model": model.name,
                        "model_identity": model.identity,
                        "set": set_name,
                        "item_id": ids[i],
                        "prompt": prompts[i],
                        "decoding": self.settings,
                        "prediction": answer.text,
                        "n_tokens": answer.n_tokens,
                        "latency_s": answer.latency_s,
                        "batch_size": answer.batch_size,
                        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                    }
                    rows[i] = row
                    self.cache.put(row)
                self.cache.save()

            t0 = time.perf_counter()
            model.generate(
                [prompts[i] for i in todo],
                self.cfg.eval.decoding,
                self.seed,
                desc=f"{model.name} · {set_name}",
                on_batch=store,
            )
            self.generation_s[model.name] += time.perf_counter() - t0
            self.generated += len(todo)
        return rows  # type: ignore[return-value]


def _nll_rows(model: EvalModel, items: list[Item], cache: JsonlCache, cfg, set_name: str) -> list[tuple[float, int]]:
    settings = {"max_tokens": cfg.eval.perplexity_max_tokens}
    keys = [cache_key("nll", model.identity, [it.prompt, it.reference], settings) for it in items]
    rows = [cache.get(k) for k in keys]
    todo = [i for i, r in enumerate(rows) if r is None]
    if todo:
        computed = model.reference_nll(
            [items[i].prompt for i in todo],
            [items[i].reference for i in todo],
            max_length=cfg.eval.perplexity_max_tokens,
            batch_size=max(1, cfg.eval.decoding.batch_size // 2),
            desc=f"{model.name} · perplexity {set_name}",
        )
        for i, (nll, n) in zip(todo, computed):
            rows[i] = {
                "key": keys[i],
                "model": model.name,
                "set": set_name,
                "item_id": items[i].id,
                "nll": nll,
                "tokens": n,
            }
            cache.put(rows[i])
        cache.save()
    return [(r["nll"], r["tokens"]) for r in rows]  # type: ignore[index]


def _aggregate(per_item: list[dict[str, Any]]) -> dict[str, float]:
    sums: dict[str, list[float]] = defaultdict(list)
    for scores in per_item:
        for name, value in scores.items():
            if _finite(value):
                sums[name].append(float(value))
    return {name: float(np.mean(values)) for name, values in sums.items()}


def _score_set(
    items: list[Item], answers: dict[str, list[dict]], ecfg, glossary: list[str] | None
) -> tuple[dict[str, list[dict]], dict[str, dict[str, float]]]:
    """Per-item scores and aggregate metrics for every model on one set."""
    per_item: dict[str, list[dict]] = {}
    aggregate: dict[str, dict[str, float]] = {}
    gold = [classification_gold(it) for it in items]
    labels = sorted({g for g in gold if g is not None})
    for name, rows in answers.items():
        scores = []
        for it, row, g in zip(items, rows, gold):
            s = M.score_item(row["prediction"], it.reference, ecfg.metrics, glossary)
            if g is not None and "classification" in ecfg.metrics:
                s["pred_label"] = M.predicted_label(row["prediction"], labels)
                s["accuracy"] = 100.0 if s["pred_label"] == g else 0.0
            scores.append(s)
        per_item[name] = scores
        agg = _aggregate([{k: v for k, v in s.items() if k != "pred_label"} for s in scores])
        if "bleu" in ecfg.metrics:
            agg["bleu_corpus"] = M.corpus_bleu([r["prediction"] for r in rows], [it.reference for it in items])
        cls_idx = [i for i, g in enumerate(gold) if g is not None]
        if cls_idx and "classification" in ecfg.metrics:
            agg.update(M.classification_scores([gold[i] for i in cls_idx], [scores[i]["pred_label"] for i in cls_idx]))
            agg["classification_items"] = len(cls_idx)
        if "latency" in ecfg.metrics:
            lat = [r["latency_s"] for r in rows]
            agg["latency_p50_s"] = M.percentile(lat, 50)
            agg["latency_p95_s"] = M.percentile(lat, 95)
            toks = [r["n_tokens"] for r in rows if r.get("n_tokens") is not None]
            # A batch's wall time is shared by its answers: tokens/s = tokens / (sum of latency / batch size).
            busy = sum(r["latency_s"] / max(1, r.get("batch_size") or 1) for r in rows)
            if toks and busy > 0:
                agg["tokens_per_s"] = float(sum(toks) / busy)
                agg["avg_new_tokens"] = float(np.mean(toks))
        aggregate[name] = agg
    return per_item, aggregate


def _paired(per_item: dict[str, list[dict]], a: str, b: str, metric: str) -> tuple[list[float], list[float]]:
    xs, ys = [], []
    for sa, sb in zip(per_item[a], per_item[b]):
        va, vb = sa.get(metric), sb.get(metric)
        if _finite(va) and _finite(vb):
            xs.append(float(va))
            ys.append(float(vb))
    return xs, ys


def _deltas(per_item, aggregate, nll, ref_model: str, other: str, ecfg, seed: int) -> dict[str, dict]:
    out: dict[str, dict] = {}
    metric_names = sorted({k for s in per_item[other] for k, v in s.items() if _finite(v)})
    for metric in metric_names:
        xs, ys = _paired(per_item, ref_model, other, metric)
        if not xs:
            continue
        d = paired_bootstrap_delta(xs, ys, samples=ecfg.bootstrap_samples, seed=seed)
        d.update(base=float(np.mean(xs)), model=float(np.mean(ys)))
        out[metric] = d
    if nll.get(ref_model) and nll.get(other):
        a, b = np.asarray(nll[ref_model], float), np.asarray(nll[other], float)
        ppl = lambda rows: float(math.exp(rows[:, 0].sum() / max(1.0, rows[:, 1].sum())))  # noqa: E731
        d = paired_bootstrap_delta(a, b, samples=ecfg.bootstrap_samples, seed=seed, stat=ppl)
        d.update(base=ppl(a), model=ppl(b))
        out["perplexity"] = d
    for metric in ("bleu_corpus", "macro_f1", "tokens_per_s", "latency_p50_s", "latency_p95_s"):
        va, vb = aggregate[ref_model].get(metric), aggregate[other].get(metric)
        if _finite(va) and _finite(vb):
            out[metric] = {"delta": vb - va, "ci_low": None, "ci_high": None, "base": va, "model": vb}
    return out


def _worst_cases(items, per_item, answers, focus: str, ref: str | None, metric: str, n: int) -> dict[str, list]:
    if n <= 0 or focus not in per_item:
        return {"lowest": [], "regressions": []}

    def row(i: int) -> dict:
        return {
            "id": items[i].id,
            "question": items[i].question,
            "reference": items[i].reference,
            "answers": {name: rows[i]["prediction"] for name, rows in answers.items()},
            "scores": {name: per_item[name][i].get(metric) for name in per_item},
        }

    scored = [i for i in range(len(items)) if _finite(per_item[focus][i].get(metric))]
    lowest = sorted(scored, key=lambda i: (per_item[focus][i][metric], items[i].id))[:n]
    regressions = []
    if ref and ref in per_item:
        diffs = [
            (per_item[focus][i][metric] - per_item[ref][i][metric], i)
            for i in scored
            if _finite(per_item[ref][i].get(metric))
        ]
        regressions = [i for d, i in sorted(diffs) if d < 0][:n]
    return {"lowest": [row(i) for i in lowest], "regressions": [row(i) for i in regressions]}


def _strata(items, per_item, field: str | None, metric: str) -> dict[str, Any]:
    if not field:
        return {}
    groups: dict[str, list[int]] = defaultdict(list)
    for i, it in enumerate(items):
        groups[str(it.row.get(field, "(none)"))].append(i)
    table = {}
    for value, idx in sorted(groups.items(), key=lambda kv: (-len(kv[1]), kv[0])):
        entry: dict[str, Any] = {"n": len(idx)}
        for name, scores in per_item.items():
            entry[name] = {
                m: (float(np.mean(v)) if (v := [scores[i][m] for i in idx if _finite(scores[i].get(m))]) else None)
                for m in dict.fromkeys((metric, "bleu", "chrf"))
            }
        table[value] = entry
    return {"field": field, "metric": metric, "groups": table}


def _robust_models(ecfg) -> list[str]:
    models = ecfg.robustness.models
    return ["base", "tuned"] if models is None else list(models)


def _robustness(items, models, gens: _Generations, per_item_clean, ecfg, seed: int) -> dict[str, Any]:
    rcfg = ecfg.robustness
    if not rcfg.enabled:
        return {"skipped": "robustness disabled (eval.robustness.enabled: false)"}
    chosen = [m for m in models if m.name in _robust_models(ecfg)]
    missing = sorted(set(rcfg.models or []) - {m.name for m in models})
    if missing:
        raise UserError(
            f"eval.robustness.models: {missing} not evaluated in this run (evaluated: {[m.name for m in models]})"
        )
    subset = items[: rcfg.max_items]
    metric = ecfg.primary_metric
    out: dict[str, Any] = {"metric": metric, "n_items": len(subset), "models": {}}
    for model in chosen:
        clean_scores = [per_item_clean[model.name][i].get(metric) for i in range(len(subset))]
        clean = float(np.mean([s for s in clean_scores if _finite(s)])) if subset else float("nan")
        entry: dict[str, Any] = {"clean": clean, "perturbed": {}, "drop": {}}
        for kind in rcfg.perturbations:
            prompts = [perturb_prompt(it.prompt, kind, seed + k, rcfg.rate) for k, it in enumerate(subset)]
            rows = gens.answers(model, f"robust-{kind}", [it.id for it in subset], prompts)
            vals = [
                M.score_item(r["prediction"], it.reference, [_metric_family(metric)]).get(metric)
                for r, it in zip(rows, subset)
            ]
            score = float(np.mean([v for v in vals if _finite(v)]))
            entry["perturbed"][kind] = score
            entry["drop"][kind] = clean - score
        entry["mean_drop"] = float(np.mean(list(entry["drop"].values())))
        out["models"][model.name] = entry
    example = subset[0] if subset else None
    if example is not None:
        out["example"] = {
            kind: perturb_prompt(example.prompt, kind, seed, rcfg.rate)[-1]["content"][:300]
            for kind in rcfg.perturbations
        }
        out["example"]["original"] = example.prompt[-1]["content"][:300]
    return out


def _metric_family(metric: str) -> str:
    for family in ("rouge", "bleu", "chrf", "exact_match", "token_f1"):
        if metric.startswith(family):
            return family
    raise UserError(
        f"eval.primary_metric {metric!r}: use a text metric (rouge1/2/L_char, rouge*_word, bleu, chrf, "
        "exact_match, token_f1)"
    )


def _judge(items, answers, models, ecfg, eval_dir: Path) -> dict[str, Any]:
    if "judge" not in ecfg.metrics:
        return {"skipped": "judge not in eval.metrics"}
    if not ecfg.judge.url:
        return {"skipped": "no judge endpoint configured (set eval.judge.url to an OpenAI-compatible endpoint)"}
    from domaintune.eval.judge import Judge, judge_settings

    judge = Judge(ecfg.judge)
    cache = JsonlCache(eval_dir / "judge.jsonl")
    settings = judge_settings(ecfg.judge)
    subset = list(range(len(items)))[: ecfg.judge.max_items or len(items)]
    out: dict[str, Any] = {
        "model": ecfg.judge.model,
        "url": ecfg.judge.url,
        "n_items": len(subset),
        "models": {},
        "per_item": {},
    }
    from tqdm.auto import tqdm

    for model in models:
        scores: list[int | None] = []
        for i in tqdm(subset, desc=f"judge · {model.name}", unit="item", dynamic_ncols=True):
            answer = answers[model.name][i]["prediction"]
            key = cache_key("judge", "judge", [items[i].question, items[i].reference, answer], settings)
            row = cache.get(key)
            if row is None:
                row = {"key": key, "item_id": items[i].id, **judge.score(items[i].question, items[i].reference, answer)}
                cache.put(row)
            scores.append(row["score"])
        cache.save()
        valid = [s for s in scores if s is not None]
        out["models"][model.name] = {
            "judge_score": float(np.mean(valid)) if valid else None,
            "scored": len(valid),
            "unparsed": len(scores) - len(valid),
        }
        out["per_item"][model.name] = scores
    return out


def _flat_values(report: dict[str, Any]) -> dict[str, Any]:
    """The names gates can use: `base.rougeL_char`, `rougeL_char_delta` (tuned - base), `retention`, ..."""
    values: dict[str, Any] = {}
    for set_name, per_model in report["metrics"].items():
        for model, agg in per_model.items():
            for metric, value in agg.items():
                prefix = f"{model}." if set_name == "test" else f"{set_name}.{model}."
                values[prefix + metric] = value
    main = "tuned" if "tuned" in report["models"] else None
    for set_name, by_model in report["deltas"].items():
        for model, deltas in by_model.items():
            for metric, d in deltas.items():
                prefix = (
                    ""
                    if set_name == "test" and model == main
                    else (f"{model}." if set_name == "test" else f"{set_name}.{model}.")
                )
                values[f"{prefix}{metric}_delta"] = d["delta"]
                values[f"{prefix}{metric}_delta_ci_low"] = d["ci_low"]
                values[f"{prefix}{metric}_delta_ci_high"] = d["ci_high"]
                if metric == "perplexity" and d["base"]:
                    values[f"{prefix}perplexity_ratio"] = d["model"] / d["base"]
    for model, r in report.get("retention", {}).items():
        values["retention" if model == main else f"{model}.retention"] = r.get("ratio")
    for model, r in report.get("robustness", {}).get("models", {}).items():
        values["robustness_drop" if model == main else f"{model}.robustness_drop"] = r["mean_drop"]
    for model, j in report.get("judge", {}).get("models", {}).items():
        values[f"{model}.judge_score"] = j["judge_score"]
    for alias, target in _ALIASES.items():
        for key in list(values):
            if target in key:
                values.setdefault(key.replace(target, alias), values[key])
    return values


def _default_general_file(output_dir: Path) -> Path:
    holdout = output_dir / "data" / "general_holdout.jsonl"
    return holdout if holdout.is_file() else output_dir / "data" / "general.jsonl"


def _refuse_replayed_retention_set(cfg, output_dir: Path, general_file: Path) -> None:
    """Retention on rows the model was trained on (replay) would report no forgetting however much there was."""
    replay = cfg.train.replay
    if replay.ratio <= 0:
        return
    replay_file = Path(replay.path) if replay.path else output_dir / "data" / "general.jsonl"
    if replay_file.resolve() == general_file.resolve():
        raise UserError(
            f"eval.general_file: {general_file} is also the replay set (train.replay.ratio={replay.ratio}), so "
            "retention would be measured on trained rows; set data.general.holdout > 0 (the data stage then writes "
            "data/general_holdout.jsonl) or point eval.general_file at a held-out file"
        )


def run_eval(cfg, output_dir: str | Path) -> dict[str, Any]:
    """Evaluate every configured model; write eval/{predictions,items}.jsonl, report.json, report.html."""
    import torch

    threads = torch.get_num_threads()
    if cfg.eval.num_threads:
        torch.set_num_threads(cfg.eval.num_threads)
    try:
        return _run_eval(cfg, output_dir)
    finally:
        torch.set_num_threads(threads)


def _run_eval(cfg, output_dir: str | Path) -> dict[str, Any]:
    import torch

    t_start = time.perf_counter()
    ecfg = cfg.eval
    output_dir = Path(output_dir)
    eval_dir = output_dir / "eval"
    eval_dir.mkdir(parents=True, exist_ok=True)
    seed = _seed(cfg)
    for gate in ecfg.gates:
        parse_gate(gate)
    _metric_family(ecfg.primary_metric)
    notes: list[str] = []

    test_file = Path(ecfg.test_file or output_dir / "data" / "test.jsonl")
    sets: dict[str, list[Item]] = {"test": load_items(test_file, ecfg.max_items, "test", ecfg.system_prompt)}
    general_file = Path(ecfg.general_file or _default_general_file(output_dir))
    _refuse_replayed_retention_set(cfg, output_dir, general_file)
    if general_file.is_file():
        sets["general"] = load_items(general_file, ecfg.max_general_items, "general", ecfg.system_prompt)
    elif ecfg.general_file:
        raise UserError(f"eval.general_file: {general_file} does not exist")
    else:
        notes.append(f"retention skipped: no general set at {general_file}")
    glossary = None
    if "term_coverage" in ecfg.metrics:
        if ecfg.glossary:
            glossary = M.load_glossary(ecfg.glossary)
        else:
            notes.append("term coverage skipped: no eval.glossary file configured")

    models = build_models(cfg, output_dir)
    gens = _Generations(cfg, eval_dir)
    nll_cache = JsonlCache(eval_dir / "perplexity.jsonl")
    answers: dict[str, dict[str, list[dict]]] = {name: {} for name in sets}
    nll: dict[str, dict[str, list]] = {name: {} for name in sets}
    robust_needed = ecfg.robustness.enabled
    for model in models:
        for set_name, items in sets.items():
            answers[set_name][model.name] = gens.answers(
                model, set_name, [it.id for it in items], [it.prompt for it in items]
            )
            if "perplexity" in ecfg.metrics:
                if model.kind == "local":
                    nll[set_name][model.name] = _nll_rows(model, items, nll_cache, cfg, set_name)
                elif set_name == "test":
                    notes.append(f"perplexity not available for endpoint model {model.name!r} (no log-probs)")
        if not robust_needed or model.name not in _robust_models(ecfg):
            model.unload()

    per_item: dict[str, dict[str, list[dict]]] = {}
    aggregate: dict[str, dict[str, dict[str, float]]] = {}
    for set_name, items in sets.items():
        per_item[set_name], aggregate[set_name] = _score_set(items, answers[set_name], ecfg, glossary)
        for name, rows in nll[set_name].items():
            aggregate[set_name][name]["perplexity"] = perplexity(rows)
            aggregate[set_name][name]["reference_tokens"] = sum(n for _, n in rows)
            for s, (total, n) in zip(per_item[set_name][name], rows):
                s["nll_per_token"] = total / n if n else None

    robustness = _robustness(sets["test"], models, gens, per_item["test"], ecfg, seed)
    for model in models:
        model.unload()
    judge = _judge(sets["test"], answers["test"], models, ecfg, eval_dir)
    if "per_item" in judge:
        for name, scores in judge["per_item"].items():
            for s, j in zip(per_item["test"][name], scores):
                s["judge_score"] = j
        for name, j in judge["models"].items():
            aggregate["test"][name]["judge_score"] = j["judge_score"]
    elif "judge" in ecfg.metrics:
        notes.append(f"judge: {judge['skipped']}")

    names = [m.name for m in models]
    ref = "base" if "base" in names else None
    deltas: dict[str, dict[str, dict]] = {s: {} for s in sets}
    retention: dict[str, dict] = {}
    if ref:
        for set_name in sets:
            for other in names:
                if other != ref:
                    deltas[set_name][other] = _deltas(
                        per_item[set_name], aggregate[set_name], nll[set_name], ref, other, ecfg, seed
                    )
        if "general" in sets:
            metric = ecfg.primary_metric
            for other in names:
                if other == ref:
                    continue
                b = aggregate["general"][ref].get(metric)
                t = aggregate["general"][other].get(metric)
                ratio = (t / b) if _finite(b) and _finite(t) and b > 0 else None
                entry = {"metric": metric, "base": b, "model": t, "ratio": ratio}
                ppl_b = aggregate["general"][ref].get("perplexity")
                ppl_t = aggregate["general"][other].get("perplexity")
                if _finite(ppl_b) and _finite(ppl_t):
                    entry["perplexity_ratio"] = ppl_t / ppl_b
                retention[other] = entry
                if ratio is None:
                    notes.append(f"retention of {other}: base scores 0 on the general set, ratio undefined")
    else:
        notes.append("no base model evaluated: deltas and retention need eval.base: true")

    focus = "tuned" if "tuned" in names else (next((n for n in names if n != ref), names[0]))
    stratum_field = detect_stratum_field(sets["test"], ecfg.stratum_field)
    for model in models:
        notes.extend(f"{model.name}: {n}" for n in model.notes)

    report: dict[str, Any] = {
        "project": cfg.name,
        "output_dir": str(output_dir),
        "models": {m.name: {"kind": m.kind, "identity": m.identity, "description": m.description} for m in models},
        "sets": {
            name: {
                "file": str(test_file if name == "test" else general_file),
                "n_items": len(items),
                "language": "zh" if sum(M.has_cjk(it.reference) for it in items) * 2 >= len(items) else "other",
            }
            for name, items in sets.items()
        },
        "decoding": {**gens.settings, "batch_size": ecfg.decoding.batch_size, "greedy": ecfg.decoding.temperature == 0},
        "torch_threads": torch.get_num_threads(),
        "latency_note": (
            f"local models: an answer's latency is the wall time of its batch (up to {ecfg.decoding.batch_size} "
            "prompts, CPU/GPU shared with other work); endpoints: one request each; tokens/s counts generated "
            "tokens over busy time; cached answers keep the timings of the run that generated them"
        ),
        "primary_metric": ecfg.primary_metric,
        "metrics": aggregate,
        "deltas": deltas,
        "retention": retention,
        "robustness": robustness,
        "strata": _strata(sets["test"], per_item["test"], stratum_field, ecfg.primary_metric),
        "worst": _worst_cases(
            sets["test"],
            per_item["test"],
            answers["test"],
            focus,
            ref if focus != ref else None,
            ecfg.primary_metric,
            ecfg.worst_n,
        ),
        "judge": {k: v for k, v in judge.items() if k != "per_item"},
        "cache": {
            "answers_reused": gens.cache.hits,
            "answers_generated": gens.generated,
            "perplexity_reused": nll_cache.hits,
        },
        "notes": notes,
    }
    report["gate_values"] = {k: v for k, v in sorted(_flat_values(report).items())}
    report["gates"] = evaluate_gates(ecfg.gates, report["gate_values"])
    report["timing"] = {
        "wall_s": time.perf_counter() - t_start,
        "generation_s": dict(gens.generation_s),
    }

    item_rows = []
    for set_name, items in sets.items():
        for i, it in enumerate(items):
            item_rows.append(
                {
                    "set": set_name,
                    "id": it.id,
                    "prompt": it.prompt,
                    "reference": it.reference,
                    "stratum": it.row.get(stratum_field) if stratum_field else None,
                    "answers": {name: rows[i]["prediction"] for name, rows in answers[set_name].items()},
                    "scores": {name: scores[i] for name, scores in per_item[set_name].items()},
                }
            )
    write_jsonl(eval_dir / "items.jsonl", item_rows)
    write_json(eval_dir / "report.json", report)
    from domaintune.eval.report import render_html

    (eval_dir / "report.html").write_text(render_html(report), encoding="utf-8")
    return report

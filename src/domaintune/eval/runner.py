"""`run_eval`: every model on the same prompts, every metric, deltas with bootstrap CIs, retention, gates.

Outputs in `<run>/eval/`: predictions.jsonl (the answer cache), perplexity.jsonl and judge.jsonl
(caches), items.jsonl (per item: prompt, reference, every model's answer and scores), report.json and
report.html.
"""

from __future__ import annotations

import logging
import math
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeGuard

import numpy as np

from domaintune.errors import UserError
from domaintune.eval import metrics as M
from domaintune.eval.engine_check import (
    check_engine_agreement,
    engine_summary,
    perplexity_agreement,
    transformers_twin,
)
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
from domaintune.eval.sets import (
    RETENTION,
    default_general_file,
    resolve_sets,
    set_concentration,
    set_gate_values,
    set_sections,
)
from domaintune.eval.shared_base import SharedBase
from domaintune.eval.stats import paired_bootstrap_delta
from domaintune.eval.verifiers import add_to_report as add_verifier_metrics
from domaintune.hardware.autoselect import Choice, choose_precision
from domaintune.layout import RunLayout
from domaintune.model.thinking import answer_text
from domaintune.utils.io import read_jsonl, write_json, write_jsonl

if TYPE_CHECKING:
    from domaintune.config import ProjectConfig
    from domaintune.eval.config import EvalConfig

log = logging.getLogger(__name__)

_ALIASES = {"rouge1": "rouge1_char", "rouge2": "rouge2_char", "rougeL": "rougeL_char"}

# set -> model -> one row per item: answer rows (prediction, latency, ...) and (nll sum, tokens) of the reference
_Answers = dict[str, dict[str, list[dict[str, Any]]]]
_Nll = dict[str, dict[str, list[tuple[float, int]]]]


def run_eval(cfg: ProjectConfig, layout: RunLayout, *, shared_base: Path | None = None) -> dict[str, Any]:
    """Evaluate every configured model; write eval/{predictions,items}.jsonl, report.json, report.html.

    `shared_base`: a folder of base-model answers and perplexities shared with other runs (a sweep's
    `shared_eval/`, `domaintune.eval.shared_base`): read before answering, this run's base rows added after."""
    import torch

    from domaintune.hardware.autoselect import apply_threads

    threads = torch.get_num_threads()
    apply_threads(cfg.eval.num_threads)  # auto: one per usable physical core
    try:
        return _run_eval(cfg, layout, shared_base)
    finally:
        torch.set_num_threads(threads)


def _run_eval(cfg: ProjectConfig, layout: RunLayout, shared_base: Path | None = None) -> dict[str, Any]:
    started = time.perf_counter()
    ecfg = cfg.eval
    layout.eval_dir.mkdir(parents=True, exist_ok=True)
    _check_rules(ecfg)
    notes: list[str] = []
    sets = _load_sets(cfg, layout, notes)
    checked = {
        name: _check_contamination(cfg, layout, name, items, sets.files[name], notes)
        for name, items in sets.items.items()
    }
    contamination = checked["test"]
    glossary = _load_glossary(ecfg, notes)

    models = build_models(cfg, layout)
    gens = _Generations(cfg, layout.eval_dir)
    nll_cache = JsonlCache(layout.eval_dir / "perplexity.jsonl")
    shared = SharedBase(shared_base, cfg, _seed(cfg)) if shared_base is not None else None
    if shared is not None:
        shared.seed(gens.cache, nll_cache)
    answers, nll = _answer_every_set(models, sets, gens, nll_cache, cfg, notes)
    scored = _score_every_set(sets, answers, nll, ecfg, glossary)
    t0 = time.perf_counter()
    engine = _check_engine(models, sets, answers, nll, gens, nll_cache, cfg)
    gens.phase_s["engine_check"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    robustness = _robustness(sets.items["test"], models, gens, scored.per_item["test"], ecfg, _seed(cfg))
    gens.phase_s["robustness"] = time.perf_counter() - t0
    if shared is not None:
        shared.store(gens.cache, nll_cache)
    for model in models:
        model.unload()
    judge = _judge(sets.items["test"], answers["test"], models, ecfg, layout.eval_dir)
    _add_judge_scores(judge, scored, ecfg, notes)

    names = [m.name for m in models]
    ref = "base" if "base" in names else None
    deltas, retained = _compare_with_base(sets, scored, nll, names, ref, ecfg, _seed(cfg), notes)
    retention = next(iter(retained.values()), {})  # the first retention set's (`general`)
    concentration = {
        name: set_concentration(items, scored.per_item[name], ref, ecfg, _seed(cfg))
        for name, items in sets.items.items()
    }
    for model in models:
        notes.extend(f"{model.name}: {n}" for n in model.notes)

    stratum_field = detect_stratum_field(sets.items["test"], ecfg.stratum_field)
    report: dict[str, Any] = {
        **_header(cfg, layout, sets, models, gens),
        "engine": engine,
        "perplexity_precision": _perplexity_precision(models, gens.scoring),
        "metrics": scored.aggregate,
        "deltas": deltas,
        "retention": retention,
        "robustness": robustness,
        **_error_analysis(sets, answers, scored, names, ref, stratum_field, ecfg),
        "contamination": contamination,
        "judge": {k: v for k, v in judge.items() if k != "per_item"},
        "cache": {
            "answers_reused": gens.cache.hits,
            "answers_generated": gens.generated,
            "perplexity_reused": nll_cache.hits,
            "shared_base_rows": shared.seeded if shared is not None else None,
        },
        "notes": notes,
    }
    report["sets"] = set_sections(report, sets.kinds, checked, retained, concentration)
    report["concentration"] = ecfg.concentration.model_dump()  # the alarm's thresholds
    report["gate_values"] = dict(sorted(_flat_values(report).items()))
    add_verifier_metrics(report, cfg, sets.items["test"], answers["test"], _seed(cfg))  # verifiers, reward model
    report["gates"] = evaluate_gates(ecfg.gates, report["gate_values"])
    report["timing"] = _timing(started, gens)
    _write_outputs(layout, sets, answers, scored, stratum_field, report)
    return report


def _timing(started: float, gens: _Generations) -> dict[str, Any]:
    return {
        "wall_s": time.perf_counter() - started,
        # the scored sets' answers, per model (engine check and robustness answers are in their phases)
        "generation_s": dict(gens.generation_s),
        "perplexity_s": dict(gens.perplexity_s),
        **{f"{phase}_s": seconds for phase, seconds in gens.phase_s.items()},
    }


# ---------------------------------------------------------------------- the steps of _run_eval, in order


def _check_rules(ecfg: EvalConfig) -> None:
    """Malformed gates and a non-text primary metric fail before any model loads."""
    for gate in ecfg.gates:
        parse_gate(gate)
    _metric_family(ecfg.primary_metric)


def _metric_family(metric: str) -> str:
    for family in ("rouge", "bleu", "chrf", "exact_match", "token_f1"):
        if metric.startswith(family):
            return family
    raise UserError(
        f"eval.primary_metric {metric!r}: use a text metric (rouge1/2/L_char, rouge*_word, bleu, chrf, "
        "exact_match, token_f1)"
    )


@dataclass
class _Sets:
    """The evaluation sets by name (eval.sets: `test` first, out-of-source sets, `general` when there is one), the
    file each came from and what it measures (in_distribution, out_of_source, retention)."""

    items: dict[str, list[Item]]
    files: dict[str, Path]
    kinds: dict[str, str] = field(default_factory=dict)


def _load_sets(cfg: ProjectConfig, layout: RunLayout, notes: list[str]) -> _Sets:
    ecfg = cfg.eval
    sets = _Sets({}, {})
    for spec in resolve_sets(ecfg, layout):
        if spec.kind == RETENTION:
            _refuse_replayed_retention_set(cfg, layout, spec.file)
        if spec.optional and not spec.file.is_file():
            notes.append(f"retention skipped: no general set at {spec.file}")
            continue
        sets.items[spec.name] = load_items(spec.file, spec.max_items, spec.name, ecfg.system_prompt)
        sets.files[spec.name] = spec.file
        sets.kinds[spec.name] = spec.kind
    return sets


def _training_files(cfg: ProjectConfig, layout: RunLayout) -> list[Path]:
    """The data that trained the model: the run's train split, and the replay pool when replay was on."""
    files = [layout.train_file] if layout.train_file.is_file() else []
    replay = cfg.train.replay
    if replay.ratio > 0:
        pool = Path(replay.path) if replay.path else layout.general_file
        if pool.is_file():
            files.append(pool)
    return files


def _check_contamination(
    cfg: ProjectConfig, layout: RunLayout, name: str, items: list[Item], test_file: Path, notes: list[str]
) -> dict[str, Any]:
    """Refuse to score a set (any of eval.sets) whose prompts the model saw in training (unless eval.allow_overlap)."""
    from domaintune.data.overlap import find_overlaps

    ecfg = cfg.eval
    files = _training_files(cfg, layout)
    asked = [{"id": it.id, "messages": it.prompt} for it in items]
    found = []
    for path in files:
        found += find_overlaps(read_jsonl(path), asked, near_threshold=ecfg.overlap_near_threshold)
    kinds = Counter(o.kind for o in found)
    result = {
        "checked_against": [str(p) for p in files],
        "overlaps": len(found),
        "by_kind": dict(kinds),
        "test_ids": sorted({o.matched_id for o in found})[:50],
        "allowed": ecfg.allow_overlap,
    }
    if not found:
        return result
    pairs = ", ".join(f"{name} {o.matched_id} ~ train {o.row_id} ({o.kind})" for o in found[:10])
    message = (
        f"{test_file}: {len({o.matched_id for o in found})} {name} prompt(s) were seen in training ({pairs}"
        f"{', ...' if len(found) > 10 else ''})"
    )
    if not ecfg.allow_overlap:
        raise UserError(message + "; re-run the data stage (it removes such rows) or set eval.allow_overlap: true")
    notes.append("CONTAMINATED (eval.allow_overlap): " + message)
    return result


def _default_general_file(layout: RunLayout) -> Path:
    return default_general_file(layout)


def _refuse_replayed_retention_set(cfg: ProjectConfig, layout: RunLayout, general_file: Path) -> None:
    """Retention on rows the model was trained on (replay) would report no forgetting however much there was."""
    replay = cfg.train.replay
    if replay.ratio <= 0:
        return
    replay_file = Path(replay.path) if replay.path else layout.general_file
    if replay_file.resolve() == general_file.resolve():
        raise UserError(
            f"eval.general_file: {general_file} is also the replay set (train.replay.ratio={replay.ratio}), so "
            "retention would be measured on trained rows; set data.general.holdout > 0 (the data stage then writes "
            "data/general_holdout.jsonl) or point eval.general_file at a held-out file"
        )


def _load_glossary(ecfg: EvalConfig, notes: list[str]) -> list[str] | None:
    if "term_coverage" not in ecfg.metrics:
        return None
    if not ecfg.glossary:
        notes.append("term coverage skipped: no eval.glossary file configured")
        return None
    return M.load_glossary(ecfg.glossary)


def _answer_every_set(
    models: list[EvalModel],
    sets: _Sets,
    gens: _Generations,
    nll_cache: JsonlCache,
    cfg: ProjectConfig,
    notes: list[str],
) -> tuple[_Answers, _Nll]:
    """Each model in turn (base, tuned, then the others) answers every set; local models also score the
    references (llama.cpp on each answer's prompt as the answer ends; transformers in a pass of its own)."""
    ecfg = cfg.eval
    answers: _Answers = {name: {} for name in sets.items}
    nll: _Nll = {name: {} for name in sets.items}
    for model in models:
        for set_name, items in sets.items.items():
            scoring = "perplexity" in ecfg.metrics and model.kind == "local"
            keys = _nll_keys(model, items, cfg, gens.scoring.value) if scoring else []
            sink = _NllSink(model, set_name, items, keys, nll_cache) if scoring and model.scorer == "llamacpp" else None
            answers[set_name][model.name] = gens.answers(
                model, set_name, [it.id for it in items], [it.prompt for it in items], sink
            )
            if scoring:
                t0 = time.perf_counter()
                nll[set_name][model.name] = _nll_rows(model, items, keys, nll_cache, cfg, set_name, gens.scoring.value)
                gens.perplexity_s[model.name] += time.perf_counter() - t0
            elif "perplexity" in ecfg.metrics and set_name == "test":
                notes.append(f"perplexity not available for endpoint model {model.name!r} (no log-probs)")
        if not ecfg.robustness.enabled or model.name not in _robust_models(ecfg):
            model.unload()  # robustness asks the kept ones again later
    return answers, nll


class _NllSink:
    """Reference scores that arrive with the answers (llama.cpp scores a reference on its answer's prompt)."""

    def __init__(self, model: EvalModel, set_name: str, items: list[Item], keys: list[str], cache: JsonlCache):
        self.model, self.set_name, self.items, self.keys, self.cache = model, set_name, items, keys, cache

    def references(self, todo: list[int]) -> list[str] | None:
        """The references to score with these answers (None: every one already has its score)."""
        if all(self.keys[i] in self.cache.rows for i in todo):
            return None
        return [self.items[i].reference for i in todo]

    def put(self, i: int, scored: tuple[float, int] | None) -> None:
        if scored is not None:
            self.cache.put(_nll_row(self.keys[i], self.model, self.set_name, self.items[i], *scored))


def _check_engine(
    models: list[EvalModel],
    sets: _Sets,
    answers: _Answers,
    nll: _Nll,
    gens: _Generations,
    nll_cache: JsonlCache,
    cfg: ProjectConfig,
) -> dict[str, Any]:
    """Which engine answered and scored, and (llama.cpp) how its first test answers and reference perplexity
    compare with transformers' own."""
    ecfg = cfg.eval
    summary = engine_summary(models)
    summary["check"] = check_engine_agreement(
        models,
        sets.items["test"],
        answers["test"],
        ecfg.engine_check_items,
        ecfg.primary_metric,
        lambda model, ids, prompts: gens.answers(model, "engine_check", ids, prompts),
    )
    sample = sets.items["test"][: ecfg.engine_check_items]
    for model in models:
        if model.scorer != "llamacpp" or not sample or model.name not in nll["test"]:
            continue
        twin = transformers_twin(model)
        try:
            keys = _nll_keys(twin, sample, cfg, gens.scoring.value)
            slow = _nll_rows(twin, sample, keys, nll_cache, cfg, "engine_check", gens.scoring.value)
        finally:
            twin.unload()
        fast = nll["test"][model.name][: len(sample)]
        summary["check"].setdefault(model.name, {}).update(perplexity_agreement(fast, slow, gens.scoring.value))
    return summary


def _perplexity_precision(models: list[EvalModel], transformers_precision: Choice) -> dict[str, str]:
    """What reference perplexity was computed in, and why (the same for every local model)."""
    if any(m.scorer == "llamacpp" for m in models):
        return {
            "value": "q8_0 (llama.cpp)",
            "reason": "eval.perplexity_engine: each reference scored by the q8_0 GGUF that answers, in its "
            "answer's prompt, the prompt processed once (transformers' figures on the engine-check items: report engine.check)",
        }
    return {"value": transformers_precision.value, "reason": transformers_precision.reason}


class _Generations:
    """Answers per (set, model), through the cache."""

    def __init__(self, cfg: ProjectConfig, eval_dir: Path):
        self.cfg = cfg
        self.seed = _seed(cfg)
        self.settings = decoding_key(cfg.eval.decoding, self.seed)
        self.cache = JsonlCache(eval_dir / "predictions.jsonl")
        self.generated = 0
        self.generation_s: dict[str, float] = defaultdict(float)
        self.perplexity_s: dict[str, float] = defaultdict(float)  # kept here so every phase's time is in one place
        self.phase_s: dict[str, float] = {}
        self.scoring = _scoring_precision(cfg.eval)  # the reference-perplexity precision, for every model

    def answers(
        self,
        model: EvalModel,
        set_name: str,
        ids: list[str],
        prompts: list[list[dict]],
        nll_sink: _NllSink | None = None,
    ) -> list[dict]:
        """Cached answers, the missing ones generated (with `nll_sink`: their references scored meanwhile)."""
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
                    if nll_sink is not None:
                        nll_sink.put(i, answer.nll)
                self.cache.save()
                if nll_sink is not None:
                    nll_sink.cache.save()

            t0 = time.perf_counter()
            references = nll_sink.references(todo) if nll_sink is not None else None
            scoring: dict[str, Any] = {}
            if references is not None:
                scoring = {"references": references, "perplexity_max_tokens": self.cfg.eval.perplexity_max_tokens}
            model.generate(
                [prompts[i] for i in todo],
                self.cfg.eval.decoding,
                self.seed,
                desc=f"{model.name} · {set_name}" + (" (+ perplexity)" if references is not None else ""),
                on_batch=store,
                **scoring,
            )
            if set_name != "engine_check" and not set_name.startswith("robust-"):
                self.generation_s[model.name] += time.perf_counter() - t0
            self.generated += len(todo)
        return _filled(rows, f"{model.name} · {set_name}")


def _filled(rows: list[dict[str, Any] | None], what: str) -> list[dict[str, Any]]:
    """Rows with every slot filled (a model that skipped a prompt is a bug, not an answer)."""
    done = [row for row in rows if row is not None]
    if len(done) != len(rows):
        raise RuntimeError(f"{what}: {len(rows) - len(done)} of {len(rows)} items got no result")
    return done


def _scoring_precision(ecfg: EvalConfig) -> Choice:
    """eval.perplexity_precision: auto is bf16 where the hardware does it natively (never fp16: its range
    overflows on long references), fp32 otherwise."""
    if ecfg.perplexity_precision != "auto":
        return Choice(ecfg.perplexity_precision, "eval.perplexity_precision")
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    chosen = choose_precision("auto", device)
    if chosen.value == "bf16":
        return Choice("bf16", f"eval.perplexity_precision={chosen.reason}")
    return Choice("fp32", f"eval.perplexity_precision=auto: fp32 ({chosen.reason.removeprefix('auto: ')})")


def _nll_keys(model: EvalModel, items: list[Item], cfg: ProjectConfig, precision: str) -> list[str]:
    # "scorer": which engine scored (transformers rows in a precision; llama.cpp rows on the q8_0 GGUF, on the
    # prompt ids it answered from), so rows of one are never reused for the other
    settings: dict[str, Any] = {"max_tokens": cfg.eval.perplexity_max_tokens, "scorer": "transformers"}
    if model.scorer == "llamacpp":
        settings.update(scorer="llamacpp-q8_0", max_prompt_tokens=cfg.eval.decoding.max_prompt_tokens)
    elif precision != "fp32":  # fp32 rows keep the keys they always had
        settings["precision"] = precision
    return [cache_key("nll", model.identity, [it.prompt, it.reference], settings) for it in items]


def _nll_row(key: str, model: EvalModel, set_name: str, item: Item, nll: float, n: int) -> dict[str, Any]:
    return {"key": key, "model": model.name, "set": set_name, "item_id": item.id, "nll": nll, "tokens": n}


def _nll_rows(
    model: EvalModel,
    items: list[Item],
    keys: list[str],
    cache: JsonlCache,
    cfg: ProjectConfig,
    set_name: str,
    precision: str,
) -> list[tuple[float, int]]:
    """Every item's (NLL, tokens): from the cache, the missing ones scored now."""
    rows = [cache.get(k) for k in keys]
    todo = [i for i, r in enumerate(rows) if r is None]
    if todo:
        by = "llama.cpp q8_0" if model.scorer == "llamacpp" else precision
        computed = model.reference_nll(
            [items[i].prompt for i in todo],
            [items[i].reference for i in todo],
            max_length=cfg.eval.perplexity_max_tokens,
            batch_size=max(1, cfg.eval.decoding.batch_size // 2),
            desc=f"{model.name} · perplexity {set_name} ({by})",
            precision=precision,
            max_prompt_tokens=cfg.eval.decoding.max_prompt_tokens,
        )
        for i, (nll, n) in zip(todo, computed):
            row = _nll_row(keys[i], model, set_name, items[i], nll, n)
            rows[i] = row
            cache.put(row)
        cache.save()
    return [(r["nll"], r["tokens"]) for r in _filled(rows, f"{model.name} · perplexity {set_name}")]


def _robust_models(ecfg: EvalConfig) -> list[str]:
    models = ecfg.robustness.models
    return ["base", "tuned"] if models is None else list(models)


@dataclass
class _Scored:
    """Per set and model: each item's scores, and the aggregate metrics."""

    per_item: dict[str, dict[str, list[dict[str, Any]]]]
    aggregate: dict[str, dict[str, dict[str, float | None]]]


def _score_every_set(
    sets: _Sets, answers: _Answers, nll: _Nll, ecfg: EvalConfig, glossary: list[str] | None
) -> _Scored:
    scored = _Scored({}, {})
    for set_name, items in sets.items.items():
        per_item, aggregate = _score_set(items, answers[set_name], ecfg, glossary)
        for name, rows in nll[set_name].items():
            aggregate[name]["perplexity"] = perplexity(rows)
            aggregate[name]["reference_tokens"] = sum(n for _, n in rows)
            for s, (total, n) in zip(per_item[name], rows):
                s["nll_per_token"] = total / n if n else None
        scored.per_item[set_name], scored.aggregate[set_name] = per_item, aggregate
    return scored


def _score_set(
    items: list[Item], answers: dict[str, list[dict]], ecfg: EvalConfig, glossary: list[str] | None
) -> tuple[dict[str, list[dict]], dict[str, dict[str, float | None]]]:
    """Per-item scores and aggregate metrics for every model on one set."""
    per_item: dict[str, list[dict]] = {}
    aggregate: dict[str, dict[str, float | None]] = {}
    gold = [classification_gold(it) for it in items]
    labels = sorted({g for g in gold if g is not None})
    references = [answer_text(it.reference) for it in items]  # a reasoning model's answer after its <think> block
    for name, rows in answers.items():
        scores = []
        predictions = [answer_text(row["prediction"]) for row in rows]
        for it, reference, prediction, g in zip(items, references, predictions, gold):
            s = M.score_item(prediction, reference, ecfg.metrics, glossary)
            if it.tool_calls:  # tool_json_valid, tool_name_acc, tool_args_exact: items that expect calls
                s.update(M.tool_call_scores(prediction, it.tool_calls))
            if g is not None and "classification" in ecfg.metrics:
                s["pred_label"] = M.predicted_label(prediction, labels)
                s["accuracy"] = 100.0 if s["pred_label"] == g else 0.0
            scores.append(s)
        per_item[name] = scores
        agg = _aggregate([{k: v for k, v in s.items() if k != "pred_label"} for s in scores])
        if "bleu" in ecfg.metrics:
            agg["bleu_corpus"] = M.corpus_bleu(predictions, references)
        if labels and "classification" in ecfg.metrics:
            labelled = [(g, s["pred_label"]) for g, s in zip(gold, scores) if g is not None]
            agg.update(M.classification_scores([g for g, _ in labelled], [p for _, p in labelled]))
            agg["classification_items"] = len(labelled)
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


def _aggregate(per_item: list[dict[str, Any]]) -> dict[str, float | None]:
    sums: dict[str, list[float]] = defaultdict(list)
    for scores in per_item:
        for name, value in scores.items():
            if _finite(value):
                sums[name].append(float(value))
    return {name: float(np.mean(values)) for name, values in sums.items()}


def _robustness(
    items: list[Item],
    models: list[EvalModel],
    gens: _Generations,
    per_item_clean: dict[str, list[dict[str, Any]]],
    ecfg: EvalConfig,
    seed: int,
) -> dict[str, Any]:
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


def _judge(
    items: list[Item],
    answers: dict[str, list[dict[str, Any]]],
    models: list[EvalModel],
    ecfg: EvalConfig,
    eval_dir: Path,
) -> dict[str, Any]:
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


def _add_judge_scores(judge: dict[str, Any], scored: _Scored, ecfg: EvalConfig, notes: list[str]) -> None:
    if "per_item" in judge:
        for name, scores in judge["per_item"].items():
            for s, j in zip(scored.per_item["test"][name], scores):
                s["judge_score"] = j
        for name, j in judge["models"].items():
            scored.aggregate["test"][name]["judge_score"] = j["judge_score"]
    elif "judge" in ecfg.metrics:
        notes.append(f"judge: {judge['skipped']}")


def _compare_with_base(
    sets: _Sets,
    scored: _Scored,
    nll: _Nll,
    names: list[str],
    ref: str | None,
    ecfg: EvalConfig,
    seed: int,
    notes: list[str],
) -> tuple[dict[str, dict[str, dict]], dict[str, dict[str, dict]]]:
    """Deltas with paired bootstrap CIs of every model against base on every set, and retention (per retention
    set, per model)."""
    deltas: dict[str, dict[str, dict]] = {s: {} for s in sets.items}
    retention: dict[str, dict[str, dict]] = {}
    if ref is None:
        notes.append("no base model evaluated: deltas and retention need eval.base: true")
        return deltas, retention
    others = [name for name in names if name != ref]
    for set_name in sets.items:
        for other in others:
            deltas[set_name][other] = _deltas(
                scored.per_item[set_name], scored.aggregate[set_name], nll[set_name], ref, other, ecfg, seed
            )
    for set_name in [s for s in sets.items if sets.kinds.get(s) == RETENTION]:
        retention[set_name] = {}
        for other in others:
            entry = retention[set_name][other] = _retention(scored.aggregate[set_name], ref, other, ecfg.primary_metric)
            if entry["ratio"] is None:
                notes.append(f"retention of {other}: base scores 0 on the {set_name} set, ratio undefined")
    return deltas, retention


def _deltas(
    per_item: dict[str, list[dict[str, Any]]],
    aggregate: dict[str, dict[str, float | None]],
    nll: dict[str, list[tuple[float, int]]],
    ref_model: str,
    other: str,
    ecfg: EvalConfig,
    seed: int,
) -> dict[str, dict]:
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


def _paired(per_item: dict[str, list[dict]], a: str, b: str, metric: str) -> tuple[list[float], list[float]]:
    xs, ys = [], []
    for sa, sb in zip(per_item[a], per_item[b]):
        va, vb = sa.get(metric), sb.get(metric)
        if _finite(va) and _finite(vb):
            xs.append(float(va))
            ys.append(float(vb))
    return xs, ys


def _retention(aggregate: dict[str, dict[str, float | None]], ref: str, other: str, metric: str) -> dict[str, Any]:
    b = aggregate[ref].get(metric)
    t = aggregate[other].get(metric)
    ratio = (t / b) if _finite(b) and _finite(t) and b > 0 else None
    entry = {"metric": metric, "base": b, "model": t, "ratio": ratio}
    ppl_b = aggregate[ref].get("perplexity")
    ppl_t = aggregate[other].get("perplexity")
    if _finite(ppl_b) and _finite(ppl_t):
        entry["perplexity_ratio"] = ppl_t / ppl_b
    return entry


def _header(
    cfg: ProjectConfig, layout: RunLayout, sets: _Sets, models: list[EvalModel], gens: _Generations
) -> dict[str, Any]:
    """What was compared and how: the report's first entries."""
    import torch

    ecfg = cfg.eval
    return {
        "project": cfg.name,
        "output_dir": str(layout.root),
        "models": {m.name: {"kind": m.kind, "identity": m.identity, "description": m.description} for m in models},
        "sets": {
            name: {
                "file": str(sets.files[name]),
                "n_items": len(items),
                "language": "zh" if sum(M.has_cjk(it.reference) for it in items) * 2 >= len(items) else "other",
            }
            for name, items in sets.items.items()
        },
        "decoding": {**gens.settings, "batch_size": ecfg.decoding.batch_size, "greedy": ecfg.decoding.temperature == 0},
        "torch_threads": torch.get_num_threads(),
        "latency_note": (
            f"local models: an answer's latency is the wall time of its batch (up to {ecfg.decoding.batch_size} "
            "prompts, CPU/GPU shared with other work); endpoints: one request each; tokens/s counts generated "
            "tokens over busy time; cached answers keep the timings of the run that generated them"
        ),
        "primary_metric": ecfg.primary_metric,
    }


def _error_analysis(
    sets: _Sets,
    answers: _Answers,
    scored: _Scored,
    names: list[str],
    ref: str | None,
    stratum_field: str | None,
    ecfg: EvalConfig,
) -> dict[str, Any]:
    """Per-stratum scores and the worst items of the model in focus (tuned, else the first non-base model)."""
    focus = "tuned" if "tuned" in names else (next((n for n in names if n != ref), names[0]))
    test, per_item = sets.items["test"], scored.per_item["test"]
    return {
        "strata": _strata(test, per_item, stratum_field, ecfg.primary_metric),
        "worst": _worst_cases(
            test,
            per_item,
            answers["test"],
            focus,
            ref if focus != ref else None,
            ecfg.primary_metric,
            ecfg.worst_n,
        ),
    }


def _strata(
    items: list[Item], per_item: dict[str, list[dict[str, Any]]], field: str | None, metric: str
) -> dict[str, Any]:
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


def _worst_cases(
    items: list[Item],
    per_item: dict[str, list[dict[str, Any]]],
    answers: dict[str, list[dict[str, Any]]],
    focus: str,
    ref: str | None,
    metric: str,
    n: int,
) -> dict[str, list]:
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
    values.update(set_gate_values(report["sets"], main))  # sets.<name>.<...> for every set, test included
    for alias, target in _ALIASES.items():
        for key in list(values):
            if target in key:
                values.setdefault(key.replace(target, alias), values[key])
    return values


def _write_outputs(
    layout: RunLayout,
    sets: _Sets,
    answers: _Answers,
    scored: _Scored,
    stratum_field: str | None,
    report: dict[str, Any],
) -> None:
    """items.jsonl (every item with every model's answer and scores), report.json and report.html."""
    from domaintune.eval.report import render_html

    item_rows = []
    for set_name, items in sets.items.items():
        for i, it in enumerate(items):
            item_rows.append(
                {
                    "set": set_name,
                    "id": it.id,
                    "prompt": it.prompt,
                    "reference": it.reference,
                    "stratum": it.row.get(stratum_field) if stratum_field else None,
                    "answers": {name: rows[i]["prediction"] for name, rows in answers[set_name].items()},
                    "scores": {name: scores[i] for name, scores in scored.per_item[set_name].items()},
                }
            )
    write_jsonl(layout.eval_items, item_rows)
    write_json(layout.eval_report, report)
    (layout.eval_dir / "report.html").write_text(render_html(report), encoding="utf-8")


def _seed(cfg: ProjectConfig) -> int:
    return cfg.eval.decoding.seed if cfg.eval.decoding.seed is not None else cfg.seed


def _finite(x: object) -> TypeGuard[float]:
    """A measured number (an int counts; None and NaN do not)."""
    return isinstance(x, (int, float)) and not (isinstance(x, float) and math.isnan(x))

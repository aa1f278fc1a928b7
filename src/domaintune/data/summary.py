"""`build_report`: data/report.json from the ledger and what each step recorded (report.html draws it)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from domaintune.data.clean import Cleaning
from domaintune.data.decontaminate import HeldOut
from domaintune.data.guards import Finding
from domaintune.data.ledger import Ledger
from domaintune.data.split import HOLDOUT, HOLDOUT_DEV, Plan
from domaintune.data.write import Written
from domaintune.layout import SPLIT_NAMES, RunLayout

if TYPE_CHECKING:
    from domaintune.config import ProjectConfig

# the dropping stages in order, with what each drops (the funnel's rows)
FUNNEL_STAGES = (
    ("parse", "unparseable input (broken JSON, wrong column count, undecodable bytes, ...)"),
    ("map", "records that cannot be mapped to training fields"),
    ("filter", "empty/missing fields, length, tokens, repetition, language"),
    ("dedup_exact", "exact duplicates (normalised text hash)"),
    ("dedup_near", "near duplicates (MinHash-LSH)"),
    ("outlier", "length outliers (k·σ)"),
    ("split", "rows the split could not place"),
    ("decontaminate", "train rows repeating a val/test/holdout prompt, val rows repeating a test/holdout prompt"),
    ("sample", "sampled out by data.sample caps"),
)


@dataclass
class SplitChecks:
    """What was checked on the finished split: its groups, the prompt overlaps between splits, the guards."""

    groups: dict[str, Any]
    leakage: list[dict[str, Any]]
    findings: list[Finding]


def build_report(
    cfg: ProjectConfig,
    layout: RunLayout,
    workers: int,
    ledger: Ledger,
    cleaning: Cleaning,
    plan: Plan,
    held: HeldOut,
    written: Written,
    general: dict[str, Any] | None,
    checks: SplitChecks,
) -> dict[str, Any]:
    dc = cfg.data
    sources = ledger.summary()
    return {
        "project": cfg.name,
        "output_dir": os.path.abspath(layout.data_dir),
        "workers": workers,
        "engine": dc.engine,
        "format": dc.format,
        "sources": sources,
        "balanced": all(s["balanced"] for s in sources.values()),
        "totals": {
            "input": sum(s["input"] for s in sources.values()),
            "kept": sum(s["kept_total"] for s in sources.values()),
            "dropped": sum(s["dropped_total"] for s in sources.values()),
            "quarantined": ledger.quarantined,
        },
        "funnel": funnel(ledger, cleaning, written),
        "drop_reasons": ledger.drop_reasons(),
        "normalise": {"rows_changed": cleaning.normalised},
        "pii": {"rows_changed": cleaning.pii_rows, "counts": dict(cleaning.pii_counts)},
        "dedup": cleaning.dedup.report(
            ledger.dropped_at("dedup_exact"), ledger.dropped_at("dedup_near"), written.snippets
        ),
        "outliers": plan.outliers,
        "decontaminate": held.report(),
        "leakage": {"near_threshold": dc.decontaminate.near_threshold, "pairs": checks.leakage},
        "guards": {
            **dc.guards.model_dump(),
            "violations": [f.as_dict() for f in checks.findings],
        },
        "split": {
            "by": dc.split.by,
            "ratios": dc.split.ratios,
            "seed": plan.seed,
            "field": dc.split.stratify_field or dc.split.time_field,
            "sizes": {s: written.sizes[s] for s in SPLIT_NAMES},
            "sizes_before_sampling": {s: plan.before_sampling[s] for s in SPLIT_NAMES},
            "per_stratum": {s: dict(sorted(written.strata[s].items())) for s in SPLIT_NAMES},
            "difficulty": {s: dict(written.difficulty[s]) for s in SPLIT_NAMES},
            "difficulty_tiers": plan.tiers,
            "groups": checks.groups,
        },
        "sample": dc.sample.model_dump(),
        "lengths": {
            "mapped_chars": hist_summary(cleaning.input_lengths),
            "kept_chars": hist_summary(written.lengths),
            "kept_answer_chars": hist_summary(written.answer_lengths),
        },
        "holdout": _holdout(cfg, layout, plan, held, written, sources),
        "general": general,
        "augment": written.augment,
    }


def _holdout(
    cfg: ProjectConfig, layout: RunLayout, plan: Plan, held: HeldOut, written: Written, sources: dict[str, Any]
) -> dict[str, Any] | None:
    """The held-out group (data.split.holdout_group): what was asked, what it matched, and what was written."""
    hg = cfg.data.split.holdout_group
    if hg is None or plan.holdout is None:
        return None
    return {
        **plan.holdout,
        "file": layout.relative(layout.holdout_file(hg.name)),  # relative: the report is the same wherever it runs
        "rows": written.sizes[HOLDOUT],
        "before_sampling": plan.before_sampling[HOLDOUT],
        "max_rows": hg.max_rows,
        "by_source": {name: s["kept"].get(HOLDOUT, 0) for name, s in sources.items()},
        "per_stratum": dict(sorted(written.strata[HOLDOUT].items())),
        "decontaminated_against": held.before[HOLDOUT] > 0,
        "dev": _holdout_dev(hg.name, layout, plan, written, sources) if hg.dev_rows else None,
    }


def _holdout_dev(name: str, layout: RunLayout, plan: Plan, written: Written, sources: dict[str, Any]) -> dict[str, Any]:
    """The selection part of the holdout (holdout_group.dev_rows): drawn before max_rows, written apart."""
    assert plan.holdout is not None
    return {
        "set": f"{name}_dev",  # the eval set that reads it
        "file": layout.relative(layout.holdout_dev_file(name)),
        "dev_rows": plan.holdout["dev_rows"],
        "drawn": plan.holdout["dev_drawn"],
        "rows": written.sizes[HOLDOUT_DEV],
        "by_source": {src: s["kept"].get(HOLDOUT_DEV, 0) for src, s in sources.items()},
        "per_stratum": dict(sorted(written.strata[HOLDOUT_DEV].items())),
    }


def funnel(ledger: Ledger, cleaning: Cleaning, written: Written) -> list[dict[str, Any]]:
    """Rows in, dropped and out per stage, from the input to the written splits."""
    current = ledger.rows_in
    rows = [_stage("input", current, 0, "records read (general set excluded)")]
    for stage, note in FUNNEL_STAGES:
        if stage == "filter":  # in-place stages before the filters: rows changed, none dropped
            rows.append(
                _stage("normalise", current, 0, "NFKC, HTML, control characters, whitespace", cleaning.normalised)
            )
            rows.append(_stage("pii", current, 0, "rows with PII replaced by typed placeholders", cleaning.pii_rows))
        dropped = ledger.dropped_at(stage)
        rows.append(_stage(stage, current, dropped, note))
        current -= dropped
    note = ", ".join(f"{s}={written.sizes[s]}" for s in SPLIT_NAMES)
    for place in (HOLDOUT, HOLDOUT_DEV):
        if written.sizes[place]:
            note += f", {place}={written.sizes[place]}"
    rows.append(
        {"stage": "output", "rows_in": current, "dropped": 0, "rows_out": sum(written.sizes.values()), "note": note}
    )
    return rows


def _stage(stage: str, rows_in: int, dropped: int, note: str, changed: int | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"stage": stage, "rows_in": rows_in, "dropped": dropped, "rows_out": rows_in - dropped}
    if changed is not None:
        out["changed"] = changed
    out["note"] = note
    return out


def hist_summary(values: Sequence[int]) -> dict[str, Any]:
    if not values:
        return {"count": 0}
    arr = np.asarray(values, dtype=np.float64)
    q = np.quantile(arr, [0.05, 0.5, 0.95])
    return {
        "count": int(arr.size),
        "mean": round(float(arr.mean()), 1),
        "std": round(float(arr.std()), 1),
        "min": int(arr.min()),
        "p5": round(float(q[0]), 1),
        "median": round(float(q[1]), 1),
        "p95": round(float(q[2]), 1),
        "max": int(arr.max()),
    }

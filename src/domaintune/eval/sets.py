"""The named evaluation sets (eval.sets): which file each is read from, what it measures, how many items.

Default (eval.sets unset): `test` (the data stage's test split, in-distribution), every
data/holdout_<name>.jsonl the data stage wrote (data.split.holdout_group, out-of-source; with its dev_rows also
data/holdout_<name>_dev.jsonl, the set `<name>_dev` that recipes are chosen on), and `general`
(retention) when there is one. Every set gets the same metrics, deltas with bootstrap intervals, concentration
alarm and gates (`sets.<name>.<...>`), and every set is checked against the training data.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from domaintune.errors import UserError
from domaintune.eval.concentration import gain_concentration
from domaintune.eval.items import Item, detect_stratum_field
from domaintune.layout import RunLayout

if TYPE_CHECKING:
    from domaintune.eval.config import EvalConfig, EvalSetConfig

IN_DISTRIBUTION, OUT_OF_SOURCE, RETENTION = "in_distribution", "out_of_source", "retention"


@dataclass(frozen=True)
class SetSpec:
    name: str
    kind: str  # in_distribution | out_of_source | retention
    file: Path
    max_items: int | None
    optional: bool = False  # the default retention set: skipped (with a note) when there is none


def default_general_file(layout: RunLayout) -> Path:
    """The retention set: tasks the data stage held out of the replay pool, else the general set itself."""
    return layout.general_holdout_file if layout.general_holdout_file.is_file() else layout.general_file


def resolve_sets(ecfg: EvalConfig, layout: RunLayout) -> list[SetSpec]:
    """The sets to score, `test` first; a named set whose file is missing fails here, naming what writes it."""
    if ecfg.sets is None:
        specs = [_test(ecfg, layout, None)]
        specs += [SetSpec(name, OUT_OF_SOURCE, path, None) for name, path in layout.holdout_files().items()]
        specs.append(_general(ecfg, layout, None))
        return specs
    return [_from_config(entry, ecfg, layout) for entry in ecfg.sets]


def _test(ecfg: EvalConfig, layout: RunLayout, entry: EvalSetConfig | None) -> SetSpec:
    file = Path(entry.file) if entry and entry.file else Path(ecfg.test_file or layout.test_file)
    limit = entry.max_items if entry and entry.max_items else ecfg.max_items
    return SetSpec("test", (entry.kind if entry else None) or IN_DISTRIBUTION, file, limit)


def _general(ecfg: EvalConfig, layout: RunLayout, entry: EvalSetConfig | None) -> SetSpec:
    given = (entry.file if entry else None) or ecfg.general_file
    file = Path(given or default_general_file(layout))
    limit = entry.max_items if entry and entry.max_items else ecfg.max_general_items
    if given and not file.is_file():
        raise UserError(f"eval.{'sets' if entry and entry.file else 'general_file'}: {file} does not exist")
    return SetSpec("general", (entry.kind if entry else None) or RETENTION, file, limit, optional=not given)


def _from_config(entry: EvalSetConfig, ecfg: EvalConfig, layout: RunLayout) -> SetSpec:
    if entry.name == "test":
        return _test(ecfg, layout, entry)
    if entry.name == "general":
        return _general(ecfg, layout, entry)
    # `<name>`: data/holdout_<name>.jsonl; `<name>_dev`: data/holdout_<name>_dev.jsonl, the holdout's selection rows
    file = Path(entry.file) if entry.file else layout.holdout_file(entry.name)
    if not file.is_file():
        writer = f"data.split.holdout_group (name: {entry.name})"
        if entry.name.endswith("_dev"):
            writer += f" or data.split.holdout_group.dev_rows (name: {entry.name.removesuffix('_dev')})"
        how = (
            "give the set a `file:`"
            if entry.file
            else f"the data stage writes it with {writer}, or give the set a `file:`"
        )
        raise UserError(f"eval.sets: set {entry.name!r}: {file} does not exist ({how})")
    return SetSpec(entry.name, entry.kind or OUT_OF_SOURCE, file, entry.max_items)


# ---------------------------------------------------------------------- per-set results: alarm, report, gate names


def set_concentration(
    items: list[Item], per_item: dict[str, list[dict[str, Any]]], ref: str | None, ecfg: EvalConfig, seed: int
) -> dict[str, Any]:
    """The template-learning alarm of every model against `ref` on one set (primary metric, per item)."""
    if not ecfg.concentration.enabled or ref is None or ref not in per_item:
        return {}
    metric = ecfg.primary_metric
    field = _stratum_field(items, ecfg.stratum_field)
    out = {}
    for model, scores in per_item.items():
        if model == ref:
            continue
        both = [
            (i, float(a[metric]), float(b[metric]))
            for i, (a, b) in enumerate(zip(per_item[ref], scores))
            if _finite(a.get(metric)) and _finite(b.get(metric))
        ]
        strata = [str(items[i].row.get(field, "(none)")) for i, _, _ in both] if field else None
        result = gain_concentration(
            [x for _, x, _ in both],
            [y for _, _, y in both],
            [items[i].id for i, _, _ in both],
            strata,
            ecfg.concentration,
            samples=ecfg.bootstrap_samples,
            seed=seed,
        )
        if result["items"]:
            by_id = {it.id: it for it in items}
            result["items"]["questions"] = [by_id[i].question[:300] for i in result["items"]["ids"]]
        out[model] = {"metric": metric, "stratum_field": field, **result}
    return out


def _stratum_field(items: list[Item], configured: str | None) -> str | None:
    """eval.stratum_field when this set's rows have it, else the detected one (department/qtype/category...)."""
    if configured:
        return configured if any(configured in it.row for it in items) else None
    return detect_stratum_field(items, None)


def set_sections(
    report: dict[str, Any],
    kinds: dict[str, str],
    contamination: dict[str, dict[str, Any]],
    retention: dict[str, dict[str, Any]],
    concentration: dict[str, dict[str, Any]],
) -> dict[str, dict[str, Any]]:
    """report.json `sets.<name>`: the set's file, kind and size, and everything measured on it."""
    return {
        name: {
            **report["sets"][name],
            "kind": kinds[name],
            "metrics": per_model,
            "deltas": report["deltas"].get(name, {}),
            "retention": retention.get(name),
            "concentration": concentration.get(name, {}),
            "contamination": contamination[name],
        }
        for name, per_model in report["metrics"].items()
    }


def set_gate_values(sections: dict[str, dict[str, Any]], main: str | None) -> dict[str, Any]:
    """Gate names of every set, `sets.<name>.` + the names the test set has without a prefix: `<model>.<metric>`,
    `<metric>_delta[_ci_low|_ci_high]` (main model - base; other models `<model>.<metric>_delta`), `retention`,
    `gain_concentrated` (1 when the alarm sounds) and, when it does, `<metric>_delta_without_top_items[_ci_low|
    _ci_high]` / `<metric>_delta_without_top_stratum[...]`."""
    values: dict[str, Any] = {}
    for name, sec in sections.items():
        prefix = f"sets.{name}."
        for model, agg in sec["metrics"].items():
            values.update({f"{prefix}{model}.{metric}": v for metric, v in agg.items()})
        for model, deltas in sec["deltas"].items():
            who = prefix if model == main else f"{prefix}{model}."
            for metric, d in deltas.items():
                values.update(_delta_values(f"{who}{metric}_delta", d))
                if metric == "perplexity" and d["base"]:
                    values[f"{who}perplexity_ratio"] = d["model"] / d["base"]
        for model, r in (sec.get("retention") or {}).items():
            values[f"{prefix}retention" if model == main else f"{prefix}{model}.retention"] = r.get("ratio")
        for model, c in sec["concentration"].items():
            who = prefix if model == main else f"{prefix}{model}."
            values[f"{who}gain_concentrated"] = 1.0 if c["flagged"] else 0.0
            for part in ("items", "stratum"):
                entry = c.get(part) or {}
                if entry.get("without"):
                    values.update(_delta_values(f"{who}{c['metric']}_delta_without_top_{part}", entry["without"]))
    return values


def _delta_values(name: str, d: dict[str, Any]) -> dict[str, Any]:
    return {name: d["delta"], f"{name}_ci_low": d["ci_low"], f"{name}_ci_high": d["ci_high"]}


def _finite(x: object) -> bool:
    return isinstance(x, (int, float)) and not (isinstance(x, float) and math.isnan(x))

"""`check_guards`: the finished split, checked before anyone trains on it.

* a step after cleaning (outliers, unparseable dates, decontamination) that removes more than
  `data.guards.max_removed` of a split (or, before the split, of the rows) names itself and its likely cause;
* split shares that stray more than `data.guards.max_ratio_drift` from `data.split.ratios` (before the
  data.sample caps) say why (a large group, decontamination, too few rows);
* an empty train split, or an empty val/test split that the ratios ask for, always fails: there is nothing
  to train or to test on; so does an empty data.split.holdout_group.

`data.guards.on_violation: warn` turns the first two into warnings; the report lists them either way.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any

from domaintune.data.config import DataConfig
from domaintune.data.decontaminate import HeldOut
from domaintune.data.groups import Groups
from domaintune.data.ledger import Ledger
from domaintune.data.split import HOLDOUT, Plan
from domaintune.errors import UserError
from domaintune.layout import SPLIT_NAMES

_CAUSES = {
    "exact": "copies of the same prompt were split across train and val/test (a group larger than a split?)",
    "near": "many prompts are near-identical (a question template?): raise data.decontaminate.near_threshold, "
    "or keep them on one side with data.split.group_by",
    "ngram": "rows share long passages (boilerplate{scope}): use decontaminate.scope: prompt or a longer ngram",
}


@dataclass
class Finding:
    check: str  # removed | ratio | empty
    step: str
    split: str
    message: str
    fatal: bool = False  # fails whatever data.guards.on_violation says

    def as_dict(self) -> dict[str, Any]:
        return {"check": self.check, "step": self.step, "split": self.split, "message": self.message}


def check_guards(
    dc: DataConfig, plan: Plan, held: HeldOut, groups: Groups, sizes: Counter[str], ledger: Ledger
) -> list[Finding]:
    """Every guard that does not hold, in the order the steps ran; `sizes` are the written splits."""
    findings = _removals(dc, plan, held)
    findings += _ratios(dc, plan, held, groups)
    findings += _empties(dc, sizes, ledger, plan)
    return findings


def _share(part: int, whole: int) -> str:
    return f"{part / whole:.1%} ({part:,} of {whole:,} rows)"


def _removals(dc: DataConfig, plan: Plan, held: HeldOut) -> list[Finding]:
    limit = dc.guards.max_removed
    stages = Counter(stage for stage, _ in plan.dropped.values())
    out = []
    checks = [
        ("outlier", "all rows", stages["outlier"], plan.n, _outlier_cause(dc)),
        ("split", "all rows", stages["split"], plan.n - stages["outlier"], _date_cause(dc)),
    ]
    for split in ("train", "val"):
        kinds = held.split_kinds.get(split, Counter())
        breakdown = ", ".join(f"{k} {v:,}" for k, v in kinds.most_common())
        why = f"{_decontamination_cause(dc, kinds)} [{breakdown}]"
        checks.append(("decontaminate", split, held.removed[split], held.before[split], why))
    for step, split, removed, whole, why in checks:
        if whole and removed / whole > limit:
            where = f"of {split}" if split != "all rows" else "of the rows"
            out.append(
                Finding(
                    "removed",
                    step,
                    split,
                    f"step {step} removed {_share(removed, whole)} {where} (limit {limit:.0%}): likely cause: {why}",
                )
            )
    return out


def _decontamination_cause(dc: DataConfig, kinds: Counter[str]) -> str:
    kind = kinds.most_common(1)[0][0] if kinds else "exact"
    if kind in ("exact", "near") and "prompt" not in dc.split.group_by:
        return (
            "the split is not grouped by prompt, so copies and near-copies of a prompt landed on both sides: "
            "set data.split.group_by: [prompt]"
        )
    return _CAUSES[kind].format(scope=" in the answers" if dc.decontaminate.scope == "all" else "")


def _outlier_cause(dc: DataConfig) -> str:
    sigma = dc.filters.outlier_sigma
    return f"data.filters.outlier_sigma={sigma} is tight for these lengths: raise it or set it to null"


def _date_cause(dc: DataConfig) -> str:
    return f"dates in {dc.split.time_field!r} do not parse (see quarantine.jsonl, stage split)"


def _ratios(dc: DataConfig, plan: Plan, held: HeldOut, groups: Groups) -> list[Finding]:
    """Split shares before the data.sample caps, against the configured ratios."""
    counts = {s: plan.before_sampling[s] - held.removed[s] for s in SPLIT_NAMES}
    total = sum(counts.values())
    if not total:
        return []
    ratios = dc.split.ratios
    alive = [i for i in range(plan.n) if plan.assign[i]]
    largest = max(groups.sizes(alive).values(), default=0)
    out = []
    for k, split in enumerate(SPLIT_NAMES):
        share, expected = counts[split] / total, ratios[k] / sum(ratios)
        if abs(share - expected) <= dc.guards.max_ratio_drift:
            continue
        if largest > dc.guards.max_ratio_drift * total:
            why = f"groups are too large: the largest holds {_share(largest, total)} (data.split.group_by)"
        elif held.dropped > dc.guards.max_ratio_drift * total:
            why = f"decontamination removed {held.dropped:,} rows"
        else:
            why = f"{total:,} rows in {len(groups.sizes(alive)):,} groups are too few for these ratios"
        out.append(
            Finding(
                "ratio",
                "split",
                split,
                f"{split} holds {share:.1%} of the rows ({counts[split]:,} of {total:,}), configured "
                f"{expected:.1%} (drift limit {dc.guards.max_ratio_drift:.0%}): likely cause: {why}",
            )
        )
    return out


def _empties(dc: DataConfig, sizes: Counter[str], ledger: Ledger, plan: Plan) -> list[Finding]:
    if ledger.rows_in == 0:
        why = "the sources hold no rows (an empty file, or a header without rows?)"
        return [Finding("empty", "output", "all", f"every split is empty: {why}", fatal=True)]
    caps = {"train": dc.sample.train, "val": dc.sample.val, "test": dc.sample.test}
    out = []
    for k, split in enumerate(SPLIT_NAMES):
        wanted = dc.split.ratios[k] > 0 and caps[split] != 0
        if sizes[split] or not (wanted or split == "train"):
            continue
        if sum(sizes.values()):
            why = f"none of the {sum(sizes.values()):,} rows kept was placed in it (too few rows or groups)"
        else:
            top = ", ".join(f"{r} {n:,}" for r, n in list(ledger.drop_reasons().items())[:3])
            why = f"{ledger.rows_in:,} rows read, {sum(sizes.values()):,} kept; most dropped: {top or 'none'}"
        out.append(Finding("empty", "output", split, f"the {split} split is empty: {why}", fatal=True))
    return out + _empty_holdout(dc, sizes, plan)


def _empty_holdout(dc: DataConfig, sizes: Counter[str], plan: Plan) -> list[Finding]:
    """A configured holdout group that matched no row (a misspelt value?) is an error, not an empty test set."""
    hg = dc.split.holdout_group
    if hg is None or sizes[HOLDOUT]:
        return []
    seen = (plan.holdout or {}).get("rows_per_value") or {}
    asked = f"after {hg.after}" if hg.after else f"in {[str(v) for v in hg.values or []]}"
    why = f"no row kept has {hg.field} {asked}" + (f" (values seen, rows: {seen})" if seen else "")
    return [Finding("empty", "holdout", HOLDOUT, f"the holdout {hg.name!r} is empty: {why}", fatal=True)]


def enforce(findings: list[Finding], on_violation: str, report_path: str) -> None:
    """Raise a UserError for the findings that fail the stage (all, or only the fatal ones with `warn`)."""
    failing = [f for f in findings if f.fatal or on_violation == "fail"]
    if not failing:
        return
    lines = "\n".join(f"  - {f.message}" for f in failing)
    advice = "" if all(f.fatal for f in failing) else "\n(data.guards.on_violation: warn to go on anyway)"
    raise UserError(f"data: the split failed its checks (report: {report_path}):\n{lines}{advice}")

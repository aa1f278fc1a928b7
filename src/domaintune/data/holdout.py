"""`hold_out_group`: whole groups of rows kept out of train, val and test (data.split.holdout_group).

Before the split, every row whose source (or kept field) is one of the configured values, or whose date is
after the configured date, is placed in the holdout (`Plan.assign` code of `HOLDOUT`); the split then places
the other rows. The holdout is sampled (holdout_group.max_rows), train and val rows that repeat a holdout
prompt are dropped by `decontaminate`, and `write_splits` writes it to data/holdout_<name>.jsonl, each row
kept in the ledger under `holdout` like a split.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from domaintune.data.config import HoldoutGroupConfig
from domaintune.data.split import HOLDOUT, PLACES, Plan
from domaintune.data.spool import Spooled

_CODE = PLACES.index(HOLDOUT) + 1
_SHOWN_VALUES = 30  # values of the field listed in the report (most rows first)


def hold_out_group(plan: Plan, rows: Spooled, hg: HoldoutGroupConfig | None) -> None:
    """Place the rows of the held-out groups in the holdout; record how many rows each value of the field has."""
    if hg is None:
        return
    alive = [(i, item) for i, item in rows.read() if i not in plan.dropped]
    values = [_value(item, hg.field) for _, item in alive]
    if hg.after is None:
        wanted = {str(v) for v in hg.values or []}
        held = [i for (i, _), v in zip(alive, values) if v in wanted]
    else:
        held = _after(plan, [i for i, _ in alive], values, hg)
    plan.assign[held] = _CODE
    plan.holdout = {
        "name": hg.name,
        "field": hg.field,
        "values": [str(v) for v in hg.values] if hg.values is not None else None,
        "after": hg.after,
        "rows_held_out": len(held),
        "rows_per_value": dict(Counter(values).most_common(_SHOWN_VALUES)) if hg.after is None else None,
    }


def _value(item: dict[str, Any], field: str) -> str:
    """The row's value of `field` as text: `source` is the source's name; a missing field is `(missing)`."""
    if field == "source":
        return str(item["source"])
    value = item["row"].get(field)
    return "(missing)" if value is None else str(value)


def _after(plan: Plan, alive: list[int], values: list[str], hg: HoldoutGroupConfig) -> list[int]:
    """Rows dated after `hg.after`; a row whose date does not parse is dropped (stage split), as in a time split."""
    import pandas as pd

    cutoff = pd.to_datetime(hg.after, utc=True)
    raw = pd.Series([None if v == "(missing)" else v for v in values], dtype=object)
    times = pd.to_datetime(raw, errors="coerce", utc=True, format="mixed")
    held = []
    for i, t in zip(alive, times):
        if pd.isna(t):
            plan.dropped[i] = ("split", f"unparseable date in {hg.field} (data.split.holdout_group)")
        elif t > cutoff:
            held.append(i)
    return held

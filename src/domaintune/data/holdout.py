"""`hold_out_group`: whole groups of rows kept out of train, val and test (data.split.holdout_group).

Before the split, every row whose source (or kept field) is one of the configured values, or whose date is
after the configured date, is placed in the holdout (`Plan.assign` code of `HOLDOUT`); the split then places
the other rows. The holdout is sampled (holdout_group.max_rows), train and val rows that repeat a holdout
prompt are dropped by `decontaminate`, and `write_splits` writes it to data/holdout_<name>.jsonl, each row
kept in the ledger under `holdout` like a split.

With holdout_group.dev_rows, that many of the held-out rows are first set aside as a selection set (code of
`HOLDOUT_DEV`, written to data/holdout_<name>_dev.jsonl, kept in the ledger under `holdout_dev`): whole prompt
groups in a seeded order, so no group has rows on both sides; max_rows then caps the rest. A sweep chooses on the
dev rows and the gates read the others, which the choice never saw.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np

from domaintune.data.config import HoldoutGroupConfig
from domaintune.data.split import HOLDOUT, HOLDOUT_DEV, PLACES, Plan, grouped, seeded_rng
from domaintune.data.spool import Spooled
from domaintune.errors import UserError

_CODE = PLACES.index(HOLDOUT) + 1
_DEV_CODE = PLACES.index(HOLDOUT_DEV) + 1
_SHOWN_VALUES = 30  # values of the field listed in the report (most rows first)


def hold_out_group(plan: Plan, rows: Spooled, hg: HoldoutGroupConfig | None, root: np.ndarray | None = None) -> None:
    """Place the rows of the held-out groups in the holdout (and `dev_rows` of them in its dev part; `root`: per
    row the first row of its prompt group); record how many rows each value of the field has."""
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
    dev = _take_dev(plan, held, hg, np.arange(plan.n) if root is None else root)
    plan.holdout = {
        "name": hg.name,
        "field": hg.field,
        "values": [str(v) for v in hg.values] if hg.values is not None else None,
        "after": hg.after,
        "rows_held_out": len(held),
        "dev_rows": hg.dev_rows,  # asked for
        "dev_drawn": len(dev),  # set aside before max_rows and decontamination
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


def _take_dev(plan: Plan, held: list[int], hg: HoldoutGroupConfig, root: np.ndarray) -> list[int]:
    """`dev_rows` of the held-out rows, as whole groups in a seeded order: each group goes to dev when its middle
    row falls within the first dev_rows (rows on their own: exactly dev_rows); the rest stay gated."""
    if hg.dev_rows is None or not held:
        return []
    where = "data.split.holdout_group.dev_rows"
    if hg.dev_rows >= len(held):
        raise UserError(
            f"{where}: {hg.dev_rows} asked for, the held-out groups have {len(held)} rows; leave rows for the gated "
            f"set data/holdout_{hg.name}.jsonl (fewer dev_rows)"
        )
    groups = grouped(sorted(held), root)
    dev: list[int] = []
    pos = 0
    for j in seeded_rng(plan.seed, "holdout-dev").permutation(len(groups)).tolist():
        if pos >= hg.dev_rows:
            break
        if pos + len(groups[j]) / 2 < hg.dev_rows:
            dev.extend(groups[j])
        pos += len(groups[j])
    if not dev or len(dev) == len(held):
        largest = max(len(g) for g in groups)
        raise UserError(
            f"{where}: {hg.dev_rows} rows cannot be set aside by whole prompt groups (data.split.group_by) and "
            f"leave rows on both sides: {len(groups)} groups, the largest of {largest} rows; change dev_rows"
        )
    plan.assign[dev] = _DEV_CODE
    return dev

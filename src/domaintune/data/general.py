"""`build_general`: self-instruct seed tasks → one messages row per instance, split by task into the replay
pool (data/general.jsonl) and the retention holdout (data/general_holdout.jsonl)."""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from domaintune.data.config import GeneralConfig
from domaintune.data.formats import convert_row
from domaintune.data.ledger import Ledger, Where
from domaintune.data.readers import read_jsonl
from domaintune.data.source_config import SourceConfig
from domaintune.data.split import seeded_rng
from domaintune.data.text import normalise_text
from domaintune.errors import UserError
from domaintune.layout import RunLayout
from domaintune.utils.io import atomic_write

NAME = "general"  # the source name of its rows and quarantine entries; also its quarantine stage and book


@dataclass
class _Tasks:
    rows: list[dict[str, Any]] = field(default_factory=list)  # with `_loc` (file, loc) and `_group` (task id)
    n_input: int = 0  # instances met (a record without instances counts as one)
    dropped: Counter[str] = field(default_factory=Counter)


def build_general(gc: GeneralConfig, fmt: str, layout: RunLayout, ledger: Ledger, seed: int) -> dict[str, Any]:
    """Writes the replay pool and the holdout; returns the report section."""
    if not gc.path.exists():
        raise UserError(f"data.general.path: {gc.path} not found")
    gc = gc.model_copy(update={"path": Path(os.path.normpath(gc.path))})  # no `proj/../data` in the report
    tasks = _read_tasks(gc, ledger)
    rows = tasks.rows
    keep = set(range(len(rows)))
    if gc.max_rows is not None and len(rows) > gc.max_rows:
        keep = set(seeded_rng(seed, NAME).permutation(len(rows))[: gc.max_rows].tolist())
    held_out = _holdout_groups(sorted({rows[i]["_group"] for i in keep}), gc.holdout, seed)
    counts: Counter[str] = Counter()
    with atomic_write(layout.general_file) as replay, atomic_write(layout.general_holdout_file) as holdout:
        for i, row in enumerate(rows):
            file, loc = row.pop("_loc")
            group = row.pop("_group")
            if i not in keep:
                tasks.dropped["sampled out"] += 1
                reason = f"sampled out (general capped at {gc.max_rows})"
                ledger.set_aside(Where(NAME, file, loc), NAME, reason, book=NAME, row=row)
                continue
            line = json.dumps(convert_row(row, fmt), ensure_ascii=False) + "\n"
            part = "holdout" if group in held_out else "replay"
            (holdout if part == "holdout" else replay).write(line)
            counts[part] += 1
    if not counts["holdout"]:
        layout.general_holdout_file.unlink(missing_ok=True)  # no holdout asked for: eval uses general.jsonl
    written = counts["replay"] + counts["holdout"]
    report = {
        "path": str(gc.path),
        "input": tasks.n_input,
        "written": written,
        "replay_rows": counts["replay"],
        "holdout_rows": counts["holdout"],
        "holdout_tasks": len(held_out),
        "dropped": dict(tasks.dropped),
        "balanced": tasks.n_input == written + sum(tasks.dropped.values()),
    }
    if not report["balanced"]:  # would be a bug: said loudly rather than shipped in a wrong report
        raise RuntimeError(f"general set accounting does not balance: {report}")
    return report


def _read_tasks(gc: GeneralConfig, ledger: Ledger) -> _Tasks:
    """One row per usable instance; broken records and empty instances go to the quarantine."""
    tasks = _Tasks()
    src = SourceConfig.model_validate({"path": gc.path, "reader": "jsonl"})
    for rec in read_jsonl(gc.path, src, NAME):
        if rec.error is not None:
            tasks.n_input += 1
            tasks.dropped["parse"] += 1
            ledger.set_aside(Where(NAME, rec.file, rec.loc), NAME, rec.error, book=NAME, raw=rec.raw)
            continue
        data = rec.data or {}
        instances = data.get("instances")
        instruction = normalise_text(str(data.get("instruction") or ""))
        if not isinstance(instances, list) or not instances:
            tasks.n_input += 1
            tasks.dropped["no instances"] += 1
            ledger.set_aside(Where(NAME, rec.file, rec.loc), NAME, "no instances", book=NAME, row=data)
            continue
        for k, inst in enumerate(instances):
            tasks.n_input += 1
            inp = normalise_text(str((inst or {}).get("input") or ""))
            output = normalise_text(str((inst or {}).get("output") or ""))
            loc = f"{rec.loc} instance {k}"
            if not instruction or not output:
                tasks.dropped["empty instruction/output"] += 1
                reason = "empty instruction/output"
                ledger.set_aside(Where(NAME, rec.file, loc), NAME, reason, book=NAME, row=inst)
                continue
            user = instruction if not inp else f"{instruction}\n\n{inp}"
            tasks.rows.append(
                {
                    "id": f"{data.get('id', rec.loc)}-{k}",
                    "messages": [{"role": "user", "content": user}, {"role": "assistant", "content": output}],
                    "source": NAME,
                    "task": data.get("name"),
                    "is_classification": bool(data.get("is_classification", False)),
                    "_loc": (rec.file, loc),
                    "_group": str(data.get("id", rec.loc)),
                }
            )
    return tasks


def _holdout_groups(groups: list[str], holdout: float, seed: int) -> set[str]:
    """The seed tasks held out for retention: a seeded choice of whole tasks (a fraction, or a count when >= 1)."""
    if holdout <= 0 or not groups:
        return set()
    # a fraction always leaves at least one task for the replay pool; a count is taken as asked
    n = int(holdout) if holdout >= 1 else min(max(1, round(holdout * len(groups))), len(groups) - 1)
    if n > len(groups):
        raise UserError(f"data.general.holdout: {int(holdout)} tasks asked for, the general set has {len(groups)}")
    rng = seeded_rng(seed, "general-holdout")
    return {groups[i] for i in rng.permutation(len(groups))[:n].tolist()}

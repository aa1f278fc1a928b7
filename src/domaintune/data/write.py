"""`write_splits`: the plan carried out. Each spooled row is written to its split's file (or the holdout's, with
data.split.holdout_group; with its difficulty tier and the system prompt) or dropped in the ledger; synthetic
rows made from the train rows (data.augment) follow the train rows, unless their prompt repeats a val/test prompt."""

from __future__ import annotations

import json
from array import array
from collections import Counter
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import IO, TYPE_CHECKING, Any

from domaintune.data.augment import run_augment
from domaintune.data.config import HoldoutGroupConfig
from domaintune.data.decontaminate import HeldOut
from domaintune.data.dedup import snippet
from domaintune.data.formats import convert_row
from domaintune.data.ledger import Ledger, Where
from domaintune.data.processing import normalise
from domaintune.data.split import HOLDOUT, HOLDOUT_DEV, PLACES, TIERS, Plan
from domaintune.data.spool import Spooled
from domaintune.layout import SPLIT_NAMES, RunLayout
from domaintune.utils.io import atomic_write

if TYPE_CHECKING:
    from domaintune.config import ProjectConfig


@dataclass
class Written:
    """What went into the split files, for the report."""

    sizes: Counter[str] = field(default_factory=Counter)  # rows per split (and holdout)
    strata: dict[str, Counter[str]] = field(default_factory=lambda: {s: Counter() for s in PLACES})
    difficulty: dict[str, Counter[str]] = field(default_factory=lambda: {s: Counter() for s in PLACES})
    lengths: array[int] = field(default_factory=lambda: array("l"))  # characters of each written row
    answer_lengths: array[int] = field(default_factory=lambda: array("l"))
    snippets: dict[str, str] = field(default_factory=dict)  # text of the rows that head a duplicate cluster
    augment: dict[str, Any] | None = None  # the augment report section (None: no augmentation)


def write_splits(
    cfg: ProjectConfig,
    layout: RunLayout,
    rows: Spooled,
    plan: Plan,
    ledger: Ledger,
    held: HeldOut,
    cluster_heads: set[str],
    progress: bool,
) -> Written:
    """data/{train,val,test}.jsonl (and data/holdout_<name>.jsonl, data/holdout_<name>_dev.jsonl), published
    together once every row is written; holdout files of other names (an earlier config's) are removed, so eval
    never scores a stale holdout."""
    dc = cfg.data
    written = Written()
    system_prompt = normalise(dc.system_prompt, dc.normalise) if dc.system_prompt else None  # the rows' rule
    augment_on = dc.augment is not None and dc.augment.enabled and bool(dc.augment.ops)
    train_rows: list[dict[str, Any]] = []  # augmentation sees train rows only: synthetic rows never reach val/test
    names = rows.stratum_names()
    with ExitStack() as stack:
        files = {s: stack.enter_context(atomic_write(layout.split_file(s))) for s in SPLIT_NAMES}
        hg = dc.split.holdout_group
        if hg is not None:
            files[HOLDOUT] = stack.enter_context(atomic_write(layout.holdout_file(hg.name)))
        if hg is not None and hg.dev_rows:
            files[HOLDOUT_DEV] = stack.enter_context(atomic_write(layout.holdout_dev_file(hg.name)))
        for path in layout.holdout_files().values():
            if path.name not in {layout.holdout_file(n).name for n in _holdout_names(hg)}:
                path.unlink()
        for i, item in rows.read():
            row = item["row"]
            if row["id"] in cluster_heads:
                written.snippets[row["id"]] = snippet(row)
            split = plan.split_of(i)
            if i not in plan.dropped and split is None:
                plan.dropped[i] = ("split", "not assigned")
            if i in plan.dropped or split is None:
                stage, reason = plan.dropped[i]
                where = Where(item["source"], item["file"], item["loc"])
                detail = plan.detail.get(i, {})
                ledger.drop(where, stage, reason, counted_as=reason.split(" (")[0], **detail, row=row)
                continue
            if plan.difficulty[i]:
                row[dc.difficulty.field] = TIERS[plan.difficulty[i]]
            _write(files[split], row, system_prompt, dc.format)
            if augment_on and split == "train":
                train_rows.append(row)
            ledger.keep(item["source"], split)
            written.sizes[split] += 1
            written.strata[split][names[rows.stratum[i]]] += 1
            written.difficulty[split][TIERS[plan.difficulty[i]]] += 1
            written.lengths.append(rows.length[i])
            written.answer_lengths.append(rows.answer_length[i])
        if augment_on:
            written.augment = _augment(cfg, layout, train_rows, files["train"], ledger, held, system_prompt, progress)
    return written


def _holdout_names(hg: HoldoutGroupConfig | None) -> list[str]:
    """The holdout files this config writes (holdout_<name>.jsonl and, with dev_rows, holdout_<name>_dev.jsonl)."""
    if hg is None:
        return []
    return [hg.name, f"{hg.name}_dev"] if hg.dev_rows else [hg.name]


def _augment(
    cfg: ProjectConfig,
    layout: RunLayout,
    train_rows: list[dict[str, Any]],
    train_file: IO[str],
    ledger: Ledger,
    held: HeldOut,
    system_prompt: str | None,
    progress: bool,
) -> dict[str, Any]:
    """Synthetic rows from the train rows, appended to the train file unless their prompt repeats a val/test
    prompt; returns the augment report section."""
    synthetic, report = run_augment(cfg, train_rows, layout.data_dir, ledger, progress)
    decontaminated: Counter[str] = Counter()
    for row in synthetic:
        match = held.match(row)  # the same val/test indexes as the leakage table's
        if match is not None:
            decontaminated[row["origin"]] += 1
            ledger.set_aside(
                Where(row["source"], "augment", row["id"]),
                "augment/decontaminate",
                f"synthetic row: {held.reason(match)}",
                book="augment",
                **held.detail(match),
                row=row,
            )
            continue
        _write(train_file, row, system_prompt, cfg.data.format)
    report["decontaminated"] = dict(decontaminated)
    report["written"] = len(synthetic) - sum(decontaminated.values())
    report["quarantined"] += sum(decontaminated.values())
    return report


def _write(fh: IO[str], row: dict[str, Any], system_prompt: str | None, fmt: str) -> None:
    """One row in the output format, with the system prompt unless the row has its own."""
    # a preference / unpaired / prompt row (data.kind) is written in its canonical form
    if "messages" not in row and isinstance(row.get("prompt"), list):
        if system_prompt and not any(m["role"] == "system" for m in row["prompt"]):
            row["prompt"].insert(0, {"role": "system", "content": system_prompt})
        fh.write(json.dumps(row, ensure_ascii=False, default=str) + "\n")
        return
    if system_prompt and "messages" in row and not any(m["role"] == "system" for m in row["messages"]):
        row["messages"].insert(0, {"role": "system", "content": system_prompt})
    elif system_prompt and "instruction" in row and not row.get("system"):
        row["system"] = system_prompt
    fh.write(json.dumps(convert_row(row, fmt), ensure_ascii=False, default=str) + "\n")

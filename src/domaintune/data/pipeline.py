"""`run_data`: the data stage, as its steps in order.

sources → read and clean (normalise, PII, filters, exact and near dedup) → length outliers → groups (rows
that must share a split) → holdout group (data.split.holdout_group) → split → difficulty → sample val/test/holdout →
decontaminate (val against test and holdout, train against all three) → sample train → write the splits and the
holdout (+ augment) → general set → leakage table and guards → report; a split that fails its guards
(`guards.py`) fails the stage after the report is written.

Memory: records stream from the readers through bounded batches (worker processes when
`workers > 1`); rows that survive the per-row stages are spooled to disk, and only small
per-row numbers (lengths, stratum codes, dedup signatures) stay in memory.
Accounting: every input record ends in train/val/test/holdout or in `quarantine.jsonl` with its
source, file, location, stage and reason; the `Ledger` checks `input = kept + Σ dropped`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from domaintune.data.clean import read_and_clean
from domaintune.data.config import DataConfig
from domaintune.data.decontaminate import decontaminate
from domaintune.data.general import build_general
from domaintune.data.groups import find_groups
from domaintune.data.guards import check_guards, enforce
from domaintune.data.holdout import hold_out_group
from domaintune.data.ledger import Ledger
from domaintune.data.overlap import leakage_table
from domaintune.data.readers import source_name
from domaintune.data.report import write_html_report
from domaintune.data.split import HOLDOUT, HOLDOUT_DEV, Plan, assign_difficulty, drop_outliers, sample, split
from domaintune.data.spool import spool_file
from domaintune.data.summary import SplitChecks, build_report
from domaintune.data.write import write_splits
from domaintune.errors import UserError
from domaintune.layout import SPLIT_NAMES, RunLayout
from domaintune.utils.io import write_json

if TYPE_CHECKING:
    from domaintune.config import ProjectConfig


def run_data(
    cfg: ProjectConfig, layout: RunLayout, *, workers: int = 1, strict: bool = False, progress: bool = True
) -> dict[str, Any]:
    """The data stage. Writes data/{train,val,test,general,general_holdout,quarantine}.jsonl (and
    data/holdout_<name>.jsonl with data.split.holdout_group, data/holdout_<name>_dev.jsonl with its dev_rows) and data/report.{json,html}; returns the report."""
    dc = cfg.data
    hg = dc.split.holdout_group
    validate_sources(dc, workers)
    seed = dc.split.seed if dc.split.seed is not None else cfg.seed
    layout.data_dir.mkdir(parents=True, exist_ok=True)
    with Ledger(layout.quarantine_file) as ledger, spool_file(layout.data_dir) as spool:
        rows, cleaning = read_and_clean(cfg, ledger, spool, workers=workers, strict=strict, progress=progress)

        plan = Plan(len(rows), seed)
        drop_outliers(plan, rows, dc.filters.outlier_sigma)
        near = dc.decontaminate.near_threshold
        groups = find_groups(plan, rows, dc.split.group_by, near, dc.dedup.char_ngram)
        hold_out_group(plan, rows, hg, groups.root)
        split(plan, rows, dc.split, groups.root)
        assign_difficulty(plan, rows, dc.difficulty)
        stratified = dc.split.by == "stratified"
        sample(plan, rows, "val", dc.sample.val, stratified)
        sample(plan, rows, "test", dc.sample.test, stratified)
        sample(plan, rows, HOLDOUT, hg.max_rows if hg else None, stratified)
        held = decontaminate(plan, rows, dc.decontaminate, dc.dedup.char_ngram)  # before the train cap
        sample(plan, rows, "train", dc.sample.train, stratified)

        heads = set(cleaning.dedup.clusters)
        written = write_splits(cfg, layout, rows, plan, ledger, held, heads, progress)
        general = build_general(dc.general, dc.format, layout, ledger, seed) if dc.general is not None else None

        files = {s: layout.split_file(s) for s in SPLIT_NAMES} | ({HOLDOUT: layout.holdout_file(hg.name)} if hg else {})
        files |= {HOLDOUT_DEV: layout.holdout_dev_file(hg.name)} if hg and hg.dev_rows else {}
        checks = SplitChecks(
            groups.report([i for i in range(plan.n) if plan.assign[i]]),
            leakage_table(files, near_threshold=near, char_ngram=dc.dedup.char_ngram),
            check_guards(dc, plan, held, groups, written.sizes, ledger),
        )
        report = build_report(cfg, layout, workers, ledger, cleaning, plan, held, written, general, checks)
        report["kind"] = dc.kind  # what the split files hold (train reads non-sft rows as its method's kind)
        ledger.check(
            general=sum(general["dropped"].values()) if general else 0,
            augment=written.augment["quarantined"] if written.augment else 0,
        )
    write_json(layout.data_report, report)
    write_html_report(report, layout.data_report_html, cleaning.input_lengths, written.lengths, written.answer_lengths)
    enforce(checks.findings, dc.guards.on_violation, str(layout.data_report_html))
    return report


def validate_sources(dc: DataConfig, workers: int) -> None:
    """Config errors that need the sources together, before anything is read."""
    if not dc.sources:
        raise UserError("data.sources is empty: add at least one source (see examples/medical-zh.yaml)")
    names = [source_name(s, i) for i, s in enumerate(dc.sources)]
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise UserError(f"data.sources: two sources are named {dup!r}; give each a distinct `name:`")
    keep_names = set().union(*(s.keep_map() for s in dc.sources))
    for key, value in (("stratify_field", dc.split.stratify_field), ("time_field", dc.split.time_field)):
        if value and dc.split.by in ("stratified", "time") and value not in keep_names:
            raise UserError(f"data.split.{key}: {value!r} is not kept by any source (add it to sources[*].keep)")
    for name in dc.split.group_by:
        if name != "prompt" and name not in keep_names:
            raise UserError(
                f"data.split.group_by: {name!r} is neither `prompt` nor kept by any source (add it to sources[*].keep)"
            )
    hg = dc.split.holdout_group
    if hg is not None and hg.field != "source" and hg.field not in keep_names:
        raise UserError(
            f"data.split.holdout_group.field: {hg.field!r} is neither `source` nor kept by any source "
            "(add it to sources[*].keep)"
        )
    if hg is not None and hg.field == "source" and hg.values is not None:
        unknown = sorted({str(v) for v in hg.values} - set(names))
        if unknown:
            raise UserError(f"data.split.holdout_group.values: no source is named {unknown} (sources: {names})")
    if dc.difficulty.enabled and dc.difficulty.by != "length" and dc.difficulty.by not in keep_names:
        raise UserError(f"data.difficulty.by: {dc.difficulty.by!r} is neither `length` nor a kept field")
    if dc.kind != "sft":
        _check_row_kind(dc)
    if dc.engine == "ray" and workers > 1:
        raise UserError(
            "--workers is for data.engine: local; with engine ray the cluster's CPUs do "
            "the work (data.ray.num_cpus or data.ray.address)"
        )


def _check_row_kind(dc: DataConfig) -> None:
    """What a preference / unpaired / prompt data stage cannot do, named before anything is read."""
    if dc.format != "messages":
        raise UserError(
            f"data.format: {dc.format!r} is for sft rows; data.kind {dc.kind!r} rows are written in their canonical "
            "form (prompt as messages); remove data.format"
        )
    if dc.augment is not None and dc.augment.enabled:
        raise UserError(f"data.augment makes sft rows; it cannot run with data.kind: {dc.kind}")
    for i, src in enumerate(dc.sources):
        mapped = sorted(k for k, v in src.fields.model_dump().items() if v is not None and k != "id")
        if mapped:
            raise UserError(
                f"data.sources[{i}].fields: {', '.join(mapped)} map sft columns; {dc.kind} rows are read by their "
                "own keys (see data.kind); only fields.id applies"
            )

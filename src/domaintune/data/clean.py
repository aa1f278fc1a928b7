"""`read_and_clean`: sources → readers → normalise, PII, filters → exact and near dedup → spool.

Records stream from the readers through bounded batches (worker processes when `workers > 1`, Ray
tasks with `engine: ray`); each outcome comes back in input order and is settled here: a drop goes
to the ledger, a surviving row to the spool with the few numbers the later steps need.
"""

from __future__ import annotations

import json
import multiprocessing as mp
from array import array
from collections import Counter, deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from rich.progress import Progress, TaskID

from domaintune.data.config import DataConfig
from domaintune.data.dedup import Dedup
from domaintune.data.ledger import Ledger, Where
from domaintune.data.processing import RowProcessor, init_worker, public_row, run_batch
from domaintune.data.progress import rows_progress
from domaintune.data.readers import Record, estimate_rows, iter_source
from domaintune.data.spool import Spooled
from domaintune.errors import UserError

if TYPE_CHECKING:
    from domaintune.config import ProjectConfig

Item = tuple[int, str, Record]  # (rid: position among all records, row id, record)
Batch = list[Item]


@dataclass
class Cleaning:
    """What the per-row stages changed, for the report (the rows themselves are in the spool)."""

    dedup: Dedup
    input_lengths: array[int] = field(default_factory=lambda: array("l"))  # characters of every mapped row
    normalised: int = 0  # rows changed by normalisation
    pii_rows: int = 0  # rows with PII redacted
    pii_counts: Counter[str] = field(default_factory=Counter)  # by PII type
    tool_rows: int = 0  # kept rows that declare tools or hold tool calls


def read_and_clean(
    cfg: ProjectConfig, ledger: Ledger, spool_path: Path, *, workers: int, strict: bool, progress: bool
) -> tuple[Spooled, Cleaning]:
    """Every record read, processed and settled: dropped (ledger) or spooled."""
    dc = cfg.data
    processor = RowProcessor(dc, cfg.model)
    cleaning = Cleaning(Dedup(dc.dedup))
    rows = Spooled(spool_path)
    estimated = [estimate_rows(s) for s in dc.sources]
    total = sum(e for e in estimated if e is not None) if all(e is not None for e in estimated) else None
    with rows_progress(progress) as bar, spool_path.open("w", encoding="utf-8") as spool:
        task = bar.add_task("data: reading and cleaning", total=total)
        reader = _Reader(cfg, ledger, processor, strict, advance=lambda n: bar.advance(task, n))
        settle = _Settler(dc, ledger, cleaning, rows, spool)
        phase = _Phase(bar, task)  # the ray engine names its phases on the bar
        for batch, result in _stream(dc, reader, processor, cleaning.dedup, workers, progress, phase.describe):
            settle.batch(result, reader.where)
            bar.advance(task, len(batch))
        bar.update(task, total=ledger.rows_in, completed=ledger.rows_in)
    if cleaning.tool_rows:
        check_tool_rows(cfg, cleaning.tool_rows)
    return rows, cleaning


def check_tool_rows(cfg: ProjectConfig, n_rows: int) -> None:
    """Rows with tool calls need an output format that holds them and a chat template that renders them
    (one without tool branches would silently train on conversations with the calls left out)."""
    from domaintune.model.loader import load_tokenizer
    from domaintune.model.tools import template_tool_problem

    if cfg.data.format == "alpaca":
        raise UserError(
            f"data.format: alpaca cannot hold tool calls ({n_rows} rows have them); use messages or sharegpt"
        )
    problem = template_tool_problem(load_tokenizer(cfg.model))
    if problem is not None:
        raise UserError(
            f"{n_rows} rows have tool calls, but model {cfg.model.name_or_path!r}: {problem}; set "
            "model.chat_template to a template with tool support (e.g. `chatml-tools`, or the model family's own)"
        )


@dataclass
class _Phase:
    bar: Progress
    task: TaskID

    def describe(self, text: str) -> None:
        self.bar.update(self.task, description=text)


class _Reader:
    """The records of every source in order, numbered; parse errors are settled in the ledger as met."""

    def __init__(
        self, cfg: ProjectConfig, ledger: Ledger, processor: RowProcessor, strict: bool, advance: Callable[[int], Any]
    ):
        self.cfg = cfg
        self.ledger = ledger
        self.processor = processor
        self.strict = strict
        self.advance = advance
        self.where: dict[int, tuple[str, str, str]] = {}  # rid -> (source, file, loc) of records in flight

    def records(self, deferred: list[tuple[int, Record]] | None = None) -> Iterator[Item]:
        """(rid, row id, record) of parseable records; parse errors are accounted as met, or, with
        `deferred`, appended as (records yielded before it, record) for the ray engine to replay."""
        rid = 0
        yielded = 0
        seq: Counter[str] = Counter()  # records met per source: the default row id
        for i, src in enumerate(self.cfg.data.sources):
            for rec in iter_source(src, i, self.cfg.base_dir):
                rid += 1
                self.ledger.read(rec.source)
                seq[rec.source] += 1
                if rec.error is not None:
                    if self.strict:
                        raise UserError(f"{rec.file}: {rec.loc}: {rec.error} (--strict)")
                    if deferred is not None:
                        deferred.append((yielded, rec))
                    else:
                        self.parse_error(rec)
                    continue
                self.where[rid] = Where(rec.source, rec.file, rec.loc)
                yielded += 1
                yield rid, f"{rec.source}-{seq[rec.source]:06d}", rec

    def parse_error(self, rec: Record) -> None:
        error = rec.error or ""
        where = Where(rec.source, rec.file, rec.loc)
        raw = self.processor.redact_payload(rec.raw)
        self.ledger.drop(where, "parse", error, counted_as=error.split(":")[0], raw=raw)
        self.advance(1)


def _stream(
    dc: DataConfig,
    reader: _Reader,
    processor: RowProcessor,
    dedup: Dedup,
    workers: int,
    progress: bool,
    describe: Callable[[str], Any],
) -> Iterator[tuple[list[Any], dict[str, Any]]]:
    """(batch, processed batch) in input order, from worker processes or from the ray engine."""
    if dc.engine == "ray":
        from domaintune.data.ray_engine import RayEngine

        engine = RayEngine(dc, processor, dedup.lsh, progress=progress)
        dedup.engine = engine
        return engine.stream(reader.records, reader.parse_error, reader.where, describe=describe)
    return _bounded_map(_batches(reader.records(), dc.batch_size), workers, processor)


def _batches(records: Iterator[Item], size: int) -> Iterator[Batch]:
    batch: Batch = []
    for item in records:
        batch.append(item)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch


def _bounded_map(batches: Iterator[Batch], workers: int, processor: RowProcessor) -> Iterator[tuple[Batch, Any]]:
    """Ordered map over batches with at most 2×workers batches in flight (keeps memory flat)."""
    if workers <= 1:
        for batch in batches:
            yield batch, processor.process(batch)
        return
    ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    with ctx.Pool(workers, initializer=init_worker, initargs=(processor,)) as pool:
        pending: deque[tuple[Batch, Any]] = deque()
        for batch in batches:
            pending.append((batch, pool.apply_async(run_batch, (batch,))))
            if len(pending) >= 2 * workers:
                b, res = pending.popleft()
                yield b, res.get()
        while pending:
            b, res = pending.popleft()
            yield b, res.get()


class _Settler:
    """Settles one processed batch: filter drops, then exact duplicates, then near duplicates; the rest
    is spooled with its length, answer length, stratum and (when used) time and difficulty score."""

    def __init__(self, dc: DataConfig, ledger: Ledger, cleaning: Cleaning, rows: Spooled, spool: IO[str]):
        self.dc = dc
        self.ledger = ledger
        self.cleaning = cleaning
        self.dedup = cleaning.dedup
        self.rows = rows
        self.spool = spool

    def batch(self, result: dict[str, Any], where_of: dict[int, tuple[str, str, str]]) -> None:
        sigs = result["sigs"]  # one per row that passed the filters
        passed = 0
        candidates = []  # (where, pub, outcome, signature) of exact-unique rows
        for o in result["outcomes"]:
            where = Where(*where_of.pop(o["rid"]))
            self._count_changes(o.get("info"))
            if "drop" in o:
                stage, reason = o["drop"]
                self.ledger.drop(where, stage, reason, row=o["payload"])
                continue
            sig = sigs[passed] if sigs is not None else None
            passed += 1
            pub = public_row(o["row"], where.source)
            first = self.dedup.exact_duplicate_of(o)
            if first is not None:
                self.ledger.drop(where, "dedup_exact", "exact duplicate", duplicate_of=first, row=pub)
                self.dedup.add_to_cluster(first, pub, 1.0, "exact")
                continue
            candidates.append((where, pub, o, sig))
        verdicts = self.dedup.near_verdicts([(o, sig) for _, _, o, sig in candidates])
        for (where, pub, o, _), verdict in zip(candidates, verdicts):
            if verdict is not None and verdict.duplicate_of is not None:
                reason = f"near duplicate (Jaccard≈{verdict.similarity:.2f} ≥ {self.dc.dedup.threshold})"
                self.ledger.drop(
                    where,
                    "dedup_near",
                    reason,
                    counted_as="near duplicate",
                    duplicate_of=verdict.duplicate_of,
                    similarity=round(verdict.similarity, 3),
                    row=pub,
                )
                self.dedup.add_to_cluster(verdict.duplicate_of, pub, verdict.similarity, "near")
                continue
            self._spool(where, pub, o)

    def _count_changes(self, info: dict[str, Any] | None) -> None:
        if info:
            self.cleaning.input_lengths.append(info["length"])
            self.cleaning.normalised += info["normalised"]
            if info["pii"]:
                self.cleaning.pii_rows += 1
                self.cleaning.pii_counts.update(info["pii"])

    def _spool(self, where: Where, pub: dict[str, Any], o: dict[str, Any]) -> None:
        item = {"source": where.source, "file": where.file, "loc": where.loc, "row": pub}
        self.cleaning.tool_rows += bool(pub.get("tools"))
        self.spool.write(json.dumps(item, ensure_ascii=False, default=str) + "\n")
        sp, rows, extra = self.dc.split, self.rows, o["row"]["extra"]
        rows.length.append(o["length"])
        rows.answer_length.append(o["answer_length"])
        rows.add_stratum(str(extra.get(sp.stratify_field, "(missing)")) if sp.stratify_field else "(all)")
        if sp.by == "time":
            rows.time.append(extra.get(sp.time_field))
        if self.dc.difficulty.by != "length":
            rows.score.append(_to_float(extra.get(self.dc.difficulty.by)))


def _to_float(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return float("nan")

"""`run_data`: sources → normalise → PII → filters → dedup → outliers → split → decontaminate → sample → files.

Memory: records stream from the readers through bounded batches (worker processes when
`workers > 1`); rows that survive the per-row stages are spooled to disk, and only small
per-row numbers (lengths, stratum codes, dedup signatures) stay in memory.
Accounting: every input record ends in train/val/test or in `quarantine.jsonl` with its
source, file, location, stage and reason; the report checks `input = kept + Σ dropped`.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import re
from array import array
from collections import Counter, defaultdict, deque
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import xxhash
from rich.progress import (
    BarColumn,
    Progress,
    ProgressColumn,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

from domaintune.data.config import DataConfig
from domaintune.data.formats import convert_row
from domaintune.data.minhash import LSHIndex
from domaintune.data.processing import (
    RowProcessor,
    answer_text,
    init_worker,
    prompt_text,
    public_row,
    run_batch,
)
from domaintune.data.readers import Record, estimate_rows, iter_source, source_name
from domaintune.data.text import is_cjk, normalise_text, words
from domaintune.errors import UserError
from domaintune.utils.io import atomic_write, write_json

SPLITS = ("train", "val", "test")
TIERS = ("(none)", "easy", "medium", "hard")
_WS = re.compile(r"\s+")


class RateColumn(ProgressColumn):
    def render(self, task) -> Text:
        speed = task.finished_speed or task.speed
        return Text(f"{speed:,.0f} rows/s" if speed else "… rows/s", style="progress.data.speed")


class CountColumn(ProgressColumn):
    def render(self, task) -> Text:
        total = f"/~{task.total:,.0f}" if task.total else ""
        return Text(f"{task.completed:,.0f}{total} rows", style="progress.download")


def _progress() -> Progress:
    return Progress(
        SpinnerColumn(),
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        CountColumn(),
        RateColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        transient=False,
    )


def _stable_int(text: str) -> int:
    return xxhash.xxh64_intdigest(text.encode())


class Quarantine:
    """Streams quarantined rows to `quarantine.jsonl` (atomically renamed at the end)."""

    def __init__(self, path: Path):
        self._ctx = atomic_write(path)
        self._fh = self._ctx.__enter__()
        self.count = 0

    def add(self, source: str, file: str, loc: str, stage: str, reason: str, **extra: Any) -> None:
        entry = {"source": source, "file": file, "loc": loc, "stage": stage, "reason": reason}
        entry.update(extra)
        self._fh.write(json.dumps(entry, ensure_ascii=False, default=str) + "\n")
        self.count += 1

    def close(self, ok: bool = True) -> None:
        if ok:
            self._ctx.__exit__(None, None, None)
        else:
            self._ctx.__exit__(RuntimeError, None, None)


class Accounts:
    """Per-source outcome counters: input, dropped by (stage, reason), kept by split."""

    def __init__(self):
        self.input: Counter = Counter()
        self.dropped: dict[str, Counter] = defaultdict(Counter)
        self.kept: dict[str, Counter] = defaultdict(Counter)

    def drop(self, source: str, stage: str, reason: str) -> None:
        self.dropped[source][f"{stage}: {reason}"] += 1

    def summary(self) -> dict[str, Any]:
        out = {}
        for source in self.input:
            dropped = dict(sorted(self.dropped[source].items(), key=lambda kv: -kv[1]))
            kept = {s: self.kept[source][s] for s in SPLITS}
            total_dropped = sum(dropped.values())
            total_kept = sum(kept.values())
            out[source] = {
                "input": self.input[source],
                "kept": kept,
                "kept_total": total_kept,
                "dropped": dropped,
                "dropped_total": total_dropped,
                "balanced": self.input[source] == total_kept + total_dropped,
            }
        return out


def _batches(records: Iterator[tuple[int, str, Record]], size: int) -> Iterator[list]:
    batch = []
    for item in records:
        batch.append(item)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch


def _bounded_map(fn, batches: Iterator[list], workers: int, processor: RowProcessor) -> Iterator[tuple[list, dict]]:
    """Ordered map over batches with at most 2×workers batches in flight (keeps memory flat)."""
    if workers <= 1:
        for batch in batches:
            yield batch, processor.process(batch)
        return
    ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    with ctx.Pool(workers, initializer=init_worker, initargs=(processor,)) as pool:
        pending: deque = deque()
        for batch in batches:
            pending.append((batch, pool.apply_async(fn, (batch,))))
            if len(pending) >= 2 * workers:
                b, res = pending.popleft()
                yield b, res.get()
        while pending:
            b, res = pending.popleft()
            yield b, res.get()


def _split_counts(n: int, ratios: list[float]) -> tuple[int, int, int]:
    total = sum(ratios)
    n_val = int(round(n * ratios[1] / total))
    n_test = int(round(n * ratios[2] / total))
    if n_val + n_test > n:
        n_test = max(0, n - n_val)
    return n - n_val - n_test, n_val, n_test


def _ngram_hashes(text: str, n: int) -> set[int]:
    if is_cjk(text):
        compact = _WS.sub("", text)
        grams = [compact[i : i + n] for i in range(len(compact) - n + 1)]
    else:
        toks = words(text)
        grams = [" ".join(toks[i : i + n]) for i in range(len(toks) - n + 1)]
    return {xxhash.xxh64_intdigest(g.encode()) for g in grams}


def _read_spool(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    with path.open("r", encoding="utf-8") as fh:
        for i, line in enumerate(fh):
            yield i, json.loads(line)


def run_data(cfg, output_dir: str | Path, workers: int = 1, strict: bool = False, progress: bool = True) -> dict:
    """The data stage. Writes output_dir/data/{train,val,test,general,quarantine}.jsonl + report.{json,html}."""
    dc: DataConfig = cfg.data
    if not dc.sources:
        raise UserError("data.sources is empty: add at least one source (see examples/medical-zh.yaml)")
    out = Path(output_dir) / "data"
    out.mkdir(parents=True, exist_ok=True)
    work = out / ".work"
    work.mkdir(exist_ok=True)
    seed = dc.split.seed if dc.split.seed is not None else cfg.seed
    names = [source_name(s, i) for i, s in enumerate(dc.sources)]
    if len(set(names)) != len(names):
        dup = [n for n in names if names.count(n) > 1][0]
        raise UserError(f"data.sources: two sources are named {dup!r}; give each a distinct `name:`")
    keep_names = set().union(*(s.keep_map() for s in dc.sources))
    for key, value in (("stratify_field", dc.split.stratify_field), ("time_field", dc.split.time_field)):
        if value and dc.split.by in ("stratified", "time") and value not in keep_names:
            raise UserError(f"data.split.{key}: {value!r} is not kept by any source (add it to sources[*].keep)")
    if dc.difficulty.enabled and dc.difficulty.by != "length" and dc.difficulty.by not in keep_names:
        raise UserError(f"data.difficulty.by: {dc.difficulty.by!r} is neither `length` nor a kept field")

    sp = dc.split
    processor = RowProcessor(dc, cfg.model)
    accounts = Accounts()
    quarantine = Quarantine(out / "quarantine.jsonl")
    funnel: Counter = Counter()
    pii_counts: Counter = Counter()
    changed = Counter()
    input_lengths = array("l")
    exact_seen: dict[int, str] = {}
    lsh = LSHIndex(dc.dedup.threshold, dc.dedup.num_perm) if dc.dedup.near else None
    clusters: dict[str, dict[str, Any]] = {}
    cluster_sizes: Counter = Counter()
    # per surviving row (spool order): small numbers only
    # compact typed arrays: a few bytes per row, whatever the row size
    meta_length = array("l")
    meta_answer = array("l")
    meta_stratum = array("l")  # codes into stratum_names
    stratum_codes: dict[str, int] = {}
    meta_time: list[Any] = []  # only filled for split.by == time
    meta_score = array("d")  # only filled for difficulty by a named field
    spool_path = work / "rows.jsonl"
    ok = False
    try:
        estimated = [estimate_rows(s) for s in dc.sources]
        total = sum(estimated) if all(e is not None for e in estimated) else None
        per_source_seq: Counter = Counter()
        rid_info: dict[int, tuple[str, str, str]] = {}

        def parse_error(rec: Record) -> None:
            accounts.drop(rec.source, "parse", rec.error.split(":")[0])
            quarantine.add(rec.source, rec.file, rec.loc, "parse", rec.error, raw=processor.redact_payload(rec.raw))
            funnel["parse_dropped"] += 1
            task_advance(1)

        def records(deferred: list | None = None) -> Iterator[tuple[int, str, Record]]:
            """(rid, row id, record) of parseable records; parse errors are accounted as met, or, with
            `deferred`, appended as (records yielded before it, record) for the ray engine to replay."""
            rid = 0
            yielded = 0
            for i, src in enumerate(dc.sources):
                for rec in iter_source(src, i, cfg.base_dir):
                    rid += 1
                    accounts.input[rec.source] += 1
                    funnel["input"] += 1
                    per_source_seq[rec.source] += 1
                    if rec.error is not None:
                        if strict:
                            raise UserError(f"{rec.file}: {rec.loc}: {rec.error} (--strict)")
                        if deferred is not None:
                            deferred.append((yielded, rec))
                        else:
                            parse_error(rec)
                        continue
                    rid_info[rid] = (rec.source, rec.file, rec.loc)
                    yielded += 1
                    yield rid, f"{rec.source}-{per_source_seq[rec.source]:06d}", rec

        with _progress() if progress else _NoProgress() as bar, spool_path.open("w", encoding="utf-8") as spool:
            task = bar.add_task("data: reading and cleaning", total=total)

            def task_advance(n: int) -> None:
                bar.advance(task, n)

            if dc.engine == "ray":
                from domaintune.data.ray_engine import RayEngine

                if workers > 1:
                    raise UserError(
                        "--workers is for data.engine: local; with engine ray the cluster's CPUs do "
                        "the work (data.ray.num_cpus or data.ray.address)"
                    )

                engine = RayEngine(dc, processor, lsh, progress=progress)
                stream = engine.stream(
                    records, parse_error, rid_info, describe=lambda text: bar.update(task, description=text)
                )
            else:
                engine = None
                stream = _bounded_map(run_batch, _batches(records(), dc.batch_size), workers, processor)
            for batch, result in stream:
                sig_i = 0
                near_rows = []
                for o in result["outcomes"]:
                    source, file, loc = rid_info.pop(o["rid"])
                    info = o.get("info")
                    if info:
                        input_lengths.append(info["length"])
                        changed["normalise"] += info["normalised"]
                        if info["pii"]:
                            changed["pii"] += 1
                            pii_counts.update(info["pii"])
                    if "drop" in o:
                        stage, reason = o["drop"]
                        accounts.drop(source, stage, reason)
                        funnel[f"{stage}_dropped"] += 1
                        quarantine.add(source, file, loc, stage, reason, row=o["payload"])
                        continue
                    row = o["row"]
                    sig = result["sigs"][sig_i] if result["sigs"] is not None else None
                    sig_i += 1
                    pub = public_row(row, source)
                    if engine is not None:  # decided by the cluster's exact-duplicate grouping
                        first = engine.exact_duplicate_of.get(o["rid"])
                    else:
                        first = exact_seen.get(o["exact"]) if dc.dedup.exact else None
                    if first is not None:
                        accounts.drop(source, "dedup_exact", "exact duplicate")
                        funnel["dedup_exact_dropped"] += 1
                        quarantine.add(source, file, loc, "dedup_exact", "exact duplicate", duplicate_of=first, row=pub)
                        _cluster_add(clusters, cluster_sizes, first, pub, 1.0, "exact", dc.dedup.max_clusters_reported)
                        continue
                    if dc.dedup.exact and engine is None:
                        exact_seen[o["exact"]] = row["id"]
                    near_rows.append((source, file, loc, row, pub, o, sig))
                if engine is not None:  # decided by the cluster's banding step (see ray_engine)
                    verdicts = [engine.near_verdict(r[5]["rid"]) for r in near_rows]
                elif lsh is not None and near_rows:
                    sigs = np.stack([r[6] for r in near_rows])
                    verdicts = lsh.add_batch(sigs, [r[3]["id"] for r in near_rows])
                else:
                    verdicts = [None] * len(near_rows)
                for (source, file, loc, row, pub, o, _sig), verdict in zip(near_rows, verdicts):
                    if verdict is not None and verdict.duplicate_of is not None:
                        reason = f"near duplicate (Jaccard≈{verdict.similarity:.2f} ≥ {dc.dedup.threshold})"
                        accounts.drop(source, "dedup_near", "near duplicate")
                        funnel["dedup_near_dropped"] += 1
                        quarantine.add(
                            source,
                            file,
                            loc,
                            "dedup_near",
                            reason,
                            duplicate_of=verdict.duplicate_of,
                            similarity=round(verdict.similarity, 3),
                            row=pub,
                        )
                        _cluster_add(
                            clusters,
                            cluster_sizes,
                            verdict.duplicate_of,
                            pub,
                            verdict.similarity,
                            "near",
                            dc.dedup.max_clusters_reported,
                        )
                        continue
                    spool.write(
                        json.dumps(
                            {"source": source, "file": file, "loc": loc, "row": pub}, ensure_ascii=False, default=str
                        )
                        + "\n"
                    )
                    meta_length.append(o["length"])
                    meta_answer.append(o["answer_length"])
                    extra = row["extra"]
                    label = str(extra.get(dc.split.stratify_field, "(missing)")) if dc.split.stratify_field else "(all)"
                    meta_stratum.append(stratum_codes.setdefault(label, len(stratum_codes)))
                    if sp.by == "time":
                        meta_time.append(extra.get(sp.time_field))
                    if dc.difficulty.by != "length":
                        meta_score.append(_to_float(extra.get(dc.difficulty.by)))
                bar.advance(task, len(batch))
            bar.update(task, total=funnel["input"], completed=funnel["input"])

        n = len(meta_length)
        status: dict[int, tuple[str, str]] = {}  # only dropped rows
        lengths = np.asarray(meta_length, dtype=np.float64)
        stratum_names = {code: name for name, code in stratum_codes.items()}

        # ---- 3σ length outliers ------------------------------------------------------------
        outlier_info = None
        sigma = dc.filters.outlier_sigma
        if sigma is not None and n >= 10:
            mu, sd = float(lengths.mean()), float(lengths.std())
            lo, hi = mu - sigma * sd, mu + sigma * sd
            outlier_info = {"mean": round(mu, 1), "std": round(sd, 1), "low": round(lo, 1), "high": round(hi, 1)}
            if sd > 0:
                for i in np.nonzero((lengths < lo) | (lengths > hi))[0].tolist():
                    side = "long" if lengths[i] > hi else "short"
                    status[i] = ("outlier", f"length {side} outlier (>{sigma}σ from mean {mu:.0f})")

        # ---- split ---------------------------------------------------------------------------
        alive = [i for i in range(n) if i not in status]
        assign = np.zeros(n, dtype=np.int8)  # 0 unassigned, 1 train, 2 val, 3 test
        if sp.by == "time":
            import pandas as pd

            times = pd.to_datetime(pd.Series([meta_time[i] for i in alive], dtype=object), errors="coerce")
            good = []
            for i, t in zip(alive, times):
                if pd.isna(t):
                    status[i] = ("split", f"unparseable date in {sp.time_field}")
                else:
                    good.append((t.value, i))
            good.sort()
            ordered = [i for _, i in good]
            n_tr, n_va, _ = _split_counts(len(ordered), sp.ratios)
            for k, i in enumerate(ordered):
                assign[i] = 1 if k < n_tr else (2 if k < n_tr + n_va else 3)
        else:
            groups: dict[str, list[int]] = defaultdict(list)
            for i in alive:
                groups[stratum_names[meta_stratum[i]] if sp.by == "stratified" else ""].append(i)
            for key in sorted(groups):
                members = groups[key]
                rng = np.random.default_rng([seed, _stable_int(key) & 0xFFFFFFFF])
                perm = [members[j] for j in rng.permutation(len(members))]
                n_tr, n_va, _ = _split_counts(len(perm), sp.ratios)
                for k, i in enumerate(perm):
                    assign[i] = 1 if k < n_tr else (2 if k < n_tr + n_va else 3)
        split_before = Counter({s: int((assign == k + 1).sum()) for k, s in enumerate(SPLITS)})

        # ---- difficulty tiers ----------------------------------------------------------------
        difficulty = np.zeros(n, dtype=np.int8)  # 0 none, 1 easy, 2 medium, 3 hard
        tiers = None
        if dc.difficulty.enabled and assign.any():
            placed = assign > 0
            all_scores = np.asarray(meta_answer if dc.difficulty.by == "length" else meta_score, dtype=np.float64)
            scores = all_scores[placed]
            valid = ~np.isnan(scores)
            if valid.any():
                q1, q2 = np.quantile(scores[valid], [1 / 3, 2 / 3])
                tiers = {"by": dc.difficulty.by, "easy_max": float(q1), "medium_max": float(q2)}
                tier = np.where(all_scores <= q1, 1, np.where(all_scores <= q2, 2, 3)).astype(np.int8)
                tier[np.isnan(all_scores) | ~placed] = 0
                difficulty = tier

        # ---- sample val/test, decontaminate train, sample train --------------------------------
        def sample(split: str, cap: int | None) -> None:
            code = SPLITS.index(split) + 1
            members = [i for i in np.nonzero(assign == code)[0].tolist() if i not in status]
            if cap is None or len(members) <= cap:
                return
            rng = np.random.default_rng([seed, _stable_int("sample:" + split) & 0xFFFFFFFF])
            if sp.by == "stratified":
                by: dict[str, list[int]] = defaultdict(list)
                for i in members:
                    by[stratum_names[meta_stratum[i]]].append(i)
                keys = sorted(by)
                quota = {k: cap * len(by[k]) / len(members) for k in keys}
                take = {k: int(quota[k]) for k in keys}
                for k in sorted(keys, key=lambda k: (-(quota[k] - take[k]), k))[: cap - sum(take.values())]:
                    take[k] += 1
                chosen = set()
                for k in keys:
                    grp = by[k]
                    chosen.update(grp[j] for j in rng.permutation(len(grp))[: take[k]])
            else:
                chosen = {members[j] for j in rng.permutation(len(members))[:cap]}
            for i in members:
                if i not in chosen:
                    status[i] = ("sample", f"sampled out ({split} capped at {cap})")

        sample("val", dc.sample.val)
        sample("test", dc.sample.test)
        decontam = {
            "enabled": dc.decontaminate.enabled,
            "ngram": dc.decontaminate.ngram,
            "scope": dc.decontaminate.scope,
            "dropped": 0,
        }

        def decontam_text(pub: dict[str, Any]) -> str:
            internal = _internal(pub)
            if dc.decontaminate.scope == "prompt":
                return prompt_text(internal)
            return prompt_text(internal) + "\n" + answer_text(internal)

        held: set[int] = set()  # n-gram hashes of val/test prompts (also checked against synthetic rows)
        if dc.decontaminate.enabled and assign.any():
            contaminated = []
            for i, item in _read_spool(spool_path):
                if i not in status and assign[i] in (2, 3):
                    held |= _ngram_hashes(decontam_text(item["row"]), dc.decontaminate.ngram)
            if held:
                for i, item in _read_spool(spool_path):
                    if i not in status and assign[i] == 1:
                        grams = _ngram_hashes(decontam_text(item["row"]), dc.decontaminate.ngram)
                        if not grams.isdisjoint(held):
                            contaminated.append(i)
            for i in contaminated:
                status[i] = ("decontaminate", f"shares a {dc.decontaminate.ngram}-gram with a val/test prompt")
            decontam["dropped"] = len(contaminated)
        sample("train", dc.sample.train)

        # ---- write ------------------------------------------------------------------------------
        split_counts: Counter = Counter()
        strata: dict[str, Counter] = {s: Counter() for s in SPLITS}
        diff_counts: dict[str, Counter] = {s: Counter() for s in SPLITS}
        kept_answer_lengths = array("l")
        kept_lengths = array("l")
        rep_ids = {c for c in clusters}
        rep_snippets: dict[str, str] = {}
        handles = {s: atomic_write(out / f"{s}.jsonl") for s in SPLITS}
        files = {s: h.__enter__() for s, h in handles.items()}
        augment_on = dc.augment is not None and dc.augment.enabled and bool(dc.augment.ops)
        augment_train: list[dict[str, Any]] = []  # train rows only: synthetic rows never reach val/test
        augment_report = None
        try:
            for i, item in _read_spool(spool_path):
                row = item["row"]
                if row["id"] in rep_ids:
                    rep_snippets[row["id"]] = _snippet(row)
                split = SPLITS[assign[i] - 1] if assign[i] else None
                if i not in status and split is None:
                    status[i] = ("split", "not assigned")
                if i in status:
                    stage, reason = status[i]
                    accounts.drop(item["source"], stage, reason.split(" (")[0])
                    funnel[f"{stage}_dropped"] += 1
                    quarantine.add(item["source"], item["file"], item["loc"], stage, reason, row=row)
                    continue
                if difficulty[i]:
                    row[dc.difficulty.field] = TIERS[difficulty[i]]
                if dc.system_prompt and "messages" in row and not any(m["role"] == "system" for m in row["messages"]):
                    row["messages"].insert(0, {"role": "system", "content": dc.system_prompt})
                elif dc.system_prompt and "instruction" in row and not row.get("system"):
                    row["system"] = dc.system_prompt
                files[split].write(json.dumps(convert_row(row, dc.format), ensure_ascii=False, default=str) + "\n")
                if augment_on and split == "train":
                    augment_train.append(row)
                accounts.kept[item["source"]][split] += 1
                split_counts[split] += 1
                strata[split][stratum_names[meta_stratum[i]]] += 1
                diff_counts[split][TIERS[difficulty[i]]] += 1
                kept_lengths.append(meta_length[i])
                kept_answer_lengths.append(meta_answer[i])
            if augment_on:
                from domaintune.data.augment import run_augment

                synthetic, augment_report = run_augment(cfg, augment_train, out, quarantine, progress)
                decontaminated = Counter()
                for row in synthetic:
                    if held and not _ngram_hashes(decontam_text(row), dc.decontaminate.ngram).isdisjoint(held):
                        decontaminated[row["origin"]] += 1
                        quarantine.add(
                            row["source"],
                            "augment",
                            row["id"],
                            "augment/decontaminate",
                            f"synthetic row shares a {dc.decontaminate.ngram}-gram with a val/test prompt",
                            row=row,
                        )
                        continue
                    if dc.system_prompt and not any(m["role"] == "system" for m in row["messages"]):
                        row["messages"].insert(0, {"role": "system", "content": dc.system_prompt})
                    files["train"].write(
                        json.dumps(convert_row(row, dc.format), ensure_ascii=False, default=str) + "\n"
                    )
                del augment_train
                augment_report["decontaminated"] = dict(decontaminated)
                augment_report["written"] = len(synthetic) - sum(decontaminated.values())
                augment_report["quarantined"] += sum(decontaminated.values())
        except BaseException:
            for h in handles.values():
                h.__exit__(RuntimeError, None, None)
            raise
        for h in handles.values():
            h.__exit__(None, None, None)

        general = None
        if dc.general is not None:
            general = build_general(dc, out, accounts, quarantine, funnel, seed)

        sources = accounts.summary()
        report = {
            "project": cfg.name,
            "output_dir": str(out),
            "workers": workers,
            "engine": dc.engine,
            "format": dc.format,
            "sources": sources,
            "balanced": all(s["balanced"] for s in sources.values()),
            "totals": {
                "input": sum(s["input"] for s in sources.values()),
                "kept": sum(s["kept_total"] for s in sources.values()),
                "dropped": sum(s["dropped_total"] for s in sources.values()),
                "quarantined": quarantine.count,
            },
            "funnel": _funnel(funnel, changed, split_counts, split_before),
            "drop_reasons": _drop_reasons(accounts),
            "normalise": {"rows_changed": changed["normalise"]},
            "pii": {"rows_changed": changed["pii"], "counts": dict(pii_counts)},
            "dedup": {
                "exact_dropped": funnel["dedup_exact_dropped"],
                "near_dropped": funnel["dedup_near_dropped"],
                "threshold": dc.dedup.threshold,
                "num_perm": dc.dedup.num_perm,
                "bands": lsh.bands if lsh is not None else None,
                "rows_per_band": lsh.rows if lsh is not None else None,
                "clusters": len(cluster_sizes),
                "largest_cluster": max(cluster_sizes.values()) + 1 if cluster_sizes else 0,
                "cluster_sample": [
                    {"kept": {"id": rep, "text": rep_snippets.get(rep, "(dropped later)")}, **c}
                    for rep, c in clusters.items()
                ],
            },
            "outliers": outlier_info,
            "decontaminate": decontam,
            "split": {
                "by": sp.by,
                "ratios": sp.ratios,
                "seed": seed,
                "field": sp.stratify_field or sp.time_field,
                "sizes": {s: split_counts[s] for s in SPLITS},
                "sizes_before_sampling": {s: split_before[s] for s in SPLITS},
                "per_stratum": {s: dict(sorted(strata[s].items())) for s in SPLITS},
                "difficulty": {s: dict(diff_counts[s]) for s in SPLITS},
                "difficulty_tiers": tiers,
            },
            "sample": dc.sample.model_dump(),
            "lengths": {
                "mapped_chars": _hist_summary(input_lengths),
                "kept_chars": _hist_summary(kept_lengths),
                "kept_answer_chars": _hist_summary(kept_answer_lengths),
            },
            "general": general,
            "augment": augment_report,
        }
        quarantine.close()
        ok = True
        if not report["balanced"]:  # would be a bug: say so loudly rather than ship a wrong report
            raise RuntimeError(f"data accounting does not balance: {json.dumps(sources, ensure_ascii=False)}")
        general_dropped = sum(general["dropped"].values()) if general else 0
        if general and not general["balanced"]:
            raise RuntimeError(f"general set accounting does not balance: {general}")
        augment_quarantined = augment_report["quarantined"] if augment_report else 0
        if quarantine.count != report["totals"]["dropped"] + general_dropped + augment_quarantined:
            raise RuntimeError(f"quarantine has {quarantine.count} rows but {report['totals']['dropped']} were dropped")
        write_json(out / "report.json", report)
        from domaintune.data.report import write_html_report

        write_html_report(report, out / "report.html", input_lengths, kept_lengths, kept_answer_lengths)
        return report
    finally:
        if not ok:
            quarantine.close(ok=False)
        if spool_path.exists():
            spool_path.unlink()
        try:
            work.rmdir()
        except OSError:
            pass


class _NoProgress:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def add_task(self, *a, **k):
        return 0

    def advance(self, *a, **k):
        pass

    def update(self, *a, **k):
        pass


def _internal(pub: dict[str, Any]) -> dict[str, Any]:
    """Public (spooled) row → the internal shape that prompt_text understands."""
    if "messages" in pub:
        return {"kind": "messages", "messages": pub["messages"]}
    if "text" in pub and "instruction" not in pub:
        return {"kind": "text", "fields": {"text": pub["text"]}}
    return {"kind": "qa", "fields": {k: pub.get(k, "") for k in ("instruction", "input", "output")}}


def _snippet(pub: dict[str, Any], limit: int = 160) -> str:
    if "messages" in pub:
        text = " | ".join(m["content"] for m in pub["messages"] if m["role"] != "system")
    elif "text" in pub and "instruction" not in pub:
        text = pub["text"]
    else:
        text = " | ".join(pub.get(k, "") for k in ("instruction", "input", "output") if pub.get(k))
    text = text.replace("\n", " ")
    return text if len(text) <= limit else text[:limit] + "…"


def _cluster_add(clusters, sizes, rep: str, pub: dict, sim: float, kind: str, limit: int) -> None:
    sizes[rep] += 1
    if rep not in clusters:
        if len(clusters) >= limit:
            return
        clusters[rep] = {"duplicates": [], "size": 1}
    c = clusters[rep]
    c["size"] = sizes[rep] + 1
    if len(c["duplicates"]) < 5:
        c["duplicates"].append({"id": pub["id"], "kind": kind, "similarity": round(sim, 3), "text": _snippet(pub)})


def _to_float(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return float("nan")


def _hist_summary(values: list[int]) -> dict[str, Any]:
    if not values:
        return {"count": 0}
    arr = np.asarray(values, dtype=np.float64)
    q = np.quantile(arr, [0.05, 0.5, 0.95])
    return {
        "count": int(arr.size),
        "mean": round(float(arr.mean()), 1),
        "std": round(float(arr.std()), 1),
        "min": int(arr.min()),
        "p5": float(q[0]),
        "median": float(q[1]),
        "p95": float(q[2]),
        "max": int(arr.max()),
    }


def _drop_reasons(accounts: Accounts) -> dict[str, int]:
    total: Counter = Counter()
    for c in accounts.dropped.values():
        total.update(c)
    return dict(total.most_common())


def _funnel(funnel: Counter, changed: Counter, split_counts: Counter, split_before: Counter) -> list[dict[str, Any]]:
    stages = [
        ("parse", "unparseable input (broken JSON, wrong column count, undecodable bytes, ...)"),
        ("map", "records that cannot be mapped to training fields"),
        ("filter", "empty/missing fields, length, tokens, repetition, language"),
        ("dedup_exact", "exact duplicates (normalised text hash)"),
        ("dedup_near", "near duplicates (MinHash-LSH)"),
        ("outlier", "length outliers (k·σ)"),
        ("split", "rows the split could not place"),
        ("decontaminate", "train rows sharing a long n-gram with val/test"),
        ("sample", "sampled out by data.sample caps"),
    ]
    rows = [
        {
            "stage": "input",
            "rows_in": funnel["input"],
            "dropped": 0,
            "rows_out": funnel["input"],
            "note": "records read (general set excluded)",
        }
    ]
    current = funnel["input"]
    for stage, note in stages:
        if stage == "filter":  # in-place stages before the filters: rows changed, none dropped
            rows.append(
                {
                    "stage": "normalise",
                    "rows_in": current,
                    "dropped": 0,
                    "rows_out": current,
                    "changed": changed["normalise"],
                    "note": "NFKC, HTML, control characters, whitespace",
                }
            )
            rows.append(
                {
                    "stage": "pii",
                    "rows_in": current,
                    "dropped": 0,
                    "rows_out": current,
                    "changed": changed["pii"],
                    "note": "rows with PII replaced by typed placeholders",
                }
            )
        dropped = funnel[f"{stage}_dropped"]
        rows.append(
            {"stage": stage, "rows_in": current, "dropped": dropped, "rows_out": current - dropped, "note": note}
        )
        current -= dropped
    rows.append(
        {
            "stage": "output",
            "rows_in": current,
            "dropped": 0,
            "rows_out": sum(split_counts.values()),
            "note": ", ".join(f"{s}={split_counts[s]}" for s in SPLITS),
        }
    )
    return rows


def build_general(
    dc: DataConfig, out: Path, accounts: Accounts, quarantine: Quarantine, funnel: Counter, seed: int
) -> dict[str, Any]:
    """Self-instruct seed tasks → one messages row per instance, in data/general.jsonl."""
    from domaintune.data.config import SourceConfig
    from domaintune.data.readers import read_jsonl as read_jsonl_records

    path = Path(dc.general.path)
    if not path.exists():
        raise UserError(f"data.general.path: {path} not found")
    src = SourceConfig(path=path, reader="jsonl")
    name = "general"
    rows: list[dict[str, Any]] = []
    counts = Counter()
    dropped: Counter = Counter()
    n_input = 0
    for rec in read_jsonl_records(path, src, name):
        if rec.error is not None:
            n_input += 1
            dropped["parse"] += 1
            quarantine.add(name, rec.file, rec.loc, "general", rec.error, raw=rec.raw)
            continue
        data = rec.data or {}
        instances = data.get("instances")
        instruction = normalise_text(str(data.get("instruction") or ""))
        if not isinstance(instances, list) or not instances:
            n_input += 1
            dropped["no instances"] += 1
            quarantine.add(name, rec.file, rec.loc, "general", "no instances", row=data)
            continue
        for k, inst in enumerate(instances):
            n_input += 1
            inp = normalise_text(str((inst or {}).get("input") or ""))
            output = normalise_text(str((inst or {}).get("output") or ""))
            loc = f"{rec.loc} instance {k}"
            if not instruction or not output:
                dropped["empty instruction/output"] += 1
                quarantine.add(name, rec.file, loc, "general", "empty instruction/output", row=inst)
                continue
            user = instruction if not inp else f"{instruction}\n\n{inp}"
            rows.append(
                {
                    "id": f"{data.get('id', rec.loc)}-{k}",
                    "messages": [{"role": "user", "content": user}, {"role": "assistant", "content": output}],
                    "source": name,
                    "task": data.get("name"),
                    "is_classification": bool(data.get("is_classification", False)),
                    "_loc": (rec.file, loc),
                    "_group": str(data.get("id", rec.loc)),
                }
            )
    cap = dc.general.max_rows
    keep = set(range(len(rows)))
    if cap is not None and len(rows) > cap:
        rng = np.random.default_rng([seed, _stable_int("general") & 0xFFFFFFFF])
        keep = set(rng.permutation(len(rows))[:cap].tolist())
    held_out = _holdout_groups(sorted({rows[i]["_group"] for i in keep}), dc.general.holdout, seed)
    with atomic_write(out / "general.jsonl") as replay_fh, atomic_write(out / "general_holdout.jsonl") as holdout_fh:
        for i, row in enumerate(rows):
            file, loc = row.pop("_loc")
            group = row.pop("_group")
            if i not in keep:
                dropped["sampled out"] += 1
                quarantine.add(name, file, loc, "general", f"sampled out (general capped at {cap})", row=row)
                continue
            line = json.dumps(convert_row(row, dc.format), ensure_ascii=False) + "\n"
            if group in held_out:
                holdout_fh.write(line)
                counts["holdout"] += 1
            else:
                replay_fh.write(line)
                counts["replay"] += 1
    if not counts["holdout"]:
        (out / "general_holdout.jsonl").unlink(missing_ok=True)  # no holdout asked for: eval uses general.jsonl
    written = counts["replay"] + counts["holdout"]
    return {
        "path": str(path),
        "input": n_input,
        "written": written,
        "replay_rows": counts["replay"],
        "holdout_rows": counts["holdout"],
        "holdout_tasks": len(held_out),
        "dropped": dict(dropped),
        "balanced": n_input == written + sum(dropped.values()),
    }


def _holdout_groups(groups: list[str], holdout: float, seed: int) -> set[str]:
    """The seed tasks held out for retention: a seeded choice of whole tasks (a fraction, or a count when >= 1)."""
    if holdout <= 0 or not groups:
        return set()
    # a fraction always leaves at least one task for the replay pool; a count is taken as asked
    n = int(holdout) if holdout >= 1 else min(max(1, round(holdout * len(groups))), len(groups) - 1)
    if n > len(groups):
        raise UserError(f"data.general.holdout: {int(holdout)} tasks asked for, the general set has {len(groups)}")
    rng = np.random.default_rng([seed, _stable_int("general-holdout") & 0xFFFFFFFF])
    return {groups[i] for i in rng.permutation(len(groups))[:n].tolist()}

"""`data.engine: ray` — the data stage's heavy steps as Ray Data transforms on a Ray cluster.

What runs where (docs/data-at-scale.md has the operator's view):

* driver: the readers stream the sources (one pass, in input order) and ship batches of
  `data.batch_size` records to the object store;
* cluster, `map_batches`: `RowProcessor.process` — the very function the local engine runs in
  its worker processes — maps, normalises, redacts PII, filters, hashes each row and computes its
  MinHash signature;
* cluster, hash shuffle on the row hash: exact-duplicate groups, the first row (input position) of
  each group is kept;
* cluster, hash shuffle on the LSH band key ("banding"): every surviving row emits one
  (band key, position, signature) entry per band; each band bucket yields its candidate pairs,
  verified on the signatures (estimated Jaccard >= threshold) exactly as `LSHIndex` does;
* driver: the keep-first resolution over the verified pairs (sequential by nature: a row is a
  near duplicate when it matches a row that was itself kept; O(verified pairs)), then the
  local engine's own code for accounting, outliers, split, decontamination, sampling and writing,
  replaying the cluster's per-row results in input order.

So train/val/test/quarantine and report.json are byte-identical to `engine: local` (workers=1)
for the same config and seed; tests/data/test_data_ray.py checks that on the shared datasets.
"""

from __future__ import annotations

import logging
import pickle
import re
import time
from bisect import bisect_right
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from domaintune.data.config import DataConfig
from domaintune.data.minhash import DedupResult, LSHIndex
from domaintune.data.processing import RowProcessor
from domaintune.data.readers import Record
from domaintune.errors import UserError

_KEPT = DedupResult(None, 0.0)
last_stats: dict[str, Any] = {}  # stage timings of the latest run (bench/bench_data_engine.py prints them)


def import_ray():
    try:
        import ray
        import ray.data
    except ImportError:
        raise UserError(
            "data.engine: ray needs Ray Data, which is not installed: pip install 'domaintune[ray]' "
            "(or set data.engine: local)"
        ) from None
    return ray


class RaySession:
    """Joins (or starts) the Ray instance that `data.ray` names; shuts it down only if it started it."""

    def __init__(self, dc: DataConfig, progress: bool = False):
        self.ray = import_ray()
        self.started = False
        rc = dc.ray
        if not self.ray.is_initialized():
            kwargs: dict[str, Any] = {"include_dashboard": False, "logging_level": logging.WARNING}
            if rc.address is None:  # "local": a new instance even if `ray start` left a cluster address behind
                kwargs.update(address="local", num_cpus=rc.num_cpus)
            else:
                kwargs["address"] = rc.address
                if rc.ship_code:
                    import domaintune

                    kwargs["runtime_env"] = {"py_modules": [str(Path(domaintune.__file__).parent)]}
            try:
                self.ray.init(**kwargs)
            except (ConnectionError, RuntimeError, ValueError) as exc:
                raise UserError(
                    f"data.ray.address: cannot reach the Ray cluster {rc.address!r}: {exc} (is it started, "
                    "`ray status`? Ray 2.60 authenticates with a token: the driver needs the cluster's, see "
                    "docs.ray.io/en/latest/ray-security/token-auth.html)"
                ) from None
            self.started = True
        from ray.data.context import ShuffleStrategy

        ctx = self.ray.data.DataContext.get_current()
        ctx.enable_progress_bars = progress
        ctx.print_on_execution_start = False
        ctx.shuffle_strategy = ShuffleStrategy(rc.shuffle_strategy)
        logging.getLogger("ray.data").setLevel(logging.WARNING)
        self.cpus = max(1, int(self.ray.cluster_resources().get("CPU", 1)))
        self.partitions = rc.shuffle_partitions or 2 * self.cpus

    def close(self) -> None:
        if self.started and self.ray.is_initialized():
            self.ray.shutdown()
        self.started = False


# ---- cluster-side functions (pure: numpy batches in, numpy batches out) ------------------------


def process_chunks(batch: dict[str, np.ndarray], processor: RowProcessor) -> dict[str, np.ndarray]:
    """One row per chunk of records → the chunk's outcomes (for the driver) and dedup keys (for the shuffles)."""
    ks, results, keys = [], [], []
    for k, payload in zip(batch["k"].tolist(), batch["payload"]):
        chunk = pickle.loads(payload)
        result = processor.process(chunk)
        sigs = result["sigs"]
        where = {rid: (rec.source, rec.file, rec.loc) for rid, _, rec in chunk}
        survivors = [o for o in result["outcomes"] if "drop" not in o]
        rids = np.asarray([o["rid"] for o in survivors], dtype=np.int64)
        ids = [o["row"]["id"] for o in survivors]
        exact = np.asarray([o["exact"] for o in survivors], dtype=np.uint64)
        keys.append(pickle.dumps((rids, ids, exact, sigs), protocol=5))
        result["sigs"] = None  # the driver gets verdicts, not signatures
        result["where"] = where
        results.append(pickle.dumps(result, protocol=5))
        ks.append(k)
    return {
        "k": np.asarray(ks, dtype=np.int64),
        "result": np.asarray(results, dtype=object),
        "keys": np.asarray(keys, dtype=object),
    }


def expand_rows(batch: dict[str, np.ndarray], partitions: int, num_perm: int) -> dict[str, np.ndarray]:
    """Chunk dedup keys → one row per surviving record: pos, id, exact hash, signature, shuffle partition."""
    pos, ids, exact, sigs = [], [], [], []
    for blob in batch["keys"]:
        r, i, e, s = pickle.loads(blob)
        pos.append(r)
        ids.extend(i)
        exact.append(e)
        sigs.append(s if s is not None else np.zeros((len(r), num_perm), dtype=np.uint32))
    exact_all = np.concatenate(exact) if exact else np.zeros(0, dtype=np.uint64)
    return {
        "pos": np.concatenate(pos) if pos else np.zeros(0, dtype=np.int64),
        "id": np.asarray(ids, dtype=object),
        "exact": exact_all,
        "sig": np.concatenate(sigs) if sigs else np.zeros((0, num_perm), dtype=np.uint32),
        "part": (exact_all % np.uint64(partitions)).astype(np.int64),
    }


def exact_groups(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """One shuffle partition: rows grouped by exact hash; the first by input position is kept."""
    order = np.lexsort((batch["pos"], batch["exact"]))
    exact = batch["exact"][order]
    pos = batch["pos"][order]
    ids = batch["id"][order]
    head = np.ones(len(order), dtype=bool)
    head[1:] = exact[1:] != exact[:-1]
    first_idx = np.maximum.accumulate(np.where(head, np.arange(len(order)), 0))
    dup_of = np.where(head, "", ids[first_idx].astype(object))
    return {"pos": pos, "id": ids, "sig": batch["sig"][order], "first": head, "dup_of": dup_of.astype(object)}


def _select(batch: dict[str, np.ndarray], first: bool, columns: tuple[str, ...]) -> dict[str, np.ndarray]:
    mask = batch["first"] == first
    return {c: batch[c][mask] for c in columns}


def emit_bands(batch: dict[str, np.ndarray], lsh: LSHIndex, partitions: int) -> dict[str, np.ndarray]:
    """Each surviving row → one entry per LSH band: (band key, band, all its band keys, pos, id, signature,
    shuffle partition). The row's other band keys let a bucket skip pairs that an earlier band also finds."""
    sigs = batch["sig"]
    keys = lsh.band_keys(sigs)  # (n, bands) uint64, salted per band
    b = keys.shape[1]
    flat = keys.ravel()
    return {
        "key": flat,
        "band": np.tile(np.arange(b, dtype=np.int64), len(sigs)),
        "keys": np.repeat(keys, b, axis=0),
        "pos": np.repeat(batch["pos"], b),
        "id": np.repeat(batch["id"], b),
        "sig": np.repeat(sigs, b, axis=0),
        "part": (flat % np.uint64(partitions)).astype(np.int64),
    }


def band_pairs(batch: dict[str, np.ndarray], threshold: float, num_perm: int) -> dict[str, np.ndarray]:
    """One shuffle partition: each band bucket with >= 2 rows → its pairs (a < b) whose estimated Jaccard
    (share of equal signature values, as `LSHIndex`) reaches the threshold. A pair is reported by the first
    band its rows share only, so each verified pair comes back once."""
    order = np.lexsort((batch["pos"], batch["key"]))
    key, pos, ids, sig = batch["key"][order], batch["pos"][order], batch["id"][order], batch["sig"][order]
    band, keys = batch["band"][order], batch["keys"][order]
    out_a, out_b, out_aid, out_sim = [], [], [], []
    if len(key) > 1:
        same = np.nonzero(key[1:] == key[:-1])[0]
        if len(same):
            starts = same[np.r_[True, same[1:] != same[:-1] + 1]]
            for st in starts.tolist():
                en = st + 1
                while en < len(key) and key[en] == key[st]:
                    en += 1
                ia, ib = np.triu_indices(en - st, k=1)
                ia, ib = ia + st, ib + st
                first_band = np.argmax(keys[ia] == keys[ib], axis=1)
                mine = first_band == band[st]
                ia, ib = ia[mine], ib[mine]
                sims = np.count_nonzero(sig[ia] == sig[ib], axis=1) / num_perm
                ok = sims >= threshold
                out_a.append(pos[ia[ok]])
                out_b.append(pos[ib[ok]])
                out_aid.append(ids[ia[ok]])
                out_sim.append(sims[ok])
    cat = lambda parts, dt: np.concatenate(parts) if parts else np.zeros(0, dtype=dt)  # noqa: E731
    return {
        "a": cat(out_a, np.int64),
        "b": cat(out_b, np.int64),
        "a_id": cat(out_aid, object),
        "sim": cat(out_sim, np.float64),
    }


def banding_pairs(rows, lsh: LSHIndex, partitions: int) -> list[tuple[int, int, str, float]]:
    """The distributed banding step over a Ray dataset of (pos, id, sig) rows: emit one entry per band,
    group by band key (a shuffle on key mod `partitions`), verify each bucket's pairs on the signatures.
    Returns the verified pairs (a, b, id of a, estimated Jaccard) with a < b, each once."""
    pairs = (
        rows.map_batches(
            emit_bands, fn_kwargs={"lsh": lsh, "partitions": partitions}, batch_format="numpy", batch_size=None
        )
        .groupby("part", num_partitions=partitions)
        .map_groups(band_pairs, fn_kwargs={"threshold": lsh.threshold, "num_perm": lsh.num_perm}, batch_format="numpy")
    )
    edges: list[tuple[int, int, str, float]] = []
    for b in pairs.iter_batches(batch_format="numpy", batch_size=65536):
        edges.extend(zip(b["a"].tolist(), b["b"].tolist(), b["a_id"].tolist(), b["sim"].tolist()))
    return edges


def resolve_keep_first(edges: list[tuple[int, int, str, float]], batch_of: Callable[[int], int]) -> dict:
    """Verified pairs (a < b) → {b: (id of the kept row it duplicates, similarity)} with `LSHIndex.add_batch`'s
    rule: rows are taken in input order; a row is a near duplicate when it matches a row that was kept; the
    match is the most similar kept row of an earlier batch (earliest on ties), or, when there is none, the most
    similar kept row of its own batch (earliest on ties)."""
    incoming: dict[int, dict[int, tuple[str, float]]] = {}
    for a, b, a_id, sim in edges:
        incoming.setdefault(b, {})[a] = (a_id, sim)  # the same pair found in several bands: same sim
    dropped: dict[int, tuple[str, float]] = {}
    for b in sorted(incoming):
        cands = [(a, aid, sim) for a, (aid, sim) in incoming[b].items() if a not in dropped]
        if not cands:
            continue
        mine = batch_of(b)
        pool = [c for c in cands if batch_of(c[0]) < mine] or cands
        a, aid, sim = min(pool, key=lambda c: (-c[2], c[0]))
        dropped[b] = (aid, sim)
    return dropped


# ---- the engine ---------------------------------------------------------------------------------


def _user_error(exc: BaseException) -> UserError | None:
    """The UserError a Ray task raised, found through Ray's wrappers (RayTaskError, UserCodeException)."""
    seen: set[int] = set()
    todo: list[BaseException | None] = [exc]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, UserError):
            return UserError(str(e))
        todo += [getattr(e, "cause", None), e.__cause__, e.__context__]
    found = re.search(r"domaintune\.errors\.UserError: (.+)", str(exc))  # Ray keeps only the remote traceback text
    return UserError(found.group(1)) if found else None


class RayEngine:
    """Runs the per-row map and both dedup steps on Ray; `stream` replays the results in input order."""

    def __init__(self, dc: DataConfig, processor: RowProcessor, lsh: LSHIndex | None, progress: bool = False):
        self.dc = dc
        self.processor = processor
        self.lsh = lsh
        self.progress = progress
        self.exact_duplicate_of: dict[int, str] = {}
        self.near: dict[int, tuple[str, float]] = {}
        self.stats: dict[str, Any] = {}
        global last_stats
        last_stats = self.stats

    def near_verdict(self, rid: int) -> DedupResult | None:
        if self.lsh is None:
            return None
        hit = self.near.get(rid)
        return DedupResult(*hit) if hit else _KEPT

    def stream(
        self,
        records: Callable,
        parse_error: Callable,
        rid_info: dict,
        describe: Callable[[str], None] = lambda text: None,
    ) -> Iterator[tuple[list, dict]]:
        """(chunk, result) in input order, as the local engine's map yields them; `describe` names the phase
        on the driver's progress bar (Ray Data shows its own per-operator bars while the cluster works)."""
        self.describe = describe
        describe("data (ray): starting Ray")
        session = RaySession(self.dc, self.progress)
        try:
            yield from self._run(session, records, parse_error, rid_info)
        except Exception as exc:  # a UserError raised in a Ray task (e.g. tokenizer not found): one clear line
            user = _user_error(exc)
            if user is not None:
                raise user from None
            raise
        finally:
            session.close()

    def _run(self, session: RaySession, records, parse_error, rid_info) -> Iterator[tuple[list, dict]]:
        deferred: list[tuple[int, Record]] = []  # parse errors, replayed where the local engine meets them
        clock = time.perf_counter()
        self.describe(f"data (ray, {session.cpus} CPUs): reading, shipping to the object store")
        shipped = _Shipped(session.ray, self.dc.batch_size, self.dc.ray.batches_per_block)
        for item in records(deferred):
            shipped.add(item, rid_info)
        shipped.flush(rid_info)
        self.stats["read_s"] = time.perf_counter() - clock
        self.stats["chunks"] = len(shipped.lengths)
        self.stats["blocks"] = len(shipped.refs)
        self.stats["rows"] = sum(shipped.lengths)
        replay = self._map_and_dedup(session, shipped, clock) if shipped.refs else iter(())
        yield from self._replay(replay, shipped.lengths, deferred, parse_error, rid_info)

    def _map_and_dedup(self, session: RaySession, shipped: _Shipped, clock: float) -> Iterator[Any]:
        """The per-row map, then exact-duplicate grouping and near-duplicate banding, on the cluster;
        returns the map results (chunk number, pickled result) to replay in order."""
        ray = session.ray
        parts = session.partitions
        self.describe(f"data (ray): map + dedup on the cluster ({len(shipped.lengths)} chunks)")
        ctx = ray.data.DataContext.get_current()
        preserve = ctx.execution_options.preserve_order
        ctx.execution_options.preserve_order = True  # chunk order kept (the replay checks it anyway)
        try:
            results = (
                ray.data.from_arrow_refs(shipped.refs)
                .map_batches(
                    process_chunks, fn_kwargs={"processor": self.processor}, batch_size=None, batch_format="numpy"
                )
                .materialize()
            )
        finally:
            ctx.execution_options.preserve_order = preserve
        self.stats["map_s"] = time.perf_counter() - clock - self.stats["read_s"]
        if self.dc.dedup.exact or self.lsh is not None:
            rows = results.select_columns(["keys"]).map_batches(
                expand_rows,
                fn_kwargs={"partitions": parts, "num_perm": self.dc.dedup.num_perm},
                batch_format="numpy",
                batch_size=None,
            )
            survivors = (
                self._exact(rows, parts, clock) if self.dc.dedup.exact else rows.select_columns(["pos", "id", "sig"])
            )
            if self.lsh is not None:
                edges = banding_pairs(survivors, self.lsh, parts)
                self.stats["verified_pairs"] = len(edges)
                starts = shipped.starts
                self.near = resolve_keep_first(edges, lambda rid: bisect_right(starts, rid) - 1)
        self.stats["dedup_s"] = time.perf_counter() - clock - self.stats["read_s"] - self.stats["map_s"]
        return results.select_columns(["k", "result"]).iter_batches(batch_format="numpy", batch_size=1)

    def _exact(self, rows: Any, parts: int, clock: float) -> Any:
        """Exact-duplicate groups (first by input position kept): records the duplicates, returns the survivors."""
        grouped = rows.groupby("part", num_partitions=parts).map_groups(exact_groups, batch_format="numpy")
        grouped = grouped.materialize()
        dups = grouped.map_batches(
            _select, fn_kwargs={"first": False, "columns": ("pos", "dup_of")}, batch_format="numpy", batch_size=None
        )
        for b in dups.iter_batches(batch_format="numpy", batch_size=65536):
            self.exact_duplicate_of.update(zip(b["pos"].tolist(), b["dup_of"].tolist()))
        self.stats["exact_s"] = time.perf_counter() - clock - self.stats["read_s"] - self.stats["map_s"]
        return grouped.map_batches(
            _select, fn_kwargs={"first": True, "columns": ("pos", "id", "sig")}, batch_format="numpy", batch_size=None
        )

    def _replay(
        self, replay: Iterator[Any], lengths: list[int], deferred: list[tuple[int, Record]], parse_error, rid_info
    ) -> Iterator[tuple[list, dict]]:
        """The chunks' results in input order, with parse errors where the local engine (workers=1) meets them."""
        self.describe("data (ray): accounting and spooling (driver)")
        size = self.dc.batch_size
        d = 0
        expected = 0
        for b in replay:
            k = int(b["k"][0])
            if k != expected:
                raise RuntimeError(f"ray engine: chunk {k} arrived where chunk {expected} was expected")
            expected += 1
            while d < len(deferred) and deferred[d][0] // size <= k:
                parse_error(deferred[d][1])
                d += 1
            result = pickle.loads(b["result"][0])
            rid_info.update(result.pop("where"))
            yield [None] * lengths[k], result
        if expected != len(lengths):
            raise RuntimeError(f"ray engine: {expected} of {len(lengths)} chunks came back")
        while d < len(deferred):
            parse_error(deferred[d][1])
            d += 1


class _Shipped:
    """Chunks of `batch_size` records pickled into Arrow blocks of `per_block` chunks in the object store."""

    def __init__(self, ray: Any, size: int, per_block: int):
        self.ray = ray
        self.size = size
        self.per_block = per_block
        self.refs: list[Any] = []  # object refs of the blocks
        self.starts: list[int] = []  # rid of each chunk's first record
        self.lengths: list[int] = []  # records per chunk
        self._chunk: list[tuple[int, str, Record]] = []
        self._pending: list[tuple[int, bytes]] = []  # (chunk number, pickled chunk) not yet in a block

    def add(self, item: tuple[int, str, Record], rid_info: dict) -> None:
        self._chunk.append(item)
        if len(self._chunk) >= self.size:
            self._ship(rid_info)

    def flush(self, rid_info: dict) -> None:
        if self._chunk:
            self._ship(rid_info)
        if self._pending:
            self._put_block()

    def _ship(self, rid_info: dict) -> None:
        chunk = self._chunk
        self.starts.append(chunk[0][0])
        self._pending.append((len(self.lengths), pickle.dumps(chunk, protocol=5)))
        self.lengths.append(len(chunk))
        if len(self._pending) >= self.per_block:
            self._put_block()
        for rid, _, _ in chunk:  # the driver keeps no per-row state while reading
            rid_info.pop(rid, None)
        self._chunk = []

    def _put_block(self) -> None:
        import pyarrow as pa

        table = pa.table(
            {
                "k": pa.array([k for k, _ in self._pending], pa.int64()),
                "payload": pa.array([p for _, p in self._pending], pa.large_binary()),
            }
        )
        self.refs.append(self.ray.put(table))
        self._pending.clear()

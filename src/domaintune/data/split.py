"""The whole-corpus decisions on the spooled rows: length outliers, the split, difficulty tiers, sampling.

Each step reads the small per-row numbers of `Spooled` and records its decisions in one `Plan`; no
row is read or written here. All randomness is seeded from the split seed and a fixed key per use.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import xxhash

from domaintune.data.config import DifficultyConfig, SplitConfig
from domaintune.data.spool import Spooled
from domaintune.layout import SPLIT_NAMES

TIERS = ("(none)", "easy", "medium", "hard")  # indexed by Plan.difficulty
HOLDOUT = "holdout"  # rows of data.split.holdout_group: never train/val/test, written to data/holdout_<name>.jsonl
HOLDOUT_DEV = "holdout_dev"  # holdout_group.dev_rows: the selection part, written to data/holdout_<name>_dev.jsonl
PLACES = (*SPLIT_NAMES, HOLDOUT, HOLDOUT_DEV)  # Plan.assign codes 1..5


def seeded_rng(seed: int, key: str) -> np.random.Generator:
    """A generator for one use (`key`) of the seed: the same key gives the same draws on every run."""
    return np.random.default_rng([seed, xxhash.xxh64_intdigest(key.encode()) & 0xFFFFFFFF])


@dataclass
class Plan:
    """Where each spooled row goes: its split, its difficulty tier, or the stage and reason it is dropped."""

    n: int
    seed: int
    assign: np.ndarray = field(init=False)  # 0 unplaced, 1 train, 2 val, 3 test, 4 holdout, 5 holdout_dev
    difficulty: np.ndarray = field(init=False)  # index into TIERS
    dropped: dict[int, tuple[str, str]] = field(default_factory=dict)  # row -> (stage, reason)
    detail: dict[int, dict[str, Any]] = field(default_factory=dict)  # row -> extra quarantine fields of its drop
    outliers: dict[str, Any] | None = None  # the length bounds, when outliers were looked for
    tiers: dict[str, Any] | None = None  # the difficulty quantiles, when tiers were given
    before_sampling: Counter[str] = field(default_factory=Counter)  # rows per split (and holdout)
    holdout: dict[str, Any] | None = None  # what the holdout step saw: rows per value of its field

    def __post_init__(self) -> None:
        self.assign = np.zeros(self.n, dtype=np.int8)
        self.difficulty = np.zeros(self.n, dtype=np.int8)

    def split_of(self, i: int) -> str | None:
        return PLACES[self.assign[i] - 1] if self.assign[i] else None


def drop_outliers(plan: Plan, rows: Spooled, sigma: float | None) -> None:
    """Rows whose length is beyond mean ± sigma·std (with at least 10 rows)."""
    if sigma is None or plan.n < 10:
        return
    lengths = np.asarray(rows.length, dtype=np.float64)
    mu, sd = float(lengths.mean()), float(lengths.std())
    lo, hi = mu - sigma * sd, mu + sigma * sd
    # a length is never negative: a bound below 0 means no row is a short outlier
    plan.outliers = {"mean": round(mu, 1), "std": round(sd, 1), "low": round(max(lo, 0.0), 1), "high": round(hi, 1)}
    if sd > 0:
        for i in np.nonzero((lengths < lo) | (lengths > hi))[0].tolist():
            side = "long" if lengths[i] > hi else "short"
            plan.dropped[i] = ("outlier", f"length {side} outlier (>{sigma}σ from mean {mu:.0f})")


def split(plan: Plan, rows: Spooled, sp: SplitConfig, root: np.ndarray | None = None) -> None:
    """train/val/test by the ratios: by time (newest last), or shuffled per stratum (one stratum: random).
    Whole groups are placed (`root`: per row the first row of its group, from `groups.find_groups`); rows already
    held out (`holdout.hold_out_group`) are not."""
    alive = [i for i in range(plan.n) if i not in plan.dropped and not plan.assign[i]]
    root = np.arange(plan.n) if root is None else root
    if sp.by == "time":
        _place(plan, grouped(_by_time(plan, rows, alive, sp), root), sp.ratios)
    else:
        names = rows.stratum_names()
        strata: dict[str, list[list[int]]] = defaultdict(list)
        for group in grouped(alive, root):  # a group counts in the stratum of its first row
            strata[names[rows.stratum[group[0]]] if sp.by == "stratified" else ""].append(group)
        for key in sorted(strata):
            groups = strata[key]
            rng = seeded_rng(plan.seed, key)
            _place(plan, [groups[j] for j in rng.permutation(len(groups))], sp.ratios)
    plan.before_sampling = Counter({s: int((plan.assign == k + 1).sum()) for k, s in enumerate(PLACES)})


def grouped(ordered: list[int], root: np.ndarray) -> list[list[int]]:
    """The rows as groups, in the order of each group's first row in `ordered`."""
    groups: dict[int, list[int]] = {}
    for i in ordered:
        groups.setdefault(int(root[i]), []).append(i)
    return list(groups.values())


def _by_time(plan: Plan, rows: Spooled, alive: list[int], sp: SplitConfig) -> list[int]:
    """The rows oldest first; a row whose date does not parse is dropped."""
    import pandas as pd

    times = pd.to_datetime(pd.Series([rows.time[i] for i in alive], dtype=object), errors="coerce")
    good = []
    for i, t in zip(alive, times):
        if pd.isna(t):
            plan.dropped[i] = ("split", f"unparseable date in {sp.time_field}")
        else:
            good.append((t.value, i))
    good.sort()
    return [i for _, i in good]


def _place(plan: Plan, groups: list[list[int]], ratios: list[float]) -> None:
    """Each group into the split where its middle row falls when the groups are laid end to end (rows on their
    own: exactly the first n_train rows to train, the next n_val to val)."""
    n_train, n_val, _ = split_counts(sum(len(g) for g in groups), ratios)
    pos = 0
    for group in groups:
        middle = pos + len(group) / 2
        plan.assign[group] = 1 if middle < n_train else (2 if middle < n_train + n_val else 3)
        pos += len(group)


def split_counts(n: int, ratios: list[float]) -> tuple[int, int, int]:
    total = sum(ratios)
    n_val = round(n * ratios[1] / total)
    n_test = round(n * ratios[2] / total)
    if n_val + n_test > n:
        n_test = max(0, n - n_val)
    return n - n_val - n_test, n_val, n_test


def assign_difficulty(plan: Plan, rows: Spooled, dc: DifficultyConfig) -> None:
    """easy/medium/hard by the tertiles of answer length (or a numeric field) over the placed rows."""
    if not dc.enabled or not plan.assign.any():
        return
    placed = plan.assign > 0
    all_scores = np.asarray(rows.answer_length if dc.by == "length" else rows.score, dtype=np.float64)
    scores = all_scores[placed]
    valid = ~np.isnan(scores)
    if valid.any():
        q1, q2 = np.quantile(scores[valid], [1 / 3, 2 / 3])
        plan.tiers = {"by": dc.by, "easy_max": round(float(q1), 1), "medium_max": round(float(q2), 1)}
        tier = np.where(all_scores <= q1, 1, np.where(all_scores <= q2, 2, 3)).astype(np.int8)
        tier[np.isnan(all_scores) | ~placed] = 0
        plan.difficulty = tier


def sample(plan: Plan, rows: Spooled, which: str, cap: int | None, stratified: bool) -> None:
    """At most `cap` rows of split `which` (stratified: each stratum keeps its share, largest remainders
    first); the others are dropped as sampled out."""
    code = PLACES.index(which) + 1
    members = [i for i in np.nonzero(plan.assign == code)[0].tolist() if i not in plan.dropped]
    if cap is None or len(members) <= cap:
        return
    rng = seeded_rng(plan.seed, "sample:" + which)
    chosen: set[int] = set()
    if stratified:
        names = rows.stratum_names()
        by: dict[str, list[int]] = defaultdict(list)
        for i in members:
            by[names[rows.stratum[i]]].append(i)
        keys = sorted(by)
        quota = {k: cap * len(by[k]) / len(members) for k in keys}
        take = {k: int(quota[k]) for k in keys}
        for k in sorted(keys, key=lambda k: (-(quota[k] - take[k]), k))[: cap - sum(take.values())]:
            take[k] += 1
        for k in keys:
            group = by[k]
            chosen.update(group[j] for j in rng.permutation(len(group))[: take[k]])
    else:
        chosen = {members[j] for j in rng.permutation(len(members))[:cap]}
    for i in members:
        if i not in chosen:
            plan.dropped[i] = ("sample", f"sampled out ({which} capped at {cap})")

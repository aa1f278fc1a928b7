"""The template-learning alarm: is a model's gain over base concentrated in a few items or in one stratum?

A tuned model that learnt one answer template (MedQuAD's "What are the treatments for X?" answers all start
alike) shows a large mean gain that comes almost entirely from the few test items sharing that template; on
other questions, or other sources, it has gained little. This module looks at the per-item deltas (model -
base, one metric) of one set:

* items: the fewest items whose gains sum to over `gain_share` of the total gain; the alarm sounds when they are
  under `max_item_share` of the items (default: over half of the gain from under a quarter of the items);
* stratum: the stratum (e.g. question type) bringing the largest part of the total gain; the alarm sounds when
  it brings over `stratum_gain_share` of it while holding at most `max_stratum_item_share` of the items;

and for each alarm, the gain without those items (or that stratum), with its paired bootstrap interval.
There is nothing to concentrate when the total gain is not positive: then no alarm sounds.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import numpy as np

from domaintune.eval.config import ConcentrationConfig
from domaintune.eval.stats import paired_bootstrap_delta

_LISTED = 25  # flagged items listed in the report at most


def gain_concentration(
    base: Sequence[float],
    model: Sequence[float],
    ids: Sequence[str],
    strata: Sequence[str] | None,
    cfg: ConcentrationConfig,
    *,
    samples: int = 1000,
    seed: int = 0,
) -> dict[str, Any]:
    """The alarm on one set: per-item scores of base and model (aligned with `ids`, and `strata` when known)."""
    b, m = np.asarray(base, dtype=float), np.asarray(model, dtype=float)
    if b.shape != m.shape or len(ids) != b.shape[0] or (strata is not None and len(strata) != len(ids)):
        raise ValueError(f"gain_concentration needs aligned items: {b.shape}, {m.shape}, {len(ids)} ids")
    deltas = m - b
    total = float(deltas.sum())
    out: dict[str, Any] = {
        "n": int(deltas.size),
        "gain": float(deltas.mean()) if deltas.size else 0.0,
        "total_gain": total,
        "thresholds": cfg.model_dump(exclude={"enabled"}),
        "items": None,
        "stratum": None,
        "flagged": False,
        "reasons": [],
    }
    if total <= 0:
        out["reasons"].append("no positive total gain: nothing to concentrate")
        return out
    out["items"] = _items(b, m, deltas, total, list(ids), cfg, samples, seed)
    if strata is not None and len(set(strata)) > 1:
        out["stratum"] = _stratum(b, m, deltas, total, list(strata), cfg, samples, seed)
    for part in ("items", "stratum"):
        entry = out[part]
        if entry and entry["flagged"]:
            out["flagged"] = True
            out["reasons"].append(entry["reason"])
    return out


def _items(
    b: np.ndarray,
    m: np.ndarray,
    deltas: np.ndarray,
    total: float,
    ids: list[str],
    cfg: ConcentrationConfig,
    samples: int,
    seed: int,
) -> dict[str, Any]:
    """The fewest largest-gain items that bring over `gain_share` of the total gain."""
    order = sorted(range(len(ids)), key=lambda i: (-deltas[i], ids[i]))
    running = np.cumsum(deltas[order])
    k = int(np.argmax(running > cfg.gain_share * total)) + 1  # running ends at `total`, so some prefix passes
    top = order[:k]
    share_items, share_gain = k / len(ids), float(running[k - 1] / total)
    flagged = share_items < cfg.max_item_share
    entry: dict[str, Any] = {
        "flagged": flagged,
        "k": k,
        "share_of_items": share_items,
        "share_of_gain": share_gain,
        "ids": [ids[i] for i in top[:_LISTED]],
        "deltas": [float(deltas[i]) for i in top[:_LISTED]],
        "reason": f"{share_gain:.0%} of the gain comes from {k} of {len(ids)} items ({share_items:.0%})",
    }
    if flagged:
        rest = np.setdiff1d(np.arange(len(ids)), top)
        entry["without"] = _without(b, m, rest, samples, seed)
    return entry


def _stratum(
    b: np.ndarray,
    m: np.ndarray,
    deltas: np.ndarray,
    total: float,
    strata: list[str],
    cfg: ConcentrationConfig,
    samples: int,
    seed: int,
) -> dict[str, Any]:
    """The stratum bringing the largest part of the gain, and every stratum's part."""
    members: dict[str, list[int]] = defaultdict(list)
    for i, s in enumerate(strata):
        members[s].append(i)
    by = {
        s: {"n": len(idx), "gain_sum": float(deltas[idx].sum()), "share_of_gain": float(deltas[idx].sum() / total)}
        for s, idx in sorted(members.items(), key=lambda kv: (-float(deltas[kv[1]].sum()), kv[0]))
    }
    value, top = next(iter(by.items()))
    share_items = top["n"] / len(strata)
    flagged = top["share_of_gain"] > cfg.stratum_gain_share and share_items <= cfg.max_stratum_item_share
    entry: dict[str, Any] = {
        "flagged": flagged,
        "value": value,
        "n": top["n"],
        "share_of_items": share_items,
        "share_of_gain": top["share_of_gain"],
        "by_stratum": by,
        "reason": f"{top['share_of_gain']:.0%} of the gain comes from stratum {value!r} "
        f"({top['n']} of {len(strata)} items, {share_items:.0%})",
    }
    if flagged:
        rest = np.asarray([i for i, s in enumerate(strata) if s != value], dtype=int)
        entry["without"] = _without(b, m, rest, samples, seed)
    return entry


def _without(b: np.ndarray, m: np.ndarray, rest: np.ndarray, samples: int, seed: int) -> dict[str, Any]:
    """The gain (model - base) on the `rest` items, with its paired bootstrap interval."""
    if rest.size == 0:
        return {"delta": None, "ci_low": None, "ci_high": None, "n": 0}
    d = paired_bootstrap_delta(b[rest], m[rest], samples=samples, seed=seed)
    return {**d, "base": float(b[rest].mean()), "model": float(m[rest].mean())}

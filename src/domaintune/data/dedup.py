"""`Dedup`: the exact and near-duplicate decisions, taken in input order, and the clusters the report samples.

The local engine decides here (a hash table, `LSHIndex`); the ray engine decided on the cluster and this
object only reads its verdicts back, so both engines drop the same rows.
"""

from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING, Any

import numpy as np

from domaintune.data.config import DedupConfig
from domaintune.data.minhash import DedupResult, LSHIndex

if TYPE_CHECKING:
    from domaintune.data.ray_engine import RayEngine

DUPLICATES_SHOWN = 5  # per cluster in the report


class Dedup:
    def __init__(self, cfg: DedupConfig):
        self.cfg = cfg
        self.lsh = LSHIndex(cfg.threshold, cfg.num_perm) if cfg.near else None
        self.engine: RayEngine | None = None  # set when the ray engine decided
        self._exact_seen: dict[int, str] = {}  # row hash -> id of the first row with it
        self.clusters: dict[str, dict[str, Any]] = {}  # kept row id -> sampled duplicates
        self.sizes: Counter[str] = Counter()  # kept row id -> duplicates dropped

    def exact_duplicate_of(self, outcome: dict[str, Any]) -> str | None:
        """The id of the earlier row this one repeats exactly; otherwise remembers it as a first."""
        if self.engine is not None:  # decided by the cluster's exact-duplicate grouping
            return self.engine.exact_duplicate_of.get(outcome["rid"])
        if not self.cfg.exact:
            return None
        first = self._exact_seen.get(outcome["exact"])
        if first is None:
            self._exact_seen[outcome["exact"]] = outcome["row"]["id"]
        return first

    def near_verdicts(self, candidates: list[tuple[dict[str, Any], Any]]) -> list[DedupResult | None]:
        """One verdict per (outcome, signature) of a batch's exact-unique rows, in order (None: not checked)."""
        if self.engine is not None:  # decided by the cluster's banding step (see ray_engine)
            return [self.engine.near_verdict(o["rid"]) for o, _ in candidates]
        if self.lsh is not None and candidates:
            sigs = np.stack([sig for _, sig in candidates])
            return list(self.lsh.add_batch(sigs, [o["row"]["id"] for o, _ in candidates]))
        return [None] * len(candidates)

    def add_to_cluster(self, kept_id: str, pub: dict[str, Any], similarity: float, kind: str) -> None:
        self.sizes[kept_id] += 1
        if kept_id not in self.clusters:
            if len(self.clusters) >= self.cfg.max_clusters_reported:
                return
            self.clusters[kept_id] = {"duplicates": [], "size": 1}
        cluster = self.clusters[kept_id]
        cluster["size"] = self.sizes[kept_id] + 1
        if len(cluster["duplicates"]) < DUPLICATES_SHOWN:
            cluster["duplicates"].append(
                {"id": pub["id"], "kind": kind, "similarity": round(similarity, 3), "text": snippet(pub)}
            )

    def report(self, exact_dropped: int, near_dropped: int, kept_snippets: dict[str, str]) -> dict[str, Any]:
        return {
            "exact_dropped": exact_dropped,
            "near_dropped": near_dropped,
            "threshold": self.cfg.threshold,
            "num_perm": self.cfg.num_perm,
            "bands": self.lsh.bands if self.lsh is not None else None,
            "rows_per_band": self.lsh.rows if self.lsh is not None else None,
            "clusters": len(self.sizes),
            "largest_cluster": max(self.sizes.values()) + 1 if self.sizes else 0,
            "cluster_sample": [
                {"kept": {"id": rep, "text": kept_snippets.get(rep, "(dropped later)")}, **c}
                for rep, c in self.clusters.items()
            ],
        }


def snippet(pub: dict[str, Any], limit: int = 160) -> str:
    """A row's text on one line, cut at `limit` characters (for the report)."""
    if "messages" in pub:
        text = " | ".join(m["content"] for m in pub["messages"] if m["role"] != "system")
    elif isinstance(pub.get("prompt"), list):
        turns = [m for k in ("prompt", "chosen", "rejected", "completion") for m in pub.get(k) or []]
        text = " | ".join(m["content"] for m in turns if m["role"] != "system")
    elif "text" in pub and "instruction" not in pub:
        text = pub["text"]
    else:
        text = " | ".join(pub.get(k, "") for k in ("instruction", "input", "output") if pub.get(k))
    text = text.replace("\n", " ")
    return text if len(text) <= limit else text[:limit] + "…"

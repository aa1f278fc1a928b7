"""`find_groups`: the rows that must land in the same split (data.split.group_by).

`prompt` links rows whose prompts are the same after normalisation (case, width, punctuation, whitespace) or
near duplicates (`decontaminate.near_threshold`): a question asked twice, with different answers, can then
never sit in train and in test at once. A field (`focus`, a document, patient or customer id) links rows
with the same value. Rows linked by any criterion form one group (union-find over the spooled rows).

Near duplicates are found keep-first (`PromptIndex.add_new`): each row is compared with the prompts kept
before it (a prompt is kept when it matches none), and joins the nearest, so a chain of small edits cannot
merge a whole template family into one group.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from domaintune.data.overlap import PromptIndex, row_prompt
from domaintune.data.split import Plan
from domaintune.data.spool import Spooled
from domaintune.data.text import prompt_key

PROMPT = "prompt"
_BATCH = 2048


@dataclass
class Groups:
    """Per spooled row the index of its group's first row (itself when it stands alone)."""

    root: np.ndarray
    by: list[str] = field(default_factory=list)
    links: Counter[str] = field(default_factory=Counter)  # rows joined to an earlier row, by what joined them

    @classmethod
    def singletons(cls, n: int) -> Groups:
        return cls(np.arange(n, dtype=np.int64))

    def sizes(self, alive: list[int]) -> Counter[int]:
        return Counter(self.root[alive].tolist())

    def report(self, alive: list[int]) -> dict[str, Any]:
        sizes = self.sizes(alive)
        shared = [s for s in sizes.values() if s > 1]
        return {
            "by": self.by,
            "groups": len(sizes),
            "rows_in_shared_groups": sum(shared),
            "largest": max(sizes.values(), default=0),
            "links": dict(self.links),
        }


class _UnionFind:
    def __init__(self, n: int):
        self.parent = np.arange(n, dtype=np.int64)

    def find(self, i: int) -> int:
        parent = self.parent
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = int(parent[i])
        return i

    def union(self, i: int, j: int) -> bool:
        """Join the groups of i and j (the smaller index stays the root); False when already joined."""
        a, b = self.find(i), self.find(j)
        if a == b:
            return False
        self.parent[max(a, b)] = min(a, b)
        return True


class _NearPrompts:
    """Keep-first near-duplicate linking of prompts: a row joins the earlier kept prompt it is nearest."""

    def __init__(self, near_threshold: float, char_ngram: int):
        self.index = PromptIndex(near_threshold, None, char_ngram)

    def link(self, rows: list[int], prompts: list[str], uf: _UnionFind, links: Counter[str]) -> None:
        for i, m in zip(rows, self.index.add_new([str(i) for i in rows], prompts)):
            if m is not None and m.kind == "near" and uf.union(i, int(m.matched_id)):
                links["near prompt"] += 1


def find_groups(
    plan: Plan, rows: Spooled, group_by: list[str], near_threshold: float | None, char_ngram: int
) -> Groups:
    """The groups of the rows not dropped so far (one pass over the spool)."""
    if not group_by:
        return Groups.singletons(plan.n)
    uf = _UnionFind(plan.n)
    links: Counter[str] = Counter()
    first: dict[tuple[str, str], int] = {}  # (criterion, value) -> first row with it
    fields = [f for f in group_by if f != PROMPT]
    near = _NearPrompts(near_threshold, char_ngram) if PROMPT in group_by and near_threshold else None
    batch: tuple[list[int], list[str]] = ([], [])
    for i, item in rows.read():
        if i in plan.dropped:
            continue
        pub = item["row"]
        values = [(f, _field_value(pub.get(f))) for f in fields]
        if PROMPT in group_by:
            prompt = row_prompt(pub)
            values.append((PROMPT, prompt_key(prompt)))
            batch[0].append(i)
            batch[1].append(prompt)
        for criterion, value in values:
            if value and uf.union(i, first.setdefault((criterion, value), i)):
                links[f"same {criterion}"] += 1
        if near is not None and len(batch[0]) >= _BATCH:
            near.link(*batch, uf, links)
            batch = ([], [])
    if near is not None and batch[0]:
        near.link(*batch, uf, links)
    root = np.fromiter((uf.find(i) for i in range(plan.n)), dtype=np.int64, count=plan.n)
    return Groups(root, list(group_by), links)


def _field_value(value: Any) -> str:
    """A field's value as a group key ("" for a missing or empty value: such a row is not linked by it)."""
    if value is None or value == "" or value == []:
        return ""
    return value if isinstance(value, str) else json.dumps(value, sort_keys=True, ensure_ascii=False)

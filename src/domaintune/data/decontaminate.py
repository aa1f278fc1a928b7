"""`decontaminate`: no prompt is trained on and then tested on.

Dev rows of the holdout (holdout_group.dev_rows, the selection set) whose prompt repeats a gated holdout prompt are
dropped, then val rows whose prompt repeats a test (or holdout, or dev) prompt, then train rows whose prompt repeats
a val, test, holdout or dev prompt (data.split.holdout_group, an out-of-source test set): the same prompt after
normalisation, a near-duplicate one, or a shared long n-gram (`overlap.py`).
Each quarantine row names the val/test row it matched. The val/test index is kept (`HeldOut`) so that
synthetic train rows (data.augment) are checked against it too.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from domaintune.data.config import DecontamConfig
from domaintune.data.overlap import Match, PromptIndex, row_prompt
from domaintune.data.processing import answer_text
from domaintune.data.split import Plan
from domaintune.data.spool import Spooled

STAGE = "decontaminate"
_TRAIN, _VAL, _TEST, _HOLDOUT, _DEV = 1, 2, 3, 4, 5
_TESTED = ("test", "holdout", "holdout_dev")  # the sets a model is scored on: no val or train row may repeat them
_BATCH = 2048


_RANK = {"exact": 0, "near": 1, "ngram": 2}  # the strongest kind of match names the reason


@dataclass
class HeldOut:
    """The val and test prompts that train rows (real or synthetic) must not repeat, one index per split (the
    very indexes the report's leakage table builds from the written files), and what was dropped."""

    cfg: DecontamConfig
    char_ngram: int = 5
    indexes: dict[str, PromptIndex] = field(default_factory=dict)  # split -> its prompts
    before: Counter[str] = field(default_factory=Counter)  # rows per split before decontamination
    removed: Counter[str] = field(default_factory=Counter)  # rows dropped, per split
    by_kind: Counter[str] = field(default_factory=Counter)  # rows dropped, per kind of match
    split_kinds: dict[str, Counter[str]] = field(default_factory=dict)  # split -> kind of match -> rows dropped

    @property
    def dropped(self) -> int:
        return sum(self.removed.values())

    def index(self, split: str, entries: list[Entry]) -> None:
        """The split's prompts (and n-gram texts), to check other rows against."""
        hasher = next(iter(self.indexes.values())).hasher if self.indexes else None
        index = PromptIndex(self.cfg.near_threshold, self.cfg.ngram, self.char_ngram, hasher=hasher)
        index.add([e[1] for e in entries], [e[2] for e in entries], [e[3] for e in entries])
        self.indexes[split] = index

    def text(self, pub: dict[str, Any]) -> str:
        """The text of the n-gram check: the prompt, or (scope all) the prompt and the answer."""
        if self.cfg.scope == "prompt":
            return row_prompt(pub)
        return row_prompt(pub) + "\n" + answer_text(_internal(pub))

    def matches(self, prompts: list[str], texts: list[str], splits: tuple[str, ...]) -> list[tuple[str, Match] | None]:
        """Per prompt, the (split, row) of `splits` it repeats, the strongest match first (test before val)."""
        best: list[tuple[str, Match] | None] = [None] * len(prompts)
        for split in splits:
            if split not in self.indexes or not prompts:
                continue
            for i, m in enumerate(self.indexes[split].match(prompts, texts)):
                old = best[i]
                if m is not None and (old is None or _RANK[m.kind] < _RANK[old[1].kind]):
                    best[i] = (split, m)
        return best

    def match(self, pub: dict[str, Any]) -> tuple[str, Match] | None:
        """The val/test row this row's prompt repeats, if any (synthetic rows are checked one by one)."""
        return self.matches([row_prompt(pub)], [self.text(pub)], (*_TESTED, "val"))[0]

    def reason(self, found: tuple[str, Match]) -> str:
        """The quarantine reason for a row that matched (its text up to " (" is what the report counts)."""
        split, m = found
        if m.kind == "exact":
            return f"prompt repeats a {split} prompt (the same after normalising case, width, punctuation, spaces)"
        if m.kind == "near":
            return f"prompt near-duplicates a {split} prompt (similarity {m.similarity} >= {self.cfg.near_threshold})"
        what = "prompt" if self.cfg.scope == "prompt" else "row"
        return f"shares a {self.cfg.ngram}-gram with a {split} {what}"

    @staticmethod
    def detail(found: tuple[str, Match]) -> dict[str, Any]:
        """The quarantine fields naming the matched row."""
        split, m = found
        return {
            "matched_id": m.matched_id,
            "matched_split": split,
            "match": m.kind,
            "similarity": m.similarity if m.kind != "ngram" else None,
        }

    def report(self) -> dict[str, Any]:
        c = self.cfg
        return {
            "enabled": c.enabled,
            "near_threshold": c.near_threshold,
            "ngram": c.ngram,
            "scope": c.scope,
            "dropped": self.dropped,
            "by_split": {
                s: self.removed[s] for s in ("train", "val", "holdout_dev") if s != "holdout_dev" or s in self.before
            },
            "by_kind": dict(self.by_kind),
            "before": dict(self.before),
        }


Entry = tuple[int, str, str, str]  # (spooled row, row id, prompt, text of the n-gram check)


def decontaminate(plan: Plan, rows: Spooled, cfg: DecontamConfig, char_ngram: int = 5) -> HeldOut:
    """Drops dev rows that repeat a gated holdout prompt, val rows that repeat a test, holdout or dev prompt, then
    train rows that repeat a val, test, holdout or dev prompt."""
    held = HeldOut(cfg, char_ngram)
    if not cfg.enabled or not plan.assign.any():
        return held
    kept: dict[int, list[Entry]] = {_VAL: [], _TEST: [], _HOLDOUT: [], _DEV: []}
    for i, item in rows.read():
        if plan.assign[i] in kept and i not in plan.dropped:
            kept[plan.assign[i]].append(_entry(held, i, item["row"]))
    val = kept[_VAL]
    held.before.update(val=len(val), test=len(kept[_TEST]))
    held.index("test", kept[_TEST])
    if kept[_HOLDOUT]:
        held.before["holdout"] = len(kept[_HOLDOUT])
        held.index("holdout", kept[_HOLDOUT])
    if kept[_DEV]:  # the selection rows never repeat a gated prompt (the groups are apart; n-grams may not be)
        held.before["holdout_dev"] = len(kept[_DEV])
        _drop_matches(plan, held, kept[_DEV], "holdout_dev", ("holdout",))
        held.index("holdout_dev", [e for e in kept[_DEV] if e[0] not in plan.dropped])
    _drop_matches(plan, held, val, "val", _TESTED)
    held.index("val", [e for e in val if e[0] not in plan.dropped])
    batch: list[Entry] = []
    for i, item in rows.read():
        if plan.assign[i] == _TRAIN and i not in plan.dropped:
            held.before["train"] += 1
            batch.append(_entry(held, i, item["row"]))
            if len(batch) >= _BATCH:
                _drop_matches(plan, held, batch, "train", (*_TESTED, "val"))
                batch = []
    _drop_matches(plan, held, batch, "train", (*_TESTED, "val"))
    return held


def _entry(held: HeldOut, i: int, pub: dict[str, Any]) -> Entry:
    return i, pub["id"], row_prompt(pub), held.text(pub)


def _drop_matches(plan: Plan, held: HeldOut, entries: list[Entry], split: str, against: tuple[str, ...]) -> None:
    found = held.matches([e[2] for e in entries], [e[3] for e in entries], against)
    for (i, _, _, _), hit in zip(entries, found):
        if hit is not None:
            plan.dropped[i] = (STAGE, held.reason(hit))
            plan.detail[i] = held.detail(hit)
            held.removed[split] += 1
            held.by_kind[hit[1].kind] += 1
            held.split_kinds.setdefault(split, Counter())[hit[1].kind] += 1


def _internal(pub: dict[str, Any]) -> dict[str, Any]:
    """Public (spooled) row → the internal shape that answer_text understands."""
    if "messages" in pub:
        return {"kind": "messages", "messages": pub["messages"]}
    if isinstance(pub.get("prompt"), list):
        return {"kind": "pref", "pref": pub}
    if "text" in pub and "instruction" not in pub:
        return {"kind": "text", "fields": {"text": pub["text"]}}
    return {"kind": "qa", "fields": {k: pub.get(k, "") for k in ("instruction", "input", "output")}}

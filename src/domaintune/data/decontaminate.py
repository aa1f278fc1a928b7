"""`decontaminate`: train rows that share a long n-gram with a val/test prompt are dropped.

The val/test n-grams are kept (`HeldOut`) so that synthetic train rows are checked against them too.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import xxhash

from domaintune.data.config import DecontamConfig
from domaintune.data.processing import answer_text, prompt_text
from domaintune.data.split import Plan
from domaintune.data.spool import Spooled
from domaintune.data.text import is_cjk, words

_WS = re.compile(r"\s+")


@dataclass
class HeldOut:
    """The n-gram hashes of the val/test rows' text (empty when decontamination is off)."""

    cfg: DecontamConfig
    grams: set[int] = field(default_factory=set)
    dropped: int = 0  # train rows dropped

    def text(self, pub: dict[str, Any]) -> str:
        """The text compared: the prompt, or (scope all) the prompt and the answer."""
        internal = _internal(pub)
        if self.cfg.scope == "prompt":
            return prompt_text(internal)
        return prompt_text(internal) + "\n" + answer_text(internal)

    def touches(self, pub: dict[str, Any]) -> bool:
        """Whether the row shares an n-gram with a val/test row."""
        return bool(self.grams) and not ngram_hashes(self.text(pub), self.cfg.ngram).isdisjoint(self.grams)

    def report(self) -> dict[str, Any]:
        c = self.cfg
        return {"enabled": c.enabled, "ngram": c.ngram, "scope": c.scope, "dropped": self.dropped}


def decontaminate(plan: Plan, rows: Spooled, cfg: DecontamConfig) -> HeldOut:
    """Collects the val/test n-grams, then drops the train rows that share one."""
    held = HeldOut(cfg)
    if not cfg.enabled or not plan.assign.any():
        return held
    for i, item in rows.read():
        if i not in plan.dropped and plan.assign[i] in (2, 3):
            held.grams |= ngram_hashes(held.text(item["row"]), cfg.ngram)
    if not held.grams:
        return held
    contaminated = [
        i for i, item in rows.read() if i not in plan.dropped and plan.assign[i] == 1 and held.touches(item["row"])
    ]
    for i in contaminated:
        plan.dropped[i] = ("decontaminate", f"shares a {cfg.ngram}-gram with a val/test prompt")
    held.dropped = len(contaminated)
    return held


def ngram_hashes(text: str, n: int) -> set[int]:
    """Hashes of the text's character n-grams (CJK, whitespace removed) or word n-grams."""
    if is_cjk(text):
        compact = _WS.sub("", text)
        grams = [compact[i : i + n] for i in range(len(compact) - n + 1)]
    else:
        toks = words(text)
        grams = [" ".join(toks[i : i + n]) for i in range(len(toks) - n + 1)]
    return {xxhash.xxh64_intdigest(g.encode()) for g in grams}


def _internal(pub: dict[str, Any]) -> dict[str, Any]:
    """Public (spooled) row → the internal shape that prompt_text understands."""
    if "messages" in pub:
        return {"kind": "messages", "messages": pub["messages"]}
    if "text" in pub and "instruction" not in pub:
        return {"kind": "text", "fields": {"text": pub["text"]}}
    return {"kind": "qa", "fields": {k: pub.get(k, "") for k in ("instruction", "input", "output")}}

"""A round's new training rows from production feedback: review rules, PII, holdout, dedup, decontamination.

Feedback comes from the serving store (`domaintune serve` logs every request, PII-redacted, and
`/v1/feedback` adds ratings and corrections). Per logged request, within the round's window:

* a reviewer's thumbs-down without a correction vetoes the request;
* the latest correction that differs from the model's answer becomes a row (prompt + correction);
* with `thumbs: approved`, a reviewer's thumbs-up makes a row of the model's own answer;
* anything else (a thumbs-down alone, an unapproved thumbs-up) gives no row, and says why.

Reviewers are the API keys named in `reviewers` and every admin key. Rows are PII-redacted again
(a store written with `serve.redact_pii: false` is not trusted), a stable share is held out by
request id (never trained on, in this round or a later one, so the child and its parent can be
compared on it), and the rest are deduplicated against the parent's training rows and each other and
decontaminated against every test set. Every dropped request is kept with its reason.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any, Literal

from domaintune.data.text import normalise_text

if TYPE_CHECKING:
    from domaintune.data.config import DataConfig


@dataclass(frozen=True)
class ReviewRules:
    """Which feedback becomes training data."""

    thumbs: Literal["off", "approved"] = "off"  # approved: a reviewer's thumbs-up makes the answer a row
    reviewers: tuple[str, ...] = ()  # key names whose ratings approve or veto (admin keys always do)
    holdout: float = 0.2  # share of requests (by id) held out to evaluate child vs parent, never trained on
    redact_pii: bool = True

    def as_dict(self) -> dict[str, Any]:
        return {
            "thumbs": self.thumbs,
            "reviewers": list(self.reviewers),
            "holdout": self.holdout,
            "redact_pii": self.redact_pii,
        }


@dataclass
class Intake:
    """What a round takes from feedback (and new sources) and what it leaves, with reasons."""

    seen: int = 0  # feedback rows in the window
    requests: int = 0  # logged requests they belong to
    train: list[dict[str, Any]] = field(default_factory=list)
    holdout: list[dict[str, Any]] = field(default_factory=list)
    dropped: list[dict[str, Any]] = field(default_factory=list)  # {id, request_id, stage, reason}
    pii: Counter[str] = field(default_factory=Counter)

    def drop(self, row: dict[str, Any], stage: str, reason: str, **detail: Any) -> None:
        self.dropped.append(
            {"id": row.get("id"), "request_id": row.get("request_id"), "stage": stage, "reason": reason, **detail}
        )

    def counts(self) -> dict[str, int]:
        return dict(Counter(d["reason"].split(" (")[0] for d in self.dropped))

    def feedback_train_rows(self) -> int:
        return sum(1 for r in self.train if str(r.get("origin", "")).startswith("feedback"))


# ---------------------------------------------------------------------- reading the store


def read_feedback(
    store_url: str, iterations: int, start: datetime | None, end: datetime, rules: ReviewRules
) -> tuple[Intake, list[dict[str, Any]]]:
    """(intake with the requests that gave no row, candidate rows) from the feedback posted in (start, end]."""
    from domaintune.serve.store import Store

    store = Store(store_url, key_hash_iterations=iterations)
    try:
        pairs = [
            (fb, req)
            for fb, req in store.feedback_with_requests()
            if (start is None or fb.created_at > start) and fb.created_at <= end
        ]
        keys = store.list_keys()
    finally:
        store.engine.dispose()
    reviewer_ids = {k.id for k in keys if k.is_admin or k.name in rules.reviewers}
    by_request: dict[str, list[Any]] = {}
    requests: dict[str, Any] = {}
    for fb, req in pairs:
        by_request.setdefault(req.id, []).append(fb)
        requests[req.id] = req
    intake = Intake(seen=len(pairs), requests=len(by_request))
    rows = []
    for request_id, feedback in by_request.items():
        row = _reviewed_row(requests[request_id], feedback, reviewer_ids, rules, intake)
        if row is not None:
            rows.append(row)
    return intake, rows


def _reviewed_row(
    req: Any, feedback: list[Any], reviewer_ids: set[str], rules: ReviewRules, intake: Intake
) -> dict[str, Any] | None:
    """One request's row under the review rules, or None (the reason recorded in `intake`)."""
    ids = [fb.id for fb in feedback]
    base = {"id": f"fb-{req.id}", "request_id": req.id}
    reviewed = [fb for fb in feedback if fb.key_id in reviewer_ids]
    if any(fb.rating < 0 and not (fb.correction or "").strip() for fb in reviewed):
        intake.drop(base, "review", "vetoed by a reviewer (thumbs-down without a correction)")
        return None
    corrections = [fb for fb in feedback if (fb.correction or "").strip()]
    original = (req.response or "").strip()
    if corrections:
        answer = corrections[-1].correction.strip()  # oldest first: the latest correction wins
        if _key(answer) == _key(original):
            intake.drop(base, "review", "correction is the same as the model's answer")
            return None
        kind = "correction"
    elif rules.thumbs == "approved" and any(fb.rating > 0 for fb in reviewed) and original:
        answer, kind = original, "approved"
    else:
        intake.drop(base, "review", _why_not(feedback, reviewed, rules, original))
        return None
    messages = [*_prompt_messages(req.prompt), {"role": "assistant", "content": answer}]
    return {
        **base,
        "messages": messages,
        "origin": f"feedback/{kind}",
        "feedback_ids": ids,
        "served_version": req.version,
        "feedback_at": max(fb.created_at for fb in feedback).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }


def _why_not(feedback: list[Any], reviewed: list[Any], rules: ReviewRules, original: str) -> str:
    """Why a request without a usable correction gives no row."""
    if not any(fb.rating > 0 for fb in feedback):
        return "thumbs-down without a correction (nothing to train on)"
    if rules.thumbs == "off":
        return "thumbs-up not taken (thumbs: off)"
    if not any(fb.rating > 0 for fb in reviewed):
        return "thumbs-up without a reviewer's approval"
    return "approved thumbs-up of an empty answer (nothing to train on)"


def _prompt_messages(prompt: Any) -> list[dict[str, str]]:
    if isinstance(prompt, str):  # /v1/completions: the raw prompt becomes one user turn
        return [{"role": "user", "content": prompt}]
    return [{"role": str(m["role"]), "content": str(m.get("content") or "")} for m in prompt]


# ---------------------------------------------------------------------- screening


def redact(rows: list[dict[str, Any]], data: DataConfig, intake: Intake) -> None:
    """PII-redact every message in place with the data stage's redactor and `data.pii.types`."""
    from domaintune.data.pii import redact_pii

    for row in rows:
        for message in row["messages"]:
            text, counts = redact_pii(message["content"], data.pii.types)
            message["content"] = text
            intake.pii.update(counts)


def in_holdout(request_id: str, share: float) -> bool:
    """A stable choice by request id: the same request is held out in every round."""
    digest = int(hashlib.sha256(request_id.encode()).hexdigest()[:8], 16)
    return digest / 2**32 < share


def screen(
    candidates: list[dict[str, Any]],
    parent_train: list[dict[str, Any]],
    test_sets: dict[str, list[dict[str, Any]]],
    data: DataConfig,
    rules: ReviewRules,
    intake: Intake,
    near_threshold: float | None = None,
) -> None:
    """Split candidates into holdout and train rows of `intake`, dropping repeats and contaminated rows.

    Prompts are near duplicates at `near_threshold` (default: `data.decontaminate.near_threshold`)."""
    near = near_threshold if near_threshold is not None else _near(data)
    trained_prompts = _Index(near, None)
    trained_prompts.add([str(r.get("id")) for r in parent_train], [prompt_of(r) for r in parent_train])
    held: list[dict[str, Any]] = []
    rest: list[dict[str, Any]] = []
    for row in candidates:
        is_feedback = str(row.get("origin", "")).startswith("feedback")
        (held if is_feedback and in_holdout(str(row["request_id"]), rules.holdout) else rest).append(row)
    for row, hit in zip(held, trained_prompts.match([prompt_of(r) for r in held])):
        if hit is None:
            intake.holdout.append(row)
        else:
            intake.drop(row, "holdout", f"the parent was trained on this prompt ({hit})")
    rest = _dedup(rest, parent_train, data, intake)
    tests = _Index(near, data.decontaminate.ngram)
    for name, rows in {**test_sets, "feedback holdout": intake.holdout}.items():
        tests.add([f"{name}:{r.get('id')}" for r in rows], [prompt_of(r) for r in rows])
    for row, hit in zip(rest, tests.match([prompt_of(r) for r in rest])):
        if hit is None:
            intake.train.append(row)
        else:
            intake.drop(row, "decontaminate", f"prompt repeats a test prompt ({hit})")


def _dedup(
    rows: list[dict[str, Any]], parent_train: list[dict[str, Any]], data: DataConfig, intake: Intake
) -> list[dict[str, Any]]:
    """Rows that repeat neither a parent training row nor an earlier row (exact, and near when data.dedup.near)."""
    threshold = data.dedup.threshold if data.dedup.near else None
    seen = _Index(threshold, None)
    seen.add([f"parent:{r.get('id')}" for r in parent_train], [text_of(r) for r in parent_train])
    kept = []
    for row in rows:
        hit = seen.match([text_of(row)])[0]
        if hit is not None:
            intake.drop(row, "dedup", f"repeats a training row ({hit})")
            continue
        seen.add([f"new:{row.get('id')}"], [text_of(row)])
        kept.append(row)
    return kept


def _near(data: DataConfig) -> float | None:
    """The data stage's near-duplicate prompt threshold, where this version of the data stage has one."""
    return getattr(data.decontaminate, "near_threshold", None)


def prompt_of(row: dict[str, Any]) -> str:
    return "\n".join(str(m.get("content") or "") for m in row.get("messages", []) if m.get("role") == "user")


def text_of(row: dict[str, Any]) -> str:
    return "\n".join(str(m.get("content") or "") for m in row.get("messages", []) if m.get("role") != "system")


def _key(text: str) -> str:
    return " ".join("".join(ch if ch.isalnum() else " " for ch in normalise_text(text).lower()).split())


class _Index:
    """Texts to look others up in: the data stage's prompt-overlap index (exact, near, n-gram) when this
    checkout has it (`domaintune.data.overlap.PromptIndex`), else exact matching of normalised text."""

    def __init__(self, near_threshold: float | None, ngram: int | None):
        try:
            from domaintune.data.overlap import PromptIndex
        except ImportError:  # an older data stage: exact normalised matches only
            self._index: Any = None
        else:
            self._index = PromptIndex(near_threshold, ngram)
        self._exact: dict[str, str] = {}

    def add(self, ids: list[str], texts: list[str]) -> None:
        if self._index is not None:
            self._index.add(ids, texts)
            return
        for rid, text in zip(ids, texts):
            self._exact.setdefault(_key(text), rid)

    def match(self, texts: list[str]) -> list[str | None]:
        """For each text, `<matched id>, <exact|near|ngram>` or None."""
        if not texts:
            return []
        if self._index is not None:
            if self._index.size == 0:
                return [None] * len(texts)
            return [None if m is None else f"{m.matched_id}, {m.kind}" for m in self._index.match(texts)]
        return [f"{self._exact[_key(t)]}, exact" if _key(t) in self._exact else None for t in texts]

"""Canary rollout: sticky hash routing and a sliding-window comparison that rolls back or promotes.

The controller is plain logic (no HTTP, no clock of its own): the server feeds it each request's
outcome and each feedback rating, and acts on the decisions it returns. Tests inject outcomes.
"""

from __future__ import annotations

import collections
import hashlib
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from domaintune.serve.config import CanaryConfig

STABLE = "stable"
CANDIDATE = "candidate"
RUNNING, ROLLED_BACK, PROMOTED = "running", "rolled_back", "promoted"
STATE_CODES = {RUNNING: 1, ROLLED_BACK: 2, PROMOTED: 3}


@dataclass
class _Outcome:
    request_id: str
    error: bool
    negative: bool = False


@dataclass
class ArmStats:
    requests: int
    errors: int
    negatives: int

    @property
    def error_rate(self) -> float:
        return self.errors / self.requests if self.requests else 0.0

    @property
    def negative_rate(self) -> float:
        return self.negatives / self.requests if self.requests else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "errors": self.errors,
            "negatives": self.negatives,
            "error_rate": round(self.error_rate, 4),
            "negative_feedback_rate": round(self.negative_rate, 4),
        }


@dataclass
class Decision:
    kind: str  # rolled_back | promoted
    reason: str
    manual: bool
    stats: dict[str, Any]


class CanaryController:
    def __init__(self, cfg: CanaryConfig, on_decision: Callable[[Decision], None] | None = None, state: str = RUNNING):
        self.cfg = cfg
        self.on_decision = on_decision
        self.state = state
        self._windows = {STABLE: collections.deque(maxlen=cfg.window), CANDIDATE: collections.deque(maxlen=cfg.window)}
        self._by_id: dict[str, _Outcome] = {}
        self.candidate_total = 0
        self.decision: Decision | None = None
        self._lock = threading.Lock()

    # ---- routing --------------------------------------------------------------------------------
    def bucket(self, subject: str) -> float:
        """Where a user/key falls in [0, 1): the same subject always lands in the same place."""
        digest = hashlib.sha256(f"{self.cfg.salt}:{self.cfg.model}:{subject}".encode()).digest()
        return int.from_bytes(digest[:8], "big") / 2**64

    def arm_for(self, subject: str) -> str:
        if self.state == ROLLED_BACK:
            return STABLE
        if self.state == PROMOTED:
            return CANDIDATE
        return CANDIDATE if self.bucket(subject) < self.cfg.candidate_share else STABLE

    # ---- evidence -------------------------------------------------------------------------------
    def record(self, request_id: str, arm: str, error: bool) -> Decision | None:
        """One finished request: error means 5xx, timeout, empty or malformed output."""
        with self._lock:
            if self.state != RUNNING:
                return None
            window = self._windows[arm]
            if len(window) == window.maxlen:
                self._by_id.pop(window[0].request_id, None)
            outcome = _Outcome(request_id, error)
            window.append(outcome)
            self._by_id[request_id] = outcome
            if arm == CANDIDATE:
                self.candidate_total += 1
            decision = self._evaluate()
        return self._announce(decision)

    def feedback(self, request_id: str, rating: int) -> Decision | None:
        with self._lock:
            outcome = self._by_id.get(request_id)
            if outcome is None or self.state != RUNNING:
                return None
            outcome.negative = rating < 0
            decision = self._evaluate()
        return self._announce(decision)

    def stats(self) -> dict[str, ArmStats]:
        return {
            arm: ArmStats(len(w), sum(o.error for o in w), sum(o.negative for o in w))
            for arm, w in self._windows.items()
        }

    def snapshot(self) -> dict[str, Any]:
        stats = self.stats()
        return {
            "model": self.cfg.model,
            "state": self.state,
            "candidate_share": self.cfg.candidate_share,
            "margin": self.cfg.margin,
            "window": self.cfg.window,
            "min_requests": self.cfg.min_requests,
            "promote_after": self.cfg.promote_after,
            "candidate_requests_total": self.candidate_total,
            "arms": {arm: s.as_dict() for arm, s in stats.items()},
            "decision": None
            if self.decision is None
            else {
                "kind": self.decision.kind,
                "reason": self.decision.reason,
                "manual": self.decision.manual,
            },
        }

    # ---- decisions ------------------------------------------------------------------------------
    def _evaluate(self) -> Decision | None:
        stats = self.stats()
        stable, cand = stats[STABLE], stats[CANDIDATE]
        if stable.requests < self.cfg.min_requests or cand.requests < self.cfg.min_requests:
            return None
        margin = self.cfg.margin
        if cand.error_rate - stable.error_rate > margin:
            return self._decide(
                ROLLED_BACK,
                f"candidate error rate {cand.error_rate:.1%} vs stable {stable.error_rate:.1%} "
                f"(margin {margin:.1%}, last {cand.requests}/{stable.requests} requests)",
                manual=False,
            )
        if cand.negative_rate - stable.negative_rate > margin:
            return self._decide(
                ROLLED_BACK,
                f"candidate negative feedback rate {cand.negative_rate:.1%} vs stable {stable.negative_rate:.1%} "
                f"(margin {margin:.1%}, last {cand.requests}/{stable.requests} requests)",
                manual=False,
            )
        if self.cfg.auto_promote and self.candidate_total >= self.cfg.promote_after:
            return self._decide(
                PROMOTED,
                f"candidate passed {self.candidate_total} requests: error rate {cand.error_rate:.1%} vs "
                f"{stable.error_rate:.1%}, negative feedback {cand.negative_rate:.1%} vs {stable.negative_rate:.1%}",
                manual=False,
            )
        return None

    def _decide(self, state: str, reason: str, manual: bool) -> Decision:
        self.state = state
        self.decision = Decision(state, reason, manual, {a: s.as_dict() for a, s in self.stats().items()})
        return self.decision

    def _announce(self, decision: Decision | None) -> Decision | None:
        if decision is not None and self.on_decision is not None:
            self.on_decision(decision)
        return decision

    def rollback(self, reason: str = "rolled back by an operator") -> Decision:
        with self._lock:
            decision = self._decide(ROLLED_BACK, reason, manual=True)
        self._announce(decision)
        return decision

    def promote(self, reason: str = "promoted by an operator", force: bool = False) -> Decision:
        """Promote when the window has passed (or with force=True); raises ValueError otherwise."""
        with self._lock:
            if self.state != RUNNING:
                raise ValueError(f"the canary is already {self.state}")
            stats = self.stats()
            enough = self.candidate_total >= self.cfg.promote_after and all(
                s.requests >= self.cfg.min_requests for s in stats.values()
            )
            if not force and not enough:
                raise ValueError(
                    f"the window has not passed yet: {self.candidate_total}/{self.cfg.promote_after} candidate "
                    f"requests, {stats[STABLE].requests}/{self.cfg.min_requests} stable requests in the window "
                    "(use force to promote anyway)"
                )
            worse = self._evaluate() if enough else None
            if worse is not None and worse.kind == ROLLED_BACK:
                decision = worse
            else:
                decision = self._decide(PROMOTED, reason, manual=True)
        self._announce(decision)
        return decision

"""Canary rollout: sticky hash routing and a sliding-window comparison that rolls back or promotes.

The controller is plain logic (no HTTP, no clock of its own): the server feeds it each request's
outcome and each feedback rating, and acts on the decisions it returns. Tests inject outcomes.
`setup_canary` wires a controller into the server; `on_canary_decision` is what a decision does
there (metrics, the serve store's event log, the registry's events and aliases). Replicas sharing
one store follow each other's decisions: `refresh_canary` reads new decision events every few seconds.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

from domaintune.errors import UserError
from domaintune.registry.uri import is_registry_uri, parse_registry_uri
from domaintune.serve.config import CanaryConfig

if TYPE_CHECKING:
    from domaintune.serve.catalog import ServedModel
    from domaintune.serve.state import ServeState

log = logging.getLogger("domaintune.serve")

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
    at: str | None = None  # UTC, when it was taken (kept across restarts: read back from the store)


class CanaryController:
    def __init__(self, cfg: CanaryConfig, on_decision: Callable[[Decision], None] | None = None, state: str = RUNNING):
        self.cfg = cfg
        self.on_decision = on_decision
        self.state = state
        self._windows: dict[str, collections.deque[_Outcome]] = {
            STABLE: collections.deque(maxlen=cfg.window),
            CANDIDATE: collections.deque(maxlen=cfg.window),
        }
        self._by_id: dict[str, _Outcome] = {}
        self.candidate_total = 0
        self.decision: Decision | None = None
        self._lock = threading.Lock()
        self.synced_at = time.monotonic()  # when the store's decision events were last read
        self.last_event_id = 0

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
                "at": self.decision.at,
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

    def _decide(self, state: str, reason: str, manual: bool, at: str | None = None) -> Decision:
        self.state = state
        stats = {a: s.as_dict() for a, s in self.stats().items()}
        self.decision = Decision(state, reason, manual, stats, at or _utc_now())
        return self.decision

    def _announce(self, decision: Decision | None) -> Decision | None:
        if decision is not None and self.on_decision is not None:
            self.on_decision(decision)
        return decision

    def adopt(self, state: str, reason: str, manual: bool, at: str | None = None) -> bool:
        """Take a decision another replica made (not announced again); False when already decided here."""
        with self._lock:
            if self.state != RUNNING or state == RUNNING:
                return False
            self._decide(state, reason, manual, at)
            return True

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


def _utc_now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


# ---- the canary inside the server ------------------------------------------------------------------
DECISION_EVENTS = {ROLLED_BACK: "canary_rolled_back", PROMOTED: "canary_promoted"}


def setup_canary(state: ServeState, cfg: CanaryConfig) -> None:
    """Load both arms (hidden), and start the controller in the state a past decision left it in."""
    stable = state.catalog.add(f"{cfg.model}@stable", cfg.stable, hidden=True)
    candidate = state.catalog.add(f"{cfg.model}@candidate", cfg.candidate, hidden=True)
    state.canary_arms = {STABLE: stable, CANDIDATE: candidate}
    decided, last_id = _decided_before(state, cfg, candidate.version)
    initial = decided.kind if decided else RUNNING
    state.canary = CanaryController(cfg, on_decision=lambda d: on_canary_decision(state, cfg, d), state=initial)
    state.canary.decision = decided  # /admin/canary and /metrics say why after a restart too
    state.canary.last_event_id = last_id
    state.metrics.canary_state.labels(cfg.model).set(STATE_CODES[initial])
    if decided is not None:
        _show_decision(state, cfg, decided, candidate.version)
        log.warning("canary for %s starts %s (decided before a restart: %s)", cfg.model, initial, decided.reason)


def _show_decision(state: ServeState, cfg: CanaryConfig, decision: Decision, candidate_version: str) -> None:
    """The last decision as an info metric (value 1) carrying its reason; one per canary."""
    gauge = state.metrics.canary_decision
    gauge.clear()
    gauge.labels(cfg.model, decision.kind, candidate_version, decision.reason).set(1)


def _decision_of(ev: Any, cfg: CanaryConfig, candidate_version: str | None) -> str | None:
    """The state a stored event decided for this canary's stable/candidate pair (None: another event).

    A decision stands for the candidate version it was taken on: when `candidate: registry://m@candidate`
    moves to a new version (the next round), the new candidate starts running.
    """
    d = ev.details
    recorded = d.get("candidate_version")
    if (
        ev.kind in DECISION_EVENTS.values()
        and d.get("model") == cfg.model
        and d.get("stable_source") == cfg.stable
        and d.get("candidate_source") == cfg.candidate
        and (recorded is None or candidate_version is None or recorded == candidate_version)
    ):
        return ROLLED_BACK if ev.kind == DECISION_EVENTS[ROLLED_BACK] else PROMOTED
    return None


def _stored_decision(ev: Any, kind: str) -> Decision:
    d = ev.details
    at = ev.created_at.strftime("%Y-%m-%dT%H:%M:%SZ") if ev.created_at else None
    return Decision(kind, str(d.get("reason", "")), bool(d.get("manual")), dict(d.get("window") or {}), at)


def _decided_before(state: ServeState, cfg: CanaryConfig, candidate_version: str) -> tuple[Decision | None, int]:
    """(last decision, last event id): a decision taken before a restart stands for the same candidate."""
    decided, last_id = None, 0
    for ev in state.store.events():
        kind = _decision_of(ev, cfg, candidate_version)
        if kind is not None:
            decided = _stored_decision(ev, kind)
        last_id = max(last_id, ev.id)
    return decided, last_id


SYNC_EVERY_S = 2.0


async def refresh_canary(state: ServeState) -> None:
    """Follow decisions other replicas stored since the last look (at most every SYNC_EVERY_S seconds)."""
    canary = state.canary
    if canary is None or canary.state != RUNNING or time.monotonic() - canary.synced_at < SYNC_EVERY_S:
        return
    canary.synced_at = time.monotonic()
    try:
        events = await asyncio.to_thread(state.store.events, None, canary.last_event_id)
    except Exception as exc:  # the store is down: keep routing as now, readiness reports the store
        log.warning("could not read canary decisions from the store: %s", exc)
        return
    candidate_version = state.canary_arms[CANDIDATE].version
    for ev in events:
        canary.last_event_id = max(canary.last_event_id, ev.id)
        decided = _decision_of(ev, canary.cfg, candidate_version)
        if decided is None:
            continue
        stored = _stored_decision(ev, decided)
        if canary.adopt(decided, stored.reason, stored.manual, stored.at):
            state.metrics.canary_state.labels(canary.cfg.model).set(STATE_CODES[stored.kind])
            _show_decision(state, canary.cfg, stored, candidate_version)
            log.warning("canary for %s is %s (decided by another replica)", canary.cfg.model, decided)


def on_canary_decision(state: ServeState, cfg: CanaryConfig, decision: Decision) -> None:
    """Count and log a decision, then record it in the serve store and (for registry versions) the registry."""
    stable, candidate = state.canary_arms[STABLE], state.canary_arms[CANDIDATE]
    kind = DECISION_EVENTS[decision.kind]
    details = {
        "model": cfg.model,
        "stable_source": cfg.stable,
        "stable_version": stable.version,
        "candidate_source": cfg.candidate,
        "candidate_version": candidate.version,
        "reason": decision.reason,
        "manual": decision.manual,
        "window": decision.stats,
        "at": decision.at,
    }
    state.metrics.canary_state.labels(cfg.model).set(STATE_CODES[decision.kind])
    _show_decision(state, cfg, decision, candidate.version)
    if decision.kind == ROLLED_BACK:
        state.metrics.canary_rollbacks.labels(cfg.model, candidate.version).inc()
        log.warning(
            "canary rollback: all traffic for %s back to stable: %s",
            cfg.model,
            decision.reason,
            extra={"event": kind, **details},
        )
    else:
        state.metrics.canary_promotions.labels(cfg.model, candidate.version).inc()
        log.info(
            "canary promoted: %s now serves the candidate: %s",
            cfg.model,
            decision.reason,
            extra={"event": kind, **details},
        )
    state.store.add_event(kind, details)
    if candidate.registry_name:
        _record_in_registry(state, cfg, decision, kind, details)
    else:
        log.info("candidate %s is not a registry version: %s recorded in the serve store only", cfg.candidate, kind)


def _record_in_registry(
    state: ServeState, cfg: CanaryConfig, decision: Decision, kind: str, details: dict[str, Any]
) -> None:
    """The decision as a registry event; a promotion also moves the stable alias to the candidate."""
    stable, candidate = state.canary_arms[STABLE], state.canary_arms[CANDIDATE]
    try:
        registry = state.catalog.registry()
        registry.record_event(candidate.registry_name, candidate.version, kind, details)
        stable_alias = registry_alias(cfg.stable)
        if decision.kind == PROMOTED and stable_alias and stable.registry_name == candidate.registry_name:
            # The stable alias (e.g. production) now points at the candidate, so a restart serves it.
            registry.promote(
                candidate.registry_name,
                candidate.version,
                alias=stable_alias,
                note=f"canary promoted: {decision.reason}",
            )
            log.info(
                "registry: %s@%s now points at %s",
                candidate.registry_name,
                stable_alias,
                candidate.version,
                extra={"event": "registry_alias_moved"},
            )
    except Exception as exc:  # the routing change already happened; the log says the record failed
        log.error("could not record %s in the registry: %s", kind, exc, extra={"event": kind})


def registry_alias(source: str) -> str | None:
    """`production` for registry://name@production; None for explicit versions, `latest` and folders."""
    if not is_registry_uri(source):
        return None
    try:
        ref = parse_registry_uri(source).ref
    except UserError:  # malformed: it names no alias
        return None
    if (ref[:1] == "v" and ref[1:2].isdigit()) or ref == "latest":
        return None
    return ref


def canary_model_entry(canary: CanaryController, arms: dict[str, ServedModel]) -> dict[str, Any]:
    """The canary's public model as /v1/models lists it: the arm now serving, under the public name."""
    stable, cand = arms[STABLE], arms[CANDIDATE]
    current = cand if canary.state == PROMOTED else stable
    entry = current.describe()
    entry.update(
        {
            "id": canary.cfg.model,
            "kind": "canary",
            "root": canary.cfg.model,
            "canary": {
                "state": canary.state,
                "stable": stable.version,
                "candidate": cand.version,
                "candidate_share": canary.cfg.candidate_share,
            },
        }
    )
    return entry

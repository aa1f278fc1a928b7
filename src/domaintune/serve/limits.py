"""Per-key limits that hold under concurrency: requests and tokens per minute, tokens per UTC day.

Admission *reserves* what a request may use (`prompt_tokens + max_tokens`) against all three limits
in one atomic step, and the request's real usage is *settled* when it ends (the unused part is
refunded). So concurrent requests can never take more than a limit: each one is counted from the
moment it is admitted, not when it finishes. The same counters throttle failed key checks (per
client address and per key id) and feedback posts.

`MemoryLimits` keeps the counters in this process (the default, one replica); `RedisLimits`
(limits_redis.py, `serve.limits_url: redis://...`) keeps them in Redis, shared by every replica.
The daily quota's settled usage is also written to the store (it survives restarts); a counter
that does not know today's usage yet starts from the store's figure.
"""

from __future__ import annotations

import collections
import math
import secrets
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

WINDOW_S = 60.0
_PRUNE_AT = 10_000  # fixed-window counters kept before old ones are dropped

# (key id, UTC day) -> tokens already settled for that day (the store's figure).
DailyUsage = Callable[[str, str], int]


class LimitExceeded(Exception):  # noqa: N818  # named for what happened, as the API's 429 says
    """A limit refused the request: 429 with Retry-After."""

    def __init__(
        self, message: str, retry_after_s: float, code: str = "rate_limit_exceeded", type_: str = "rate_limit_error"
    ):
        super().__init__(message)
        self.message = message
        self.retry_after_s = max(1, math.ceil(retry_after_s))
        self.code = code
        self.type = type_


@dataclass(frozen=True)
class Quota:
    key_id: str
    rpm: int | None = None
    tpm: int | None = None
    daily: int | None = None


@dataclass
class Reservation:
    key_id: str
    id: str
    tokens: int
    day: str | None  # the UTC day it counts against, when the key has a daily quota
    done: bool = False


def utc_day(now: datetime | None = None) -> str:
    return (now or datetime.now(timezone.utc)).strftime("%Y-%m-%d")


def seconds_to_utc_midnight() -> int:
    now = datetime.now(timezone.utc)
    tomorrow = (now + timedelta(days=1)).replace(hour=0, minute=0, second=0, microsecond=0)
    return max(1, math.ceil((tomorrow - now).total_seconds()))


def rpm_exceeded(rpm: int, wait_s: float) -> LimitExceeded:
    return LimitExceeded(
        f"rate limit reached: {rpm} requests per minute for this key; retry in {math.ceil(wait_s)} s", math.ceil(wait_s)
    )


def tpm_exceeded(tpm: int, used: int, incoming: int, wait_s: float) -> LimitExceeded:
    if incoming > tpm:
        return LimitExceeded(
            f"this request needs up to {incoming} tokens (prompt + max_tokens), more than the key's limit of {tpm} "
            "tokens per minute; lower max_tokens or shorten the prompt",
            int(WINDOW_S),
        )
    return LimitExceeded(
        f"token rate limit reached: {used} of {tpm} tokens per minute used or reserved, this request needs up to "
        f"{incoming}; retry in {math.ceil(wait_s)} s",
        math.ceil(wait_s),
    )


def daily_exceeded(daily: int, used: int, incoming: int) -> LimitExceeded:
    if used >= daily:
        what = f"daily token quota exhausted: this key has used {used} of its {daily} tokens today (UTC)"
    else:
        what = (
            f"daily token quota: this request needs up to {incoming} tokens (prompt + max_tokens) but only "
            f"{daily - used} of the key's {daily} tokens are left today (UTC); lower max_tokens"
        )
    return LimitExceeded(
        f"{what}; the quota resets at 00:00 UTC",
        seconds_to_utc_midnight(),
        code="daily_quota_exceeded",
        type_="insufficient_quota",
    )


def new_reservation_id() -> str:
    return secrets.token_hex(8)


class Limits(ABC):
    """Where the counters live. `remote` ones do network I/O: call them from a thread."""

    remote = False

    def __init__(self, daily_usage: DailyUsage):
        self.daily_usage = daily_usage

    @abstractmethod
    def admit(self, quota: Quota, tokens: int) -> Reservation:
        """Count one request and reserve `tokens` against rpm, tpm and the daily quota, or raise LimitExceeded."""

    @abstractmethod
    def settle(self, reservation: Reservation, used: int) -> None:
        """The request used `used` tokens (<= reserved): refund the rest; it still counts as a request."""

    @abstractmethod
    def release(self, reservation: Reservation) -> None:
        """The request never ran (refused after admission): give back its request and its tokens."""

    @abstractmethod
    def hit(self, bucket: str, limit: int) -> LimitExceeded | None:
        """Count one event in `bucket`'s current minute; LimitExceeded (not raised) when over `limit`."""

    @abstractmethod
    def auth_blocked(self, subjects: Iterable[str], limit: int) -> int | None:
        """Seconds to wait when a subject has had `limit` failed key checks this minute, else None."""

    @abstractmethod
    def auth_failed(self, subjects: Iterable[str]) -> None:
        """Count one failed key check for each subject."""

    def close(self) -> None:
        return None


class _FixedWindows:
    """Counters per name that restart every minute (failed key checks, feedback posts)."""

    def __init__(self, clock: Callable[[], float]):
        self.clock = clock
        self._counts: dict[str, list[float]] = {}  # name -> [window start, count]

    def _entry(self, name: str, now: float) -> list[float]:
        entry = self._counts.get(name)
        if entry is None or now - entry[0] >= WINDOW_S:
            if len(self._counts) >= _PRUNE_AT:
                self._counts = {k: v for k, v in self._counts.items() if now - v[0] < WINDOW_S}
            entry = self._counts[name] = [now, 0]
        return entry

    def wait_if_over(self, name: str, limit: int) -> float | None:
        now = self.clock()
        entry = self._entry(name, now)
        return entry[0] + WINDOW_S - now if entry[1] >= limit else None

    def add(self, name: str, n: int) -> None:
        entry = self._entry(name, self.clock())
        entry[1] = max(0, entry[1] + n)


class MemoryLimits(Limits):
    """The counters in this process: exact for one replica."""

    def __init__(self, daily_usage: DailyUsage, clock: Callable[[], float] = time.monotonic):
        super().__init__(daily_usage)
        self.clock = clock
        self._lock = threading.Lock()
        # key id -> reservations in the last minute, oldest first: [time, tokens, reservation id]
        self._window: dict[str, collections.deque[list]] = collections.defaultdict(collections.deque)
        self._daily: dict[tuple[str, str], int] = {}  # (key id, day) -> settled + reserved tokens
        self._fixed = _FixedWindows(clock)

    def _trim(self, key_id: str, now: float) -> collections.deque[list]:
        window = self._window[key_id]
        while window and now - window[0][0] >= WINDOW_S:
            window.popleft()
        return window

    def _daily_total(self, key_id: str, day: str) -> int:
        if (key_id, day) not in self._daily:
            self._daily = {k: v for k, v in self._daily.items() if k[1] == day}  # yesterday's counters go
            self._daily[(key_id, day)] = int(self.daily_usage(key_id, day))
        return self._daily[(key_id, day)]

    def admit(self, quota: Quota, tokens: int) -> Reservation:
        now = self.clock()
        with self._lock:
            window = self._trim(quota.key_id, now)
            if quota.rpm is not None and len(window) >= quota.rpm:
                raise rpm_exceeded(quota.rpm, WINDOW_S - (now - window[0][0]))
            if quota.tpm is not None:
                used = sum(entry[1] for entry in window)
                if used + tokens > quota.tpm:
                    raise tpm_exceeded(quota.tpm, used, tokens, _tpm_wait(window, used, tokens, quota.tpm, now))
            day = None
            if quota.daily is not None:
                day = utc_day()
                total = self._daily_total(quota.key_id, day)
                if total + tokens > quota.daily:
                    raise daily_exceeded(quota.daily, total, tokens)
                self._daily[(quota.key_id, day)] = total + tokens
            reservation = Reservation(quota.key_id, new_reservation_id(), tokens, day)
            window.append([now, tokens, reservation.id])
            return reservation

    def _adjust(self, reservation: Reservation, used: int, drop: bool) -> None:
        if reservation.done:
            return
        reservation.done = True
        refund = max(0, reservation.tokens - used)
        with self._lock:
            window = self._window.get(reservation.key_id, collections.deque())
            for entry in window:
                if entry[2] == reservation.id:
                    if drop:
                        window.remove(entry)
                    else:
                        entry[1] = min(entry[1], used)
                    break
            slot = (reservation.key_id, reservation.day or "")
            if reservation.day is not None and slot in self._daily:
                self._daily[slot] = max(0, self._daily[slot] - refund)

    def settle(self, reservation: Reservation, used: int) -> None:
        self._adjust(reservation, used, drop=False)

    def release(self, reservation: Reservation) -> None:
        self._adjust(reservation, 0, drop=True)

    def hit(self, bucket: str, limit: int) -> LimitExceeded | None:
        with self._lock:
            wait = self._fixed.wait_if_over(f"hit:{bucket}", limit)
            if wait is not None:
                return LimitExceeded(f"limit reached: {limit} per minute; retry in {math.ceil(wait)} s", wait)
            self._fixed.add(f"hit:{bucket}", 1)
            return None

    def auth_blocked(self, subjects: Iterable[str], limit: int) -> int | None:
        with self._lock:
            waits = [w for w in (self._fixed.wait_if_over(f"auth:{s}", limit) for s in subjects) if w is not None]
            return max(1, math.ceil(max(waits))) if waits else None

    def auth_failed(self, subjects: Iterable[str]) -> None:
        with self._lock:
            for subject in subjects:
                self._fixed.add(f"auth:{subject}", 1)


def _tpm_wait(window: Iterable[list], used: int, incoming: int, tpm: int, now: float) -> float:
    """Seconds until enough of the window's tokens leave it for `incoming` more to fit."""
    freed = 0
    for stamp, tokens, _rid in window:
        freed += tokens
        if used - freed + incoming <= tpm:
            return WINDOW_S - (now - stamp)
    return WINDOW_S

"""Per-key request and token rate limits over a sliding 60-second window (in memory, per server process).

Daily token quotas are kept in the store instead (they must survive restarts); see generation.py.
"""

from __future__ import annotations

import collections
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

WINDOW_S = 60.0


@dataclass
class LimitExceeded:
    message: str
    retry_after_s: int


class RateLimiter:
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self._requests: dict[str, collections.deque[float]] = collections.defaultdict(collections.deque)
        self._tokens: dict[str, collections.deque[tuple[float, int]]] = collections.defaultdict(collections.deque)
        self._lock = threading.Lock()

    def _trim(self, key_id: str, now: float) -> None:
        reqs, toks = self._requests[key_id], self._tokens[key_id]
        while reqs and now - reqs[0] >= WINDOW_S:
            reqs.popleft()
        while toks and now - toks[0][0] >= WINDOW_S:
            toks.popleft()

    def check_request(self, key_id: str, rpm: int | None) -> LimitExceeded | None:
        """Count one request against the key's requests-per-minute; None when allowed."""
        now = self.clock()
        with self._lock:
            self._trim(key_id, now)
            reqs = self._requests[key_id]
            if rpm is not None and len(reqs) >= rpm:
                wait = WINDOW_S - (now - reqs[0])
                return LimitExceeded(
                    f"rate limit reached: {rpm} requests per minute for this key; retry in {math.ceil(wait)} s",
                    max(1, math.ceil(wait)),
                )
            reqs.append(now)
            return None

    def check_tokens(self, key_id: str, tpm: int | None, incoming: int) -> LimitExceeded | None:
        """Would `incoming` more tokens exceed the key's tokens-per-minute? None when allowed."""
        if tpm is None:
            return None
        now = self.clock()
        with self._lock:
            self._trim(key_id, now)
            toks = self._tokens[key_id]
            used = sum(n for _, n in toks)
            if incoming > tpm:
                return LimitExceeded(
                    f"this request needs {incoming} tokens, more than the key's limit of {tpm} tokens per minute",
                    int(WINDOW_S),
                )
            if used + incoming > tpm:
                # Wait until enough old tokens leave the window.
                freed, wait = 0, WINDOW_S
                for stamp, n in toks:
                    freed += n
                    if used - freed + incoming <= tpm:
                        wait = WINDOW_S - (now - stamp)
                        break
                return LimitExceeded(
                    f"token rate limit reached: {used} of {tpm} tokens per minute used; retry in {math.ceil(wait)} s",
                    max(1, math.ceil(wait)),
                )
            return None

    def add_tokens(self, key_id: str, tokens: int) -> None:
        with self._lock:
            self._tokens[key_id].append((self.clock(), tokens))

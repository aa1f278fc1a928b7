"""The limits' counters in Redis (`serve.limits_url: redis://...`), shared by every replica.

Each check-and-reserve is one Lua script, so it is atomic across replicas; times come from the
Redis server's clock, so replicas with skewed clocks still agree. A key's per-minute window is a
sorted set of reservation ids by time plus a hash of their tokens; the daily quota is one counter
per key and UTC day (started from the store's figure the first time it is needed that day).
Keys hold the key id in braces, so one key's counters share a slot on a Redis Cluster too.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

from domaintune.errors import UserError
from domaintune.serve.limits import (
    WINDOW_S,
    DailyUsage,
    LimitExceeded,
    Limits,
    Quota,
    Reservation,
    daily_exceeded,
    new_reservation_id,
    rpm_exceeded,
    tpm_exceeded,
    utc_day,
)

PREFIX = "domaintune"
DAY_TTL_S = 2 * 24 * 3600

_NOW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
"""

# KEYS: window zset, tokens hash, daily counter. ARGV: id, tokens, rpm, tpm, daily, window ms, daily start.
# Limits of -1 are off; a daily start of -1 means "unknown": the caller reads the store and tries again.
ADMIT = (
    _NOW
    + """
local window = tonumber(ARGV[6])
local old = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now - window)
for i = 1, #old do redis.call('HDEL', KEYS[2], old[i]) end
if #old > 0 then redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - window) end
local incoming, rpm, tpm, daily = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
if rpm >= 0 then
  local n = redis.call('ZCARD', KEYS[1])
  if n >= rpm then
    local first = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
    return {'rpm', n, tonumber(first[2]) + window - now}
  end
end
if tpm >= 0 then
  local ids = redis.call('ZRANGE', KEYS[1], 0, -1, 'WITHSCORES')
  local used, entries = 0, {}
  for i = 1, #ids, 2 do
    local n = tonumber(redis.call('HGET', KEYS[2], ids[i]) or '0')
    used = used + n
    entries[#entries + 1] = {n, tonumber(ids[i + 1])}
  end
  if used + incoming > tpm then
    local freed, wait = 0, window
    for _, e in ipairs(entries) do
      freed = freed + e[1]
      if used - freed + incoming <= tpm then wait = e[2] + window - now; break end
    end
    return {'tpm', used, wait}
  end
end
if daily >= 0 then
  local cur = redis.call('GET', KEYS[3])
  if not cur then
    if tonumber(ARGV[7]) < 0 then return {'init', 0, 0} end
    cur = ARGV[7]
    redis.call('SET', KEYS[3], cur, 'EX', DAY_TTL_S)
  end
  cur = tonumber(cur)
  if cur + incoming > daily then return {'daily', cur, 0} end
  redis.call('INCRBY', KEYS[3], incoming)
end
redis.call('ZADD', KEYS[1], now, ARGV[1])
redis.call('HSET', KEYS[2], ARGV[1], incoming)
redis.call('PEXPIRE', KEYS[1], window * 2)
redis.call('PEXPIRE', KEYS[2], window * 2)
return {'ok', 0, 0}
""".replace("DAY_TTL_S", str(DAY_TTL_S))
)

# KEYS: window zset, tokens hash, daily counter. ARGV: id, used, reserved, drop (1: forget the request).
SETTLE = """
local used, reserved = tonumber(ARGV[2]), tonumber(ARGV[3])
if ARGV[4] == '1' then
  redis.call('ZREM', KEYS[1], ARGV[1])
  redis.call('HDEL', KEYS[2], ARGV[1])
elseif redis.call('HEXISTS', KEYS[2], ARGV[1]) == 1 then
  redis.call('HSET', KEYS[2], ARGV[1], math.min(used, reserved))
end
if KEYS[3] ~= '' and reserved > used and redis.call('EXISTS', KEYS[3]) == 1 then
  redis.call('DECRBY', KEYS[3], reserved - used)
end
return 1
"""

# KEYS: one counter per subject. ARGV: limit. Returns the ms to wait when one is at the limit, else -1.
AUTH_BLOCKED = """
local limit, wait = tonumber(ARGV[1]), -1
for i = 1, #KEYS do
  if tonumber(redis.call('GET', KEYS[i]) or '0') >= limit then
    wait = math.max(wait, redis.call('PTTL', KEYS[i]))
  end
end
return wait
"""

# KEYS: one counter per subject (or bucket). ARGV: window ms, limit (-1: none). Returns ms to wait or -1.
COUNT = """
local limit = tonumber(ARGV[2])
if limit >= 0 and tonumber(redis.call('GET', KEYS[1]) or '0') >= limit then
  return redis.call('PTTL', KEYS[1])
end
for i = 1, #KEYS do
  if redis.call('INCR', KEYS[i]) == 1 then redis.call('PEXPIRE', KEYS[i], ARGV[1]) end
end
return -1
"""


def _opt(value: int | None) -> int:
    return -1 if value is None else int(value)


class RedisLimits(Limits):
    remote = True

    def __init__(self, url: str, daily_usage: DailyUsage):
        super().__init__(daily_usage)
        try:
            import redis
        except ImportError:
            raise UserError(
                "serve.limits_url is a Redis URL but the redis package is not installed (pip install redis)"
            ) from None
        self.url = url
        self.client: Any = redis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=5)
        try:
            self.client.ping()
        except redis.RedisError as exc:
            raise UserError(f"serve.limits_url {_redacted(url)}: cannot reach Redis ({exc})") from None
        self._admit = self.client.register_script(ADMIT)
        self._settle = self.client.register_script(SETTLE)
        self._auth_blocked = self.client.register_script(AUTH_BLOCKED)
        self._count = self.client.register_script(COUNT)
        self.window_ms = int(WINDOW_S * 1000)

    @staticmethod
    def _keys(key_id: str, day: str | None) -> list[str]:
        base = f"{PREFIX}:{{{key_id}}}"
        return [f"{base}:window", f"{base}:tokens", f"{base}:daily:{day}" if day else ""]

    def admit(self, quota: Quota, tokens: int) -> Reservation:
        day = utc_day() if quota.daily is not None else None
        rid = new_reservation_id()
        start = -1
        args: list[Any] = [rid, tokens, _opt(quota.rpm), _opt(quota.tpm), _opt(quota.daily), self.window_ms]
        for _ in range(2):
            kind, used, wait_ms = self._admit(keys=self._keys(quota.key_id, day), args=[*args, start])
            kind = kind.decode() if isinstance(kind, bytes) else kind
            if kind == "ok":
                return Reservation(quota.key_id, rid, tokens, day)
            if kind != "init":
                raise self._refusal(kind, quota, int(used), tokens, int(wait_ms) / 1000)
            start = int(self.daily_usage(quota.key_id, day or utc_day()))
        raise RuntimeError("the daily counter could not be started in Redis")

    @staticmethod
    def _refusal(kind: str, quota: Quota, used: int, tokens: int, wait_s: float) -> LimitExceeded:
        if kind == "rpm":
            return rpm_exceeded(quota.rpm or 0, wait_s)
        if kind == "tpm":
            return tpm_exceeded(quota.tpm or 0, used, tokens, wait_s)
        return daily_exceeded(quota.daily or 0, used, tokens)

    def _adjust(self, reservation: Reservation, used: int, drop: bool) -> None:
        if reservation.done:
            return
        reservation.done = True
        self._settle(
            keys=self._keys(reservation.key_id, reservation.day),
            args=[reservation.id, max(0, used), reservation.tokens, "1" if drop else "0"],
        )

    def settle(self, reservation: Reservation, used: int) -> None:
        self._adjust(reservation, used, drop=False)

    def release(self, reservation: Reservation) -> None:
        self._adjust(reservation, 0, drop=True)

    def hit(self, bucket: str, limit: int) -> LimitExceeded | None:
        wait_ms = int(self._count(keys=[f"{PREFIX}:hit:{bucket}"], args=[self.window_ms, limit]))
        if wait_ms < 0:
            return None
        wait = max(1, math.ceil(wait_ms / 1000))
        return LimitExceeded(f"limit reached: {limit} per minute; retry in {wait} s", wait)

    def auth_blocked(self, subjects: Iterable[str], limit: int) -> int | None:
        wait_ms = int(self._auth_blocked(keys=[f"{PREFIX}:auth:{s}" for s in subjects], args=[limit]))
        return None if wait_ms < 0 else max(1, math.ceil(wait_ms / 1000))

    def auth_failed(self, subjects: Iterable[str]) -> None:
        self._count(keys=[f"{PREFIX}:auth:{s}" for s in subjects], args=[self.window_ms, -1])

    def close(self) -> None:
        self.client.close()


def _redacted(url: str) -> str:
    """The URL without its password, for messages."""
    if "@" not in url:
        return url
    scheme, _, rest = url.partition("://")
    return f"{scheme}://***@{rest.split('@', 1)[1]}"

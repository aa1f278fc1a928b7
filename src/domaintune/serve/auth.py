"""Who is calling: API keys from `Authorization: Bearer`, checked at a bounded cost.

A key verified before on this replica is recognised without hashing (its record is re-read, so a
revocation takes effect at once). Any other key costs one PBKDF2 hash on `key_pool`, a pool of its
own, so a flood of wrong keys cannot slow the other requests down. Before hashing: a client address
or key id that had `serve.auth_failures_per_minute` failed checks this minute gets 429 without any
hashing; concurrent checks of the same key share one hash; and at most `serve.max_pending_key_checks`
different keys wait for a hash at once (429 beyond). Every refusal is written to the
`domaintune.audit` log (client address, key id, reason; never the secret) and counted in
`domaintune_auth_failures_total`.
"""

from __future__ import annotations

import asyncio
import logging

from fastapi import Request

from domaintune.serve.protocol import ApiError
from domaintune.serve.state import ServeState
from domaintune.serve.store import ApiKey, split_key

audit = logging.getLogger("domaintune.audit")

UNAUTHORIZED = "invalid or revoked API key"


def client_address(request: Request) -> str:
    return request.client.host if request.client else "unknown"


def presented_key(request: Request) -> str:
    header = request.headers.get("authorization", "")
    return header[7:].strip() if header.lower().startswith("bearer ") else ""


def _refuse(state: ServeState, request: Request, reason: str, key_id: str | None) -> None:
    """Write the refusal to the audit log and count it."""
    state.metrics.auth_failures.labels(reason).inc()
    audit.warning(
        "authentication failed: %s",
        reason,
        extra={
            "event": "auth_failed",
            "reason": reason,
            "client": client_address(request),
            "key_id": key_id,
            "path": request.url.path,
        },
    )


def _throttled(wait_s: int, what: str) -> ApiError:
    return ApiError(
        429,
        f"too many failed API key checks from {what}; retry in {wait_s} s",
        "rate_limit_error",
        "auth_rate_limited",
        headers={"Retry-After": str(wait_s)},
    )


async def verify_key(state: ServeState, request: Request, presented: str) -> ApiKey:
    """The key's record, or 401 (wrong, unknown, revoked) / 429 (too many failures, too many checks queued)."""
    if state.store.verified_before(presented):
        key = await state.cpu(state.store.cached_key, presented)
        if key is not None:
            return key
    key_id, _secret = split_key(presented)
    subjects = [f"addr:{client_address(request)}"] + ([f"key:{key_id}"] if key_id else [])
    wait = await state.limit(state.limits.auth_blocked, subjects, state.scfg.auth_failures_per_minute)
    if wait is not None:
        _refuse(state, request, "throttled", key_id)
        raise _throttled(wait, "this address or for this key")
    key, outcome = await _hash_check(state, request, presented, key_id)
    if key is None:
        await state.limit(state.limits.auth_failed, subjects)
        _refuse(state, request, outcome, key_id)
        raise ApiError(401, UNAUTHORIZED, "authentication_error", "invalid_api_key")
    return key


async def _hash_check(
    state: ServeState, request: Request, presented: str, key_id: str | None
) -> tuple[ApiKey | None, str]:
    """One PBKDF2 check on the key pool; concurrent checks of the same key wait for the same one."""
    running = state.key_checks.get(presented)
    if running is not None:
        return await asyncio.shield(running)
    if len(state.key_checks) >= state.scfg.max_pending_key_checks:
        _refuse(state, request, "busy", key_id)
        raise _throttled(1, "all clients (the key checks are busy)")
    future = asyncio.get_running_loop().run_in_executor(state.key_pool, state.store.check_key, presented)
    state.key_checks[presented] = future
    try:
        return await asyncio.shield(future)
    finally:
        if future.done():
            state.key_checks.pop(presented, None)
        else:  # this request was cancelled; the check goes on for the others waiting on it
            future.add_done_callback(lambda _f: state.key_checks.pop(presented, None))


async def authenticate(request: Request, state: ServeState, admin: bool = False) -> ApiKey | None:
    """The caller's key from `Authorization: Bearer`; None when keys are optional and none was sent."""
    presented = presented_key(request)
    if not presented:
        if not admin and not state.scfg.require_api_key:
            return None
        _refuse(state, request, "missing", None)
        raise ApiError(
            401,
            "missing API key: send `Authorization: Bearer <key>` (create one with `domaintune keys create`)",
            "authentication_error",
            "missing_api_key",
        )
    key = await verify_key(state, request, presented)
    request.state.key_name = key.name
    if admin and not key.is_admin:
        _refuse(state, request, "not_admin", key.id)
        raise ApiError(
            403,
            "this endpoint needs an admin key (`domaintune keys create --admin`)",
            "permission_error",
            "admin_required",
        )
    return key

"""The HTTP endpoints: thin handlers over the generation path, the catalog, the store and the canary.

Authentication is a dependency: `ApiKeyDep` on /v1 endpoints (None when keys are not required and
none was sent), and the admin router requires an admin key for every route. Bodies are read by the
`json_body` dependency after authentication, so an unauthenticated caller learns nothing about them.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel

from domaintune.errors import UserError
from domaintune.serve.auth import authenticate, client_address
from domaintune.serve.canary import RUNNING, CanaryController, canary_model_entry, refresh_canary
from domaintune.serve.generation import respond, start_job
from domaintune.serve.protocol import (
    ApiError,
    Body,
    ChatBody,
    CompletionBody,
    FeedbackBody,
    LoadModelBody,
    bad_request,
    parse_body,
    parse_json,
    too_large,
)
from domaintune.serve.state import Redactor, ServeState
from domaintune.serve.store import ApiKey, RequestRow

log = logging.getLogger("domaintune.serve")


# ---- dependencies -------------------------------------------------------------------------------
async def get_state(request: Request) -> ServeState:
    return request.app.state.serve


StateDep = Annotated[ServeState, Depends(get_state)]


async def api_key(request: Request, state: StateDep) -> ApiKey | None:
    return await authenticate(request, state)


async def admin_key(request: Request, state: StateDep) -> ApiKey | None:
    return await authenticate(request, state, admin=True)


async def metrics_key(request: Request, state: StateDep) -> None:
    if state.scfg.metrics_require_key:
        await authenticate(request, state, admin=True)


ApiKeyDep = Annotated[ApiKey | None, Depends(api_key)]


async def read_body(request: Request, limit: int) -> bytes:
    """The body, refused with 413 as soon as more than `limit` bytes arrived (chunked bodies too)."""
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:  # answer now and close the connection: the rest of the body is never read
            error = too_large(None, limit)
            error.headers["Connection"] = "close"
            raise error
        chunks.append(chunk)
    return b"".join(chunks)


def json_body(model_cls: type[Body]) -> Callable[[Request, ServeState], Awaitable[Body]]:
    """A dependency that reads the body as `model_cls` (OpenAI-style 400/413 errors otherwise), parsed off the loop."""

    async def read(request: Request, state: StateDep) -> Body:
        limit = state.scfg.max_body_bytes
        raw = await read_body(request, limit)
        return await state.cpu(parse_body, raw, model_cls, limit)

    return read


def body_schema(model_cls: type[BaseModel]) -> dict[str, Any]:
    """The OpenAPI request body of a route whose body `json_body` reads (app.py adds the schemas)."""
    ref = {"$ref": f"#/components/schemas/{model_cls.__name__}"}
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": ref}}}}


def listed_models(state: ServeState, include_hidden: bool) -> list[dict[str, Any]]:
    """The served models as /v1/models lists them, the canary under its public name."""
    items = [m.describe() for m in state.catalog.models.values() if include_hidden or not m.hidden]
    if state.canary is not None:
        items.append(canary_model_entry(state.canary, state.canary_arms))
    return items


# ---- the OpenAI-compatible API ------------------------------------------------------------------
openai_router = APIRouter(prefix="/v1")


@openai_router.post("/chat/completions", openapi_extra=body_schema(ChatBody))
async def chat_completions(
    request: Request, state: StateDep, key: ApiKeyDep, body: Annotated[ChatBody, Depends(json_body(ChatBody))]
) -> Response:
    job = await start_job(state, request, key, body)
    return await respond(state, job, body)


@openai_router.post("/completions", openapi_extra=body_schema(CompletionBody))
async def completions(
    request: Request,
    state: StateDep,
    key: ApiKeyDep,
    body: Annotated[CompletionBody, Depends(json_body(CompletionBody))],
) -> Response:
    job = await start_job(state, request, key, body)
    return await respond(state, job, body)


@openai_router.get("/models")
async def list_models(state: StateDep, key: ApiKeyDep):
    items = listed_models(state, False)
    if key is not None and not key.is_admin and key.models is not None:
        items = [m for m in items if m["id"] in key.models]
    return {"object": "list", "data": items}


@openai_router.get("/models/{name:path}")
async def get_model(name: str, state: StateDep, key: ApiKeyDep):
    for item in listed_models(state, False):
        if item["id"] == name and (key is None or key.allows(name)):
            return item
    raise ApiError(404, f"The model `{name}` does not exist", "invalid_request_error", "model_not_found", "model")


async def _logged_request(state: ServeState, request_id: str) -> RequestRow:
    """The logged request a feedback names: by response id, or by the bare request id."""
    for candidate in (request_id, f"chatcmpl-{request_id}", f"cmpl-{request_id}"):
        row = await asyncio.to_thread(state.store.get_request, candidate)
        if row is not None:
            return row
    raise ApiError(
        404, f"no logged request with id {request_id!r}", "invalid_request_error", "request_not_found", "request_id"
    )


async def _check_feedback(state: ServeState, request: Request, key: ApiKey | None, body: FeedbackBody) -> None:
    """Feedback is bounded: text length, posts per minute per key (or address), rows per logged request."""
    scfg = state.scfg
    for field in ("correction", "comment"):
        text = getattr(body, field)
        if text is not None and len(text) > scfg.max_feedback_chars:
            raise bad_request(
                f"{field} is {len(text)} characters; at most {scfg.max_feedback_chars} are accepted",
                field,
                "feedback_too_long",
            )
    who = f"feedback:{key.id}" if key is not None else f"feedback-addr:{client_address(request)}"
    over = await state.limit(state.limits.hit, who, scfg.feedback_per_minute)
    if over is not None:
        raise ApiError(
            429,
            f"feedback rate limit reached: {scfg.feedback_per_minute} per minute; retry in {over.retry_after_s} s",
            "rate_limit_error",
            "rate_limit_exceeded",
            headers={"Retry-After": str(over.retry_after_s)},
        )


@openai_router.post("/feedback", openapi_extra=body_schema(FeedbackBody))
async def feedback(
    request: Request,
    state: StateDep,
    key: ApiKeyDep,
    body: Annotated[FeedbackBody, Depends(json_body(FeedbackBody))],
):
    await _check_feedback(state, request, key, body)
    row = await _logged_request(state, body.request_id)
    if key is not None and not key.is_admin and row.key_id != key.id:
        raise ApiError(
            403, "this request was made with another API key", "permission_error", "not_your_request", "request_id"
        )
    if await asyncio.to_thread(state.store.count_feedback, row.id) >= state.scfg.max_feedback_per_request:
        raise ApiError(
            409,
            f"this request already has {state.scfg.max_feedback_per_request} feedback rows, the most accepted",
            "invalid_request_error",
            "feedback_limit_reached",
            "request_id",
        )
    correction, comment = body.correction, body.comment
    if state.redactor is not None:
        correction, comment = await state.cpu(_redacted_pair, state.redactor, correction, comment)
    fid = await asyncio.to_thread(
        state.store.add_feedback, row.id, key.id if key else None, body.rating, correction, comment
    )
    served = state.catalog.get(row.served)
    adapter = row.served if served is not None and (served.kind == "adapter" or served.hidden) else "-"
    rating = "positive" if body.rating > 0 else "negative"
    state.metrics.feedback.labels(row.model, adapter, row.version, rating).inc()
    if row.canary_arm and state.canary is not None:
        await asyncio.to_thread(state.canary.feedback, row.id, body.rating)
    return {"id": fid, "object": "feedback", "request_id": row.id, "rating": body.rating}


def _redacted_pair(redactor: Redactor, correction: str | None, comment: str | None) -> tuple[str | None, str | None]:
    return (
        redactor(correction)[0] if correction else correction,
        redactor(comment)[0] if comment else comment,
    )


# ---- health, readiness, metrics -----------------------------------------------------------------
ops_router = APIRouter()


@ops_router.get("/healthz")
async def healthz():
    return {"status": "ok"}


@ops_router.get("/readyz")
async def readyz(state: StateDep):
    problems = list(state.engine.problems())
    if not state.catalog.models:
        problems.append("no model is loaded")
    try:
        await asyncio.to_thread(state.store.count_requests)
    except Exception as exc:  # the store is part of readiness: keys cannot be checked without it
        problems.append(f"store unreachable: {type(exc).__name__}")
    if problems:
        return JSONResponse({"status": "not ready", "problems": problems}, status_code=503)
    return {"status": "ready", "engine": state.engine.name, "models": len(state.catalog.models)}


@ops_router.get("/metrics", dependencies=[Depends(metrics_key)])
async def prometheus(state: StateDep) -> Response:
    state.metrics.queue_depth.set(state.engine.queue_depth())
    state.metrics.models_loaded.set(len(state.catalog.models))
    return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)


# ---- admin --------------------------------------------------------------------------------------
admin_router = APIRouter(prefix="/admin", dependencies=[Depends(admin_key)])


@admin_router.get("/models")
async def admin_models(state: StateDep):
    return {
        "object": "list",
        "data": listed_models(state, True),
        "engine": state.engine.name,
        "engine_reason": state.engine_reason,
    }


@admin_router.post("/models", status_code=201, openapi_extra=body_schema(LoadModelBody))
async def admin_load(state: StateDep, body: Annotated[LoadModelBody, Depends(json_body(LoadModelBody))]) -> Response:
    if state.canary is not None and body.name == state.canary.cfg.model:
        raise bad_request(f"{body.name!r} is the canary's public name", "name")
    try:
        model = await asyncio.to_thread(state.catalog.add, body.name, body.source, body.parent)
    except UserError as exc:
        raise bad_request(str(exc), "source", "model_load_failed") from None
    state.metrics.models_loaded.set(len(state.catalog.models))
    log.info("loaded %s from %s", body.name, body.source, extra={"event": "model_loaded", "model": body.name})
    return JSONResponse(model.describe(), status_code=201)


@admin_router.delete("/models/{name:path}")
async def admin_unload(name: str, state: StateDep):
    if name in {m.name for m in state.canary_arms.values()}:
        raise bad_request(f"{name!r} is a canary arm; change the canary in the config instead", "name")
    try:
        model = await asyncio.to_thread(state.catalog.remove, name)
    except UserError as exc:
        status = 404 if "is not served" in str(exc) else 400
        raise ApiError(status, str(exc), "invalid_request_error", "model_unload_failed", "name") from None
    state.metrics.models_loaded.set(len(state.catalog.models))
    log.info("unloaded %s", name, extra={"event": "model_unloaded", "model": name})
    return {"id": model.name, "object": "model", "deleted": True}


def _configured_canary(state: ServeState) -> CanaryController:
    if state.canary is None:
        raise ApiError(404, "no canary is configured (serve.canary)", "invalid_request_error", "no_canary")
    return state.canary


@admin_router.get("/canary")
async def canary_status(state: StateDep):
    canary = _configured_canary(state)
    await refresh_canary(state)  # a decision another replica took shows here too
    return canary.snapshot()


@admin_router.post("/canary/promote")
async def canary_promote(request: Request, state: StateDep):
    canary = _configured_canary(state)
    raw = await read_body(request, state.scfg.max_body_bytes)
    data = parse_json(raw) if raw.strip() else {}
    if not isinstance(data, dict):
        raise bad_request('the body must be a JSON object such as {"force": true}', code="invalid_json")
    force = bool(data.get("force"))
    try:
        await asyncio.to_thread(canary.promote, "promoted by an operator", force)
    except ValueError as exc:
        raise ApiError(409, str(exc), "invalid_request_error", "canary_not_ready") from None
    return canary.snapshot()


@admin_router.post("/canary/rollback")
async def canary_rollback(state: StateDep):
    canary = _configured_canary(state)
    if canary.state != RUNNING:
        raise ApiError(409, f"the canary is already {canary.state}", "invalid_request_error", "canary_decided")
    await asyncio.to_thread(canary.rollback, "rolled back by an operator")
    return canary.snapshot()

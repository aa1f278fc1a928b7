"""The OpenAI-compatible HTTP API (fastapi): chat/completions (streaming too), models, feedback, admin.

`build_state(cfg, output_dir)` (serve/state.py) loads the models and opens the store (slow, done
once before the server listens); `create_app(state)` returns the fastapi app: request ids and the
declared body size limit as middleware (bodies are also counted as they arrive, see routes.py),
OpenAI's error JSON for every error, and the routers of routes.py. /openapi.json describes every
request body, so the API can be fuzzed against its own schema.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response
from pydantic.json_schema import models_json_schema

from domaintune.serve.generation import metric_labels
from domaintune.serve.observability import request_id_var
from domaintune.serve.protocol import ApiError, ChatBody, CompletionBody, FeedbackBody, LoadModelBody, too_large
from domaintune.serve.routes import admin_router, openai_router, ops_router
from domaintune.serve.state import ServeState, build_state

__all__ = ["ServeState", "build_state", "create_app"]

log = logging.getLogger("domaintune.serve")


def create_app(state: ServeState) -> FastAPI:
    app = FastAPI(title="domaintune", version="1", docs_url=None, redoc_url=None, lifespan=_lifespan)
    app.state.serve = state
    app.middleware("http")(_request_context)
    app.add_exception_handler(ApiError, _api_error)  # type: ignore[arg-type]  # starlette types handlers loosely
    app.add_exception_handler(404, _not_found)
    app.add_exception_handler(405, _not_allowed)
    app.add_exception_handler(Exception, _crash)
    app.include_router(openai_router)
    app.include_router(ops_router)
    app.include_router(admin_router)
    app.openapi = lambda: _openapi(app)  # type: ignore[method-assign]  # fastapi's documented way to extend it
    return app


def _openapi(app: FastAPI) -> dict[str, Any]:
    """fastapi's schema plus the request bodies that the routes read themselves (after authentication)."""
    if app.openapi_schema is None:
        schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
        _, defs = models_json_schema(
            [(m, "validation") for m in (ChatBody, CompletionBody, FeedbackBody, LoadModelBody)],
            ref_template="#/components/schemas/{model}",
        )
        schema.setdefault("components", {}).setdefault("schemas", {}).update(defs.get("$defs", {}))
        schema["components"]["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
        schema["security"] = [{"bearer": []}]
        app.openapi_schema = schema
    return app.openapi_schema


@contextlib.asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    state: ServeState = app.state.serve
    log.info(
        "serving %d models with the %s engine",
        len(state.catalog.models),
        state.engine.name,
        extra={"event": "started", "models": sorted(state.catalog.models)},
    )
    yield
    # Runs on SIGTERM/SIGINT before the process exits: finish the batch in progress, close the store.
    await asyncio.to_thread(state.close)
    log.info("server stopped", extra={"event": "stopped"})


def _request_id(request: Request) -> str:
    rid = request.headers.get("x-request-id") or uuid.uuid4().hex[:24]
    return "".join(ch for ch in rid if ch.isalnum() or ch in "-_")[:64] or uuid.uuid4().hex[:24]


async def _request_context(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
    """A request id for logs and the response, the declared body size refused early, one log line per request."""
    max_body_bytes = request.app.state.serve.scfg.max_body_bytes
    rid = request.state.rid = _request_id(request)
    token = request_id_var.set(rid)
    start = time.monotonic()
    try:
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > max_body_bytes:
            response: Response = JSONResponse(too_large(int(length), max_body_bytes).body(), status_code=413)
        else:
            response = await call_next(request)
        response.headers["x-request-id"] = getattr(request.state, "response_id", rid)
        log.info(
            "%s %s %s",
            request.method,
            request.url.path,
            response.status_code,
            extra={
                "method": request.method,
                "path": request.url.path,
                "status": response.status_code,
                "latency_ms": round((time.monotonic() - start) * 1000, 1),
                "key": getattr(request.state, "key_name", None),
            },
        )
        return response
    finally:
        request_id_var.reset(token)


async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
    endpoint = request.url.path
    if endpoint.startswith("/v1/"):
        metrics = request.app.state.serve.metrics
        labels = metric_labels(getattr(request.state, "served", None), getattr(request.state, "public", None))
        metrics.requests.labels(*labels, endpoint, str(exc.status)).inc()
        metrics.errors.labels(*labels, exc.code or exc.type).inc()
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)


async def _not_found(request: Request, exc: Exception) -> JSONResponse:
    error = ApiError(404, f"no route {request.method} {request.url.path}", "not_found_error", "unknown_url")
    return JSONResponse(error.body(), status_code=404)


async def _not_allowed(request: Request, exc: Exception) -> JSONResponse:
    error = ApiError(
        405, f"method {request.method} not allowed on {request.url.path}", "invalid_request_error", "method_not_allowed"
    )
    return JSONResponse(error.body(), status_code=405)


async def _crash(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error on %s", request.url.path)
    error = ApiError(
        500,
        f"internal error ({type(exc).__name__}); see the server log with request id {request.state.rid}",
        "server_error",
        "internal_error",
    )
    return JSONResponse(error.body(), status_code=500)

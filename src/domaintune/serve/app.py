"""The OpenAI-compatible HTTP API (fastapi): chat/completions (streaming too), models, feedback, admin.

`build_state(cfg, output_dir)` loads the models and opens the store (slow, done once before the
server listens); `create_app(state)` returns the fastapi app. Every error is OpenAI's error JSON:
{"error": {"message", "type", "param", "code"}}.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from domaintune.errors import UserError
from domaintune.serve.canary import CANDIDATE, PROMOTED, ROLLED_BACK, STABLE, STATE_CODES, CanaryController, Decision
from domaintune.serve.catalog import Catalog, ServedModel
from domaintune.serve.config import ServeConfig
from domaintune.serve.engine import (
    Completion,
    Engine,
    GenRequest,
    QueueFullError,
    SamplingParams,
    build_engine,
    choose_engine,
)
from domaintune.serve.limits import RateLimiter
from domaintune.serve.observability import Metrics, request_id_var
from domaintune.serve.store import ApiKey, Store, default_store_url

log = logging.getLogger("domaintune.serve")


# ---- errors -------------------------------------------------------------------------------------
class ApiError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        type_: str,
        code: str | None = None,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type_, code, param
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad_request(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, "invalid_request_error", code, param)


# ---- request bodies -----------------------------------------------------------------------------
class _Body(BaseModel):
    model_config = ConfigDict(extra="allow")


class ContentPart(BaseModel):
    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart] | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        parts = []
        for part in self.content:
            if part.type != "text" or part.text is None:
                raise bad_request(f"content part of type {part.type!r} is not supported (text only)", "messages")
            parts.append(part.text)
        return "".join(parts)


class StreamOptions(BaseModel):
    include_usage: bool = False


class _GenerationBody(_Body):
    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    user: str | None = None

    @field_validator("stop")
    @classmethod
    def _stop(cls, value):
        if isinstance(value, list) and len(value) > 4:
            raise ValueError("at most 4 stop sequences")
        return value

    def stops(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)


class ChatBody(_GenerationBody):
    messages: list[ChatMessage] = Field(..., min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)


class CompletionBody(_GenerationBody):
    prompt: str | list[str]


class FeedbackBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    request_id: str = Field(..., min_length=1)
    rating: Literal[1, -1]
    correction: str | None = None
    comment: str | None = None


class LoadModelBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(..., min_length=1)
    source: str = Field(..., min_length=1)
    parent: str | None = None


_UNSUPPORTED = {
    "tools": "tool calls",
    "functions": "function calls",
    "logprobs": "logprobs",
    "best_of": "best_of",
    "echo": "echo",
    "suffix": "suffix",
}


# ---- state --------------------------------------------------------------------------------------
@dataclass
class ServeState:
    scfg: ServeConfig
    store: Store
    engine: Engine
    engine_reason: str
    catalog: Catalog
    metrics: Metrics
    limiter: RateLimiter
    project_name: str
    canary: CanaryController | None = None
    canary_arms: dict[str, ServedModel] = field(default_factory=dict)
    redactor: Any = None
    started_at: float = field(default_factory=time.time)

    def close(self) -> None:
        self.engine.stop()
        self.store.engine.dispose()


def _registry_factory(cfg):
    def factory():
        from domaintune.registry import registry_from_config  # written by the registry stage

        return registry_from_config(cfg)

    return factory


def build_state(cfg, output_dir: Path | None = None, engine_name: str | None = None) -> ServeState:
    """Open the store, start the engine and load every configured model (the slow part of start-up)."""
    from domaintune.model.loader import resolve_model_dir

    scfg: ServeConfig = cfg.serve
    output_dir = Path(output_dir or cfg.output_dir)
    store = Store(scfg.store_url or default_store_url(output_dir), key_hash_iterations=scfg.key_hash_iterations)
    name, reason = choose_engine(engine_name or scfg.engine)
    log.info("engine: %s (%s)", name, reason, extra={"engine": name})
    engine = build_engine(name, scfg.dtype or cfg.model.dtype, scfg)
    metrics = Metrics()
    if hasattr(engine, "on_batch"):
        engine.on_batch = metrics.batch_size.observe
    catalog = Catalog(engine, registry_factory=_registry_factory(cfg))
    redactor = None
    if scfg.redact_pii:
        from domaintune.data.pii import redact_pii

        redactor = redact_pii
    state = ServeState(scfg, store, engine, reason, catalog, metrics, RateLimiter(), cfg.name, redactor=redactor)
    try:
        base_dir = resolve_model_dir(cfg.model)
        base_name = scfg.base_name or cfg.model.name_or_path
        catalog.add_base(base_name, base_dir)
        if not scfg.serve_base:
            catalog.models[base_name].hidden = True
        trained = output_dir / "model"
        if scfg.serve_trained and trained.is_dir() and cfg.name not in [m.name for m in scfg.models]:
            if scfg.canary is None or scfg.canary.model != cfg.name:
                log.info("serving the trained model %s as %r", trained, cfg.name)
                catalog.add(cfg.name, str(trained))
        for item in scfg.models:
            catalog.add(item.name, item.source, item.parent)
        if scfg.canary:
            _setup_canary(state, scfg)
    except BaseException:
        engine.stop()
        raise
    metrics.models_loaded.set(len(catalog.models))
    engine.start()
    return state


def _setup_canary(state: ServeState, scfg: ServeConfig) -> None:
    c = scfg.canary
    stable = state.catalog.add(f"{c.model}@stable", c.stable, hidden=True)
    candidate = state.catalog.add(f"{c.model}@candidate", c.candidate, hidden=True)
    state.canary_arms = {STABLE: stable, CANDIDATE: candidate}
    # A decision taken before a restart stands for the same stable/candidate pair.
    initial = "running"
    for ev in state.store.events():
        d = ev.details
        if (
            ev.kind in ("canary_rolled_back", "canary_promoted")
            and d.get("model") == c.model
            and d.get("stable_source") == c.stable
            and d.get("candidate_source") == c.candidate
        ):
            initial = ROLLED_BACK if ev.kind == "canary_rolled_back" else PROMOTED
    state.canary = CanaryController(c, on_decision=lambda d: _on_canary_decision(state, d), state=initial)
    state.metrics.canary_state.labels(c.model).set(STATE_CODES[initial])
    if initial != "running":
        log.warning("canary for %s starts %s (decided before a restart)", c.model, initial)


def _on_canary_decision(state: ServeState, decision: Decision) -> None:
    c = state.scfg.canary
    stable, candidate = state.canary_arms[STABLE], state.canary_arms[CANDIDATE]
    kind = "canary_rolled_back" if decision.kind == ROLLED_BACK else "canary_promoted"
    details = {
        "model": c.model,
        "stable_source": c.stable,
        "stable_version": stable.version,
        "candidate_source": c.candidate,
        "candidate_version": candidate.version,
        "reason": decision.reason,
        "manual": decision.manual,
        "window": decision.stats,
    }
    state.metrics.canary_state.labels(c.model).set(STATE_CODES[decision.kind])
    if decision.kind == ROLLED_BACK:
        state.metrics.canary_rollbacks.labels(c.model, candidate.version).inc()
        log.warning(
            "canary rollback: all traffic for %s back to stable: %s",
            c.model,
            decision.reason,
            extra={"event": kind, **details},
        )
    else:
        state.metrics.canary_promotions.labels(c.model, candidate.version).inc()
        log.info(
            "canary promoted: %s now serves the candidate: %s",
            c.model,
            decision.reason,
            extra={"event": kind, **details},
        )
    state.store.add_event(kind, details)
    if candidate.registry_name:
        try:
            registry = state.catalog.registry()
            registry.record_event(candidate.registry_name, candidate.version, kind, details)
            stable_alias = _registry_alias(c.stable)
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
    else:
        log.info("candidate %s is not a registry version: %s recorded in the serve store only", c.candidate, kind)


# ---- helpers ------------------------------------------------------------------------------------
def _registry_alias(source: str) -> str | None:
    """`production` for registry://name@production; None for explicit versions and folders."""
    if not source.startswith("registry://") or "@" not in source:
        return None
    ref = source.split("@", 1)[1].split("/", 1)[0]
    if (ref[:1] == "v" and ref[1:2].isdigit()) or ref == "latest":
        return None
    return ref


def _labels(model: ServedModel | None, public: str | None) -> tuple[str, str, str]:
    if model is None:
        return ("unknown", "-", "-")
    return (public or model.name, model.name if model.kind == "adapter" or model.hidden else "-", model.version)


def _classify(completion: Completion) -> str:
    if completion.finish_reason == "cancelled":
        return "cancelled"
    if not completion.text.strip():
        return "empty"
    if "\ufffd" in completion.text:
        return "malformed"
    return "ok"


def _seconds_to_utc_midnight() -> int:
    now = datetime.now(timezone.utc)
    tomorrow = (now + timedelta(days=1)).replace(hour=0, minute=0, second=0, microsecond=0)
    return max(1, math.ceil((tomorrow - now).total_seconds()))


@dataclass
class _Job:
    """One generation request travelling through the handler."""

    rid: str
    response_id: str
    endpoint: str
    public: str
    served: ServedModel
    arm: str | None
    key: ApiKey | None
    prompt_record: Any
    prompt_tokens: int
    params: SamplingParams
    started: float
    gen: GenRequest | None = None


def create_app(state: ServeState) -> FastAPI:
    scfg = state.scfg
    metrics = state.metrics

    @contextlib.asynccontextmanager
    async def lifespan(_app):
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

    app = FastAPI(title="domaintune", version="1", docs_url=None, redoc_url=None, lifespan=lifespan)
    app.state.serve = state

    # ---- middleware and error handlers ------------------------------------------------------------
    @app.middleware("http")
    async def request_context(request: Request, call_next):
        rid = request.headers.get("x-request-id") or uuid.uuid4().hex[:24]
        rid = "".join(ch for ch in rid if ch.isalnum() or ch in "-_")[:64] or uuid.uuid4().hex[:24]
        request.state.rid = rid
        token = request_id_var.set(rid)
        start = time.monotonic()
        try:
            length = request.headers.get("content-length")
            if length is not None and length.isdigit() and int(length) > scfg.max_body_bytes:
                err = ApiError(
                    413,
                    f"request body is {int(length)} bytes; the limit is {scfg.max_body_bytes}",
                    "invalid_request_error",
                    "request_too_large",
                )
                response = JSONResponse(err.body(), status_code=413)
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

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError):
        endpoint = request.url.path
        if endpoint.startswith("/v1/"):
            model = getattr(request.state, "served", None)
            public = getattr(request.state, "public", None)
            labels = _labels(model, public)
            metrics.requests.labels(*labels, endpoint, str(exc.status)).inc()
            metrics.errors.labels(*labels, exc.code or exc.type).inc()
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(404)
    async def not_found(request: Request, exc):
        return JSONResponse(
            ApiError(404, f"no route {request.method} {request.url.path}", "not_found_error", "unknown_url").body(),
            status_code=404,
        )

    @app.exception_handler(405)
    async def not_allowed(request: Request, exc):
        return JSONResponse(
            ApiError(
                405,
                f"method {request.method} not allowed on {request.url.path}",
                "invalid_request_error",
                "method_not_allowed",
            ).body(),
            status_code=405,
        )

    @app.exception_handler(Exception)
    async def crash(request: Request, exc: Exception):
        log.exception("unhandled error on %s", request.url.path)
        return JSONResponse(
            ApiError(
                500,
                f"internal error ({type(exc).__name__}); see the server log with request id {request.state.rid}",
                "server_error",
                "internal_error",
            ).body(),
            status_code=500,
        )

    # ---- auth -----------------------------------------------------------------------------------
    async def authenticate(request: Request, admin: bool = False) -> ApiKey | None:
        header = request.headers.get("authorization", "")
        presented = header[7:].strip() if header.lower().startswith("bearer ") else ""
        if not presented:
            if not admin and not scfg.require_api_key:
                return None
            raise ApiError(
                401,
                "missing API key: send `Authorization: Bearer <key>` (create one with `domaintune keys create`)",
                "authentication_error",
                "missing_api_key",
            )
        key = await asyncio.to_thread(state.store.verify, presented)
        if key is None:
            raise ApiError(401, "invalid or revoked API key", "authentication_error", "invalid_api_key")
        request.state.key_name = key.name
        if admin and not key.is_admin:
            raise ApiError(
                403,
                "this endpoint needs an admin key (`domaintune keys create --admin`)",
                "permission_error",
                "admin_required",
            )
        return key

    async def read_body(request: Request, model_cls: type[BaseModel]):
        raw = await request.body()
        if len(raw) > scfg.max_body_bytes:
            raise ApiError(
                413,
                f"request body is {len(raw)} bytes; the limit is {scfg.max_body_bytes}",
                "invalid_request_error",
                "request_too_large",
            )
        try:
            data = json.loads(raw or b"null")
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise bad_request(f"the body is not valid JSON ({exc})", code="invalid_json") from None
        if not isinstance(data, dict):
            raise bad_request("the body must be a JSON object", code="invalid_json")
        try:
            return model_cls.model_validate(data)
        except ValidationError as exc:
            first = exc.errors()[0]
            param = ".".join(str(p) for p in first["loc"]) or None
            msg = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()[:5])
            raise bad_request(msg, param=param) from None

    # ---- routing and limits -----------------------------------------------------------------------
    def route(request: Request, key: ApiKey | None, body: _GenerationBody) -> tuple[ServedModel, str | None]:
        public = body.model
        canary = state.canary
        if canary is not None and public == canary.cfg.model:
            served_exists = True
        else:
            served = state.catalog.get(public)
            served_exists = served is not None
        if not served_exists:
            raise ApiError(
                404,
                f"The model `{public}` does not exist (GET /v1/models lists the served models)",
                "invalid_request_error",
                "model_not_found",
                "model",
            )
        if key is not None and not key.allows(public):
            raise ApiError(
                403,
                f"this API key may not use model `{public}` (allowed: {', '.join(key.models or [])})",
                "permission_error",
                "model_not_allowed",
                "model",
            )
        request.state.public = public
        if canary is not None and public == canary.cfg.model:
            subject = body.user or (key.id if key else None) or (request.client.host if request.client else "anon")
            arm = canary.arm_for(subject)
            served = state.canary_arms[arm]
            request.state.served = served
            return served, arm
        request.state.served = served
        return served, None

    def sampling(body: _GenerationBody, explicit_max: int | None, prompt_tokens: int, ctx: int) -> SamplingParams:
        if body.n != 1:
            raise bad_request("only n=1 is supported", "n")
        extra = body.model_extra or {}
        for name, what in _UNSUPPORTED.items():
            value = extra.get(name)
            if value not in (None, False, [], 0):
                raise bad_request(f"{what} are not supported by this server", name, "unsupported_parameter")
        fmt = extra.get("response_format")
        if isinstance(fmt, dict) and fmt.get("type") not in (None, "text"):
            raise bad_request("only response_format text is supported", "response_format", "unsupported_parameter")
        if explicit_max is not None and explicit_max > scfg.max_tokens_cap:
            raise bad_request(
                f"max_tokens is {explicit_max}; this server allows at most {scfg.max_tokens_cap}",
                "max_tokens",
                "max_tokens_too_large",
            )
        if prompt_tokens >= ctx:
            raise bad_request(
                f"This model's maximum context length is {ctx} tokens. However, your prompt has {prompt_tokens} "
                "tokens, which leaves no room for the completion. Please reduce the length of the prompt.",
                "messages",
                "context_length_exceeded",
            )
        if explicit_max is None:
            max_tokens = min(scfg.default_max_tokens, ctx - prompt_tokens)
        else:
            max_tokens = explicit_max
            if prompt_tokens + max_tokens > ctx:
                raise bad_request(
                    f"This model's maximum context length is {ctx} tokens. However, you requested "
                    f"{prompt_tokens + max_tokens} tokens ({prompt_tokens} in the prompt, {max_tokens} in the "
                    "completion). Please reduce the length of the prompt or the completion.",
                    "max_tokens",
                    "context_length_exceeded",
                )
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=scfg.default_temperature if body.temperature is None else body.temperature,
            top_p=scfg.default_top_p if body.top_p is None else body.top_p,
            stop=body.stops(),
            seed=body.seed,
        )

    async def check_limits(key: ApiKey | None, needed_tokens: int) -> None:
        if key is None:
            return
        over = state.limiter.check_tokens(key.id, key.tpm, needed_tokens)
        if over:
            raise ApiError(
                429,
                over.message,
                "rate_limit_error",
                "rate_limit_exceeded",
                headers={"Retry-After": str(over.retry_after_s)},
            )
        if key.daily_tokens is not None:
            used = await asyncio.to_thread(state.store.tokens_used_today, key.id)
            if used >= key.daily_tokens:
                raise ApiError(
                    429,
                    f"daily token quota exhausted: this key has used {used} of its {key.daily_tokens} tokens today "
                    "(UTC); the quota resets at 00:00 UTC",
                    "insufficient_quota",
                    "daily_quota_exceeded",
                    headers={"Retry-After": str(_seconds_to_utc_midnight())},
                )

    # ---- the generation path -------------------------------------------------------------------
    async def start_job(request: Request, key: ApiKey | None, body: _GenerationBody, endpoint: str) -> _Job:
        started = time.monotonic()
        if key is not None:
            over = state.limiter.check_request(key.id, key.rpm)
            if over:
                raise ApiError(
                    429,
                    over.message,
                    "rate_limit_error",
                    "rate_limit_exceeded",
                    headers={"Retry-After": str(over.retry_after_s)},
                )
        served, arm = route(request, key, body)
        bb = state.engine.backbone(served.backbone)
        tokenizer = bb.tokenizer
        if endpoint == "chat":
            messages = [
                {"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in body.messages
            ]
            try:
                text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            except Exception as exc:  # templates raise on e.g. roles they do not know
                raise bad_request(f"the chat template rejected these messages: {exc}", "messages") from None
            prompt_ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            prompt_record: Any = messages
            explicit_max = body.max_completion_tokens or body.max_tokens
        else:
            prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
            if len(prompts) != 1:
                raise bad_request("send one prompt per request (a list of several prompts is not supported)", "prompt")
            prompt_ids = tokenizer(prompts[0])["input_ids"]
            prompt_record = prompts[0]
            explicit_max = body.max_tokens
        ctx = bb.context_length if scfg.max_context_tokens is None else min(bb.context_length, scfg.max_context_tokens)
        params = sampling(body, explicit_max, len(prompt_ids), ctx)
        await check_limits(key, len(prompt_ids) + params.max_tokens)
        prefix = "chatcmpl" if endpoint == "chat" else "cmpl"
        job = _Job(
            request.state.rid,
            f"{prefix}-{request.state.rid}",
            endpoint,
            body.model,
            served,
            arm,
            key,
            prompt_record,
            len(prompt_ids),
            params,
            started,
        )
        request.state.response_id = job.response_id
        job.gen = GenRequest(
            id=job.response_id,
            backbone=served.backbone,
            adapter=served.adapter,
            prompt_ids=list(prompt_ids),
            params=params,
            loop=asyncio.get_running_loop(),
            events=asyncio.Queue(),
        )
        try:
            state.engine.submit(job.gen)
        except QueueFullError as exc:
            raise ApiError(
                503,
                f"server overloaded: {exc}; retry shortly",
                "server_error",
                "overloaded",
                headers={"Retry-After": "5"},
            ) from None
        metrics.queue_depth.set(state.engine.queue_depth())
        return job

    def finish_job(job: _Job, status: int, completion: Completion | None, outcome: str) -> None:
        """Account for a finished job: metrics, usage, request log, canary evidence (runs in a thread)."""
        labels = _labels(job.served, job.public)
        latency = time.monotonic() - job.started
        completion_tokens = completion.completion_tokens if completion else 0
        metrics.requests.labels(*labels, job.endpoint, str(status)).inc()
        metrics.latency.labels(*labels, job.endpoint).observe(latency)
        metrics.prompt_tokens.labels(*labels).inc(job.prompt_tokens)
        metrics.completion_tokens.labels(*labels).inc(completion_tokens)
        if completion and completion.first_token_at:
            metrics.ttft.labels(*labels).observe(max(0.0, completion.first_token_at - job.started))
        if outcome not in ("ok", "cancelled"):
            metrics.errors.labels(*labels, outcome).inc()
        metrics.queue_depth.set(state.engine.queue_depth())
        total = job.prompt_tokens + completion_tokens
        if job.key is not None:
            state.limiter.add_tokens(job.key.id, total)
            state.store.add_usage(job.key.id, total)
        if scfg.log_requests:
            prompt, response, counts = job.prompt_record, completion.text if completion else None, {}
            if state.redactor is not None:
                prompt, counts = _redact_prompt(state.redactor, prompt)
                if response is not None:
                    response, more = state.redactor(response)
                    for k, v in more.items():
                        counts[k] = counts.get(k, 0) + v
            state.store.log_request(
                id=job.response_id,
                key_id=job.key.id if job.key else None,
                endpoint=job.endpoint,
                model=job.public,
                served=job.served.name,
                version=job.served.version,
                canary_arm=job.arm,
                prompt=prompt,
                response=response,
                status=status,
                outcome=outcome,
                finish_reason=completion.finish_reason if completion else None,
                prompt_tokens=job.prompt_tokens,
                completion_tokens=completion_tokens,
                latency_s=round(latency, 4),
                pii_counts=counts or None,
            )
        if job.arm is not None and state.canary is not None and outcome != "cancelled":
            metrics.canary_requests.labels(job.public, job.arm, outcome).inc()
            state.canary.record(job.response_id, job.arm, error=outcome != "ok")
        log.info(
            "generation %s",
            outcome,
            extra={
                "event": "generation",
                "response_id": job.response_id,
                "model": job.public,
                "served": job.served.name,
                "version": job.served.version,
                "arm": job.arm,
                "status": status,
                "prompt_tokens": job.prompt_tokens,
                "completion_tokens": completion_tokens,
                "latency_ms": round(latency * 1000, 1),
                "finish_reason": completion.finish_reason if completion else None,
            },
        )

    def deadline_left(job: _Job) -> float:
        return scfg.request_timeout_s - (time.monotonic() - job.started)

    async def wait_done(job: _Job) -> Completion:
        while True:
            left = deadline_left(job)
            if left <= 0:
                raise asyncio.TimeoutError
            kind, payload = await asyncio.wait_for(job.gen.events.get(), timeout=left)
            if kind == "done":
                return payload
            if kind == "error":
                raise payload

    def headers_for(job: _Job) -> dict[str, str]:
        return {
            "x-request-id": job.response_id,
            "x-domaintune-served": job.served.name,
            "x-domaintune-version": job.served.version,
        }

    def usage(job: _Job, completion: Completion) -> dict[str, int]:
        return {
            "prompt_tokens": job.prompt_tokens,
            "completion_tokens": completion.completion_tokens,
            "total_tokens": job.prompt_tokens + completion.completion_tokens,
        }

    def fingerprint(job: _Job) -> str:
        return f"{job.served.name}@{job.served.version}"

    async def respond(request: Request, job: _Job, body: _GenerationBody) -> Response:
        created = int(time.time())
        if body.stream:
            return StreamingResponse(
                stream(job, body, created),
                media_type="text/event-stream",
                headers={**headers_for(job), "Cache-Control": "no-cache"},
            )
        try:
            completion = await wait_done(job)
        except asyncio.TimeoutError:
            job.gen.cancelled.set()
            await asyncio.to_thread(finish_job, job, 504, None, "timeout")
            raise ApiError(
                504, f"generation did not finish within {scfg.request_timeout_s:g} s", "server_error", "timeout"
            ) from None
        except asyncio.CancelledError:
            job.gen.cancelled.set()
            raise
        except Exception as exc:
            await asyncio.to_thread(finish_job, job, 500, None, "error")
            raise ApiError(500, f"generation failed: {exc}", "server_error", "generation_failed") from None
        await asyncio.to_thread(finish_job, job, 200, completion, _classify(completion))
        finish = completion.finish_reason
        if job.endpoint == "chat":
            payload = {
                "id": job.response_id,
                "object": "chat.completion",
                "created": created,
                "model": job.public,
                "system_fingerprint": fingerprint(job),
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": completion.text},
                        "logprobs": None,
                        "finish_reason": finish,
                    }
                ],
                "usage": usage(job, completion),
            }
        else:
            payload = {
                "id": job.response_id,
                "object": "text_completion",
                "created": created,
                "model": job.public,
                "system_fingerprint": fingerprint(job),
                "choices": [{"index": 0, "text": completion.text, "logprobs": None, "finish_reason": finish}],
                "usage": usage(job, completion),
            }
        return JSONResponse(payload, headers=headers_for(job))

    async def stream(job: _Job, body: _GenerationBody, created: int):
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        chat = job.endpoint == "chat"
        obj = "chat.completion.chunk" if chat else "text_completion"

        def chunk(delta: str | None, finish: str | None, role: bool = False) -> str:
            if chat:
                d: dict[str, Any] = {}
                if role:
                    d["role"] = "assistant"
                if delta is not None:
                    d["content"] = delta
                choice = {"index": 0, "delta": d, "logprobs": None, "finish_reason": finish}
            else:
                choice = {"index": 0, "text": delta or "", "logprobs": None, "finish_reason": finish}
            data: dict[str, Any] = {
                "id": job.response_id,
                "object": obj,
                "created": created,
                "model": job.public,
                "system_fingerprint": fingerprint(job),
                "choices": [choice],
            }
            if include_usage:
                data["usage"] = None
            return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"

        finished = False
        try:
            if chat:
                yield chunk("", None, role=True)
            while True:
                left = deadline_left(job)
                if left <= 0:
                    raise asyncio.TimeoutError
                kind, payload = await asyncio.wait_for(job.gen.events.get(), timeout=left)
                if kind == "delta":
                    yield chunk(payload, None)
                elif kind == "error":
                    finished = True
                    await asyncio.to_thread(finish_job, job, 500, None, "error")
                    err = ApiError(500, f"generation failed: {payload}", "server_error", "generation_failed")
                    yield f"data: {json.dumps(err.body())}\n\n"
                    yield "data: [DONE]\n\n"
                    return
                else:
                    completion: Completion = payload
                    finished = True
                    await asyncio.to_thread(finish_job, job, 200, completion, _classify(completion))
                    yield chunk(None, completion.finish_reason)
                    if include_usage:
                        data = {
                            "id": job.response_id,
                            "object": obj,
                            "created": created,
                            "model": job.public,
                            "system_fingerprint": fingerprint(job),
                            "choices": [],
                            "usage": usage(job, completion),
                        }
                        yield f"data: {json.dumps(data)}\n\n"
                    yield "data: [DONE]\n\n"
                    return
        except asyncio.TimeoutError:
            job.gen.cancelled.set()
            finished = True
            await asyncio.to_thread(finish_job, job, 504, None, "timeout")
            err = ApiError(
                504, f"generation did not finish within {scfg.request_timeout_s:g} s", "server_error", "timeout"
            )
            yield f"data: {json.dumps(err.body())}\n\n"
            yield "data: [DONE]\n\n"
        finally:
            if not finished:  # the client went away mid-stream: stop generating, still account for it
                job.gen.cancelled.set()
                log.info("client disconnected; generation cancelled", extra={"event": "cancelled"})
                asyncio.get_running_loop().run_in_executor(None, finish_job, job, 499, None, "cancelled")

    # ---- endpoints ------------------------------------------------------------------------------
    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        key = await authenticate(request)
        body = await read_body(request, ChatBody)
        job = await start_job(request, key, body, "chat")
        return await respond(request, job, body)

    @app.post("/v1/completions")
    async def completions(request: Request):
        key = await authenticate(request)
        body = await read_body(request, CompletionBody)
        job = await start_job(request, key, body, "completion")
        return await respond(request, job, body)

    def model_list(include_hidden: bool) -> list[dict[str, Any]]:
        items = [m.describe() for m in state.catalog.models.values() if include_hidden or not m.hidden]
        if state.canary is not None:
            c = state.canary
            stable, cand = state.canary_arms[STABLE], state.canary_arms[CANDIDATE]
            current = cand if c.state == PROMOTED else stable
            entry = current.describe()
            entry.update(
                {
                    "id": c.cfg.model,
                    "kind": "canary",
                    "root": c.cfg.model,
                    "canary": {
                        "state": c.state,
                        "stable": stable.version,
                        "candidate": cand.version,
                        "candidate_share": c.cfg.candidate_share,
                    },
                }
            )
            items.append(entry)
        return items

    @app.get("/v1/models")
    async def list_models(request: Request):
        key = await authenticate(request)
        items = model_list(False)
        if key is not None and not key.is_admin and key.models is not None:
            items = [m for m in items if m["id"] in key.models]
        return {"object": "list", "data": items}

    @app.get("/v1/models/{name:path}")
    async def get_model(request: Request, name: str):
        key = await authenticate(request)
        for item in model_list(False):
            if item["id"] == name and (key is None or key.allows(name)):
                return item
        raise ApiError(404, f"The model `{name}` does not exist", "invalid_request_error", "model_not_found", "model")

    @app.post("/v1/feedback")
    async def feedback(request: Request):
        key = await authenticate(request)
        body = await read_body(request, FeedbackBody)
        row = None
        for candidate in (body.request_id, f"chatcmpl-{body.request_id}", f"cmpl-{body.request_id}"):
            row = await asyncio.to_thread(state.store.get_request, candidate)
            if row is not None:
                break
        if row is None:
            raise ApiError(
                404,
                f"no logged request with id {body.request_id!r}",
                "invalid_request_error",
                "request_not_found",
                "request_id",
            )
        if key is not None and not key.is_admin and row.key_id != key.id:
            raise ApiError(
                403, "this request was made with another API key", "permission_error", "not_your_request", "request_id"
            )
        correction, comment = body.correction, body.comment
        if state.redactor is not None:
            correction = state.redactor(correction)[0] if correction else correction
            comment = state.redactor(comment)[0] if comment else comment
        fid = await asyncio.to_thread(
            state.store.add_feedback, row.id, key.id if key else None, body.rating, correction, comment
        )
        served = state.catalog.get(row.served)
        labels = (
            row.model,
            row.served if served is not None and (served.kind == "adapter" or served.hidden) else "-",
            row.version,
        )
        metrics.feedback.labels(*labels, "positive" if body.rating > 0 else "negative").inc()
        if row.canary_arm and state.canary is not None:
            await asyncio.to_thread(state.canary.feedback, row.id, body.rating)
        return {"id": fid, "object": "feedback", "request_id": row.id, "rating": body.rating}

    @app.get("/healthz")
    async def healthz():
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz():
        problems = []
        thread = getattr(state.engine, "_thread", None)
        if state.engine.name == "transformers" and (thread is None or not thread.is_alive()):
            problems.append("the batching thread is not running")
        if not state.catalog.models:
            problems.append("no model is loaded")
        try:
            await asyncio.to_thread(state.store.count_requests)
        except Exception as exc:  # the store is part of readiness: keys cannot be checked without it
            problems.append(f"store unreachable: {type(exc).__name__}")
        if problems:
            return JSONResponse({"status": "not ready", "problems": problems}, status_code=503)
        return {"status": "ready", "engine": state.engine.name, "models": len(state.catalog.models)}

    @app.get("/metrics")
    async def prometheus(request: Request):
        if scfg.metrics_require_key:
            await authenticate(request, admin=True)
        metrics.queue_depth.set(state.engine.queue_depth())
        metrics.models_loaded.set(len(state.catalog.models))
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    # ---- admin ----------------------------------------------------------------------------------
    @app.get("/admin/models")
    async def admin_models(request: Request):
        await authenticate(request, admin=True)
        return {
            "object": "list",
            "data": model_list(True),
            "engine": state.engine.name,
            "engine_reason": state.engine_reason,
        }

    @app.post("/admin/models", status_code=201)
    async def admin_load(request: Request):
        await authenticate(request, admin=True)
        body = await read_body(request, LoadModelBody)
        if state.canary is not None and body.name == state.canary.cfg.model:
            raise bad_request(f"{body.name!r} is the canary's public name", "name")
        try:
            model = await asyncio.to_thread(state.catalog.add, body.name, body.source, body.parent)
        except UserError as exc:
            raise bad_request(str(exc), "source", "model_load_failed") from None
        metrics.models_loaded.set(len(state.catalog.models))
        log.info("loaded %s from %s", body.name, body.source, extra={"event": "model_loaded", "model": body.name})
        return JSONResponse(model.describe(), status_code=201)

    @app.delete("/admin/models/{name:path}")
    async def admin_unload(request: Request, name: str):
        await authenticate(request, admin=True)
        if name in {m.name for m in state.canary_arms.values()}:
            raise bad_request(f"{name!r} is a canary arm; change the canary in the config instead", "name")
        try:
            model = await asyncio.to_thread(state.catalog.remove, name)
        except UserError as exc:
            status = 404 if "is not served" in str(exc) else 400
            raise ApiError(status, str(exc), "invalid_request_error", "model_unload_failed", "name") from None
        metrics.models_loaded.set(len(state.catalog.models))
        log.info("unloaded %s", name, extra={"event": "model_unloaded", "model": name})
        return {"id": model.name, "object": "model", "deleted": True}

    def need_canary():
        if state.canary is None:
            raise ApiError(404, "no canary is configured (serve.canary)", "invalid_request_error", "no_canary")
        return state.canary

    @app.get("/admin/canary")
    async def canary_status(request: Request):
        await authenticate(request, admin=True)
        return need_canary().snapshot()

    @app.post("/admin/canary/promote")
    async def canary_promote(request: Request):
        await authenticate(request, admin=True)
        canary = need_canary()
        raw = await request.body()
        force = bool(json.loads(raw).get("force")) if raw.strip() else False
        try:
            await asyncio.to_thread(canary.promote, "promoted by an operator", force)
        except ValueError as exc:
            raise ApiError(409, str(exc), "invalid_request_error", "canary_not_ready") from None
        return canary.snapshot()

    @app.post("/admin/canary/rollback")
    async def canary_rollback(request: Request):
        await authenticate(request, admin=True)
        canary = need_canary()
        if canary.state != "running":
            raise ApiError(409, f"the canary is already {canary.state}", "invalid_request_error", "canary_decided")
        await asyncio.to_thread(canary.rollback, "rolled back by an operator")
        return canary.snapshot()

    return app


def _redact_prompt(redactor, prompt: Any) -> tuple[Any, dict[str, int]]:
    counts: dict[str, int] = {}

    def red(text: str) -> str:
        out, found = redactor(text)
        for k, v in found.items():
            counts[k] = counts.get(k, 0) + v
        return out

    if isinstance(prompt, str):
        return red(prompt), counts
    return [{**m, "content": red(m["content"])} for m in prompt], counts

"""One generation request from admission to accounting.

`start_job` admits a request (rate limits, routing and canary arm, chat template, sampling checks,
token limits and quotas) and queues it on the engine; `respond` waits for the answer (or streams
it as server-sent events) within the request deadline; `finish_job` accounts for every job however
it ended: metrics, usage, the request log, canary evidence.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from domaintune.model.thinking import OPEN as THINK_OPEN
from domaintune.model.thinking import ReasoningSplitter, split_reasoning, supports_reasoning
from domaintune.serve.canary import refresh_canary
from domaintune.serve.catalog import ServedModel
from domaintune.serve.config import ServeConfig
from domaintune.serve.engines import Backbone, Completion, GenRequest, QueueFullError, SamplingParams
from domaintune.serve.limits import LimitExceeded, Quota, Reservation
from domaintune.serve.protocol import (
    DONE,
    NO_REASONING,
    UNSUPPORTED,
    ApiError,
    ChatBody,
    CompletionBody,
    GenerationBody,
    ResponseHead,
    bad_request,
    completion_response,
    generation_failed,
    header_value,
    sse,
    stream_chunk,
    timed_out,
    usage_chunk,
)
from domaintune.serve.state import Redactor, ServeState
from domaintune.serve.store import ApiKey
from domaintune.serve.tools import (
    active_tools,
    answer_calls,
    forced_call_grammar,
    held_back_chunks,
    holds_back,
    map_call_arguments,
    template_inputs,
    with_tool_calls,
)
from domaintune.utils.names import model_name_problem

log = logging.getLogger("domaintune.serve")

GREEDY_BELOW = 1e-5  # temperatures below this decode greedily (as vLLM does)


@dataclass
class Job:
    """One generation request travelling through the handler."""

    rid: str
    response_id: str
    endpoint: str  # chat | completion
    public: str  # the model name the client asked for
    served: ServedModel  # what serves it (a canary arm for the canary's public name)
    arm: str | None
    key: ApiKey | None
    prompt_record: Any  # what the request log keeps: the messages, or the prompt text
    prompt_tokens: int
    params: SamplingParams
    started: float
    gen: GenRequest
    reservation: Reservation | None = None
    accounted: bool = False
    thinking: bool | None = None  # a reasoning model's chat: whether the prompt opened its <think> block; None: not one
    tools: list[dict[str, Any]] | None = None  # a chat's active tool definitions (rendered in its prompt)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def claim(self) -> bool:
        """True for the first caller only: a job is accounted for exactly once, however it ended."""
        with self._lock:
            first, self.accounted = not self.accounted, True
            return first

    def headers(self) -> dict[str, str]:
        return {
            "x-request-id": header_value(self.response_id),
            "x-domaintune-served": header_value(self.served.name),
            "x-domaintune-version": header_value(self.served.version),
        }

    def usage(self, completion: Completion) -> dict[str, int]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": completion.completion_tokens,
            "total_tokens": self.prompt_tokens + completion.completion_tokens,
        }

    def head(self, created: int) -> ResponseHead:
        fingerprint = f"{self.served.name}@{self.served.version}"
        return ResponseHead(self.response_id, self.endpoint == "chat", created, self.public, fingerprint)


def metric_labels(model: ServedModel | None, public: str | None) -> tuple[str, str, str]:
    """(model, adapter, version) labels: the adapter label names adapters and canary arms only."""
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


# ---- admission ----------------------------------------------------------------------------------
def _limited(over: LimitExceeded) -> ApiError:
    return ApiError(429, over.message, over.type, over.code, headers={"Retry-After": str(over.retry_after_s)})


async def reserve(state: ServeState, key: ApiKey | None, tokens: int) -> Reservation | None:
    """Count the request and reserve its most tokens against the key's rpm, tpm and daily quota at once."""
    if key is None or (key.rpm is None and key.tpm is None and key.daily_tokens is None):
        return None
    quota = Quota(key.id, key.rpm, key.tpm, key.daily_tokens)
    try:
        return await state.limit(state.limits.admit, quota, tokens)
    except LimitExceeded as over:
        raise _limited(over) from None


def route(
    state: ServeState, request: Request, key: ApiKey | None, body: GenerationBody
) -> tuple[ServedModel, str | None]:
    """The served model for `body.model`, and the canary arm when it is the canary's public name."""
    public = body.model
    problem = model_name_problem(public)
    if problem:
        raise bad_request(problem, "model", "invalid_model_name")
    canary = state.canary
    is_canary = canary is not None and public == canary.cfg.model
    served = None if is_canary else state.catalog.get(public)
    if served is not None and served.hidden:  # canary arms are reached through the public name only
        served = None
    if not is_canary and served is None:
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
    arm = None
    if canary is not None and is_canary:
        subject = body.user or (key.id if key else None) or (request.client.host if request.client else "anon")
        arm = canary.arm_for(subject)
        served = state.canary_arms[arm]
    assert served is not None  # found in the catalog, or a canary arm
    request.state.served = served
    return served, arm


def _prompt_text_length(body: GenerationBody) -> int:
    """Characters of the prompt's text (a lower bound for the templated prompt)."""
    if isinstance(body, ChatBody):
        return sum(len(m.text()) for m in body.messages)
    if isinstance(body, CompletionBody):
        return len(body.single_prompt())
    return 0


def _refuse_surely_too_long(bb: Backbone, body: GenerationBody, ctx: int) -> None:
    """Refuse a prompt that cannot fit before tokenising it: no token covers more than `max_token_chars`."""
    chars = _prompt_text_length(body)
    if bb.max_token_chars and chars > ctx * bb.max_token_chars:
        raise bad_request(
            f"This model's maximum context length is {ctx} tokens. However, your prompt has {chars} characters, "
            f"at least {chars // bb.max_token_chars} tokens. Please reduce the length of the prompt.",
            "messages" if isinstance(body, ChatBody) else "prompt",
            "context_length_exceeded",
        )


def _prompt(tokenizer: Any, body: GenerationBody) -> tuple[list[int], Any]:
    """(prompt token ids, what the request log keeps) for a chat or a completion body (CPU work: runs in a pool)."""
    if isinstance(body, ChatBody):
        messages = body.chat_messages()
        inputs = template_inputs(tokenizer, body, messages)  # the tools too, when the template renders them
        try:
            text = tokenizer.apply_chat_template(**inputs, add_generation_prompt=True, tokenize=False)
        except Exception as exc:  # templates raise on e.g. roles they do not know
            raise bad_request(f"the chat template rejected these messages: {exc}", "messages") from None
        return tokenizer(text, add_special_tokens=False)["input_ids"], messages
    if isinstance(body, CompletionBody):
        prompt = body.single_prompt()
        ids = tokenizer(prompt)["input_ids"]
        if not ids:
            raise bad_request("the prompt is empty: give at least one token of text", "prompt", "empty_prompt")
        return ids, prompt
    raise TypeError(f"{type(body).__name__} is neither a chat nor a completion body")


def _opens_reasoning(tokenizer: Any, prompt_ids: list[int]) -> bool | None:
    """None for a model without reasoning; else whether its prompt ends inside a `<think>` block."""
    if not supports_reasoning(getattr(tokenizer, "chat_template", None)):
        return None
    return tokenizer.decode(prompt_ids[-4:]).rstrip().endswith(THINK_OPEN)


def _refuse_unsupported(body: GenerationBody) -> None:
    if body.n != 1:
        raise bad_request("only n=1 is supported", "n")
    extra = body.model_extra or {}
    for name, what in UNSUPPORTED.items():
        value = extra.get(name)
        if value not in (None, False, [], 0):
            raise bad_request(f"{what} are not supported by this server", name, "unsupported_parameter")
    fmt = extra.get("response_format")
    if isinstance(fmt, dict) and fmt.get("type") not in (None, "text"):
        raise bad_request("only response_format text is supported", "response_format", "unsupported_parameter")


def sampling(scfg: ServeConfig, body: GenerationBody, prompt_tokens: int, ctx: int) -> SamplingParams:
    """The request's sampling parameters, after the server's caps and the context length."""
    _refuse_unsupported(body)
    explicit_max = body.explicit_max_tokens()
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
    temperature = scfg.default_temperature if body.temperature is None else body.temperature
    return SamplingParams(
        max_tokens=max_tokens,
        # Below GREEDY_BELOW the distribution is an argmax anyway, and dividing by it overflows: decode greedily.
        temperature=0.0 if temperature < GREEDY_BELOW else temperature,
        top_p=scfg.default_top_p if body.top_p is None else body.top_p,
        stop=body.stops(),
        seed=body.seed,
        repetition_penalty=(
            scfg.default_repetition_penalty if body.repetition_penalty is None else body.repetition_penalty
        ),
    )


async def start_job(state: ServeState, request: Request, key: ApiKey | None, body: GenerationBody) -> Job:
    """Admit the request and queue it on the engine; every refusal is an ApiError."""
    started = time.monotonic()
    scfg = state.scfg
    await refresh_canary(state)
    served, arm = route(state, request, key, body)
    bb = state.engine.backbone(served.backbone)
    ctx = bb.context_length if scfg.max_context_tokens is None else min(bb.context_length, scfg.max_context_tokens)
    _refuse_unsupported(body)
    _refuse_surely_too_long(bb, body, ctx)
    prompt_ids, prompt_record = await state.cpu(_prompt, bb.tokenizer, body)
    params = sampling(scfg, body, len(prompt_ids), ctx)
    if isinstance(body, ChatBody):  # tool_choice required / a named function: constrained to one call
        thinking = bool(_opens_reasoning(bb.tokenizer, prompt_ids))
        params.grammar = await state.cpu(forced_call_grammar, bb.tokenizer, bb.eot_ids, body, thinking)
    reservation = await reserve(state, key, len(prompt_ids) + params.max_tokens)
    endpoint = "chat" if isinstance(body, ChatBody) else "completion"
    rid = request.state.rid
    response_id = f"{'chatcmpl' if endpoint == 'chat' else 'cmpl'}-{rid}"
    request.state.response_id = response_id
    gen = GenRequest(
        id=response_id,
        backbone=served.backbone,
        adapter=served.adapter,
        prompt_ids=list(prompt_ids),
        params=params,
        loop=asyncio.get_running_loop(),
        events=asyncio.Queue(),
    )
    job = Job(
        rid, response_id, endpoint, body.model, served, arm, key, prompt_record, len(prompt_ids), params, started, gen
    )
    job.reservation = reservation
    if endpoint == "chat":
        job.thinking = _opens_reasoning(bb.tokenizer, prompt_ids)
        job.tools = active_tools(body) if isinstance(body, ChatBody) else None
    try:
        state.engine.submit(gen)
    except QueueFullError as exc:
        if reservation is not None:
            await state.limit(state.limits.release, reservation)
        raise ApiError(
            503,
            f"server overloaded: {exc}; retry shortly",
            "server_error",
            "overloaded",
            headers={"Retry-After": "5"},
        ) from None
    state.metrics.queue_depth.set(state.engine.queue_depth())
    return job


# ---- accounting ---------------------------------------------------------------------------------
def finish_job(state: ServeState, job: Job, status: int, completion: Completion | None, outcome: str) -> None:
    """Account for a finished job, once: metrics, usage (the reservation settled), request log, canary evidence.

    Runs in a thread. The usage settled is what the request really took: its prompt and the tokens generated.
    """
    if not job.claim():
        return
    latency = time.monotonic() - job.started
    completion_tokens = completion.completion_tokens if completion else 0
    total = job.prompt_tokens + completion_tokens
    try:
        if job.reservation is not None:
            state.limits.settle(job.reservation, total)
        if job.key is not None:
            state.store.add_usage(job.key.id, total, job.reservation.day if job.reservation else None)
    finally:
        _count(state, job, status, completion, outcome, latency)
    if state.scfg.log_requests:
        _log_request(state, job, status, completion, outcome, latency)
    if job.arm is not None and state.canary is not None and outcome != "cancelled":
        state.metrics.canary_requests.labels(job.public, job.arm, outcome).inc()
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


def _count(
    state: ServeState, job: Job, status: int, completion: Completion | None, outcome: str, latency: float
) -> None:
    metrics = state.metrics
    labels = metric_labels(job.served, job.public)
    metrics.requests.labels(*labels, job.endpoint, str(status)).inc()
    metrics.latency.labels(*labels, job.endpoint).observe(latency)
    metrics.prompt_tokens.labels(*labels).inc(job.prompt_tokens)
    metrics.completion_tokens.labels(*labels).inc(completion.completion_tokens if completion else 0)
    if completion and completion.first_token_at:
        metrics.ttft.labels(*labels).observe(max(0.0, completion.first_token_at - job.started))
    if outcome not in ("ok", "cancelled"):
        metrics.errors.labels(*labels, outcome).inc()
    metrics.queue_depth.set(state.engine.queue_depth())


def _log_request(
    state: ServeState, job: Job, status: int, completion: Completion | None, outcome: str, latency: float
) -> None:
    """The request and its answer in the store (PII-redacted first), for the feedback loop; a chat with tools
    also keeps them and the calls its answer was read back as."""
    prompt, response = job.prompt_record, completion.text if completion else None
    calls = None
    if response is not None and job.tools:
        calls = answer_calls(
            split_reasoning(response, job.thinking)[1] if job.thinking is not None else response, job.tools
        )
    counts: dict[str, int] = {}
    if state.redactor is not None:
        red = _counting(state.redactor, counts)
        prompt = _redact_prompt(red, prompt)
        response = red(response) if response is not None else None
        if calls:  # the same PII as in the response's text: counted there once
            redactor = state.redactor
            calls = map_call_arguments(calls, lambda text: redactor(text)[0])
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
        completion_tokens=completion.completion_tokens if completion else 0,
        latency_s=round(latency, 4),
        pii_counts=counts or None,
        tools=job.tools,
        tool_calls=calls,
    )


def _counting(redactor: Redactor, counts: dict[str, int]) -> Callable[[str], str]:
    """The redactor as text -> text, adding what it found to `counts`."""

    def red(text: str) -> str:
        out, found = redactor(text)
        for k, v in found.items():
            counts[k] = counts.get(k, 0) + v
        return out

    return red


def _redact_prompt(red: Callable[[str], str], prompt: Any) -> Any:
    """The prompt text, or every message's content and its tool calls' argument values, redacted."""
    if isinstance(prompt, str):
        return red(prompt)
    out = []
    for m in prompt:
        message = {**m, "content": red(m["content"])}
        if m.get("tool_calls"):
            message["tool_calls"] = map_call_arguments(m["tool_calls"], red)
        out.append(message)
    return out


# ---- answering ----------------------------------------------------------------------------------
def _deadline_left(state: ServeState, job: Job) -> float:
    return state.scfg.request_timeout_s - (time.monotonic() - job.started)


async def _next_event(state: ServeState, job: Job) -> tuple[str, Any]:
    """The engine's next event for the job; asyncio.TimeoutError once the request deadline passed."""
    left = _deadline_left(state, job)
    if left <= 0:
        raise asyncio.TimeoutError
    return await asyncio.wait_for(job.gen.events.get(), timeout=left)


async def _wait_done(state: ServeState, job: Job) -> Completion:
    while True:
        kind, payload = await _next_event(state, job)
        if kind == "done":
            return payload
        if kind == "error":
            raise payload


async def respond(state: ServeState, job: Job, body: GenerationBody) -> Response:
    """The answer as one JSON object, or as a stream of server-sent events when the client asked for one."""
    created = int(time.time())
    if body.stream:
        return JobStream(
            _stream(state, job, body, created),
            on_close=lambda: abandon(state, job),
            media_type="text/event-stream",
            headers={**job.headers(), "Cache-Control": "no-cache"},
        )
    try:
        completion = await _wait_done(state, job)
    except asyncio.TimeoutError:
        job.gen.cancelled.set()
        await asyncio.to_thread(finish_job, state, job, 504, None, "timeout")
        raise timed_out(state.scfg.request_timeout_s) from None
    except asyncio.CancelledError:  # the client went away: stop generating, still account for it
        abandon(state, job)
        raise
    except Exception as exc:
        await asyncio.to_thread(finish_job, state, job, 500, None, "error")
        raise generation_failed(exc) from None
    await asyncio.to_thread(finish_job, state, job, 200, completion, _classify(completion))
    text, reasoning = completion.text, NO_REASONING
    if job.thinking is not None:  # a reasoning model: its <think> block is reasoning_content, the rest content
        thought, text = split_reasoning(text, job.thinking)
        reasoning = (True, thought)
    payload = completion_response(
        job.head(created), text, completion.finish_reason, job.usage(completion), reasoning=reasoning
    )
    if isinstance(body, ChatBody):
        payload = with_tool_calls(payload, body)
    return JSONResponse(payload, headers=job.headers())


async def _stream(state: ServeState, job: Job, body: GenerationBody, created: int) -> AsyncIterator[str]:
    """Server-sent events: deltas, the finish chunk, the usage chunk if asked for, then [DONE].

    A failure or the deadline mid-stream becomes an error event; a client that goes away cancels
    the generation, and the job is still accounted for.
    """
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    head = job.head(created)
    finished = False
    held: list[str] | None = [] if isinstance(body, ChatBody) and holds_back(body) else None  # serve/tools.py
    splitter = ReasoningSplitter(job.thinking) if job.thinking is not None else None
    try:
        if head.chat:
            yield sse(stream_chunk(head, "", None, include_usage, role=True), ensure_ascii=False)
        while True:
            kind, payload = await _next_event(state, job)
            if kind == "delta" and held is not None:  # may be tool calls: sent whole at the end
                held.append(payload)
                continue
            if kind == "delta":
                for chunk in _deltas(head, splitter, payload, include_usage):
                    yield chunk
                continue
            if kind == "done" and splitter is not None:
                for chunk in _deltas(head, splitter, None, include_usage):
                    yield chunk
            finished = True
            if kind == "error":
                await asyncio.to_thread(finish_job, state, job, 500, None, "error")
                yield sse(generation_failed(payload).body())
                yield DONE
                return
            completion: Completion = payload
            await asyncio.to_thread(finish_job, state, job, 200, completion, _classify(completion))
            finish = completion.finish_reason
            if held is not None and isinstance(body, ChatBody):
                events, called = held_back_chunks(head, "".join(held), body, include_usage)
                for event in events:
                    yield event
                finish = called or finish
            yield sse(stream_chunk(head, None, finish, include_usage), ensure_ascii=False)
            if include_usage:
                yield sse(usage_chunk(head, job.usage(completion)))
            yield DONE
            return
    except asyncio.TimeoutError:
        job.gen.cancelled.set()
        finished = True
        await asyncio.to_thread(finish_job, state, job, 504, None, "timeout")
        yield sse(timed_out(state.scfg.request_timeout_s).body())
        yield DONE
    finally:
        if not finished:  # the client went away mid-stream: stop generating, still account for it
            abandon(state, job)


def _deltas(head: ResponseHead, splitter: ReasoningSplitter | None, text: str | None, include_usage: bool) -> list[str]:
    """The events of one piece of output (None: the end); a reasoning model's is split into reasoning and content."""
    if splitter is None:
        return [sse(stream_chunk(head, text, None, include_usage), ensure_ascii=False)]
    thought, answer = splitter.feed(text) if text is not None else splitter.finish()
    events = []
    if thought:
        events.append(sse(stream_chunk(head, None, None, include_usage, reasoning=thought), ensure_ascii=False))
    if answer:
        events.append(sse(stream_chunk(head, answer, None, include_usage), ensure_ascii=False))
    return events


def abandon(state: ServeState, job: Job) -> None:
    """The client is gone (or the response was never sent): stop the generation, account for the job once."""
    if job.accounted:
        return
    job.gen.cancelled.set()
    log.info("client disconnected; generation cancelled", extra={"event": "cancelled"})
    task = asyncio.get_running_loop().create_task(_account_abandoned(state, job))
    _background.add(task)
    task.add_done_callback(_background.discard)


_background: set[asyncio.Task] = set()


async def _account_abandoned(state: ServeState, job: Job) -> None:
    """Wait for the engine to stop the cancelled generation, then account for the tokens it did generate."""
    completion = None
    try:
        completion = await asyncio.wait_for(_wait_done(state, job), timeout=max(1.0, _deadline_left(state, job)))
    except Exception:  # an error or no answer in time: account for the prompt alone
        completion = None
    await asyncio.to_thread(finish_job, state, job, 499, completion, "cancelled")


class JobStream(StreamingResponse):
    """A streamed answer that accounts for its job however the response ends, even if it never started."""

    def __init__(self, content: AsyncIterator[str], on_close: Callable[[], None], **kwargs: Any):
        super().__init__(content, **kwargs)
        self.on_close = on_close

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.on_close()

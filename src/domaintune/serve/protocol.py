"""The wire format of the API: request bodies, OpenAI-style errors and response payloads.

Every error is OpenAI's error JSON: {"error": {"message", "type", "param", "code"}}.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator


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


def too_large(size: int, limit: int) -> ApiError:
    return ApiError(
        413, f"request body is {size} bytes; the limit is {limit}", "invalid_request_error", "request_too_large"
    )


def timed_out(timeout_s: float) -> ApiError:
    return ApiError(504, f"generation did not finish within {timeout_s:g} s", "server_error", "timeout")


def generation_failed(exc: object) -> ApiError:
    return ApiError(500, f"generation failed: {exc}", "server_error", "generation_failed")


# ---- request bodies -----------------------------------------------------------------------------
Body = TypeVar("Body", bound=BaseModel)


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


class GenerationBody(BaseModel):
    model_config = ConfigDict(extra="allow")  # unsupported OpenAI parameters are refused by name, not as unknown

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
    def _stop(cls, value: str | list[str] | None) -> str | list[str] | None:
        if isinstance(value, list) and len(value) > 4:
            raise ValueError("at most 4 stop sequences")
        return value

    def explicit_max_tokens(self) -> int | None:
        """`max_tokens` as the client asked for it (None: the server's default)."""
        return self.max_tokens

    def stops(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)


class ChatBody(GenerationBody):
    messages: list[ChatMessage] = Field(..., min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)

    def chat_messages(self) -> list[dict[str, str]]:
        """The messages as the chat template takes them (`developer` is the system role)."""
        return [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in self.messages]

    def explicit_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class CompletionBody(GenerationBody):
    prompt: str | list[str]

    def single_prompt(self) -> str:
        prompts = [self.prompt] if isinstance(self.prompt, str) else self.prompt
        if len(prompts) != 1:
            raise bad_request("send one prompt per request (a list of several prompts is not supported)", "prompt")
        return prompts[0]


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


UNSUPPORTED = {
    "tools": "tool calls",
    "functions": "function calls",
    "logprobs": "logprobs",
    "best_of": "best_of",
    "echo": "echo",
    "suffix": "suffix",
}


def parse_body(raw: bytes, model_cls: type[Body], max_bytes: int) -> Body:
    """A request body as `model_cls`; too large, not JSON or invalid fields are OpenAI-style errors."""
    if len(raw) > max_bytes:
        raise too_large(len(raw), max_bytes)
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


# ---- responses ----------------------------------------------------------------------------------
DONE = "data: [DONE]\n\n"


@dataclass(frozen=True)
class ResponseHead:
    """The fields every completion object and stream chunk of one response starts with."""

    id: str
    chat: bool  # chat.completion(.chunk) or text_completion
    created: int
    model: str
    system_fingerprint: str

    def fields(self, chunk: bool = False) -> dict[str, Any]:
        if self.chat:
            obj = "chat.completion.chunk" if chunk else "chat.completion"
        else:
            obj = "text_completion"
        return {
            "id": self.id,
            "object": obj,
            "created": self.created,
            "model": self.model,
            "system_fingerprint": self.system_fingerprint,
        }


def completion_response(head: ResponseHead, text: str, finish_reason: str, usage: dict[str, int]) -> dict[str, Any]:
    if head.chat:
        choice = {
            "index": 0,
            "message": {"role": "assistant", "content": text},
            "logprobs": None,
            "finish_reason": finish_reason,
        }
    else:
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
    return {**head.fields(), "choices": [choice], "usage": usage}


def stream_chunk(
    head: ResponseHead, delta: str | None, finish: str | None, include_usage: bool, role: bool = False
) -> dict[str, Any]:
    """One streamed piece; with include_usage every chunk carries `usage: null` until the usage chunk."""
    choice: dict[str, Any]
    if head.chat:
        d: dict[str, Any] = {}
        if role:
            d["role"] = "assistant"
        if delta is not None:
            d["content"] = delta
        choice = {"index": 0, "delta": d, "logprobs": None, "finish_reason": finish}
    else:
        choice = {"index": 0, "text": delta or "", "logprobs": None, "finish_reason": finish}
    data = {**head.fields(chunk=True), "choices": [choice]}
    if include_usage:
        data["usage"] = None
    return data


def usage_chunk(head: ResponseHead, usage: dict[str, int]) -> dict[str, Any]:
    """The last chunk before [DONE] when the client asked for stream_options.include_usage."""
    return {**head.fields(chunk=True), "choices": [], "usage": usage}


def sse(data: dict[str, Any], ensure_ascii: bool = True) -> str:
    """One server-sent event."""
    return f"data: {json.dumps(data, ensure_ascii=ensure_ascii)}\n\n"

"""The wire format of the API: request bodies, OpenAI-style errors and response payloads.

Every error is OpenAI's error JSON: {"error": {"message", "type", "param", "code"}}. Bodies are
checked before any model sees them: JSON only (no NaN or Infinity), nested at most MAX_JSON_DEPTH
deep, no lone UTF-16 surrogates in any string, then the fields' own rules; anything else is a 400.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, Literal, TypeVar
from urllib.parse import quote

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from domaintune.utils.names import check_model_name

MAX_JSON_DEPTH = 32
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
_SURROGATE = re.compile("[\ud800-\udfff]")
_HEADER_SAFE = re.compile(r"[\x21-\x7e]([\x20-\x7e]*[\x21-\x7e])?")


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


def too_large(size: int | None, limit: int) -> ApiError:
    what = f"request body is {size} bytes" if size is not None else "request body is larger than the limit"
    return ApiError(413, f"{what}; the limit is {limit} bytes", "invalid_request_error", "request_too_large")


def header_value(value: str) -> str:
    """`value` as an HTTP header value: printable ASCII as it is, anything else percent-encoded (UTF-8)."""
    if _HEADER_SAFE.fullmatch(value):
        return value
    return quote(value, safe="".join(chr(c) for c in range(0x21, 0x7F) if chr(c) != "%"))


def timed_out(timeout_s: float) -> ApiError:
    return ApiError(504, f"generation did not finish within {timeout_s:g} s", "server_error", "timeout")


def generation_failed(exc: object) -> ApiError:
    return ApiError(500, f"generation failed: {exc}", "server_error", "generation_failed")


# ---- request bodies -----------------------------------------------------------------------------
Body = TypeVar("Body", bound=BaseModel)


class ContentPart(BaseModel):
    type: str
    text: str | None = None


class FunctionCall(BaseModel):
    name: str = Field(..., min_length=1, max_length=256)
    arguments: str = Field(..., max_length=1_000_000)  # JSON object text, as OpenAI sends it


class ToolCall(BaseModel):
    id: str = Field(..., max_length=256)
    type: Literal["function"] = "function"
    function: FunctionCall


class ToolFunction(BaseModel):
    name: str = Field(..., pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ToolSpec(BaseModel):
    type: Literal["function"]
    function: ToolFunction


class NamedFunction(BaseModel):
    name: str


class NamedToolChoice(BaseModel):
    type: Literal["function"]
    function: NamedFunction


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    tool_calls: list[ToolCall] | None = None  # an assistant's earlier calls
    tool_call_id: str | None = Field(None, max_length=256)  # a tool result: the call it answers

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

    model: str = Field(..., max_length=256)
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0, allow_inf_nan=False)
    top_p: float | None = Field(None, gt=0.0, le=1.0, allow_inf_nan=False)
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=INT64_MIN, le=INT64_MAX)
    user: str | None = Field(None, max_length=256)
    # Not OpenAI's: vLLM's extension (the openai client sends it with extra_body), transformers' rule.
    repetition_penalty: float | None = Field(None, gt=0.0, allow_inf_nan=False)

    @field_validator("stop")
    @classmethod
    def _stop(cls, value: str | list[str] | None) -> str | list[str] | None:
        if isinstance(value, list) and len(value) > 4:
            raise ValueError("at most 4 stop sequences")
        if any(len(s) > 256 for s in ([value] if isinstance(value, str) else value or [])):
            raise ValueError("a stop sequence is at most 256 characters")
        return value

    def explicit_max_tokens(self) -> int | None:
        """`max_tokens` as the client asked for it (None: the server's default)."""
        return self.max_tokens

    def stops(self) -> list[str]:
        """The stop sequences, empty ones dropped (they would stop before the first token)."""
        if self.stop is None:
            return []
        return [s for s in ([self.stop] if isinstance(self.stop, str) else self.stop) if s]


class ChatBody(GenerationBody):
    messages: list[ChatMessage] = Field(..., min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    tools: list[ToolSpec] | None = Field(None, max_length=128)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None

    def chat_messages(self) -> list[dict[str, Any]]:
        """The messages as the chat template takes them (`developer` is the system role; tool calls and results
        in OpenAI's shape)."""
        out: list[dict[str, Any]] = []
        for m in self.messages:
            message: dict[str, Any] = {"role": "system" if m.role == "developer" else m.role, "content": m.text()}
            if m.tool_calls:
                message["tool_calls"] = [c.model_dump() for c in m.tool_calls]
            if m.tool_call_id is not None:
                message["tool_call_id"] = m.tool_call_id
            out.append(message)
        return out

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
    request_id: str = Field(..., min_length=1, max_length=200)
    rating: Literal[1, -1]
    correction: str | None = None
    comment: str | None = None


class LoadModelBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(..., min_length=1, max_length=128)
    source: str = Field(..., min_length=1, max_length=4096)
    parent: str | None = Field(None, max_length=128)

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        return check_model_name(value)

    @field_validator("source")
    @classmethod
    def _source(cls, value: str) -> str:
        if "\x00" in value:
            raise ValueError("the source must not contain NUL characters")
        return value


UNSUPPORTED = {
    "functions": "function calls (the deprecated API; send `tools`)",
    "logprobs": "logprobs",
    "best_of": "best_of",
    "echo": "echo",
    "suffix": "suffix",
}


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _json_problem(data: Any) -> str | None:
    """Why a parsed body is refused before validation: too deep, or a lone surrogate in a string."""
    stack: list[tuple[Any, int]] = [(data, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, str):
            if _SURROGATE.search(value):
                return "a string holds a lone UTF-16 surrogate (\\ud800-\\udfff), which is not valid Unicode text"
        elif isinstance(value, (dict, list)):
            if depth > MAX_JSON_DEPTH:
                return f"the JSON is nested more than {MAX_JSON_DEPTH} levels deep"
            items = list(value.items()) if isinstance(value, dict) else [(None, v) for v in value]
            for k, v in items:
                if k is not None and _SURROGATE.search(k):
                    return "an object key holds a lone UTF-16 surrogate, which is not valid Unicode text"
                stack.append((v, depth + 1))
    return None


def parse_json(raw: bytes) -> Any:
    """The body's JSON, refused with 400 when malformed, non-standard (NaN), too deep or not valid text."""
    try:
        data = json.loads(raw or b"null", parse_constant=_no_constant)
    except RecursionError:
        raise bad_request(f"the JSON is nested more than {MAX_JSON_DEPTH} levels deep", code="invalid_json") from None
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, NaN/Infinity
        raise bad_request(f"the body is not valid JSON ({exc})", code="invalid_json") from None
    problem = _json_problem(data)
    if problem:
        raise bad_request(problem, code="invalid_json")
    return data


def parse_body(raw: bytes, model_cls: type[Body], max_bytes: int) -> Body:
    """A request body as `model_cls`; too large, not JSON or invalid fields are OpenAI-style errors."""
    if len(raw) > max_bytes:
        raise too_large(len(raw), max_bytes)
    data = parse_json(raw)
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
Reasoning = tuple[bool, str | None]  # (the model reasons, the text of its <think> block or None)
NO_REASONING: Reasoning = (False, None)


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


def completion_response(
    head: ResponseHead, text: str, finish_reason: str, usage: dict[str, int], reasoning: Reasoning = NO_REASONING
) -> dict[str, Any]:
    """`reasoning`: (whether the model reasons, the text of its `<think>` block): such a chat answer carries
    `reasoning_content` (null without a block) beside `content`, as vLLM's and DeepSeek's servers do."""
    if head.chat:
        message: dict[str, Any] = {"role": "assistant", "content": text}
        if reasoning[0]:
            message["reasoning_content"] = reasoning[1]
        choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": finish_reason}
    else:
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
    return {**head.fields(), "choices": [choice], "usage": usage}


def stream_chunk(
    head: ResponseHead,
    delta: str | None,
    finish: str | None,
    include_usage: bool,
    role: bool = False,
    reasoning: str | None = None,
) -> dict[str, Any]:
    """One streamed piece; with include_usage every chunk carries `usage: null` until the usage chunk.
    `reasoning`: a piece of a reasoning model's `<think>` block, sent as `delta.reasoning_content`."""
    choice: dict[str, Any]
    if head.chat:
        d: dict[str, Any] = {}
        if role:
            d["role"] = "assistant"
        if reasoning is not None:
            d["reasoning_content"] = reasoning
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

"""Tool calls on /v1/chat/completions: `tools` and `tool_choice` in, `message.tool_calls` out.

The tools are rendered by the model's own chat template (`apply_chat_template(..., tools=...)`); a template that
does not render them is refused with a 400 rather than answering as if the tools were not there. The answer is
read back with `domaintune.model.tools.parse_tool_calls` (Qwen/Hermes `<tool_call>` tags, Llama 3.1 JSON, Mistral's
`[TOOL_CALLS]`): when it holds calls to the request's tools the message carries `tool_calls` and `finish_reason` is
`tool_calls`, else it is an ordinary answer.

`tool_choice`: `auto` (the default with tools) and `required` render every tool; a named function renders only
that one; `none` renders none and never parses calls. Under `auto` decoding is free: the model answers in prose
or calls. Under `required` and a named function decoding is constrained, as vLLM does it: the answer is exactly one
call, written as the template writes calls (Qwen/Hermes `<tool_call>\n...\n</tool_call>`, Llama 3.1's bare JSON:
`model.tools.call_format`), whose JSON is `{"name": <one of the tools>, "arguments": <valid against that tool's
`parameters`>}` (under a named function, that function), then the end of the turn; objects take no properties
their schema does not name (`call_schema`). So the reply carries `tool_calls` and finish_reason `tool_calls`
unless `max_tokens` cuts the call short (finish_reason `length`, the partial text as content, as OpenAI does).
The grammar is llguidance's (`serve/engines/guided.py`), enforced by the transformers and llama.cpp engines
token by token and passed to vLLM as its structured-output grammar. `parallel_tool_calls` is not honoured under
constraint (one call); a reasoning model whose prompt opens a `<think>` block closes it at once (no reasoning
under constraint); a template whose calls the parser cannot read back, or parameters llguidance cannot compile,
is a 400.

Streaming with tools: the answer is held back until it is complete (a call cannot be told from prose before
its end), then sent as one content delta or as `tool_calls` deltas, then the finish chunk, as OpenAI's stream does.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from domaintune.model.thinking import CLOSE as THINK_CLOSE
from domaintune.model.tools import call_format, for_template, parse_tool_calls, template_tool_problem
from domaintune.serve.engines.guided import CallGrammar, call_grammar, grammar_problem, special_tokens
from domaintune.serve.protocol import ChatBody, ResponseHead, bad_request, sse, stream_chunk


def active_tools(body: ChatBody) -> list[dict[str, Any]] | None:
    """The tool definitions the prompt renders (None: no tools, or tool_choice `none`); 400 for a named
    function that is not among the tools."""
    if not body.tools:
        if body.tool_choice not in (None, "none"):
            raise bad_request("tool_choice needs `tools`", "tool_choice")
        return None
    choice = body.tool_choice
    if choice == "none":
        return None
    tools = [t.model_dump(exclude_none=True) for t in body.tools]
    if choice is None or isinstance(choice, str):
        return tools
    named = [t for t in tools if t["function"]["name"] == choice.function.name]
    if not named:
        names = ", ".join(t["function"]["name"] for t in tools)
        raise bad_request(
            f"tool_choice names {choice.function.name!r}, which is not among the tools ({names})", "tool_choice"
        )
    return named


def template_inputs(tokenizer: Any, body: ChatBody, messages: list[dict[str, Any]]) -> dict[str, Any]:
    """Keyword arguments for `apply_chat_template`: the messages as templates take them, and the tools; 400 when
    the model's template cannot render tool calls or a call's arguments are not JSON."""
    tools = active_tools(body)
    uses_tools = tools is not None or any(m.get("tool_calls") or m["role"] == "tool" for m in messages)
    if not uses_tools:
        return {"conversation": messages}
    problem = template_tool_problem(tokenizer)
    if problem is not None:
        raise bad_request(f"this model cannot take tools: {problem}", "tools", "tools_unsupported")
    try:
        templated = for_template(messages)
    except ValueError as exc:
        raise bad_request(f"a tool call's arguments must be a JSON object{exc}", "messages") from None
    return {"conversation": templated, "tools": tools}


def _closed(schema: Any) -> Any:
    """The schema with `additionalProperties: false` on every object schema that does not say (OpenAI's strict
    mode, vLLM's `disable_additional_properties`): a constrained model fills the properties the schema names and
    cannot invent keys until it runs out of tokens. What it writes is still valid against the original schema."""
    if isinstance(schema, list):
        return [_closed(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: _closed(v) for k, v in schema.items()}
    if (out.get("type") == "object" or "properties" in out) and "additionalProperties" not in out:
        out["additionalProperties"] = False
    return out


def call_schema(tools: list[dict[str, Any]], arguments_key: str) -> dict[str, Any]:
    """JSON schema of one call to one of `tools`: `{"name": <its name>, <arguments_key>: <its parameters>}`."""
    options = []
    for tool in tools:
        fn = tool["function"]
        parameters = fn.get("parameters") or {"type": "object", "properties": {}}
        options.append(
            {
                "type": "object",
                "properties": {"name": {"const": fn["name"]}, arguments_key: _closed(parameters)},
                "required": ["name", arguments_key],
                "additionalProperties": False,
            }
        )
    return options[0] if len(options) == 1 else {"anyOf": options}


def forced_call_grammar(
    tokenizer: Any, eot_ids: list[int], body: ChatBody, thinking: bool = False
) -> CallGrammar | None:
    """The grammar an answer must follow: under `tool_choice` `required` one call to one of the tools, under a
    named function one call to it, written as the template writes calls; None otherwise (free text). `thinking`:
    the prompt opened a reasoning block, which the answer closes at once (`</think>`, then the call). 400 when the
    template's call format cannot be read or a tool's parameters cannot be compiled (CPU work: runs in a pool)."""
    choice = body.tool_choice
    tools = active_tools(body)
    if tools is None or choice is None or choice == "auto":
        return None
    end_texts = [tokenizer.convert_ids_to_tokens(i) for i in eot_ids]
    try:
        prefix, suffix, key = call_format(tokenizer, [t for t in end_texts if isinstance(t, str)])
    except ValueError as exc:
        raise bad_request(
            f"tool_choice {choice if isinstance(choice, str) else 'function'} needs the model's call format, "
            f"which this template does not give: {exc}",
            "tool_choice",
        ) from None
    if thinking:
        prefix = f"{THINK_CLOSE}\n\n{prefix}"
    special = special_tokens(tokenizer, eot_ids)
    grammar = call_grammar(prefix, suffix, call_schema(tools, key), special)
    problem = grammar_problem(grammar, tokenizer, eot_ids)
    if problem is not None:
        raise bad_request(f"the tools' parameters cannot constrain decoding: {problem}", "tools")
    return grammar


def _names(body: ChatBody) -> set[str] | None:
    tools = active_tools(body)
    return None if tools is None else {t["function"]["name"] for t in tools}


def with_tool_calls(payload: dict[str, Any], body: ChatBody) -> dict[str, Any]:
    """A chat completion whose answer parses as calls to the request's tools, as OpenAI returns one."""
    names = _names(body)
    if names is None:
        return payload
    choice = payload["choices"][0]
    content, calls = parse_tool_calls(choice["message"]["content"] or "", names)
    if calls:
        choice["message"]["content"] = content
        choice["message"]["tool_calls"] = calls
        choice["finish_reason"] = "tool_calls"
    return payload


def holds_back(body: ChatBody) -> bool:
    """Whether a stream is held back to its end: it may end up as tool calls."""
    return _names(body) is not None


def _split_think(text: str) -> tuple[str | None, str]:
    if "</think>" not in text:
        return None, text
    thought, answer = text.split("</think>", 1)
    return thought.replace("<think>", "").strip("\n"), answer.lstrip("\n")


def held_back_chunks(
    head: ResponseHead, text: str, body: ChatBody, include_usage: bool
) -> tuple[list[str], str | None]:
    """The events of a held-back answer (a reasoning model's `<think>` block first), and `tool_calls` as the
    finish reason when the answer is calls (None: keep the engine's)."""
    events = []
    thought, answer = _split_think(text)
    if thought:
        chunk = stream_chunk(head, None, None, include_usage)
        chunk["choices"][0]["delta"]["reasoning_content"] = thought
        events.append(sse(chunk, ensure_ascii=False))
    content, calls = parse_tool_calls(answer, _names(body))
    if content:
        events.append(sse(stream_chunk(head, content, None, include_usage), ensure_ascii=False))
    if not calls:
        return events, None
    for index, call in enumerate(calls):
        chunk = stream_chunk(head, None, None, include_usage)
        chunk["choices"][0]["delta"]["tool_calls"] = [{"index": index, **call}]
        events.append(sse(chunk, ensure_ascii=False))
    return events, "tool_calls"


def answer_calls(answer: str, tools: list[dict[str, Any]] | None) -> list[dict[str, Any]] | None:
    """The calls an answer (its reasoning block split off) was read back as, as `with_tool_calls` and the stream
    give them to the client; None without active tools or for an ordinary answer. For the request log."""
    if not tools:
        return None
    _, calls = parse_tool_calls(answer, {t["function"]["name"] for t in tools})
    return calls or None


def map_call_arguments(calls: list[dict[str, Any]], fn: Callable[[str], str]) -> list[dict[str, Any]]:
    """The calls with `fn` applied to every string value of their arguments (PII redaction); the JSON stays valid.
    Arguments that are not JSON are mapped as one string."""

    def walk(value: Any) -> Any:
        if isinstance(value, str):
            return fn(value)
        if isinstance(value, list):
            return [walk(v) for v in value]
        if isinstance(value, dict):
            return {k: walk(v) for k, v in value.items()}
        return value

    out = []
    for call in calls:
        fn_part = dict(call.get("function") or {})
        raw = fn_part.get("arguments")
        if isinstance(raw, str):
            try:
                fn_part["arguments"] = json.dumps(walk(json.loads(raw)), ensure_ascii=False)
            except ValueError:
                fn_part["arguments"] = fn(raw)
        elif raw is not None:
            fn_part["arguments"] = walk(raw)
        out.append({**call, "function": fn_part})
    return out

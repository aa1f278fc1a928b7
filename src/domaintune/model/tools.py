"""Tool calls (function calling) in one shape everywhere: OpenAI's.

A row that uses tools is an ordinary messages row plus a `tools` list:

    {"tools": [{"type": "function", "function": {"name", "description", "parameters"}}],
     "messages": [{"role": "user", "content": "..."},
                  {"role": "assistant", "content": "", "tool_calls": [
                      {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{\"a\": 1}"}}]},
                  {"role": "tool", "tool_call_id": "call_1", "content": "result"},
                  {"role": "assistant", "content": "answer"}]}

`arguments` is JSON object text, as in OpenAI's API. Chat templates (Qwen2.5's, Hermes', Llama 3.1's, Mistral's)
render `arguments | tojson` and expect a mapping, and Mistral's refuse call ids that are not 9 letters or digits:
`for_template` gives them both. `template_tool_problem` says whether a template renders tools at all (a template
without tool branches would silently drop them), and `parse_tool_calls` reads calls back out of generated text
(Qwen/Hermes `<tool_call>` tags, Llama 3.1's bare JSON, Mistral's `[TOOL_CALLS]`).
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any

TOOL_CALL_RE = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.S)
_PYTHON_TAG = "<|python_tag|>"
# Mistral's call markers: `[TOOL_CALLS]` opens each call (v11+: `[TOOL_CALLS]name[ARGS]{...}`, optionally with
# `[CALL_ID]id` before `[ARGS]`) or one JSON list of calls (v3: `[TOOL_CALLS] [{"name": ..., "arguments": ...}]`).
# They are special tokens in Mistral's tokenizers; the serving engines keep them in the answer text for the parser.
MISTRAL_CALLS = "[TOOL_CALLS]"
TOOL_CALL_MARKERS = (MISTRAL_CALLS, "[ARGS]", "[CALL_ID]")
_MISTRAL_NAMED = re.compile(r"\s*([^\s\[\]{}]+)\s*(?:\[CALL_ID\]\s*([A-Za-z0-9_-]+)\s*)?(?:\[ARGS\])?\s*(?=\{)", re.S)


def _arguments_object(value: Any, where: str) -> dict[str, Any]:
    """`arguments` (JSON text or a mapping) as a mapping; ValueError naming `where` otherwise."""
    if isinstance(value, str):
        try:
            value = json.loads(value) if value.strip() else {}
        except ValueError as exc:
            raise ValueError(f"{where}.arguments is not valid JSON ({exc})") from None
    if not isinstance(value, dict):
        raise ValueError(f"{where}.arguments must be a JSON object, got {type(value).__name__}")
    return value


def arguments_text(arguments: dict[str, Any]) -> str:
    return json.dumps(arguments, ensure_ascii=False)


def normalise_call(value: Any, where: str, default_id: str) -> dict[str, Any]:
    """One tool call, OpenAI's `{id, type, function: {name, arguments}}` or a bare `{name, arguments}`
    (LLaMA-Factory, ShareGPT; Llama 3.1 says `parameters`), as OpenAI's shape with `arguments` as JSON text."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError as exc:
            raise ValueError(f"{where} is not valid JSON ({exc})") from None
    if not isinstance(value, dict):
        raise ValueError(f"{where} must be an object with a name and arguments")
    fn = value.get("function", value)
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"].strip():
        raise ValueError(f"{where} has no function name")
    raw_args = fn.get("arguments", fn.get("parameters", {}))
    args = _arguments_object(raw_args, where)
    call_id = value.get("id") if isinstance(value.get("id"), str) and value.get("id") else default_id
    return {"id": call_id, "type": "function", "function": {"name": fn["name"], "arguments": arguments_text(args)}}


def normalise_tools(value: Any, where: str = "tools") -> list[dict[str, Any]]:
    """The tool definitions (a list, or JSON text of one, as LLaMA-Factory stores them) in OpenAI's shape."""
    if isinstance(value, str):
        if not value.strip():
            return []
        try:
            value = json.loads(value)
        except ValueError as exc:
            raise ValueError(f"{where} is not valid JSON ({exc})") from None
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list):
        raise ValueError(f"{where} must be a list of function definitions")
    out = []
    for i, tool in enumerate(value):
        fn = tool.get("function", tool) if isinstance(tool, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"].strip():
            raise ValueError(f"{where}[{i}] needs a function name")
        if "parameters" in fn and not isinstance(fn["parameters"], dict):
            raise ValueError(f"{where}[{i}].parameters must be a JSON schema object")
        out.append({"type": "function", "function": dict(fn)})
    return out


def tool_names(tools: list[dict[str, Any]] | None) -> set[str]:
    return {t["function"]["name"] for t in tools or []}


def check_tool_turns(messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None) -> None:
    """Every tool result answers an earlier call (by `tool_call_id` when given) and every call names a
    declared tool; ValueError naming the message otherwise."""
    declared = tool_names(tools)
    pending: list[str] = []
    for i, m in enumerate(messages):
        if m["role"] == "assistant" and m.get("tool_calls"):
            if not declared:
                raise ValueError(f"messages[{i}] calls a tool but the row declares no `tools`")
            for k, call in enumerate(m["tool_calls"]):
                name = call["function"]["name"]
                if name not in declared:
                    raise ValueError(
                        f"messages[{i}].tool_calls[{k}] calls {name!r}, which is not among the row's tools "
                        f"({', '.join(sorted(declared))})"
                    )
            pending = [c["id"] for c in m["tool_calls"]]
        elif m["role"] == "tool":
            if not pending:
                raise ValueError(f"messages[{i}] is a tool result without a preceding tool call")
            call_id = m.get("tool_call_id")
            if call_id is None:
                m["tool_call_id"] = pending.pop(0)
            elif call_id in pending:
                pending.remove(call_id)
            else:
                raise ValueError(f"messages[{i}].tool_call_id {call_id!r} answers no pending call ({pending})")
        elif m["role"] in ("user", "assistant"):
            pending = []


def template_call_id(call_id: Any) -> Any:
    """A call id as Mistral's templates require it (9 ASCII letters or digits; they raise on any other, and vLLM
    rewrites ids for them too): kept when it is one, else the first 9 hex digits of its SHA-256, so a call and the
    result that answers it still carry the same id. Other templates do not render ids. A missing id stays missing."""
    if not isinstance(call_id, str) or (len(call_id) == 9 and call_id.isascii() and call_id.isalnum()):
        return call_id
    return hashlib.sha256(call_id.encode()).hexdigest()[:9]


def for_template(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Messages as chat templates take them: each call's `arguments` a mapping (templates apply `tojson`), call ids
    (and the results' `tool_call_id`) as `template_call_id` gives them."""
    out = []
    for m in messages:
        if m.get("tool_calls"):
            calls = [
                {
                    **c,
                    **({"id": template_call_id(c["id"])} if "id" in c else {}),
                    "function": {**c["function"], "arguments": _arguments_object(c["function"]["arguments"], "")},
                }
                for c in m["tool_calls"]
            ]
            m = {**m, "tool_calls": calls, "content": m.get("content") or ""}
        elif m.get("role") == "tool" and "tool_call_id" in m:
            m = {**m, "tool_call_id": template_call_id(m["tool_call_id"])}
        out.append(m)
    return out


def has_tools(row: dict[str, Any]) -> bool:
    """True for a row that declares tools or holds tool calls/results."""
    return bool(row.get("tools")) or any(
        m.get("tool_calls") or m.get("role") == "tool" for m in row.get("messages") or []
    )


_PROBE_TOOL = {
    "type": "function",
    "function": {
        "name": "probe_lookup_zq",
        "description": "Probe tool zq-description.",
        "parameters": {"type": "object", "properties": {"key": {"type": "string"}}, "required": ["key"]},
    },
}
_PROBE_MESSAGES = [
    {"role": "user", "content": "probe question"},
    {
        "role": "assistant",
        "content": "",
        "tool_calls": [
            {
                "id": "probezq01",  # 9 letters and digits: Mistral's templates raise on other ids
                "type": "function",
                "function": {"name": "probe_lookup_zq", "arguments": {"key": "zq-arg"}},
            }
        ],
    },
    {"role": "tool", "tool_call_id": "probezq01", "content": "zq-result"},
    {"role": "assistant", "content": "probe answer"},
]


def template_tool_problem(tokenizer: Any) -> str | None:
    """Why this tokenizer's chat template cannot carry tool calls (None when it can): it must render the tool
    definitions, an assistant's call (name and arguments) and the tool's result."""
    try:
        text = tokenizer.apply_chat_template(_PROBE_MESSAGES, tools=[_PROBE_TOOL], tokenize=False)
    except Exception as exc:  # templates raise on roles they do not know (`tool`)
        return f"the chat template fails on a conversation with tool calls ({exc})"
    missing = [
        what
        for what, marker in (
            ("the tool definitions", "zq-description"),
            ("the assistant's tool calls", "zq-arg"),
            ("tool results", "zq-result"),
        )
        if marker not in text
    ]
    if missing:
        return f"the chat template does not render {', '.join(missing)}"
    return None


def _call_from_json(value: Any, n: int) -> dict[str, Any] | None:
    if not isinstance(value, dict) or not isinstance(value.get("name"), str) or not value["name"].strip():
        return None
    args = value.get("arguments", value.get("parameters", {}))
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except ValueError:
            return None
    if not isinstance(args, dict):
        return None
    call_id = value.get("id") if isinstance(value.get("id"), str) and value.get("id") else f"call_{n}"
    return {
        "id": call_id,
        "type": "function",
        "function": {"name": value["name"], "arguments": arguments_text(args)},
    }


def parse_tool_calls(text: str, names: set[str] | None = None) -> tuple[str | None, list[dict[str, Any]]]:
    """(content, tool calls) read from a model's output; no calls when nothing parses as one.

    Qwen/Hermes style: each `<tool_call>{"name", "arguments"}</tool_call>` is a call and the text around them is
    the content (None when empty). Llama 3.1 style: the whole answer (after an optional `<|python_tag|>`) is
    `{"name", "parameters"}` JSON, or a list of such objects. Mistral style: the text before the first
    `[TOOL_CALLS]` is the content, and each `[TOOL_CALLS]` is followed by a JSON list of `{"name", "arguments"}`
    (v3 templates) or by `name[ARGS]{arguments}` (v11+, `[CALL_ID]id` optional). A call whose JSON does not parse
    makes the whole answer plain content, so a client sees what the model wrote; so does a call to a function
    outside `names` (the request's tools) when they are given."""
    content, calls = _parse_calls(text)
    if calls and names is not None and any(c["function"]["name"] not in names for c in calls):
        return text, []
    return content, calls


def _mistral_calls(text: str) -> tuple[str | None, list[dict[str, Any]]]:
    """Mistral's `[TOOL_CALLS]` forms (see `parse_tool_calls`); (text, []) when any call does not parse."""
    head, *segments = text.split(MISTRAL_CALLS)
    decoder = json.JSONDecoder()
    calls: list[dict[str, Any]] = []
    rest = []
    for segment in segments:
        named = _MISTRAL_NAMED.match(segment)
        body = segment.strip() if named is None else segment[named.end() :]
        try:
            value, end = decoder.raw_decode(body)
        except ValueError:
            return text, []
        if named is not None:
            if not isinstance(value, dict):
                return text, []
            value = {"name": named.group(1), "arguments": value, **({"id": named.group(2)} if named.group(2) else {})}
        for item in value if isinstance(value, list) else [value]:
            call = _call_from_json(item, len(calls))
            if call is None:
                return text, []
            calls.append(call)
        rest.append(body[end:].strip())
    if not calls:
        return text, []
    content = "\n".join(t for t in (head.strip(), *rest) if t)
    return content or None, calls


def _parse_calls(text: str) -> tuple[str | None, list[dict[str, Any]]]:
    if MISTRAL_CALLS in text:
        return _mistral_calls(text)
    blocks = TOOL_CALL_RE.findall(text)
    if blocks:
        calls = []
        for n, block in enumerate(blocks):
            try:
                call = _call_from_json(json.loads(block), n)
            except ValueError:
                call = None
            if call is None:
                return text, []
            calls.append(call)
        content = TOOL_CALL_RE.sub("", text).strip()
        return content or None, calls
    body = text.strip()
    if body.startswith(_PYTHON_TAG):
        body = body[len(_PYTHON_TAG) :].strip()
    if body[:1] in ("{", "["):
        try:
            value = json.loads(body)
        except ValueError:
            return text, []
        items = value if isinstance(value, list) else [value]
        parsed = [_call_from_json(v, n) for n, v in enumerate(items)]
        calls = [c for c in parsed if c is not None]
        if items and len(calls) == len(items):
            return None, calls
    return text, []


# ChatML with tools, as Qwen2.5 writes it (Hermes' format: definitions in <tools>, calls in <tool_call>, results in
# <tool_response> inside a user turn), without Qwen's default system prompt: `model.chat_template: chatml-tools`.
CHATML_TOOLS_TEMPLATE = (
    "{%- if tools %}\n"
    "    {{- '<|im_start|>system\\n' }}\n"
    "    {%- if messages[0]['role'] == 'system' %}\n"
    "        {{- messages[0]['content'] + '\\n\\n' }}\n"
    "    {%- endif %}\n"
    '    {{- "# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are provided '
    'with function signatures within <tools></tools> XML tags:\\n<tools>" }}\n'
    "    {%- for tool in tools %}\n"
    '        {{- "\\n" }}\n'
    "        {{- tool | tojson }}\n"
    "    {%- endfor %}\n"
    '    {{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within '
    '<tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, \\"arguments\\": '
    '<args-json-object>}\\n</tool_call><|im_end|>\\n" }}\n'
    "{%- elif messages[0]['role'] == 'system' %}\n"
    "    {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}\n"
    "{%- endif %}\n"
    "{%- for message in messages %}\n"
    '    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or '
    '(message.role == "assistant" and not message.tool_calls) %}\n'
    "        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}\n"
    '    {%- elif message.role == "assistant" %}\n'
    "        {{- '<|im_start|>' + message.role }}\n"
    "        {%- if message.content %}\n"
    "            {{- '\\n' + message.content }}\n"
    "        {%- endif %}\n"
    "        {%- for tool_call in message.tool_calls %}\n"
    "            {%- if tool_call.function is defined %}\n"
    "                {%- set tool_call = tool_call.function %}\n"
    "            {%- endif %}\n"
    '            {{- \'\\n<tool_call>\\n{"name": "\' }}\n'
    "            {{- tool_call.name }}\n"
    '            {{- \'", "arguments": \' }}\n'
    "            {{- tool_call.arguments | tojson }}\n"
    "            {{- '}\\n</tool_call>' }}\n"
    "        {%- endfor %}\n"
    "        {{- '<|im_end|>\\n' }}\n"
    '    {%- elif message.role == "tool" %}\n'
    '        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}\n'
    "            {{- '<|im_start|>user' }}\n"
    "        {%- endif %}\n"
    "        {{- '\\n<tool_response>\\n' }}\n"
    "        {{- message.content }}\n"
    "        {{- '\\n</tool_response>' }}\n"
    '        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}\n'
    "            {{- '<|im_end|>\\n' }}\n"
    "        {%- endif %}\n"
    "    {%- endif %}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n"
    "    {{- '<|im_start|>assistant\\n' }}\n"
    "{%- endif %}\n"
)


# ---- prompts that carry tools (eval): a leading {"role": "tools"} entry holds the definitions --------------
TOOLS_ROLE = "tools"


def with_tools_header(messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None) -> list[dict[str, Any]]:
    """`messages` headed by the tool definitions (unchanged without tools), so that one list carries both."""
    return [{"role": TOOLS_ROLE, "content": "", "tools": tools}, *messages] if tools else messages


def split_tools_header(prompt: list[dict[str, Any]]) -> tuple[list[dict[str, Any]] | None, list[dict[str, Any]]]:
    """(tools or None, the messages) of a prompt that may start with a tools header."""
    if prompt and prompt[0].get("role") == TOOLS_ROLE:
        return prompt[0]["tools"], prompt[1:]
    return None, prompt


def render_prompt(tokenizer: Any, prompt: list[dict[str, Any]], add_generation_prompt: bool = True) -> str:
    """The chat template's text of a prompt (with its tools header rendered as the template's tools)."""
    tools, messages = split_tools_header(prompt)
    if tools is None and not any(m.get("tool_calls") for m in messages):
        return str(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt))
    return str(
        tokenizer.apply_chat_template(
            for_template(messages), tools=tools, tokenize=False, add_generation_prompt=add_generation_prompt
        )
    )


def calls_text(calls: list[dict[str, Any]]) -> str:
    """Calls written as Qwen/Hermes templates render them (what `parse_tool_calls` reads back)."""
    blocks = []
    for call in calls:
        fn = call["function"]
        args = fn["arguments"] if isinstance(fn["arguments"], str) else arguments_text(fn["arguments"])
        blocks.append(
            f'<tool_call>\n{{"name": {json.dumps(fn["name"], ensure_ascii=False)}, "arguments": {args}}}\n</tool_call>'
        )
    return "\n".join(blocks)


# ---- how a template writes one call (constrained decoding writes exactly that) -----------------------------
_FORMAT_NAME = "probe_lookup_zq"
_FORMAT_ARGS = {"key": "zq-arg"}


def call_format(tokenizer: Any, end_texts: list[str]) -> tuple[str, str, str]:
    """(prefix, suffix, arguments key) of one call as the chat template writes an assistant's call: e.g.
    (`<tool_call>\\n`, `\\n</tool_call>`, `arguments`) for Qwen/Hermes, (``, ``, `parameters`) for Llama 3.1's bare
    JSON. Read by rendering a conversation with one call and taking the assistant's turn apart: the text before the
    call's JSON object, the text after it up to the end of the turn (the first of `end_texts`), and the key the
    arguments are under. ValueError when the template writes calls otherwise, or in a form `parse_tool_calls`
    would not read back."""
    ask = [{"role": "user", "content": "probe question"}]
    call = {"id": "probezq01", "type": "function", "function": {"name": _FORMAT_NAME, "arguments": _FORMAT_ARGS}}
    prompt = tokenizer.apply_chat_template(ask, tools=[_PROBE_TOOL], tokenize=False, add_generation_prompt=True)
    full = tokenizer.apply_chat_template(
        [*ask, {"role": "assistant", "content": "", "tool_calls": [call]}], tools=[_PROBE_TOOL], tokenize=False
    )
    if not full.startswith(prompt):
        raise ValueError("the template's generation prompt is not the start of an assistant turn with a call")
    turn = full[len(prompt) :]
    start = turn.find("{")
    while start >= 0:
        try:
            value, end = json.JSONDecoder().raw_decode(turn, start)
        except ValueError:
            value, end = None, start + 1
        if isinstance(value, dict) and value.get("name") == _FORMAT_NAME:
            break
        start = turn.find("{", end)
    else:
        raise ValueError(f"the template writes a call as {turn!r}, without a JSON object holding its name")
    key = next((k for k in ("arguments", "parameters") if value.get(k) == _FORMAT_ARGS), None)
    if key is None:
        raise ValueError(f"the template writes a call's arguments under none of `arguments`, `parameters`: {turn!r}")
    suffix = turn[end:]
    cut = min((i for i in (suffix.find(t) for t in end_texts if t) if i >= 0), default=len(suffix))
    prefix, suffix = turn[:start], suffix[:cut]
    _, calls = parse_tool_calls(prefix + json.dumps(value) + suffix, {_FORMAT_NAME})
    if len(calls) != 1:
        raise ValueError(f"the template writes a call as {turn!r}, which the call parser does not read back")
    return prefix, suffix, key

"""Row formats: OpenAI `messages` (the default), Alpaca and ShareGPT, converted both ways.

A messages row is `{"id", "messages": [{"role", "content"}, ...], "source", ...extra}`; a row that uses tools
also has `tools`, assistant messages with `tool_calls` and `tool` messages (OpenAI's layout, see
`domaintune.model.tools`). ShareGPT/LLaMA-Factory rows say the same with `function_call` / `observation` turns
and a `tools` column (JSON text); both are read into, and written from, the OpenAI layout.
"""

from __future__ import annotations

import json
from typing import Any

from domaintune.model.tools import check_tool_turns, normalise_call, normalise_tools

ROLES = ("system", "user", "assistant", "tool")
_FUNCTION_TAGS = ("function_call",)
_OBSERVATION_TAGS = ("observation", "tool")
_SHAREGPT_ROLE = {"system": "system", "user": "human", "assistant": "gpt"}
_FROM_SHAREGPT = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "system": "system",
    "bot": "assistant",
    "model": "assistant",
}
_ROW_KEYS = ("messages", "conversations", "instruction", "input", "output", "system", "history", "text")


def qa_to_messages(
    instruction: str, input: str = "", output: str = "", system: str | None = None, history: list | None = None
) -> list[dict[str, str]]:
    """Alpaca fields to messages: the user turn is instruction, a blank line, then input."""
    messages: list[dict[str, str]] = []
    if system:
        messages.append({"role": "system", "content": system})
    for pair in history or []:
        if not isinstance(pair, (list, tuple)) or len(pair) != 2:
            raise ValueError("history must be a list of [user, assistant] pairs")
        messages.append({"role": "user", "content": str(pair[0])})
        messages.append({"role": "assistant", "content": str(pair[1])})
    user = instruction if not input else (f"{instruction}\n\n{input}" if instruction else input)
    messages.append({"role": "user", "content": user})
    messages.append({"role": "assistant", "content": output})
    return messages


def validate_messages(messages: Any, tools: Any = None) -> list[dict[str, Any]]:
    """Check a messages list (and the row's `tools` its calls must name); raises ValueError with what is wrong."""
    if not isinstance(messages, list) or not messages:
        raise ValueError("messages must be a non-empty list")
    out: list[dict[str, Any]] = []
    for i, m in enumerate(messages):
        calls = m.get("tool_calls") if isinstance(m, dict) else None
        if not isinstance(m, dict) or "role" not in m or ("content" not in m and not calls):
            raise ValueError(f"messages[{i}] must have role and content")
        role = str(m["role"])
        if role not in ROLES:
            raise ValueError(f"messages[{i}].role {role!r} is not one of {', '.join(ROLES)}")
        content = m.get("content")
        if isinstance(content, list):  # OpenAI content parts: keep the text parts
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
        msg: dict[str, Any] = {"role": role, "content": "" if content is None else str(content)}
        if calls:
            if role != "assistant" or not isinstance(calls, list):
                raise ValueError(f"messages[{i}].tool_calls must be a list on an assistant message")
            where = f"messages[{i}].tool_calls"
            msg["tool_calls"] = [normalise_call(c, f"{where}[{k}]", f"call_{i}_{k}") for k, c in enumerate(calls)]
        if role == "tool" and m.get("tool_call_id") is not None:
            msg["tool_call_id"] = str(m["tool_call_id"])
        if role == "tool" and isinstance(m.get("name"), str):
            msg["name"] = m["name"]
        out.append(msg)
    check_tool_turns(out, normalise_tools(tools) if tools else None)
    return out


def message_text(m: dict[str, Any]) -> str:
    """A message's text for length, dedup and filters: its content, then each call as `name(arguments)`."""
    calls = [f"{c['function']['name']}({c['function']['arguments']})" for c in m.get("tool_calls") or []]
    return "\n".join([m["content"], *calls]) if calls else m["content"]


def row_tools(row: dict[str, Any], column: str = "tools") -> list[dict[str, Any]] | None:
    """The row's tool definitions in OpenAI's shape (None when it has none)."""
    value = row.get(column)
    if value in (None, "", []):
        return None
    return normalise_tools(value, column) or None


def sharegpt_to_messages(
    conversations: Any, tags: dict[str, str] | None = None, system: str | None = None, tools: Any = None
) -> list[dict[str, Any]]:
    """ShareGPT turns → messages; `function_call` turns (JSON of one call or a list) become assistant tool
    calls and `observation` turns tool results (LLaMA-Factory's `function_tag` / `observation_tag` rename them)."""
    tags = tags or {}
    role_tag = tags.get("role_tag", "from")
    content_tag = tags.get("content_tag", "value")
    mapping = dict(_FROM_SHAREGPT)
    for our, key in (("user", "user_tag"), ("assistant", "assistant_tag"), ("system", "system_tag")):
        if key in tags:
            mapping[tags[key]] = our
    for tag in (tags.get("function_tag"), *_FUNCTION_TAGS):
        if tag:
            mapping.setdefault(tag, "function_call")
    for tag in (tags.get("observation_tag"), *_OBSERVATION_TAGS):
        if tag:
            mapping.setdefault(tag, "tool")
    if not isinstance(conversations, list) or not conversations:
        raise ValueError("conversations must be a non-empty list")
    messages: list[dict[str, Any]] = [{"role": "system", "content": system}] if system else []
    for i, turn in enumerate(conversations):
        if not isinstance(turn, dict) or role_tag not in turn or content_tag not in turn:
            raise ValueError(f"conversations[{i}] must have {role_tag!r} and {content_tag!r}")
        who = str(turn[role_tag])
        if who not in mapping:
            raise ValueError(f"conversations[{i}].{role_tag} {who!r} is not a known role")
        value = turn[content_tag]
        if mapping[who] == "function_call":
            where = f"conversations[{i}].{content_tag}"
            if isinstance(value, str):
                try:
                    value = json.loads(value)
                except ValueError as exc:
                    raise ValueError(f"{where} is not valid JSON ({exc})") from None
            items = value if isinstance(value, list) else [value]
            calls = [normalise_call(c, f"{where}[{k}]", f"call_{i}_{k}") for k, c in enumerate(items)]
            messages.append({"role": "assistant", "content": "", "tool_calls": calls})
        else:
            messages.append({"role": mapping[who], "content": str(value or "")})
    check_tool_turns(messages, normalise_tools(tools) if tools else None)
    return messages


def messages_to_sharegpt(messages: list[dict[str, Any]]) -> dict[str, Any]:
    """Messages → ShareGPT; tool calls become `function_call` turns (LLaMA-Factory's layout: one call as an
    object, several as a list, arguments as objects) and tool results `observation` turns."""
    out: dict[str, Any] = {}
    turns: list[dict[str, str]] = []
    for m in messages:
        if m["role"] == "system" and not turns and "system" not in out:
            out["system"] = m["content"]
        elif m.get("tool_calls"):
            calls = [
                {"name": c["function"]["name"], "arguments": json.loads(c["function"]["arguments"])}
                for c in m["tool_calls"]
            ]
            value = calls[0] if len(calls) == 1 else calls
            turns.append({"from": "function_call", "value": json.dumps(value, ensure_ascii=False)})
        elif m["role"] == "tool":
            turns.append({"from": "observation", "value": m["content"]})
        else:
            turns.append({"from": _SHAREGPT_ROLE[m["role"]], "value": m["content"]})
    out["conversations"] = turns
    return out


def messages_to_alpaca(messages: list[dict[str, str]]) -> dict[str, Any]:
    """Last user/assistant pair → instruction/output; earlier pairs → history; leading system kept."""
    if any(m.get("tool_calls") or m["role"] == "tool" for m in messages):
        raise ValueError("alpaca rows cannot hold tool calls; set data.format to messages or sharegpt")
    system = None
    rest = list(messages)
    if rest and rest[0]["role"] == "system":
        system = rest.pop(0)["content"]
    if len(rest) < 2 or rest[-1]["role"] != "assistant" or rest[-2]["role"] != "user":
        raise ValueError("alpaca needs the conversation to end with a user turn and an assistant answer")
    history = []
    earlier = rest[:-2]
    if len(earlier) % 2:
        raise ValueError("alpaca history needs alternating user/assistant turns")
    for u, a in zip(earlier[::2], earlier[1::2]):
        if u["role"] != "user" or a["role"] != "assistant":
            raise ValueError("alpaca history needs alternating user/assistant turns")
        history.append([u["content"], a["content"]])
    out: dict[str, Any] = {"instruction": rest[-2]["content"], "input": "", "output": rest[-1]["content"]}
    if system:
        out["system"] = system
    if history:
        out["history"] = history
    return out


def alpaca_to_messages(row: dict[str, Any]) -> list[dict[str, str]]:
    return qa_to_messages(
        str(row.get("instruction") or ""),
        str(row.get("input") or ""),
        str(row.get("output") or ""),
        row.get("system") or None,
        row.get("history") or None,
    )


def to_messages(row: dict[str, Any]) -> list[dict[str, str]]:
    """Any supported row (messages, sharegpt `conversations`, alpaca) → messages."""
    if "messages" in row:
        return validate_messages(row["messages"], row.get("tools"))
    if "conversations" in row:
        return sharegpt_to_messages(row["conversations"], system=row.get("system"), tools=row.get("tools"))
    if "instruction" in row or "output" in row:
        return alpaca_to_messages(row)
    raise ValueError("row has none of messages / conversations / instruction+output")


def convert_row(row: dict[str, Any], fmt: str) -> dict[str, Any]:
    """Re-express a row in `fmt` (messages | alpaca | sharegpt), keeping id, source and extra fields."""
    if "text" in row and not any(k in row for k in ("messages", "conversations", "instruction")):
        return dict(row)  # raw text rows stay text rows
    messages = to_messages(row)
    extra = {k: v for k, v in row.items() if k not in _ROW_KEYS}
    tools = row_tools(row)
    extra.pop("tools", None)
    if fmt == "messages":
        body: dict[str, Any] = {"messages": messages}
        if tools:
            body["tools"] = tools
    elif fmt == "alpaca":
        body = messages_to_alpaca(messages)
        if tools:
            raise ValueError("alpaca rows cannot hold tools; set data.format to messages or sharegpt")
    elif fmt == "sharegpt":
        body = messages_to_sharegpt(messages)
        if tools:  # LLaMA-Factory's `tools` column: the definitions as JSON text
            body["tools"] = json.dumps([t["function"] for t in tools], ensure_ascii=False)
    else:
        raise ValueError(f"unknown format {fmt!r} (messages, alpaca, sharegpt)")
    out = {"id": extra.pop("id")} if "id" in extra else {}
    out.update(body)
    out.update(extra)
    return out


def canonical_from_llamafactory(
    record: dict[str, Any], formatting: str, columns: dict[str, str], tags: dict[str, str]
) -> dict[str, Any]:
    """One record of a LLaMA-Factory dataset → {messages: [...]} plus the record's other keys."""
    if formatting == "alpaca":
        col = {
            "prompt": "instruction",
            "query": "input",
            "response": "output",
            "system": "system",
            "history": "history",
        } | columns
        messages = qa_to_messages(
            str(record.get(col["prompt"]) or ""),
            str(record.get(col["query"]) or ""),
            str(record.get(col["response"]) or ""),
            record.get(col["system"]) or None,
            record.get(col["history"]) or None,
        )
        used = {col[k] for k in ("prompt", "query", "response", "system", "history")}
    elif formatting == "sharegpt":
        col = {"messages": "conversations", "system": "system", "tools": "tools"} | columns
        if col["messages"] not in record:
            raise ValueError(f"missing {col['messages']!r} column")
        tools = record.get(col["tools"]) or None
        messages = sharegpt_to_messages(record[col["messages"]], tags, record.get(col["system"]) or None, tools)
        used = {col["messages"], col["system"], col["tools"]}
    else:
        raise ValueError(f"unsupported formatting {formatting!r} (alpaca or sharegpt)")
    out = {k: v for k, v in record.items() if k not in used}
    out["messages"] = messages
    if formatting == "sharegpt" and tools:
        out["tools"] = normalise_tools(tools, col["tools"])
    return out

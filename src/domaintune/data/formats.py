"""Row formats: OpenAI `messages` (the default), Alpaca and ShareGPT, converted both ways.

A messages row is `{"id", "messages": [{"role", "content"}, ...], "source", ...extra}`.
"""

from __future__ import annotations

from typing import Any

ROLES = ("system", "user", "assistant")
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


def validate_messages(messages: Any) -> list[dict[str, str]]:
    """Check a messages list; raises ValueError with what is wrong."""
    if not isinstance(messages, list) or not messages:
        raise ValueError("messages must be a non-empty list")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise ValueError(f"messages[{i}] must have role and content")
        role = str(m["role"])
        if role not in ROLES:
            raise ValueError(f"messages[{i}].role {role!r} is not one of {', '.join(ROLES)}")
        content = m["content"]
        if isinstance(content, list):  # OpenAI content parts: keep the text parts
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
        out.append({"role": role, "content": "" if content is None else str(content)})
    return out


def sharegpt_to_messages(
    conversations: Any, tags: dict[str, str] | None = None, system: str | None = None
) -> list[dict[str, str]]:
    tags = tags or {}
    role_tag = tags.get("role_tag", "from")
    content_tag = tags.get("content_tag", "value")
    mapping = dict(_FROM_SHAREGPT)
    for our, key in (("user", "user_tag"), ("assistant", "assistant_tag"), ("system", "system_tag")):
        if key in tags:
            mapping[tags[key]] = our
    if not isinstance(conversations, list) or not conversations:
        raise ValueError("conversations must be a non-empty list")
    messages = [{"role": "system", "content": system}] if system else []
    for i, turn in enumerate(conversations):
        if not isinstance(turn, dict) or role_tag not in turn or content_tag not in turn:
            raise ValueError(f"conversations[{i}] must have {role_tag!r} and {content_tag!r}")
        who = str(turn[role_tag])
        if who not in mapping:
            raise ValueError(f"conversations[{i}].{role_tag} {who!r} is not a known role")
        messages.append({"role": mapping[who], "content": str(turn[content_tag] or "")})
    return messages


def messages_to_sharegpt(messages: list[dict[str, str]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    turns: list[dict[str, str]] = []
    for m in messages:
        if m["role"] == "system" and not turns and "system" not in out:
            out["system"] = m["content"]
        else:
            turns.append({"from": _SHAREGPT_ROLE[m["role"]], "value": m["content"]})
    out["conversations"] = turns
    return out


def messages_to_alpaca(messages: list[dict[str, str]]) -> dict[str, Any]:
    """Last user/assistant pair → instruction/output; earlier pairs → history; leading system kept."""
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
        return validate_messages(row["messages"])
    if "conversations" in row:
        return sharegpt_to_messages(row["conversations"], system=row.get("system"))
    if "instruction" in row or "output" in row:
        return alpaca_to_messages(row)
    raise ValueError("row has none of messages / conversations / instruction+output")


def convert_row(row: dict[str, Any], fmt: str) -> dict[str, Any]:
    """Re-express a row in `fmt` (messages | alpaca | sharegpt), keeping id, source and extra fields."""
    if "text" in row and not any(k in row for k in ("messages", "conversations", "instruction")):
        return dict(row)  # raw text rows stay text rows
    messages = to_messages(row)
    extra = {k: v for k, v in row.items() if k not in _ROW_KEYS}
    if fmt == "messages":
        body: dict[str, Any] = {"messages": messages}
    elif fmt == "alpaca":
        body = messages_to_alpaca(messages)
    elif fmt == "sharegpt":
        body = messages_to_sharegpt(messages)
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
        col = {"messages": "conversations", "system": "system"} | columns
        if col["messages"] not in record:
            raise ValueError(f"missing {col['messages']!r} column")
        messages = sharegpt_to_messages(record[col["messages"]], tags, record.get(col["system"]) or None)
        used = {col["messages"], col["system"]}
    else:
        raise ValueError(f"unsupported formatting {formatting!r} (alpaca or sharegpt)")
    out = {k: v for k, v in record.items() if k not in used}
    out["messages"] = messages
    return out

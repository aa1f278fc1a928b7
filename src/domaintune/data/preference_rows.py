"""Preference, unpaired and prompt-only rows: the layouts read, and the one canonical form each is turned into.

- preference pairs -> {"prompt": messages, "chosen": [assistant msg], "rejected": [assistant msg]} from
  domaintune/TRL explicit-prompt rows (`prompt`, `chosen`, `rejected`, text or messages), TRL's implicit-prompt
  rows (`chosen` and `rejected` are whole chats sharing their prefix), LLaMA-Factory's alpaca-style ranking rows
  (`instruction`, `input`, `chosen`, `rejected`) and its sharegpt-style ones (`conversations` + `chosen` /
  `rejected` turns with `from`/`value`);
- unpaired (KTO) rows -> {"prompt": messages, "completion": [assistant msg], "label": bool} from `label`,
  `desirable`, or a `rating` sign; a preference pair gives two unpaired rows;
- prompt-only (GRPO/PPO) rows -> {"prompt": messages, "reference": answer or None, ...other fields}, from
  `prompt` rows or from the data stage's messages / alpaca rows (chat up to the last answer; that answer is the
  reference the verifiers compare with).

`text_key` gives the text dedup and split decisions are made on (the prompt and every answer), so these rows
can go through the same exact/near dedup and split as SFT rows.

Tool calls (`domaintune feedback export` writes them, OpenAI's layout): a pair or unpaired row keeps its `tools`,
assistant messages keep their `tool_calls` (OpenAI's shape, `arguments` as JSON text) and tool results their
`tool_call_id`, so training renders them through the model's chat template (train/preference/tool_rows.py); a
call counts as its Qwen/Hermes text (`calls_text`) wherever text is compared (dedup, checks, filters).
"""

from __future__ import annotations

from typing import Any

from domaintune.model.tools import calls_text, normalise_call

ROW_KINDS = ("preference", "unpaired", "prompt")
# The fields each kind's canonical row is made of (the data stage writes these, plus `id`, `source` and kept fields).
CORE_FIELDS = {
    "preference": ("prompt", "chosen", "rejected"),
    "unpaired": ("prompt", "completion", "label"),
    "prompt": ("prompt", "reference"),
}
ANSWER_FIELDS = ("chosen", "rejected", "completion")
_SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


class RowError(ValueError):
    """A row that is none of the layouts its kind accepts (the message says what was expected)."""


def _messages(value: Any, role: str, field: str, keep_calls: bool = True) -> list[dict[str, Any]]:
    """Messages of `{role, content}`; an assistant's `tool_calls` are kept in OpenAI's shape and a tool result's
    `tool_call_id` with it (`keep_calls=False`: calls written into the content as their Qwen/Hermes text)."""
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    if isinstance(value, dict) and ("content" in value or "value" in value):
        value = [value]
    if isinstance(value, list) and value and all(isinstance(m, dict) for m in value):
        out = []
        for i, m in enumerate(value):
            who = m.get("role") or _SHAREGPT_ROLES.get(str(m.get("from", "")), role)
            content = m.get("content", m.get("value", ""))
            message: dict[str, Any] = {"role": str(who), "content": "" if content is None else str(content)}
            if m.get("tool_calls"):
                calls = _calls(m["tool_calls"], f"{field}[{i}].tool_calls")
                if keep_calls:
                    message["tool_calls"] = calls
                else:
                    message["content"] = "\n".join(t for t in (message["content"], calls_text(calls)) if t)
            if keep_calls and who == "tool" and isinstance(m.get("tool_call_id"), str):
                message["tool_call_id"] = m["tool_call_id"]
            out.append(message)
        return out
    raise RowError(f"`{field}` must be text or a list of messages")


def _calls(value: Any, field: str) -> list[dict[str, Any]]:
    if not isinstance(value, list):
        raise RowError(f"`{field}` must be a list of calls")
    try:
        return [normalise_call(c, f"`{field}[{k}]`", f"call_{k}") for k, c in enumerate(value)]
    except ValueError as exc:
        raise RowError(str(exc)) from None


def message_text(m: dict[str, Any]) -> str:
    """A message's text as compared (dedup, checks, filters): its content, then its calls as Qwen/Hermes text."""
    if not m.get("tool_calls"):
        return m["content"]
    return "\n".join(t for t in (m["content"], calls_text(m["tool_calls"])) if t)


def _alpaca_prompt(row: dict[str, Any]) -> list[dict[str, str]]:
    user = "\n\n".join(str(row[k]) for k in ("instruction", "input") if row.get(k))
    prompt = [{"role": "system", "content": str(row["system"])}] if row.get("system") else []
    return prompt + [{"role": "user", "content": user}]


def _split_common_prefix(chosen: list[dict], rejected: list[dict]) -> tuple[list[dict], list[dict], list[dict]]:
    n = 0
    while n < min(len(chosen), len(rejected)) - 1 and chosen[n] == rejected[n]:
        n += 1
    return chosen[:n], chosen[n:], rejected[n:]


def _extras(row: dict[str, Any], used: tuple[str, ...]) -> dict[str, Any]:
    return {k: v for k, v in row.items() if k not in used}


def to_preference(row: dict[str, Any]) -> dict[str, Any]:
    """One preference pair in the canonical form (extra fields such as `id` kept)."""
    if "chosen" not in row or "rejected" not in row:
        raise RowError("preference rows need `chosen` and `rejected` (and `prompt`, `instruction` or `conversations`)")
    used: tuple[str, ...] = ("prompt", "chosen", "rejected")
    if "prompt" in row:
        prompt = _messages(row["prompt"], "user", "prompt")
    elif "conversations" in row:
        prompt, used = _messages(row["conversations"], "user", "conversations"), used + ("conversations",)
    elif "instruction" in row:
        prompt, used = _alpaca_prompt(row), used + ("instruction", "input", "system")
    elif isinstance(row.get("messages"), list):  # a LLaMA-Factory ranking row already read as a chat
        chat = _messages(row["messages"], "user", "messages")
        while chat and chat[-1]["role"] == "assistant" and not message_text(chat[-1]).strip():
            chat.pop()
        prompt, used = chat, used + ("messages",)
    else:  # TRL's implicit prompt: two whole chats sharing their beginning
        chosen, rejected = (
            _messages(row["chosen"], "assistant", "chosen"),
            _messages(row["rejected"], "assistant", "rejected"),
        )
        prompt, chosen, rejected = _split_common_prefix(chosen, rejected)
        if not prompt:
            raise RowError("`chosen`/`rejected` without a prompt must be whole chats that share the prompt turns")
        return {"prompt": prompt, "chosen": chosen, "rejected": rejected, **_extras(row, used)}
    chosen = _messages(row["chosen"], "assistant", "chosen")
    rejected = _messages(row["rejected"], "assistant", "rejected")
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected, **_extras(row, used)}


def _label(row: dict[str, Any]) -> bool:
    for key in ("label", "desirable", "kto_tag"):
        if key in row:
            value = row[key]
            if isinstance(value, str):
                return value.strip().lower() in ("true", "1", "yes", "up", "good")
            return bool(value)
    if "rating" in row:
        return float(row["rating"]) > 0
    raise RowError("unpaired rows need `label` (true/false), `desirable`, `kto_tag`, or `rating`")


def to_unpaired(row: dict[str, Any]) -> list[dict[str, Any]]:
    """Unpaired (KTO) rows: one from a labelled row, two (desirable and not) from a preference pair."""
    if "chosen" in row and "rejected" in row and "completion" not in row:
        pair = to_preference(row)
        extras = _extras(pair, ("prompt", "chosen", "rejected"))
        return [
            {"prompt": pair["prompt"], "completion": pair["chosen"], "label": True, **extras},
            {"prompt": pair["prompt"], "completion": pair["rejected"], "label": False, **extras},
        ]
    if "prompt" not in row and any(k in row for k in ("messages", "conversations", "instruction")):
        return [_unpaired_chat(row)]
    if "prompt" not in row or "completion" not in row:
        raise RowError("unpaired rows need `prompt`, `completion` and `label` (or a chosen/rejected pair)")
    used = ("prompt", "completion", "label", "desirable")
    return [
        {
            "prompt": _messages(row["prompt"], "user", "prompt"),
            "completion": _messages(row["completion"], "assistant", "completion"),
            "label": _label(row),
            **_extras(row, used),
        }
    ]


def _unpaired_chat(row: dict[str, Any]) -> dict[str, Any]:
    """LLaMA-Factory's KTO layout: a chat (`messages` / sharegpt `conversations` / alpaca) whose last answer is the
    completion, with `label` (or `kto_tag`); a last answer that calls tools keeps its calls."""
    label = _label(row)
    key = "messages" if isinstance(row.get("messages"), list) else "conversations"
    if isinstance(row.get(key), list):
        turns = _messages(row[key], "user", key)
        last = max((i for i, m in enumerate(turns) if m["role"] == "assistant"), default=None)
        if last is None:
            raise RowError("an unpaired chat row needs a final assistant answer (the completion that `label` rates)")
        extras = _extras(row, (key, "label", "desirable", "kto_tag", "rating"))
        return {**extras, "prompt": turns[:last], "completion": [turns[last]], "label": label}
    chat = to_prompt({k: v for k, v in row.items() if k not in ("label", "desirable", "kto_tag", "rating")})
    if chat["reference"] is None:
        raise RowError("an unpaired chat row needs a final assistant answer (the completion that `label` rates)")
    completion = [{"role": "assistant", "content": str(chat.pop("reference"))}]
    return {**chat, "completion": completion, "label": label}


def to_prompt(row: dict[str, Any]) -> dict[str, Any]:
    """A prompt-only row; a data-stage chat gives its turns up to the last answer and that answer as `reference`.
    A row with `tools` keeps its earlier calls in OpenAI's shape (the prompt is rendered with its tools, as eval
    renders it); other rows get calls as their Qwen/Hermes text."""
    keep = bool(row.get("tools"))
    if "prompt" in row:
        prompt = _messages(row["prompt"], "user", "prompt", keep_calls=keep)
        return {**_extras(row, ("prompt",)), "prompt": prompt, "reference": row.get("reference")}
    if isinstance(row.get("messages"), list) or isinstance(row.get("conversations"), list):
        key = "messages" if "messages" in row else "conversations"
        chat = _messages(row[key], "user", key, keep_calls=keep)
        last = max((i for i, m in enumerate(chat) if m["role"] == "assistant"), default=None)
        if last is None:
            return {**_extras(row, (key,)), "prompt": chat, "reference": row.get("reference")}
        return {**_extras(row, (key,)), "prompt": chat[:last], "reference": message_text(chat[last])}
    if "instruction" in row:
        return {**_extras(row, ("instruction", "input", "output", "system")), "prompt": _alpaca_prompt(row),
                "reference": row.get("output")}  # fmt: skip
    raise RowError("prompt rows need `prompt`, `messages`/`conversations`, or `instruction`")


def text_key(row: dict[str, Any]) -> str:
    """The text a canonical row is deduplicated and split on: its non-system prompt turns and every answer."""
    parts = [message_text(m) for m in row.get("prompt", []) if m.get("role") != "system"]
    for key in ("chosen", "rejected", "completion"):
        parts += [message_text(m) for m in row.get(key) or []]
    if row.get("reference"):
        parts.append(str(row["reference"]))
    return "\n".join(parts)


def convert(row: dict[str, Any], kind: str) -> list[dict[str, Any]]:
    """`row` in the canonical form of `kind` (one of ROW_KINDS); a list because a pair gives two unpaired rows."""
    if kind == "preference":
        return [to_preference(row)]
    if kind == "unpaired":
        return to_unpaired(row)
    if kind == "prompt":
        return [to_prompt(row)]
    raise ValueError(f"unknown row kind {kind!r}; one of {ROW_KINDS}")


def canonical(row: dict[str, Any], kind: str) -> dict[str, Any]:
    """One record in the data stage: exactly one canonical row of `kind`, its core fields (and its `tools`) only
    (a chosen/rejected pair is not an unpaired row here: the data stage writes what it read, and kto reads pairs as
    two rows)."""
    if kind == "unpaired" and "completion" not in row and "chosen" in row and "rejected" in row:
        raise RowError("a chosen/rejected pair is not an unpaired row: use data.kind: preference (kto reads each pair as "
                       "a desirable and an undesirable row)")  # fmt: skip
    out = convert(row, kind)[0]
    core = {k: out.get(k) for k in CORE_FIELDS[kind]}
    return {**core, "tools": out["tools"]} if out.get("tools") else core


def prompt_user_text(row: dict[str, Any]) -> str:
    """The user turns of a canonical row's prompt."""
    return "\n".join(m["content"] for m in row.get("prompt") or [] if m.get("role") == "user")


def answers_text(row: dict[str, Any]) -> str:
    """Every answer of a canonical row (chosen, rejected, completion, reference), one per line."""
    parts = [message_text(m) for key in ANSWER_FIELDS for m in row.get(key) or []]
    if row.get("reference") is not None:
        parts.append(str(row["reference"]))
    return "\n".join(parts)


def map_texts(row: dict[str, Any], fn: Any) -> bool:
    """`fn` applied to every message content (and a text reference) of a canonical row in place; True if any
    changed."""
    changed = False
    for key in ("prompt", *ANSWER_FIELDS):
        for m in row.get(key) or []:
            new = fn(m["content"])
            changed |= new != m["content"]
            m["content"] = new
    if isinstance(row.get("reference"), str):
        new = fn(row["reference"])
        changed |= new != row["reference"]
        row["reference"] = new
    return changed


def problem(row: dict[str, Any], kind: str) -> str | None:
    """Why a canonical row cannot train (an empty prompt or answer, a pair whose answers are the same), or None."""
    if not prompt_user_text(row).strip():
        return "empty:prompt (needs a non-empty user turn)"
    for key in ANSWER_FIELDS:
        if key in CORE_FIELDS[kind] and not "".join(message_text(m) for m in row.get(key) or []).strip():
            return f"empty:{key}"
    if kind == "preference" and answers_text({"chosen": row["chosen"]}) == answers_text({"rejected": row["rejected"]}):
        return "chosen equals rejected (the pair teaches nothing)"
    return None

"""Evaluation items (prompt + reference) read from messages-form JSONL, and the answer cache."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from domaintune.errors import UserError
from domaintune.model.tools import calls_text, normalise_tools, with_tools_header
from domaintune.utils.io import read_jsonl, read_jsonl_numbered, write_jsonl

STRATUM_FIELDS = ("department", "qtype", "category", "stratum", "task_type", "domain")


@dataclass
class Item:
    id: str
    prompt: list[dict[str, str]]  # every message before the last assistant message
    reference: str
    row: dict[str, Any] = field(repr=False, default_factory=dict)
    tool_calls: list[dict[str, Any]] | None = None  # the reference answer's expected calls (scored by eval.metrics)

    @property
    def question(self) -> str:
        """The last user message (what a reviewer reads as "the question")."""
        for message in reversed(self.prompt):
            if message["role"] == "user":
                return message["content"]
        return self.prompt[-1]["content"]


def load_items(path: Path, limit: int | None, what: str, system_prompt: str | None = None) -> list[Item]:
    """Rows -> items: the last assistant message is the reference, earlier messages the prompt. JSONL rows in
    messages, alpaca (instruction/input/output) or sharegpt (conversations) form, or a CSV file with
    instruction[,input],output columns (other columns are kept as row fields, e.g. a stratum)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{what} set {path} does not exist (run `domaintune data` first or set eval.{what}_file)")
    items: list[Item] = []
    seen: set[str] = set()
    for line_no, row in _numbered_rows(path):
        where = f"{path}:{line_no}"
        messages = _messages(row, where)
        if not isinstance(messages, list) or not messages:
            raise UserError(f"{where}: field 'messages' must be a non-empty list of {{role, content}}")
        for k, message in enumerate(messages):
            if (
                not isinstance(message, dict)
                or message.get("role") not in ("system", "user", "assistant", "tool")
                or not (isinstance(message.get("content"), str) or message.get("tool_calls"))
            ):
                raise UserError(f"{where}: messages[{k}] needs role system/user/assistant/tool and a string content")
        last_assistant = max((k for k, m in enumerate(messages) if m["role"] == "assistant"), default=None)
        if last_assistant is None:
            raise UserError(f"{where}: no assistant message to use as the reference")
        prompt = [_prompt_message(m) for m in messages[:last_assistant]]
        if not any(m["role"] == "user" for m in prompt):
            raise UserError(f"{where}: no user message before the reference answer")
        if system_prompt and prompt[0]["role"] != "system":
            prompt.insert(0, {"role": "system", "content": system_prompt})
        prompt = with_tools_header(prompt, _row_tools(row, where))  # the model sees the row's tools
        answer = messages[last_assistant]
        item_id = str(row.get("id") or f"{path.stem}-{line_no}")
        if item_id in seen:
            raise UserError(f"{where}: duplicate id {item_id!r}")
        seen.add(item_id)
        items.append(Item(item_id, prompt, _reference(answer), row, answer.get("tool_calls") or None))
        if limit is not None and len(items) >= limit:
            break
    if not items:
        raise UserError(f"{path}: no items")
    return items


def _prompt_message(m: dict[str, Any]) -> dict[str, Any]:
    out = {"role": m["role"], "content": m.get("content") or ""}
    out.update({k: m[k] for k in ("tool_calls", "tool_call_id") if m.get(k)})
    return out


def _reference(answer: dict[str, Any]) -> str:
    """The reference text; an answer that calls tools is written as Qwen/Hermes templates render calls."""
    if not answer.get("tool_calls"):
        return answer["content"]
    return "\n".join(t for t in (answer.get("content") or "", calls_text(answer["tool_calls"])) if t)


def _row_tools(row: Any, where: str) -> list[dict[str, Any]] | None:
    if not isinstance(row, dict) or not row.get("tools"):
        return None
    try:
        return normalise_tools(row["tools"])
    except ValueError as exc:
        raise UserError(f"{where}: {exc}") from None


def _numbered_rows(path: Path) -> list[tuple[int, Any]]:
    """(line number, row) of a JSONL file, or of a CSV file (header on line 1)."""
    if path.suffix.lower() == ".csv":
        import csv

        with path.open("r", encoding="utf-8-sig", newline="") as handle:
            reader = csv.DictReader(handle)
            rows = []
            for row in reader:
                if None in row:
                    raise UserError(f"{path}:{reader.line_num}: more cells than the header has columns")
                rows.append((reader.line_num, row))
            return rows
    try:
        return list(read_jsonl_numbered(path))
    except ValueError as exc:
        raise UserError(str(exc)) from None


def _messages(row: Any, where: str) -> Any:
    """The row's messages: its own, or those of an alpaca / sharegpt row."""
    if not isinstance(row, dict):
        raise UserError(f"{where}: expected a JSON object with 'messages' (or instruction/output, conversations)")
    if "messages" not in row and isinstance(row.get("prompt"), list):
        return _canonical_messages(row, where)
    if "messages" in row or not any(k in row for k in ("instruction", "output", "conversations")):
        return row.get("messages")
    from domaintune.data.formats import to_messages

    try:
        return to_messages(row)
    except ValueError as exc:
        raise UserError(f"{where}: {exc}") from None


def _canonical_messages(row: dict[str, Any], where: str) -> list[Any]:
    """A preference / unpaired / prompt row of the data stage (data.kind): its prompt, then the answer it holds up
    as good (chosen, a desirable completion, the reference) as the reference answer."""
    if "chosen" in row:
        answer = row["chosen"]
    elif "completion" in row:
        if not row.get("label"):
            raise UserError(
                f"{where}: an undesirable completion (label false) is no reference answer; evaluate this kto run on "
                "pairs or chats (eval.test_file)"
            )
        answer = row["completion"]
    else:
        answer = [] if row.get("reference") is None else str(row["reference"])
    if isinstance(answer, str):
        answer = [{"role": "assistant", "content": answer}]
    return [*row["prompt"], *answer]


def detect_stratum_field(items: list[Item], configured: str | None) -> str | None:
    if configured:
        if not any(configured in it.row for it in items):
            raise UserError(f"eval.stratum_field: no item has a field {configured!r}")
        return configured
    for name in STRATUM_FIELDS:
        if sum(isinstance(it.row.get(name), (str, int)) for it in items) * 2 >= len(items):
            return name
    return None


def classification_gold(item: Item) -> str | None:
    """Gold label of a classification-style item (`label` field, or `is_classification` rows), else None."""
    label = item.row.get("label")
    if isinstance(label, (str, int)) and str(label).strip():
        return str(label).strip()
    if item.row.get("is_classification") is True:
        return item.reference.strip()
    return None


def cache_key(kind: str, identity: str, payload: Any, settings: dict[str, Any]) -> str:
    blob = json.dumps(
        {"kind": kind, "model": identity, "input": payload, "settings": settings}, sort_keys=True, ensure_ascii=False
    )
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


class JsonlCache:
    """Rows keyed by `key`, kept in a JSONL file; entries for other models/settings are preserved."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.rows: dict[str, dict[str, Any]] = {}
        self.hits = 0
        self.misses = 0
        if self.path.is_file():
            try:
                for row in read_jsonl(self.path):
                    if isinstance(row, dict) and "key" in row:
                        self.rows[row["key"]] = row
            except ValueError as exc:  # a damaged cache is rebuilt, and says so
                import logging

                logging.getLogger(__name__).warning("ignoring damaged cache %s: %s", self.path, exc)
                self.rows = {}

    def get(self, key: str) -> dict[str, Any] | None:
        row = self.rows.get(key)
        if row is None:
            self.misses += 1
        else:
            self.hits += 1
        return row

    def put(self, row: dict[str, Any]) -> None:
        self.rows[row["key"]] = row

    def save(self) -> None:
        write_jsonl(self.path, self.rows.values())

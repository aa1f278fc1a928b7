"""Turn `messages` rows into token ids with assistant-only labels; replay mixing; batch collators.

Labels: every token that the chat template renders for system/user turns, role headers and
separators is -100; the assistant's text and the template's end-of-turn token are learned (so
the model learns to stop). Spans come from rendering growing prefixes of the conversation, which
works for any template whose rendering of a prefix is a prefix of the full rendering.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from domaintune.errors import UserError
from domaintune.model.thinking import CLOSE as THINK_CLOSE
from domaintune.model.thinking import strip_reasoning, thinking_mode
from domaintune.model.tools import for_template, has_tools, template_tool_problem
from domaintune.utils.io import read_jsonl

IGNORE_INDEX = -100
ROLES = ("system", "user", "assistant", "tool")  # tool: a tool's result, context only (never in the loss)


def load_message_rows(path: str | Path, limit: int | None = None) -> list[dict[str, Any]]:
    """Read a messages JSONL and check its shape; a bad row names file, line and field."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: not found (run `domaintune data CONFIG` first, or check the path)")
    rows: list[dict[str, Any]] = []
    try:
        for line_no, row in enumerate(read_jsonl(path), start=1):
            _check_row(row, path, line_no)
            rows.append(row)
            if limit is not None and len(rows) >= limit:
                break
    except ValueError as exc:
        raise UserError(str(exc)) from None
    if not rows:
        raise UserError(f"{path}: no rows")
    return rows


def _check_row(row: Any, path: Path, line_no: int) -> None:
    where = f"{path}:{line_no}"
    if not isinstance(row, dict) or not isinstance(row.get("messages"), list) or not row["messages"]:
        raise UserError(f"{where}: field `messages` must be a non-empty list of {{role, content}}")
    for i, message in enumerate(row["messages"]):
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            raise UserError(f"{where}: messages[{i}].role must be one of {list(ROLES)}")
        if not isinstance(message.get("content"), str):
            raise UserError(f"{where}: messages[{i}].content must be a string")
        if "tool_calls" in message and not (message["role"] == "assistant" and isinstance(message["tool_calls"], list)):
            raise UserError(f"{where}: messages[{i}].tool_calls must be a list on an assistant message")
    if not any(m["role"] == "assistant" for m in row["messages"]):
        raise UserError(f"{where}: no assistant message, nothing to learn")


def _render(tokenizer, messages, add_generation_prompt=False, tools=None) -> str:
    if tools or any(m.get("tool_calls") for m in messages):
        messages = for_template(messages)
    return tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt, tools=tools or None
    )


def check_tool_template(tokenizer, rows: list[dict[str, Any]]) -> None:
    """Rows with tool calls need a chat template that renders them; UserError naming the first such row."""
    first = next((n for n, row in enumerate(rows, start=1) if has_tools(row)), None)
    if first is None:
        return
    problem = template_tool_problem(tokenizer)
    if problem is not None:
        raise UserError(
            f"row {first} (and maybe more) has tool calls, but {problem}; set model.chat_template to a template "
            "with tool support (e.g. `chatml-tools`, or the model family's own)"
        )


def assistant_char_spans(
    tokenizer, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None
) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans of each assistant reply (incl. its end-of-turn token).

    Under `model.thinking` (stored in the template): `off` renders the messages without their `<think>` blocks,
    `on` leaves each reply's block out of its span (in the text, not in the loss); see `domaintune.model.thinking`.
    """
    mode = thinking_mode(tokenizer.chat_template)
    if mode == "off":
        messages = strip_reasoning(messages)
    full = _render(tokenizer, messages, tools=tools)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = _render(tokenizer, messages[:i], add_generation_prompt=True, tools=tools) if i else ""
        upto = _render(tokenizer, messages[: i + 1], tools=tools)
        if not full.startswith(upto) or not upto.startswith(before):
            raise UserError(
                "the chat template does not render conversations prefix-stably, so assistant tokens cannot be "
                "located; set model.chat_template to a standard template (e.g. chatml)"
            )
        end = len(upto.rstrip())  # the newline after the end-of-turn token is not learned
        start = _after_reasoning(full, len(before), end) if mode == "on" else len(before)
        if end > start:
            spans.append((start, end))
    return full, spans


def _after_reasoning(text: str, start: int, end: int) -> int:
    """Where the answer starts in the reply text[start:end]: after its `</think>` and the blank lines after it."""
    close = text.find(THINK_CLOSE, start, end)
    if close < 0:
        return start
    cut = close + len(THINK_CLOSE)
    return cut + len(text[cut:end]) - len(text[cut:end].lstrip())


@dataclass
class EncodeStats:
    rows: int = 0
    truncated: int = 0
    dropped_no_target: int = 0
    tokens: int = 0
    target_tokens: int = 0

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


def encode_messages(tokenizer, messages, max_length: int, tools=None) -> tuple[list[int], list[int], bool]:
    """input_ids and labels (assistant tokens, tool calls included; tool results are context), truncated to
    max_length; returns (ids, labels, truncated)."""
    text, spans = assistant_char_spans(tokenizer, messages, tools)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = enc["input_ids"]
    labels = [IGNORE_INDEX] * len(ids)
    span_index = 0
    for t, (start, _end) in enumerate(enc["offset_mapping"]):
        while span_index < len(spans) and start >= spans[span_index][1]:
            span_index += 1
        if span_index < len(spans) and spans[span_index][0] <= start < spans[span_index][1]:
            labels[t] = ids[t]
    # Tokens after the last label (the newline after the final end-of-turn) are fed but predict nothing: drop them.
    last = max((t for t, label in enumerate(labels) if label != IGNORE_INDEX), default=len(ids) - 1)
    ids, labels = ids[: last + 1], labels[: last + 1]
    truncated = len(ids) > max_length
    return ids[:max_length], labels[:max_length], truncated


def encode_rows(tokenizer, rows, max_length: int, stats: EncodeStats | None = None) -> tuple[list[dict], EncodeStats]:
    stats = stats or EncodeStats()
    check_tool_template(tokenizer, rows)
    out = []
    for row in rows:
        ids, labels, truncated = encode_messages(tokenizer, row["messages"], max_length, row.get("tools"))
        stats.rows += 1
        stats.truncated += int(truncated)
        n_target = sum(1 for x in labels if x != IGNORE_INDEX)
        if n_target == 0:
            stats.dropped_no_target += 1
            continue
        stats.tokens += len(ids)
        stats.target_tokens += n_target
        out.append({"input_ids": ids, "labels": labels})
    return out, stats


class ReplayMixDataset:
    """Domain examples plus `ratio * len(domain)` general examples, a fresh general sample every epoch.

    The epoch is set by `ReplayEpochCallback` (from the trainer state, so it survives resume); the
    choice per epoch is a pure function of (seed, epoch), so a resumed run sees the same rows.
    """

    def __init__(self, domain: list[dict], general: list[dict], ratio: float, seed: int):
        self.domain = domain
        self.general = general
        self.n_replay = round(ratio * len(domain)) if general else 0
        self.seed = seed
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)
        rng = random.Random(self.seed * 1000003 + self.epoch)
        if self.n_replay <= len(self.general):
            self.replay_indices = rng.sample(range(len(self.general)), self.n_replay)
        else:  # fewer general rows than asked for: sample with replacement
            self.replay_indices = [rng.randrange(len(self.general)) for _ in range(self.n_replay)]

    def __len__(self) -> int:
        return len(self.domain) + self.n_replay

    def __getitem__(self, index: int) -> dict:
        if index < len(self.domain):
            return self.domain[index]
        return self.general[self.replay_indices[index - len(self.domain)]]


@dataclass
class PaddingCollator:
    """Right-pads a batch; padded label positions are -100 and masked out of attention."""

    pad_token_id: int
    pad_to_multiple_of: int | None = None

    def __call__(self, features: list[dict]) -> dict:
        import torch

        longest = max(len(f["input_ids"]) for f in features)
        if self.pad_to_multiple_of:
            m = self.pad_to_multiple_of
            longest = (longest + m - 1) // m * m
        ids, labels, mask = [], [], []
        for f in features:
            pad = longest - len(f["input_ids"])
            ids.append(list(f["input_ids"]) + [self.pad_token_id] * pad)
            labels.append(list(f["labels"]) + [IGNORE_INDEX] * pad)
            mask.append([1] * len(f["input_ids"]) + [0] * pad)
        return {
            "input_ids": torch.tensor(ids, dtype=torch.long),
            "labels": torch.tensor(labels, dtype=torch.long),
            "attention_mask": torch.tensor(mask, dtype=torch.long),
        }


def make_collator(tokenizer, packing: bool):
    """Padding-free (flattened, position_ids restart per example) when packing, else right padding."""
    if packing:
        from transformers import DataCollatorWithFlattening

        # position_ids restart at every example: attention is block-diagonal (transformers builds the
        # mask from them) and the first label of each example is -100, so nothing crosses a boundary.
        return DataCollatorWithFlattening(return_position_ids=True, separator_id=IGNORE_INDEX)
    return PaddingCollator(pad_token_id=tokenizer.pad_token_id)


def load_preference_rows(path: Path, limit: int | None = None, tool_rows: Any = None) -> list[dict]:
    """prompt/chosen/rejected rows in trl's conversational form (with `tools` when the row has them: `tool_rows`, a
    train/preference/tool_rows.ToolRows, makes rows that use tools ready for the chat template)."""
    if not Path(path).is_file():
        raise UserError(
            f"{path}: preference file not found (write it with `domaintune feedback export CONFIG`, "
            "or set train.dpo.path)"
        )
    rows = []
    try:
        for line_no, row in enumerate(read_jsonl(path), start=1):
            where = f"{path}:{line_no}"
            for key in ("prompt", "chosen", "rejected"):
                if key not in row:
                    raise UserError(f"{where}: missing field `{key}` (DPO rows need prompt, chosen, rejected)")
            prompt = row["prompt"]
            if isinstance(prompt, str):
                prompt = [{"role": "user", "content": prompt}]
            elif not (isinstance(prompt, list) and all(isinstance(m, dict) and "role" in m for m in prompt)):
                raise UserError(f"{where}: `prompt` must be text or a list of messages")
            pair: dict[str, Any] = {"prompt": prompt, **({"tools": row["tools"]} if row.get("tools") else {})}
            for key in ("chosen", "rejected"):
                value = row[key]
                if isinstance(value, str):
                    value = [{"role": "assistant", "content": value}]
                elif not (isinstance(value, list) and value and isinstance(value[0], dict)):
                    raise UserError(f"{where}: `{key}` must be text or a list of assistant messages")
                pair[key] = value
            rows.append(tool_rows(pair, where) if tool_rows is not None else pair)
            if limit is not None and len(rows) >= limit:
                break
    except ValueError as exc:
        raise UserError(str(exc)) from None
    if not rows:
        raise UserError(f"{path}: no preference rows")
    return rows

"""Preference rows that use tools (dpo, kto, orpo, simpo, reward), rendered through the model's chat template.

`domaintune feedback export` writes pairs and unpaired rows with the request's `tools` and answers that are
tool calls (`tool_calls` in OpenAI's shape). A tool-call answer is trained in the context it was given in: the
prompt shows the tools as the template renders them (`apply_chat_template(..., tools=...)`) and the answer is the
call as the template writes calls. `ToolRows` checks once per file that the template renders tools (a template
without tool branches would drop them silently: refused, naming the file, line and field) and gives each row what
templates take (`model.tools.for_template`: arguments as mappings, Mistral-style call ids) with its tools as JSON
text; `to_dataset` builds the trl dataset:

- dpo, kto, reward: trl's trainers render a row's `tools` column themselves, so the rows stay conversational (the
  messages held as JSON, since calls' arguments differ from row to row, `tools` as JSON text);
- orpo, simpo: trl's ORPO and CPO trainers take no per-row tools, so every row is rendered to text here with trl's
  own `apply_chat_template` (what they would render, plus the tools);
- grpo, ppo (`prompt_dataset`): trl's GRPOTrainer renders conversational prompts with trainer-wide tools only, so
  every prompt is rendered to text here with `model.tools.render_prompt`, the helper eval and serving render prompts
  with (the tools header, then the turns, then the generation prompt); the original turns go along as
  `prompt_messages` (JSON text) for the verifiers and the reward model, and the tools as `tools` (JSON text).

Rows without tools are left exactly as before, and so is a dataset in which no row uses tools.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from domaintune.errors import UserError
from domaintune.model.tools import (
    check_tool_turns,
    for_template,
    normalise_call,
    normalise_tools,
    render_prompt,
    template_tool_problem,
    with_tools_header,
)

MESSAGE_COLUMNS = ("prompt", "chosen", "rejected", "completion")
ANSWER_COLUMNS = ("chosen", "rejected", "completion")
TRL_RENDERS_TOOLS = ("dpo", "kto", "reward")  # trl trainers that pass each row's `tools` to the chat template
TEMPLATE_HINT = (
    "set model.chat_template to a template with tool support (e.g. `chatml-tools`, or the model family's own)"
)


def uses_tools(row: dict[str, Any]) -> bool:
    """True for a row with tool definitions, tool calls or tool results."""
    return bool(row.get("tools")) or any(
        m.get("tool_calls") or m.get("role") == "tool" for key in MESSAGE_COLUMNS for m in row.get(key) or []
    )


class ToolRows:
    """Rows that use tools as chat templates take them (see the module's doc); others unchanged."""

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        self._problem: str | None = None
        self._checked = False

    def problem(self) -> str | None:
        if not self._checked:
            self._problem = template_tool_problem(self.tokenizer)
            self._checked = True
        return self._problem

    def __call__(self, row: dict[str, Any], where: str) -> dict[str, Any]:
        """`row` ready for the template (its `tools` as JSON text); UserError naming `where` and the field when the
        template cannot render tools or a call is not valid."""
        if not uses_tools(row):
            return row
        problem = self.problem()
        if problem is not None:
            field = "tools" if row.get("tools") else "tool_calls"
            raise UserError(f"{where}: the row has `{field}`, but {problem}; {TEMPLATE_HINT}")
        try:
            tools = normalise_tools(row.get("tools") or [], "`tools`")
            out = dict(row)
            prompt = _messages(row["prompt"], "prompt")
            for key in ANSWER_COLUMNS:
                if key in row:
                    answer = _messages(row[key], key)
                    try:
                        check_tool_turns(prompt + answer, tools)  # fills a result's missing tool_call_id
                    except ValueError as exc:
                        raise ValueError(f"`prompt` + `{key}` ({exc})") from None
                    out[key] = for_template(answer)
            if not any(key in row for key in ANSWER_COLUMNS):  # a prompt row (grpo, ppo)
                check_tool_turns(prompt, tools)
            out["prompt"] = for_template(prompt)
        except ValueError as exc:
            raise UserError(f"{where}: {exc}") from None
        out["tools"] = json.dumps(tools, ensure_ascii=False) if tools else None
        return out


def _messages(messages: list[dict[str, Any]], field: str) -> list[dict[str, Any]]:
    """Copies with calls in OpenAI's shape (a bare `{name, arguments}` too) and text content ('' for none)."""
    out = []
    for i, m in enumerate(messages):
        m = {**m, "content": m.get("content") or ""}
        if m.get("tool_calls"):
            where = f"`{field}[{i}].tool_calls"
            m["tool_calls"] = [normalise_call(c, f"{where}[{k}]`", f"call_{k}") for k, c in enumerate(m["tool_calls"])]
        out.append(m)
    return out


def to_dataset(rows: list[dict[str, Any]], method: str, tokenizer: Any) -> Any:
    """The datasets.Dataset trl trains `method` on (rows from `ToolRows`)."""
    from datasets import Dataset, Features, Json, List, Value

    if not any(uses_tools(r) for r in rows):
        return Dataset.from_list([{k: v for k, v in r.items() if k != "tools"} for r in rows])
    if method in TRL_RENDERS_TOOLS:
        columns = [k for k in rows[0] if k != "tools"]
        features = {k: List(Json()) if k in MESSAGE_COLUMNS else Value("bool") for k in columns}
        table = [{**{k: r[k] for k in columns}, "tools": r.get("tools")} for r in rows]
        return Dataset.from_list(table, features=Features({**features, "tools": Value("string")}))
    from trl.data_utils import apply_chat_template

    rendered = []
    for r in rows:
        tools = json.loads(r["tools"]) if r.get("tools") else None
        rendered.append(apply_chat_template({k: v for k, v in r.items() if k != "tools"}, tokenizer, tools))
    return Dataset.from_list(rendered)


def prompt_dataset(rows: list[dict[str, Any]], tokenizer: Any) -> Any:
    """The datasets.Dataset GRPOTrainer generates from (prompt rows from `ToolRows`): unchanged when no row uses
    tools; else every prompt as the text eval and serving render for it (`render_prompt`, with the row's tools)."""
    from datasets import Dataset

    if not any(isinstance(r.get("tools"), str) for r in rows):  # no row with tools (ToolRows made them JSON)
        return Dataset.from_list([{k: v for k, v in r.items() if k != "tools"} for r in rows])
    table = []
    for r in rows:
        tools = json.loads(r["tools"]) if r.get("tools") else None
        text = render_prompt(tokenizer, with_tools_header(r["prompt"], tools))
        table.append({**r, "prompt": _without_added_bos(tokenizer, text), "tools": r.get("tools") or None,
                      "prompt_messages": json.dumps(r["prompt"], ensure_ascii=False)})  # fmt: skip
    return Dataset.from_list(table)


def _without_added_bos(tokenizer: Any, text: str) -> str:
    """`text` less a leading BOS when the tokenizer adds one itself: GRPOTrainer tokenises text prompts with the
    special tokens, eval and serving without, so both see the same tokens."""
    bos = getattr(tokenizer, "bos_token", None)
    added = tokenizer("", add_special_tokens=True).input_ids
    if bos and added[:1] == [tokenizer.bos_token_id] and text.startswith(bos):
        return text[len(bos) :]
    return text


def turns_of(prompts: Sequence[Any], fields: dict[str, Any]) -> list[Any]:
    """The prompts as turns: the rows' `prompt_messages` (JSON text) where GRPO was given rendered prompts (rows
    with tools, train/preference/tool_rows.py), else the prompts themselves."""
    held = fields.get("prompt_messages")
    if not isinstance(held, list) or len(held) != len(prompts):
        return list(prompts)
    return [json.loads(m) if isinstance(m, str) else p for m, p in zip(held, prompts, strict=True)]

"""Reasoning models: `model.thinking` and the `<think>...</think>` block, from training data to eval and serving.

`model.thinking` applies to chat templates with a thinking switch (the `enable_thinking` variable of Qwen3 and
its successors). The setting is written into the chat template itself, as a one-line header that gives
`enable_thinking` its default, so the template stored with the trained model carries it to eval, export, the
GGUF and the server unchanged (one template everywhere):

- `keep`: reasoning in the data is trained as written (the `<think>` block of the assistant turn is in the loss);
  the model thinks by default at inference.
- `on`: the block is kept in the training text but masked from the loss: the model learns the answer
  given the reasoning, not the reasoning itself; it thinks by default at inference.
- `off`: `<think>` blocks are stripped from assistant messages before templating and `enable_thinking` defaults
  to false, so training and every later prompt use the template's non-thinking form.

Eval always scores the answer after the block (`answer_text`); the server returns the block's text as
`reasoning_content`, apart from `content` (`ReasoningSplitter`, also for streamed deltas).
"""

from __future__ import annotations

import re

from domaintune.errors import UserError

MODES = ("on", "off", "keep")
OPEN, CLOSE = "<think>", "</think>"
SWITCH = "enable_thinking"
_HEADER = re.compile(r"^\{#- domaintune model\.thinking: (on|off|keep) #\}\{%- if enable_thinking is not defined %\}"
                     r"\{%- set enable_thinking = (?:true|false) %\}\{%- endif %\}")  # fmt: skip
_BLOCK = re.compile(re.escape(OPEN) + r".*?" + re.escape(CLOSE) + r"\s*", re.DOTALL)


def header(mode: str) -> str:
    default = "false" if mode == "off" else "true"
    return (
        f"{{#- domaintune model.thinking: {mode} #}}{{%- if enable_thinking is not defined %}}"
        f"{{%- set enable_thinking = {default} %}}{{%- endif %}}"
    )


def thinking_mode(template: str | None) -> str | None:
    """The `model.thinking` a stored template was set up with (None: not set)."""
    match = _HEADER.match(template or "")
    return match.group(1) if match else None


def without_header(template: str) -> str:
    return _HEADER.sub("", template, count=1)


def has_switch(template: str | None) -> bool:
    return SWITCH in without_header(template or "")


def supports_reasoning(template: str | None) -> bool:
    """Whether answers under this template may open with a `<think>` block (the server then splits it off)."""
    return has_switch(template) or CLOSE in (template or "")


def apply_thinking_setting(tokenizer, mode: str | None, source: str) -> None:
    """Write `mode` into the tokenizer's chat template (replacing an earlier setting); None leaves it as it is."""
    if mode is None:
        return
    if mode not in MODES:
        raise UserError(f"model.thinking: {mode!r} is not one of {list(MODES)}")
    template = tokenizer.chat_template
    if not isinstance(template, str) or not has_switch(template):
        raise UserError(
            f"model.thinking: {mode!r} is set, but the chat template of {source} has no thinking switch "
            f"(no `{SWITCH}` variable, as Qwen3's has); remove model.thinking or use a reasoning model's template"
        )
    tokenizer.chat_template = header(mode) + without_header(template)


def strip_reasoning(messages: list[dict]) -> list[dict]:
    """Assistant messages without `<think>` blocks or a `reasoning_content` field (what `off` trains on)."""
    out = []
    for message in messages:
        if message.get("role") == "assistant":
            message = {k: v for k, v in message.items() if k != "reasoning_content"}
            if isinstance(message.get("content"), str):
                message["content"] = _BLOCK.sub("", message["content"])
        out.append(message)
    return out


def answer_text(text: str) -> str:
    """The answer after a leading reasoning block (what eval scores); text without a block is returned as is."""
    return split_reasoning(text)[1]


def split_reasoning(text: str, inside: bool = False) -> tuple[str | None, str]:
    """(reasoning, answer) of a model's output; reasoning is None when the output has no block.

    `inside`: the prompt already opened the block (it ends with `<think>`), so the output starts with reasoning."""
    splitter = ReasoningSplitter(inside)
    r1, c1 = splitter.feed(text)
    r2, c2 = splitter.finish()
    return (r1 + r2 if splitter.saw_reasoning else None), c1 + c2


class ReasoningSplitter:
    """Splits streamed output into reasoning and answer deltas, holding back text that may be part of a tag.

    The text between `<think>` and `</think>` is reasoning (without the newlines around it); the answer is what
    follows, without its leading blank lines. Output that does not open with `<think>` is all answer; a block
    never closed (cut by max_tokens) is all reasoning."""

    def __init__(self, inside: bool = False):
        self.state = "opened" if inside else "start"
        self.saw_reasoning = inside
        self.buffer = ""

    def feed(self, text: str) -> tuple[str, str]:
        """(reasoning delta, answer delta) for the next piece of output."""
        self.buffer += text
        reasoning, answer = "", ""
        while True:
            if self.state == "start":
                head = self.buffer.lstrip()
                if not head or (OPEN.startswith(head) and head != OPEN):
                    return reasoning, answer  # may still become `<think>`
                if head.startswith(OPEN):
                    self.state, self.saw_reasoning, self.buffer = "opened", True, head[len(OPEN) :]
                    continue
                self.state = "answer"
            if self.state == "opened":  # the newlines after `<think>` are not reasoning
                self.buffer = self.buffer.lstrip("\n")
                if not self.buffer:
                    return reasoning, answer
                self.state = "reasoning"
            if self.state == "reasoning":
                cut = self.buffer.find(CLOSE)
                if cut < 0:
                    keep = _held_back(self.buffer)
                    reasoning += self.buffer[: len(self.buffer) - keep]
                    self.buffer = self.buffer[len(self.buffer) - keep :]
                    return reasoning, answer
                reasoning += self.buffer[:cut].rstrip("\n")
                self.state, self.buffer = "after", self.buffer[cut + len(CLOSE) :]
            if self.state == "after":
                self.buffer = self.buffer.lstrip()
                if not self.buffer:
                    return reasoning, answer
                self.state = "answer"
            answer += self.buffer
            self.buffer = ""
            return reasoning, answer

    def finish(self) -> tuple[str, str]:
        """What is left at the end of the output."""
        rest, self.buffer = self.buffer, ""
        if self.state == "reasoning":
            return rest.rstrip("\n"), ""
        if self.state in ("opened", "after"):
            return "", ""
        return "", rest


def _held_back(buffer: str) -> int:
    """Length of the longest tail that may still turn into (newlines and) `</think>`."""
    for i in range(len(buffer)):
        tail = buffer[i:].lstrip("\n")
        if CLOSE.startswith(tail):
            return len(buffer) - i
    return 0

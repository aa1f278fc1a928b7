"""What every inference engine is: the `Engine` interface and the values that cross it.

A *backbone* is one set of weights in memory (the base model, or a full fine-tuned model);
LoRA adapters are attached to a backbone by name. Requests name a backbone and an adapter
(or none), carry already-tokenized prompts and receive their output as events on an asyncio
queue: ("delta", text) pieces, then ("done", Completion) or ("error", exception).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from domaintune.errors import UserError
from domaintune.serve.engines.guided import CallGrammar

DEFAULT_CONTEXT_LENGTH = 2048


@dataclass
class SamplingParams:
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    # transformers' rule: every token already in the prompt or the answer has its logit divided by it (multiplied
    # when negative), before temperature and top_p; 1.0 = none
    repetition_penalty: float = 1.0
    # the answer must follow this grammar (tool_choice `required` or a named function: one tool call); None: free
    grammar: CallGrammar | None = None


@dataclass
class Completion:
    text: str
    completion_tokens: int
    finish_reason: str  # stop | length | cancelled
    first_token_at: float | None


@dataclass
class GenRequest:
    id: str
    backbone: str
    adapter: str | None
    prompt_ids: list[int]
    params: SamplingParams
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue
    cancelled: threading.Event = field(default_factory=threading.Event)
    enqueued_at: float = field(default_factory=time.monotonic)
    solo: bool = False  # runs alone: a batch it was in failed as a whole

    def emit(self, kind: str, payload: Any) -> None:
        # RuntimeError: the event loop is closed, nobody is listening any more
        with contextlib.suppress(RuntimeError):
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, payload))


class QueueFullError(Exception):
    pass


@dataclass
class Backbone:
    key: str
    path: Path
    tokenizer: Any
    eot_ids: list[int]
    context_length: int
    adapters: dict[str, Path] = field(default_factory=dict)
    model: Any = None
    max_token_chars: int = 0  # the longest token's text: no prompt of n characters has fewer than n / this tokens


class Engine(ABC):
    """The interface the server uses; TransformersEngine and VLLMEngine implement it."""

    name = "engine"
    # Called with the size of each batch decoded, for metrics; engines that batch themselves call it.
    on_batch: Callable[[int], None] | None = None

    @abstractmethod
    def start(self) -> None:
        """Begin taking requests (after the weights are loaded)."""

    @abstractmethod
    def stop(self) -> None:
        """Stop taking requests; whatever is still queued gets an error event."""

    @abstractmethod
    def add_backbone(self, key: str, path: Path) -> Backbone: ...

    @abstractmethod
    def add_adapter(self, name: str, path: Path, backbone: str) -> None: ...

    @abstractmethod
    def remove_adapter(self, name: str) -> None: ...

    @abstractmethod
    def remove_backbone(self, key: str) -> None: ...

    @abstractmethod
    def backbone(self, key: str) -> Backbone: ...

    @abstractmethod
    def submit(self, request: GenRequest) -> None:
        """Queue a request; raises QueueFullError when it cannot be queued."""

    def queue_depth(self) -> int:
        """Requests waiting for (or, for engines without a queue, in) generation."""
        return 0

    def problems(self) -> list[str]:
        """Why the engine cannot serve requests now (for /readyz); empty when it can."""
        return []


def read_context_length(path: Path) -> int:
    config = json.loads((Path(path) / "config.json").read_text(encoding="utf-8"))
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        if isinstance(config.get(key), int):
            return config[key]
    return DEFAULT_CONTEXT_LENGTH


def max_token_chars(tokenizer: Any) -> int:
    """Characters of the longest vocabulary entry (0 when the vocabulary cannot be read)."""
    try:
        return max((len(token) for token in tokenizer.get_vocab()), default=0)
    except Exception:  # a tokenizer without a readable vocabulary: no early length check
        return 0


def load_tokenizer(path: Path) -> Any:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if not tokenizer.chat_template:
        raise UserError(f"{path}: the tokenizer has no chat template; cannot serve chat completions")
    return tokenizer

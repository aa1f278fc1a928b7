"""The chat arena: one prompt to two models (base, the run's tuned model, or a registry version), streamed.

Models are loaded with the same loaders the eval stage uses and kept (two at most) in this process.
"Save as correction" writes a request row and a feedback row into the project's serve store, the
store `domaintune feedback export` reads, so an expert's correction becomes next round's training data.
"""

from __future__ import annotations

import threading
import uuid
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from domaintune.config import ProjectConfig
from domaintune.errors import UserError

_LOCK = threading.Lock()
_CACHE: OrderedDict[str, tuple[Any, Any]] = OrderedDict()
_KEEP = 2


def model_choices(cfg: ProjectConfig) -> list[str]:
    """`base`, `tuned` when the run has a model, and `registry:<version>` for registered versions with one."""
    choices = ["base"]
    if cfg.layout.model_dir.is_dir():
        choices.append("tuned")
    try:
        from domaintune.registry import registry_from_config

        registry = registry_from_config(cfg)
        name = cfg.registry.name or cfg.name
        for row in registry.list(name, include_archived=False):
            choices.append(f"registry:{row['version']}")
    except Exception:  # no registry yet: base and tuned only
        pass
    return choices


def _model_dir(cfg: ProjectConfig, choice: str) -> Path | None:
    if choice == "base":
        return None
    if choice == "tuned":
        return cfg.layout.model_dir
    if choice.startswith("registry:"):
        from domaintune.registry import registry_from_config

        name = cfg.registry.name or cfg.name
        folder = registry_from_config(cfg).resolve(f"registry://{name}@{choice.split(':', 1)[1]}")
        return folder / "model" if (folder / "model").is_dir() else folder
    raise UserError(f"unknown model {choice!r}")


def _load(cfg: ProjectConfig, choice: str) -> tuple[Any, Any]:
    from domaintune.model.loader import load_model_and_tokenizer, load_trained

    folder = _model_dir(cfg, choice)
    cache_key = f"{cfg.model.name_or_path}|{folder}"
    with _LOCK:
        if cache_key in _CACHE:
            _CACHE.move_to_end(cache_key)
            return _CACHE[cache_key]
        model, tokenizer = load_model_and_tokenizer(cfg.model) if folder is None else load_trained(folder)
        model.eval()
        _CACHE[cache_key] = (model, tokenizer)
        while len(_CACHE) > _KEEP:
            _CACHE.popitem(last=False)
        return model, tokenizer


def messages_for(cfg: ProjectConfig, prompt: str) -> list[dict[str, str]]:
    system = cfg.data.system_prompt
    return ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]


def stream_answer(cfg: ProjectConfig, choice: str, prompt: str, max_new_tokens: int = 64) -> Iterator[str]:
    """Text pieces of the model's greedy answer as they are generated."""
    from transformers import TextIteratorStreamer

    from domaintune.model.loader import end_of_turn_token_ids

    model, tokenizer = _load(cfg, choice)
    inputs = tokenizer.apply_chat_template(
        messages_for(cfg, prompt), add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True, timeout=120)
    kwargs = dict(
        **inputs,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        streamer=streamer,
        eos_token_id=end_of_turn_token_ids(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
    )
    thread = threading.Thread(target=model.generate, kwargs=kwargs, daemon=True)
    thread.start()
    yield from streamer
    thread.join()


def save_correction(
    cfg: ProjectConfig, model: str, prompt: str, answer: str, correction: str, comment: str, user: str
) -> str:
    """A request row (the arena's prompt and answer) and a feedback row with the correction; PII redacted."""
    from domaintune.data.pii import redact_pii
    from domaintune.serve.store import Store, default_store_url

    if not correction.strip():
        raise UserError("the correction is empty")
    store = Store(cfg.serve.store_url or default_store_url(cfg.layout.root), cfg.serve.key_hash_iterations)
    request_id = f"studio-{uuid.uuid4().hex[:16]}"
    messages = [{**m, "content": redact_pii(m["content"])[0]} for m in messages_for(cfg, prompt)]
    try:
        store.log_request(
            id=request_id,
            key_id=None,
            endpoint="studio-arena",
            model=model,
            served=model,
            version=model,
            prompt=messages,
            response=redact_pii(answer)[0],
            status=200,
            outcome="ok",
            latency_s=0.0,
        )
        store.add_feedback(
            request_id, None, -1, redact_pii(correction)[0], redact_pii(f"[{user}] {comment}".strip())[0]
        )
    finally:
        store.engine.dispose()
    return request_id

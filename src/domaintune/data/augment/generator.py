"""Generators for augmentation: a local transformers model or an OpenAI-compatible endpoint.

Every call goes through `CachedGenerator`: results are cached on disk by a hash of the generator's
identity, its settings and the chat messages, appended after every batch, so a re-run (or a run
resumed after an interruption) does not regenerate anything already done. A failure on one item
is returned as a `GenerationError` for that item; the other items go on.
"""

from __future__ import annotations

import hashlib
import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from domaintune.data.augment.config import GeneratorConfig
from domaintune.errors import UserError

Messages = list[dict[str, str]]


class GenerationError(Exception):
    """Generation failed for one item (the reason goes to the quarantine)."""


class LocalGenerator:
    """Batched `model.generate` with left padding, stopping at the template's end-of-turn tokens."""

    def __init__(self, gcfg: GeneratorConfig, model_cfg: Any):
        from domaintune.model.config import ModelConfig

        base = model_cfg if model_cfg is not None else ModelConfig()
        self.model_cfg = base if gcfg.model is None else base.model_copy(update={"name_or_path": gcfg.model})
        self.gcfg = gcfg
        self.identity = f"local:{self.model_cfg.name_or_path}"
        self._model: Any = None  # loaded on first use
        self._tok: Any = None

    def _load(self) -> None:
        if self._model is not None:
            return
        import torch

        from domaintune.model.loader import end_of_turn_token_ids, load_model_and_tokenizer

        if self.gcfg.num_threads:
            torch.set_num_threads(self.gcfg.num_threads)
        self._model, self._tok = load_model_and_tokenizer(self.model_cfg)
        self._model.eval()
        self._tok.padding_side = "left"
        if self._tok.pad_token_id is None:
            self._tok.pad_token = self._tok.eos_token
        self._eot = end_of_turn_token_ids(self._tok)

    def generate(self, batch: list[Messages]) -> list[str | GenerationError]:
        import torch

        self._load()
        out: list[str | GenerationError] = [GenerationError("not generated")] * len(batch)
        prompts, index = [], []
        for i, messages in enumerate(batch):
            text = self._tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            n = len(self._tok(text, add_special_tokens=False)["input_ids"])
            if n > self.gcfg.max_input_tokens:
                out[i] = GenerationError(
                    f"prompt has {n} tokens > generator.max_input_tokens {self.gcfg.max_input_tokens}"
                )
                continue
            prompts.append(text)
            index.append(i)
        if not prompts:
            return out
        enc = self._tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
        kwargs: dict[str, Any] = {
            "max_new_tokens": self.gcfg.max_new_tokens,
            "eos_token_id": self._eot,
            "pad_token_id": self._tok.pad_token_id,
        }
        if self.gcfg.temperature > 0:
            torch.manual_seed(self.gcfg.seed)
            kwargs.update(do_sample=True, temperature=self.gcfg.temperature)
        else:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        try:
            with torch.inference_mode():
                gen = self._model.generate(**enc, **kwargs)
        except Exception as e:  # a batch failure: fail its items, the run goes on
            for i in index:
                out[i] = GenerationError(f"generate failed: {type(e).__name__}: {e}")
            return out
        new = gen[:, enc["input_ids"].shape[1] :]
        for i, ids in zip(index, new.tolist()):
            cut = next((k for k, t in enumerate(ids) if t in self._eot), len(ids))
            out[i] = self._tok.decode(ids[:cut], skip_special_tokens=True).strip()
        return out


class OpenAIGenerator:
    """Chat completions through the official `openai` client, `batch_size` requests at a time."""

    def __init__(self, gcfg: GeneratorConfig):
        import os

        from openai import OpenAI

        key = "EMPTY"
        if gcfg.api_key_env:
            key = os.environ.get(gcfg.api_key_env, "")
            if not key:
                raise UserError(f"data.augment generator: environment variable {gcfg.api_key_env} is not set")
        self.gcfg = gcfg
        self.identity = f"openai:{gcfg.base_url}:{gcfg.model}"
        self.client = OpenAI(base_url=gcfg.base_url, api_key=key, max_retries=1, timeout=gcfg.timeout_s)

    def _one(self, messages: Messages) -> str | GenerationError:
        kwargs: dict[str, Any] = {
            "model": self.gcfg.model,
            "messages": messages,
            "max_tokens": self.gcfg.max_new_tokens,
            "temperature": self.gcfg.temperature,
        }
        if self.gcfg.temperature > 0:
            kwargs["seed"] = self.gcfg.seed
        try:
            resp = self.client.chat.completions.create(**kwargs)
        except Exception as e:
            return GenerationError(f"endpoint error: {type(e).__name__}: {e}"[:500])
        content = resp.choices[0].message.content if resp.choices else None
        if content is None:
            return GenerationError("endpoint returned no content")
        return content.strip()

    def generate(self, batch: list[Messages]) -> list[str | GenerationError]:
        with ThreadPoolExecutor(max_workers=min(len(batch), self.gcfg.batch_size) or 1) as pool:
            return list(pool.map(self._one, batch))


def make_generator(gcfg: GeneratorConfig, model_cfg: Any):
    return LocalGenerator(gcfg, model_cfg) if gcfg.kind == "local" else OpenAIGenerator(gcfg)


class CachedGenerator:
    """Cache by input hash in `<cache_dir>/generations.jsonl` (appended per batch: resumable)."""

    def __init__(self, inner, gcfg: GeneratorConfig, cache_dir: Path):
        self.inner = inner
        self.gcfg = gcfg
        cache_dir.mkdir(parents=True, exist_ok=True)
        self.path = cache_dir / "generations.jsonl"
        self.cache: dict[str, str] = {}
        if self.path.exists():
            with self.path.open(encoding="utf-8") as fh:
                for line in fh:
                    try:
                        entry = json.loads(line)
                    except json.JSONDecodeError:  # a line cut by an interruption: regenerate it
                        continue
                    self.cache[entry["key"]] = entry["text"]
        self.hits = 0
        self.generated = 0
        self.failed = 0

    def key(self, messages: Messages) -> str:
        settings = {
            "id": self.inner.identity,
            "max_new_tokens": self.gcfg.max_new_tokens,
            "temperature": self.gcfg.temperature,
            "seed": self.gcfg.seed,
            "messages": messages,
        }
        return hashlib.sha256(json.dumps(settings, sort_keys=True, ensure_ascii=False).encode()).hexdigest()

    def generate(
        self, items: list[Messages], progress=None, description: str = "generating"
    ) -> list[str | GenerationError]:
        """All items, cached ones first from disk, the rest in batches of `batch_size`."""
        keys = [self.key(m) for m in items]
        out: list[str | GenerationError | None] = [self.cache.get(k) for k in keys]
        todo = [i for i, v in enumerate(out) if v is None]
        self.hits += len(items) - len(todo)
        task = progress.add_task(description, total=len(items)) if progress is not None else None
        if task is not None:
            progress.advance(task, len(items) - len(todo))
        bs = self.gcfg.batch_size
        with self.path.open("a", encoding="utf-8") as fh:
            for start in range(0, len(todo), bs):
                chunk = todo[start : start + bs]
                results = self.inner.generate([items[i] for i in chunk])
                for i, res in zip(chunk, results):
                    out[i] = res
                    if isinstance(res, GenerationError):
                        self.failed += 1
                        continue
                    self.generated += 1
                    self.cache[keys[i]] = res
                    fh.write(json.dumps({"key": keys[i], "text": res}, ensure_ascii=False) + "\n")
                fh.flush()
                if task is not None:
                    progress.advance(task, len(chunk))
        return out  # type: ignore[return-value]

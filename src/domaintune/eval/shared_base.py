"""The base model's answers and reference perplexities shared by several runs' evals (a sweep's trials).

Every trial of a sweep evaluates the same base model on (usually) the same prompts with the same decoding, so
its base rows are computed once: `SharedBase` seeds a run's eval caches with the base rows other runs stored
in `<folder>/<digest>/`, and stores the run's own base rows there after it answered. Only rows of the model
named `base` travel (a tuned model is never shared). A row is found only under its full cache key (the base
model's identity: folder fingerprint, chat template, engine; the prompt, or prompt and reference; the decoding
or perplexity settings), and the folder `<digest>` is a digest of every setting that can change a base answer
or score without appearing in that key (the whole `model` section, the whole `eval.decoding` section, the
engine setting, the perplexity length and the seed), so a run that changes any of them uses another folder.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from domaintune.eval.items import JsonlCache

if TYPE_CHECKING:
    from domaintune.config import ProjectConfig

BASE = "base"


def shared_digest(cfg: ProjectConfig, seed: int) -> str:
    """A digest of the settings that can change a base answer or perplexity besides the rows' cache keys."""
    settings: dict[str, Any] = {
        "model": cfg.model.model_dump(mode="json"),
        "decoding": cfg.eval.decoding.model_dump(mode="json"),
        "engine": cfg.eval.engine,
        "perplexity_max_tokens": cfg.eval.perplexity_max_tokens,
        "seed": seed,
    }
    blob = json.dumps(settings, sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:16]


class SharedBase:
    """The shared copies of the base rows: predictions.jsonl and perplexity.jsonl in `<folder>/<digest>/`."""

    def __init__(self, folder: Path, cfg: ProjectConfig, seed: int):
        self.folder = Path(folder) / shared_digest(cfg, seed)
        self.answers = JsonlCache(self.folder / "predictions.jsonl")
        self.nll = JsonlCache(self.folder / "perplexity.jsonl")
        self.seeded = 0  # rows copied into this run's caches

    def seed(self, answers: JsonlCache, nll: JsonlCache) -> None:
        """Copy the shared base rows this run's caches lack into them (a key it already has is kept)."""
        for shared, own in ((self.answers, answers), (self.nll, nll)):
            for key, row in shared.rows.items():
                if row.get("model") == BASE and key not in own.rows:
                    own.put(row)
                    self.seeded += 1

    def store(self, answers: JsonlCache, nll: JsonlCache) -> None:
        """Add this run's base rows to the shared copies (rows of other models stay out)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        for own, shared in ((answers, self.answers), (nll, self.nll)):
            new = [row for key, row in own.rows.items() if row.get("model") == BASE and key not in shared.rows]
            for row in new:
                shared.put(row)
            if new or not shared.path.is_file():
                shared.save()

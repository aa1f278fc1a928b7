"""Shared helpers for the train stage's tests: small real JSONL run folders and configs on the tiny model."""

from __future__ import annotations

import json
import random
from pathlib import Path

from domaintune.config import config_from_dict

# A two-turn chat (Chinese and English) for the masking and loss tests.
CONVERSATION = [
    {"role": "system", "content": "You are a careful doctor."},
    {"role": "user", "content": "头痛怎么办？"},
    {"role": "assistant", "content": "多休息，多喝水。"},
    {"role": "user", "content": "What else?"},
    {"role": "assistant", "content": "See a doctor if it lasts."},
]


def qa_row(i: int, rng: random.Random, source: str = "domain") -> dict:
    a, b = rng.randint(1, 9), rng.randint(1, 9)
    return {
        "id": f"{source}-{i}",
        "messages": [
            {"role": "system", "content": "You are a calculator."},
            {"role": "user", "content": f"What is {a} plus {b}?"},
            {"role": "assistant", "content": f"{a} plus {b} is {a + b}."},
        ],
        "source": source,
    }


def make_run_dir(root: Path, n_train: int = 32, n_val: int = 8, n_general: int = 12, seed: int = 0) -> Path:
    rng = random.Random(seed)
    data = root / "data"
    data.mkdir(parents=True, exist_ok=True)
    for name, n, source in (("train", n_train, "domain"), ("val", n_val, "domain"), ("general", n_general, "general")):
        rows = [qa_row(i, rng, source) for i in range(n)]
        (data / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return root


def tiny_config(**train):
    base = {
        "max_steps": 2,
        "eval_steps": 2,
        "save_steps": 2,
        "batch_size": 4,
        "max_length": 64,
        "learning_rate": 1e-3,
        "max_val_samples": 4,
        "logging_steps": 1,
        "tracking": "none",
    }
    base.update(train)
    return config_from_dict({"name": "t", "model": {"name_or_path": "tiny-random-llama"}, "train": base})

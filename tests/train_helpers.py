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


def one_line(text: str) -> str:
    """CLI output with every run of whitespace made one space: rich wraps lines at the terminal's width (and long
    tmp paths move the breaks), so phrases are looked for in this, never in the wrapped text."""
    return " ".join(text.split())


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
        "precision": "fp32",  # the same arithmetic on every CPU (`auto` would pick bf16 where it is native)
    }
    base.update(train)
    return config_from_dict({"name": "t", "model": {"name_or_path": "tiny-random-llama"}, "train": base})


# ---------------------------------------------------------------------------------------------- speed levers

N_LINEAR_LORA_LAYERS = 14  # tiny Llama: 7 linear layers x 2 decoder layers
# What `keep_freed_buffers` sets on Linux/glibc (and train/metrics.json records under device.allocator).
KEPT_MALLOC = {
    "malloc": "glibc: freed buffers kept for reuse",
    "mmap_threshold": 32 * 1024 * 1024,
    "trim_threshold": 2**31 - 1,
    "top_pad": 256 * 1024 * 1024,
}


def is_glibc_linux() -> bool:
    import platform

    return platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"


def lora_model(tiny_model_dir, dropout: float):
    """peft LoRA (r=4) on every linear layer of the tiny model."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    base.config.use_cache = False
    return get_peft_model(
        base, LoraConfig(r=4, lora_dropout=dropout, target_modules="all-linear", task_type="CAUSAL_LM")
    )


def lora_layers(model):
    from peft.tuners.lora import LoraLayer

    return [m for m in model.modules() if isinstance(m, LoraLayer)]


def graph_nodes(tensor, name: str) -> int:
    """How many nodes called `name` the autograd graph behind `tensor` holds."""
    seen, stack, count = set(), [tensor.grad_fn], 0
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        count += type(node).__name__ == name
        stack.extend(next_fn for next_fn, _ in node.next_functions)
    return count


def relative_error(got, want) -> float:
    return float((got.float() - want.float()).norm() / want.float().norm())

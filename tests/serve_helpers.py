"""Shared helpers of the serve tests: tiny LoRA adapters and a project config for the tiny model."""

from __future__ import annotations

from pathlib import Path


def make_tiny_adapter(base_dir: Path, out_dir: Path, seed: int) -> Path:
    """A LoRA adapter on the tiny model with random (non-zero) weights, so it changes the outputs."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base_dir)
    peft_model = get_peft_model(
        model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    )
    peft_model.save_pretrained(out_dir)
    return out_dir


def serve_config(output_dir: Path, serve: dict | None = None, **extra):
    from domaintune.config import config_from_dict

    section = {
        "max_context_tokens": 256,
        "default_max_tokens": 16,
        "max_tokens_cap": 64,
        "key_hash_iterations": 1000,
        "batch_wait_ms": 20,
        "max_body_bytes": 20_000,
    }
    section.update(serve or {})
    data = {
        "name": "tiny",
        "output_dir": str(output_dir),
        "model": {"name_or_path": "tiny-random-llama"},
        "serve": section,
    }
    data.update(extra)
    return config_from_dict(data)

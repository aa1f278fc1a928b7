"""Attention for CPU training: transformers' eager attention with fewer passes over the score matrix.

On a CPU, torch's SDPA kernel for bf16 has a slow backward, and transformers' eager attention makes five
passes over the [batch, heads, query, key] scores (scale, add the mask, fp32 softmax, cast back to bf16, and
the dropout call). This one scales the queries instead of the scores (exact when the scale is a power of two,
as for head size 64 or 256), adds the mask in place, and softmaxes in the input dtype (torch's CPU softmax
accumulates bf16 in fp32 and rounds the result, as eager's fp32 softmax followed by `.to(bf16)`).
Registered with transformers' `AttentionInterface` under `ATTENTION_NAME`, with the eager (additive float)
mask. Attention dropout is not supported (the model's `attention_dropout` must be 0: checked).
`select_attention` puts it (or the configured kernel) on a model.
"""

from __future__ import annotations

import torch

from domaintune.errors import UserError

ATTENTION_NAME = "domaintune_cpu"
# Architectures whose attention modules call the attention interface as Llama does (no soft-capping, sinks
# or other extras), so `cpu_attention_forward` computes exactly what their eager attention does.
_CPU_ATTENTION_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")


def _repeat_kv(states: torch.Tensor, groups: int) -> torch.Tensor:
    if groups == 1:
        return states
    b, kv, s, d = states.shape
    return states[:, :, None].expand(b, kv, groups, s, d).reshape(b, kv * groups, s, d)


def cpu_attention_forward(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    if dropout and module.training:
        raise ValueError(f"{ATTENTION_NAME} attention does not implement attention dropout ({dropout})")
    if kwargs.get("softcap") is not None or kwargs.get("s_aux") is not None:
        raise ValueError(f"{ATTENTION_NAME} attention does not implement soft-capping or attention sinks")
    groups = query.shape[1] // key.shape[1]
    key = _repeat_kv(key, groups)
    value = _repeat_kv(value, groups)
    scores = torch.matmul(query * scaling, key.transpose(2, 3))
    if attention_mask is not None:
        scores = scores.add_(attention_mask[:, :, :, : key.shape[-2]])
    weights = torch.softmax(scores, dim=-1)
    out = torch.matmul(weights, value)
    return out.transpose(1, 2).contiguous(), weights


def register() -> str:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    AttentionInterface.register(ATTENTION_NAME, cpu_attention_forward)
    AttentionMaskInterface.register(ATTENTION_NAME, eager_mask)
    return ATTENTION_NAME


def auto_choice(config) -> tuple[str | None, str]:
    """What `attention: auto` picks for a model config: (ATTENTION_NAME, why), or (None, why the model's own stays)."""
    if torch.cuda.is_available():
        return None, "auto on a CUDA machine: the model's default"
    if config.model_type not in _CPU_ATTENTION_MODEL_TYPES:
        return None, f"auto: model type {config.model_type} is not one {ATTENTION_NAME} matches exactly"
    if getattr(config, "attention_dropout", 0.0):
        return None, f"auto: the model sets attention_dropout={config.attention_dropout}, which {ATTENTION_NAME} lacks"
    return ATTENTION_NAME, f"auto: CPU training of a {config.model_type} model without attention dropout"


def select_attention(model, choice: str) -> str:
    """Set the model's attention implementation for training; returns the one in use."""
    if choice == "auto":
        picked, _ = auto_choice(model.config)
        if picked is None:
            return model.config._attn_implementation
        choice = picked
    if choice == ATTENTION_NAME:
        register()
        if getattr(model.config, "attention_dropout", 0.0):
            raise UserError(
                f"train.speed.attention: {ATTENTION_NAME} has no attention dropout; the model sets "
                f"attention_dropout={model.config.attention_dropout} (use sdpa or eager)"
            )
    model.set_attn_implementation(choice)
    return choice

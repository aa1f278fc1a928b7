"""Attention for CPU training: transformers' eager attention with fewer passes over the score matrix.

On a CPU, torch's SDPA kernel for bf16 has a slow backward, and transformers' eager attention makes five
passes over the [batch, heads, query, key] scores (scale, add the mask, fp32 softmax, cast back to bf16, and
the dropout call). This one scales the queries instead of the scores (exact when the scale is a power of two,
as for head size 64 or 256), adds the mask in place, and softmaxes in the input dtype (torch's CPU softmax
accumulates bf16 in fp32 and rounds the result, as eager's fp32 softmax followed by `.to(bf16)`).
Registered with transformers' `AttentionInterface` under `ATTENTION_NAME`, with the eager (additive float)
mask. Attention dropout is not supported (the model's `attention_dropout` must be 0: checked).
"""

from __future__ import annotations

import torch

ATTENTION_NAME = "domaintune_cpu"


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

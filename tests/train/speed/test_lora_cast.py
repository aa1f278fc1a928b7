"""`skip_lora_input_cast` (train/speed/lora_cast.py): under bf16 autocast LoRA layers take bf16 input directly."""

from __future__ import annotations

import torch

from domaintune.train import speed
from domaintune.train.config import TrainConfig
from domaintune.train.methods import build_trainable
from train_helpers import N_LINEAR_LORA_LAYERS


def test_bf16_lora_skips_the_input_cast_with_the_same_loss_and_gradients(tiny_model_dir):
    """Under bf16 autocast the LoRA layers take bf16 input directly: same loss, same adapter gradients."""
    torch.manual_seed(0)
    cfg = TrainConfig(precision="bf16", lora={"dropout": 0.0})
    model, _ = build_trainable("lora", cfg, tiny_model_dir, None, "bfloat16")
    info = speed.apply(model, cfg)
    assert info["lora_input_cast"] == N_LINEAR_LORA_LAYERS  # 7 linear layers x 2 decoder layers
    with torch.no_grad():  # a trained-looking adapter, so its path changes the loss
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.05)
    ids = torch.randint(0, 1000, (2, 16))
    inputs = {"input_ids": ids, "labels": ids}

    def loss_and_grads():
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(**inputs).loss
        loss.backward()
        return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    skipped = loss_and_grads()
    for module in model.modules():
        if hasattr(module, "cast_input_dtype_enabled"):
            module.cast_input_dtype_enabled = True  # peft's default: cast to fp32, autocast casts back
    cast = loss_and_grads()
    assert skipped[0] == cast[0]
    assert skipped[1].keys() == cast[1].keys() and len(cast[1]) == 28
    for name, grad in cast[1].items():
        assert grad.abs().sum() > 0
        torch.testing.assert_close(skipped[1][name], grad, rtol=0.02, atol=1e-4)

"""`CheapMaskDropout` (train/speed/fast_dropout.py): LoRA input dropout from 16 random bits per element.

Same drop law and scaling as `nn.Dropout`, right gradient, reproducible under `torch.manual_seed`, and
`speed.apply` installs it only when `train.speed.cheap_mask_dropout` is on.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from domaintune.train import speed
from domaintune.train.config import TrainConfig
from domaintune.train.methods import build_trainable
from domaintune.train.speed.fast_dropout import CheapMaskDropout, cheap_keep_mask, use_cheap_mask_dropout
from train_helpers import N_LINEAR_LORA_LAYERS, lora_layers, lora_model


def _effective_p(p: float) -> float:
    return round(p * 65536) / 65536


def _assert_binomial(dropped: int, n: int, p: float):
    sigma = math.sqrt(n * p * (1 - p))
    assert abs(dropped - n * p) < 5 * sigma, f"dropped {dropped} of {n}, expected {n * p:.0f} +- {5 * sigma:.0f}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cheap_mask_drops_at_rate_p_and_scales_kept_elements_like_nn_dropout(dtype):
    p = 0.05
    n = 1 << 20
    x = (torch.rand(n) + 0.5).to(dtype)  # no zeros: y == 0 means dropped
    drop = CheapMaskDropout(p).train()
    y = drop(x)
    assert y.dtype == dtype and y.shape == x.shape
    dropped = y == 0
    _assert_binomial(int(dropped.sum()), n, _effective_p(p))
    # Each of the four 16-bit lanes of a 64-bit draw is uniform on its own (a lane left short of random bits
    # would drop at a different rate).
    for lane in range(4):
        _assert_binomial(int(dropped[lane::4].sum()), n // 4, _effective_p(p))
    kept = ~dropped
    scale = torch.tensor(1.0 / (1.0 - p), dtype=dtype)
    assert torch.equal(y[kept], (x * scale)[kept])
    # nn.Dropout scales by the same value in this dtype: elements both keep are identical.
    ref = nn.Dropout(p).train()(x)
    both = kept & (ref != 0)
    assert both.sum() > 0.8 * n
    assert torch.equal(y[both], ref[both])


def test_cheap_mask_is_fresh_each_call_and_follows_torch_manual_seed():
    drop = CheapMaskDropout(0.1).train()
    x = torch.rand(4096) + 0.5
    a, b = drop(x), drop(x)
    assert not torch.equal(a == 0, b == 0)
    torch.manual_seed(1234)
    first = drop(x)
    torch.manual_seed(1234)
    again = drop(x)
    assert torch.equal(first, again)
    torch.manual_seed(4321)
    assert not torch.equal(drop(x), first)


@pytest.mark.parametrize("shape", [(7, 13), (1,), (3, 5, 1), (0, 4)])
def test_cheap_mask_handles_any_number_of_elements(shape):
    p = 0.5
    x = torch.rand(shape) + 0.5
    y = CheapMaskDropout(p).train()(x)
    assert y.shape == x.shape
    assert torch.equal(y[y != 0], (x * torch.tensor(1 / (1 - p)))[y != 0])
    if x.numel() >= 91:
        assert 0 < int((y == 0).sum()) < x.numel()


def test_cheap_mask_on_non_contiguous_input():
    p = 0.3
    x = (torch.rand(64, 96) + 0.5).t()
    assert not x.is_contiguous()
    y = CheapMaskDropout(p).train()(x)
    kept = y != 0
    assert torch.equal(y[kept], (x * torch.tensor(1 / (1 - p)))[kept])
    _assert_binomial(int((~kept).sum()), x.numel(), _effective_p(p))


def test_cheap_mask_gradient_is_the_scaled_mask():
    p = 0.2
    x = (torch.rand(50, 40) + 0.5).requires_grad_()
    g = torch.randn(50, 40)
    y = CheapMaskDropout(p).train()(x)
    y.backward(g)
    kept = y.detach() != 0
    assert 0 < int(kept.sum()) < kept.numel()
    torch.testing.assert_close(x.grad, g * kept / (1 - p), rtol=1e-6, atol=0)
    assert torch.equal(x.grad, g * torch.where(kept, torch.tensor(1 / (1 - p)), torch.tensor(0.0)))


def test_cheap_mask_is_identity_in_eval_mode_and_for_p_zero():
    x = torch.rand(1000) + 0.5
    assert torch.equal(CheapMaskDropout(0.3).eval()(x), x)
    assert torch.equal(CheapMaskDropout(0.0).train()(x), x)
    assert torch.equal(CheapMaskDropout(1.0).train()(x), torch.zeros_like(x))


def test_cheap_mask_drops_nearly_everything_for_p_close_to_one():
    # round(p * 65536) == 65536 here: the int16 threshold would wrap to -32768 and keep everything.
    p = 0.999996
    x = torch.rand(10000) + 0.5
    y = CheapMaskDropout(p).train()(x)
    assert int((y == 0).sum()) >= 9990  # nn.Dropout(p) drops all but ~0.04 of them


def test_use_cheap_mask_dropout_replaces_every_lora_dropout(tiny_model_dir):
    torch.manual_seed(0)
    model = lora_model(tiny_model_dir, 0.1)
    layers = lora_layers(model)
    assert len(layers) == N_LINEAR_LORA_LAYERS
    model.train()
    assert use_cheap_mask_dropout(model) == N_LINEAR_LORA_LAYERS
    for layer in layers:
        dropout = layer.lora_dropout["default"]
        assert type(dropout) is CheapMaskDropout and dropout.p == 0.1 and dropout.training
    assert use_cheap_mask_dropout(model) == 0  # already replaced
    # The replaced dropouts are live in the model: with a non-zero adapter, training forwards are random and
    # governed by torch.manual_seed, eval forwards deterministic.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.5)
    ids = torch.randint(0, 1000, (2, 12))
    with torch.no_grad():
        torch.manual_seed(5)
        a = model(input_ids=ids).logits
        b = model(input_ids=ids).logits
        torch.manual_seed(5)
        a_again = model(input_ids=ids).logits
        model.eval()
        e1, e2 = model(input_ids=ids).logits, model(input_ids=ids).logits
    assert not torch.equal(a, b)
    assert torch.equal(a, a_again)
    assert torch.equal(e1, e2)


def test_use_cheap_mask_dropout_leaves_zero_dropout_alone(tiny_model_dir):
    model = lora_model(tiny_model_dir, 0.0)
    assert use_cheap_mask_dropout(model) == 0
    assert all(type(layer.lora_dropout["default"]) is nn.Identity for layer in lora_layers(model))


@pytest.mark.parametrize("cheap", [True, False])
def test_speed_apply_follows_the_cheap_mask_dropout_setting(tiny_model_dir, cheap):
    cfg = TrainConfig(precision="fp32", lora={"dropout": 0.1}, speed={"cheap_mask_dropout": cheap})
    model, _ = build_trainable("lora", cfg, tiny_model_dir, None, "float32")
    info = speed.apply(model, cfg)
    dropouts = [layer.lora_dropout["default"] for layer in lora_layers(model)]
    assert len(dropouts) == N_LINEAR_LORA_LAYERS
    expected = CheapMaskDropout if cheap else nn.Dropout
    assert all(type(d) is expected and d.p == 0.1 for d in dropouts)
    assert info.get("cheap_mask_dropout") == (N_LINEAR_LORA_LAYERS if cheap else None)


@pytest.mark.parametrize("p", [0.05, 0.1, 0.5])
def test_fp32_mask_is_the_comparison_of_the_same_random_bits(p):
    """The fp32 integer path gives exactly what comparing the same 16-bit draws with the threshold gives."""
    x = torch.ones(10_001)
    torch.manual_seed(3)
    fast = cheap_keep_mask(x, p)
    torch.manual_seed(3)
    bits = torch.empty((x.numel() + 3) // 4, dtype=torch.int64).random_(-(2**63), None).view(torch.int16)
    threshold = round(p * 65536) - 32768
    keep = torch.tensor(1.0 / (1.0 - p), dtype=torch.float32)
    assert torch.equal(fast, torch.where(bits[: x.numel()] >= threshold, keep, torch.zeros(())))

"""`use_fused_lora_linear` (train/speed/fused_lora.py): one autograd node per plain peft lora.Linear.

The same loss and gradients as peft in fp32 (with dropout: same masks), no worse than peft under bf16 autocast,
and peft's own forward for eval, DoRA and a trained base weight; `speed.apply` installs it only when
`train.speed.fused_lora_linear` is on.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from domaintune.train import speed
from domaintune.train.config import TrainConfig
from domaintune.train.methods import build_trainable
from domaintune.train.speed.fast_dropout import use_cheap_mask_dropout
from domaintune.train.speed.fused_lora import use_fused_lora_linear
from train_helpers import N_LINEAR_LORA_LAYERS, graph_nodes, relative_error


def _fusablelora_model(tiny_model_dir, dropout: float, use_dora: bool = False):
    """A peft LoRA model with a non-zero adapter (lora_B ~ N(0, 0.1)) and cheap-mask dropout, as in training."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    base.config.use_cache = False
    model = get_peft_model(
        base,
        LoraConfig(
            r=4,
            lora_alpha=8,
            lora_dropout=dropout,
            target_modules="all-linear",
            task_type="CAUSAL_LM",
            use_dora=use_dora,
        ),
    )
    for name, param in model.named_parameters():
        if "lora_B" in name:
            nn.init.normal_(param, std=0.1)
    use_cheap_mask_dropout(model)
    return model.train()


_FUSED_NODE = "LoraLinearFunctionBackward"
_IDS = torch.randint(0, 1000, (2, 10), generator=torch.Generator().manual_seed(3))


def _train_forward(model, seed=7, autocast=False, ids=_IDS):
    """(loss, {name: grad}) of one seeded training forward + backward."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = model(input_ids=ids, labels=ids).loss
    nodes = graph_nodes(loss, _FUSED_NODE)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach().float(), grads, nodes


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_fused_lora_linear_matches_peft_loss_and_gradients_in_fp32(tiny_model_dir, dropout):
    model = _fusablelora_model(tiny_model_dir, dropout)
    reference = copy.deepcopy(model)
    assert use_fused_lora_linear(model) == N_LINEAR_LORA_LAYERS
    loss_ref, grads_ref, nodes_ref = _train_forward(reference)
    loss, grads, nodes = _train_forward(model)
    assert nodes_ref == 0 and nodes == N_LINEAR_LORA_LAYERS  # every LoRA layer ran as one fused node
    torch.testing.assert_close(loss, loss_ref, rtol=1e-5, atol=1e-6)
    assert grads.keys() == grads_ref.keys()
    assert len(grads) == 2 * N_LINEAR_LORA_LAYERS and all("lora_" in n for n in grads)
    for name, want in grads_ref.items():
        assert want.abs().max() > 0, name
        assert relative_error(grads[name], want) < 1e-5, name
    if dropout:  # the masks really drop: another seed gives another loss, on both paths alike
        other, _, _ = _train_forward(model, seed=8)
        other_ref, _, _ = _train_forward(reference, seed=8)
        assert not torch.equal(other, loss)
        torch.testing.assert_close(other, other_ref, rtol=1e-5, atol=1e-6)


def test_fused_lora_linear_under_bf16_autocast_is_as_close_to_fp32_as_peft(tiny_model_dir):
    model = _fusablelora_model(tiny_model_dir, 0.1)
    unfused = copy.deepcopy(model)
    use_fused_lora_linear(model)
    loss32, grads32, _ = _train_forward(unfused)
    loss_peft, grads_peft, _ = _train_forward(unfused, autocast=True)
    loss_fused, grads_fused, nodes = _train_forward(model, autocast=True)
    assert nodes == N_LINEAR_LORA_LAYERS
    names = sorted(grads32)
    assert grads_fused.keys() == grads32.keys()
    assert all(grads_fused[n].dtype == torch.float32 for n in names)  # adapter grads in the adapters' dtype

    def flat(grads):
        return torch.cat([grads[n].float().flatten() for n in names])

    err_peft = relative_error(flat(grads_peft), flat(grads32))
    err_fused = relative_error(flat(grads_fused), flat(grads32))
    assert 0 < err_peft < 0.05  # bf16 really changed the numbers, but only by rounding
    assert err_fused <= 1.5 * err_peft, f"fused bf16 error {err_fused:.3g} vs peft bf16 error {err_peft:.3g}"
    assert abs(float(loss_fused) - float(loss32)) <= max(1.5 * abs(float(loss_peft) - float(loss32)), 1e-3)


def test_fused_lora_linear_leaves_eval_mode_to_peft(tiny_model_dir):
    model = _fusablelora_model(tiny_model_dir, 0.1)
    reference = copy.deepcopy(model)
    use_fused_lora_linear(model)
    model.eval(), reference.eval()
    out = model(input_ids=_IDS).logits
    assert graph_nodes(out, _FUSED_NODE) == 0
    assert torch.equal(out, reference(input_ids=_IDS).logits)


def test_fused_lora_linear_leaves_dora_to_peft(tiny_model_dir):
    model = _fusablelora_model(tiny_model_dir, 0.0, use_dora=True)
    reference = copy.deepcopy(model)
    use_fused_lora_linear(model)
    loss_ref, grads_ref, _ = _train_forward(reference)
    loss, grads, nodes = _train_forward(model)
    assert nodes == 0
    assert torch.equal(loss, loss_ref)
    assert any("magnitude" in n for n in grads)
    for name, want in grads_ref.items():
        assert torch.equal(grads[name], want), name


def test_fused_lora_linear_falls_back_when_the_base_weight_trains(tiny_model_dir):
    model = _fusablelora_model(tiny_model_dir, 0.1)
    trained = "base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight"
    dict(model.named_parameters())[trained].requires_grad_(True)
    reference = copy.deepcopy(model)
    use_fused_lora_linear(model)
    loss_ref, grads_ref, _ = _train_forward(reference)
    loss, grads, nodes = _train_forward(model)
    assert nodes == N_LINEAR_LORA_LAYERS - 1  # only that layer went to peft
    assert trained in grads and grads[trained].abs().max() > 0
    torch.testing.assert_close(loss, loss_ref, rtol=1e-5, atol=1e-6)
    assert grads.keys() == grads_ref.keys()
    for name, want in grads_ref.items():
        assert relative_error(grads[name], want) < 1e-5, name


@pytest.mark.parametrize("fused", [True, False])
def test_speed_apply_follows_the_fused_lora_linear_setting(tiny_model_dir, fused):
    cfg = TrainConfig(precision="fp32", lora={"dropout": 0.1}, speed={"fused_lora_linear": fused})
    model, _ = build_trainable("lora", cfg, tiny_model_dir, None, "float32")
    info = speed.apply(model, cfg)
    model.train()
    if fused:
        assert info["fused_lora_linear"] == N_LINEAR_LORA_LAYERS
    else:
        assert "fused_lora_linear" not in info
    loss = model(input_ids=_IDS, labels=_IDS).loss
    assert graph_nodes(loss, _FUSED_NODE) == (N_LINEAR_LORA_LAYERS if fused else 0)

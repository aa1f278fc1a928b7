"""The CPU speed levers of the train stage keep the maths of what they replace.

- `CheapMaskDropout` (LoRA input dropout from 16 random bits per element): same drop law and scaling as
  `nn.Dropout`, right gradient, reproducible under `torch.manual_seed`, and `build_trainable` installs it only
  when `train.lora.cheap_mask_dropout` is on.
- `LinearCrossEntropy` / `label_token_loss` (fused head + cross-entropy over the label tokens only): the same
  loss and gradients as a plain head and `F.cross_entropy`, as the model's own loss, chunked or not, and the
  model's output head is always put back.
- `use_fused_lora_linear` (one autograd node per plain peft lora.Linear): the same loss and gradients as peft in
  fp32 (with dropout: same masks), no worse than peft under bf16 autocast, and peft's own forward for eval, DoRA
  and a trained base weight; `build_trainable` installs it only when `train.lora.fused_linear` is on.
- `domaintune_cpu` attention: the same logits and gradients as eager attention on a padded batch (head size 16
  and 12), close under bf16 autocast; `select_attention("auto")` picks it only for allow-listed architectures
  without attention dropout; soft-capping and attention dropout are refused.
- `keep_freed_buffers` (glibc mallopt) and what a real `run_train` records of all these levers in metrics.json.
"""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from domaintune.model.config import ModelConfig
from domaintune.model.loader import load_tokenizer
from domaintune.train.speed import fused_head as sft_trainer
from domaintune.train.dataset import encode_rows, make_collator
from domaintune.train.speed.fast_dropout import CheapMaskDropout, use_cheap_mask_dropout
from domaintune.train.speed.fused_head import LinearCrossEntropy, fused_head_supported, label_token_loss
from train_helpers import CONVERSATION, make_run_dir, tiny_config

N_LINEAR_LORA_LAYERS = 14  # tiny Llama: 7 linear layers x 2 decoder layers

# ---------------------------------------------------------------------------------------------- CheapMaskDropout


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


def _lora_model(tiny_model_dir, dropout: float):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    base.config.use_cache = False
    return get_peft_model(
        base, LoraConfig(r=4, lora_dropout=dropout, target_modules="all-linear", task_type="CAUSAL_LM")
    )


def _lora_layers(model):
    from peft.tuners.lora import LoraLayer

    return [m for m in model.modules() if isinstance(m, LoraLayer)]


def test_use_cheap_mask_dropout_replaces_every_lora_dropout(tiny_model_dir):
    torch.manual_seed(0)
    model = _lora_model(tiny_model_dir, 0.1)
    layers = _lora_layers(model)
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
    model = _lora_model(tiny_model_dir, 0.0)
    assert use_cheap_mask_dropout(model) == 0
    assert all(type(layer.lora_dropout["default"]) is nn.Identity for layer in _lora_layers(model))


@pytest.mark.parametrize("cheap", [True, False])
def test_build_trainable_follows_the_cheap_mask_dropout_setting(tiny_model_dir, cheap):
    from domaintune.train.config import TrainConfig
    from domaintune.train.methods import build_trainable

    cfg = TrainConfig(precision="fp32", lora={"dropout": 0.1, "cheap_mask_dropout": cheap})
    model, info = build_trainable("lora", cfg, tiny_model_dir, None, "float32")
    dropouts = [layer.lora_dropout["default"] for layer in _lora_layers(model)]
    assert len(dropouts) == N_LINEAR_LORA_LAYERS
    expected = CheapMaskDropout if cheap else nn.Dropout
    assert all(type(d) is expected and d.p == 0.1 for d in dropouts)
    assert info.get("cheap_mask_dropout") == (N_LINEAR_LORA_LAYERS if cheap else None)


# ------------------------------------------------------------------------------------------ LinearCrossEntropy


def _reference(hidden, weight, targets):
    return F.cross_entropy(hidden @ weight.T, targets, reduction="sum")


def _leaves(rows=10, dim=16, vocab=50, seed=0):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(rows, dim, generator=gen)
    weight = torch.randn(vocab, dim, generator=gen) * 0.3
    targets = torch.randint(0, vocab, (rows,), generator=gen)
    return hidden, weight, targets


@pytest.mark.parametrize("rows_per_chunk", [None, 3, 1])
def test_linear_cross_entropy_matches_head_plus_cross_entropy(monkeypatch, rows_per_chunk):
    hidden, weight, targets = _leaves()
    if rows_per_chunk is not None:  # 10 rows in chunks of 3 (the last one short) or of 1
        monkeypatch.setattr(sft_trainer, "_CHUNK_ELEMENTS", rows_per_chunk * weight.shape[0])
    h_ref, w_ref = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    ref = _reference(h_ref, w_ref, targets)
    (ref * 0.7).backward()  # a non-unit upstream gradient reaches both inputs
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    loss = LinearCrossEntropy.apply(h, w, targets, torch.float32)
    (loss * 0.7).backward()
    torch.testing.assert_close(loss, ref, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(h.grad, h_ref.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(w.grad, w_ref.grad, rtol=1e-5, atol=1e-6)


def test_linear_cross_entropy_leaves_a_frozen_head_without_gradient():
    hidden, weight, targets = _leaves()
    h_ref = hidden.clone().requires_grad_()
    _reference(h_ref, weight, targets).backward()
    h = hidden.clone().requires_grad_()
    LinearCrossEntropy.apply(h, weight, targets, torch.float32).backward()
    assert weight.grad is None
    torch.testing.assert_close(h.grad, h_ref.grad, rtol=1e-5, atol=1e-6)


def test_linear_cross_entropy_under_bf16_autocast_matches_the_autocast_head():
    hidden, weight, targets = _leaves(rows=24, dim=32, vocab=200)
    h_ref, w_ref = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = _reference(h_ref, w_ref, targets)
    ref.backward()
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = LinearCrossEntropy.apply(h, w, targets, torch.bfloat16)
    loss.backward()
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, ref.float(), rtol=1e-2, atol=1e-2)
    assert h.grad.dtype == hidden.dtype and w.grad.dtype == weight.dtype
    torch.testing.assert_close(h.grad, h_ref.grad, rtol=3e-2, atol=3e-2)
    torch.testing.assert_close(w.grad, w_ref.grad, rtol=3e-2, atol=3e-2)
    # And far from the fp32 values only by bf16 rounding, not by a wrong formula.
    h32 = hidden.clone().requires_grad_()
    _reference(h32, weight, targets).backward()
    assert (h.grad - h32.grad).abs().max() < 0.05 * h32.grad.abs().max()


# ---------------------------------------------------------------------------------------------- label_token_loss


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return load_tokenizer(ModelConfig(name_or_path=str(tiny_model_dir)))


def _batch(tokenizer, packing: bool):
    rows = [{"messages": CONVERSATION}, {"messages": CONVERSATION[:3]}, {"messages": CONVERSATION[1:3]}]
    examples, _ = encode_rows(tokenizer, rows, max_length=512)
    batch = make_collator(tokenizer, packing=packing)(examples)
    assert (batch["labels"] == -100).float().mean() > 0.3  # mostly prompt: the fused path skips real work
    return batch


def _loss_and_grads(loss_fn, model, params):
    model.zero_grad()
    loss = loss_fn()
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in params]


@pytest.mark.parametrize(("packing", "chunked"), [(False, False), (True, False), (False, True)])
def test_label_token_loss_equals_the_full_models_own_loss(tokenizer, tiny_model_dir, monkeypatch, packing, chunked):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model.config.use_cache = False
    assert fused_head_supported(model)
    head = model.get_output_embeddings()
    embed = model.get_input_embeddings()
    assert head.weight is embed.weight  # tied: the head's gradient lands on the embedding matrix
    if chunked:  # 7 label tokens per chunk: several chunks, the last one short
        monkeypatch.setattr(sft_trainer, "_CHUNK_ELEMENTS", 7 * head.weight.shape[0])
    batch = _batch(tokenizer, packing)
    params = [model.model.layers[0].mlp.up_proj.weight, embed.weight]
    full, grads_full = _loss_and_grads(lambda: model(**batch).loss, model, params)
    fused, grads_fused = _loss_and_grads(lambda: label_token_loss(model, batch)[0], model, params)
    torch.testing.assert_close(fused, full, rtol=1e-5, atol=1e-5)
    for got, want in zip(grads_fused, grads_full):
        assert want.abs().max() > 0
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    assert model.get_output_embeddings() is head
    # num_items_in_batch (gradient accumulation's token count) is the denominator when given.
    n_labels = int((batch["labels"][:, 1:] != -100).sum())
    with torch.no_grad():
        scaled, outputs = label_token_loss(model, batch, num_items_in_batch=2 * n_labels)
    torch.testing.assert_close(scaled, full / 2, rtol=1e-5, atol=1e-6)
    assert outputs.loss is None and outputs.logits is None


@pytest.mark.parametrize("packing", [False, True])
def test_label_token_loss_equals_the_lora_models_own_loss(tokenizer, tiny_model_dir, packing):
    torch.manual_seed(0)
    model = _lora_model(tiny_model_dir, 0.0)
    with torch.no_grad():  # a trained-looking adapter, so lora_A gets a non-zero gradient
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.05)
    assert fused_head_supported(model)
    head = model.get_output_embeddings()
    batch = _batch(tokenizer, packing)
    lora_a = model.base_model.model.model.layers[0].self_attn.q_proj.lora_A["default"].weight
    lora_b = model.base_model.model.model.layers[1].mlp.down_proj.lora_B["default"].weight
    params = [lora_a, lora_b]
    full, grads_full = _loss_and_grads(lambda: model(**batch).loss, model, params)
    fused, grads_fused = _loss_and_grads(lambda: label_token_loss(model, batch)[0], model, params)
    torch.testing.assert_close(fused, full, rtol=1e-5, atol=1e-5)
    for got, want in zip(grads_fused, grads_full):
        assert want.abs().max() > 0
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-7)
    assert head.weight.grad is None  # frozen base head stays without gradient
    assert model.get_output_embeddings() is head


def test_label_token_loss_under_bf16_autocast_tracks_the_models_own_loss(tokenizer, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model.config.use_cache = False
    batch = _batch(tokenizer, packing=False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        full = model(**batch).loss
        fused, _ = label_token_loss(model, batch)
    torch.testing.assert_close(fused.float(), full.float(), rtol=1e-2, atol=1e-2)
    fused.backward()
    assert model.get_input_embeddings().weight.grad.dtype == torch.float32


@pytest.mark.parametrize("field", ["final_logit_softcapping", "logit_scale"])
def test_fused_head_is_refused_where_logits_change_after_the_head(tiny_model_dir, field):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert fused_head_supported(model)
    setattr(model.config, field, 30.0)
    assert not fused_head_supported(model)


def test_fused_head_is_refused_for_a_head_with_bias(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    head = model.get_output_embeddings()
    model.lm_head = nn.Linear(head.in_features, head.out_features, bias=True)
    assert not fused_head_supported(model)


def test_output_head_is_restored_even_when_the_forward_fails(tokenizer, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model.config.use_cache = False
    head = model.get_output_embeddings()
    vocab = head.weight.shape[0]
    batch = _batch(tokenizer, packing=False)
    with torch.no_grad():
        label_token_loss(model, batch)
        assert model.get_output_embeddings() is head and model.lm_head is head
        assert model(input_ids=batch["input_ids"][:, :5]).logits.shape[-1] == vocab
        bad = dict(batch, input_ids=torch.full_like(batch["input_ids"], vocab + 5))  # out of the embedding
        with pytest.raises(IndexError):
            label_token_loss(model, bad)
        assert model.get_output_embeddings() is head and model.lm_head is head
        assert model(input_ids=batch["input_ids"][:, :5]).logits.shape[-1] == vocab


# ----------------------------------------------------------------------------------------- LoraLinearFunction


def _fusable_lora_model(tiny_model_dir, dropout: float, use_dora: bool = False):
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


def _graph_nodes(tensor, name: str) -> int:
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


_FUSED_NODE = "LoraLinearFunctionBackward"
_IDS = torch.randint(0, 1000, (2, 10), generator=torch.Generator().manual_seed(3))


def _train_forward(model, seed=7, autocast=False, ids=_IDS):
    """(loss, {name: grad}) of one seeded training forward + backward."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = model(input_ids=ids, labels=ids).loss
    nodes = _graph_nodes(loss, _FUSED_NODE)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach().float(), grads, nodes


def _rel(got, want):
    return float((got.float() - want.float()).norm() / want.float().norm())


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_fused_lora_linear_matches_peft_loss_and_gradients_in_fp32(tiny_model_dir, dropout):
    from domaintune.train.speed.fused_lora import use_fused_lora_linear

    model = _fusable_lora_model(tiny_model_dir, dropout)
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
        assert _rel(grads[name], want) < 1e-5, name
    if dropout:  # the masks really drop: another seed gives another loss, on both paths alike
        other, _, _ = _train_forward(model, seed=8)
        other_ref, _, _ = _train_forward(reference, seed=8)
        assert not torch.equal(other, loss)
        torch.testing.assert_close(other, other_ref, rtol=1e-5, atol=1e-6)


def test_fused_lora_linear_under_bf16_autocast_is_as_close_to_fp32_as_peft(tiny_model_dir):
    from domaintune.train.speed.fused_lora import use_fused_lora_linear

    model = _fusable_lora_model(tiny_model_dir, 0.1)
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

    err_peft = _rel(flat(grads_peft), flat(grads32))
    err_fused = _rel(flat(grads_fused), flat(grads32))
    assert 0 < err_peft < 0.05  # bf16 really changed the numbers, but only by rounding
    assert err_fused <= 1.5 * err_peft, f"fused bf16 error {err_fused:.3g} vs peft bf16 error {err_peft:.3g}"
    assert abs(float(loss_fused) - float(loss32)) <= max(1.5 * abs(float(loss_peft) - float(loss32)), 1e-3)


def test_fused_lora_linear_leaves_eval_mode_to_peft(tiny_model_dir):
    from domaintune.train.speed.fused_lora import use_fused_lora_linear

    model = _fusable_lora_model(tiny_model_dir, 0.1)
    reference = copy.deepcopy(model)
    use_fused_lora_linear(model)
    model.eval(), reference.eval()
    out = model(input_ids=_IDS).logits
    assert _graph_nodes(out, _FUSED_NODE) == 0
    assert torch.equal(out, reference(input_ids=_IDS).logits)


def test_fused_lora_linear_leaves_dora_to_peft(tiny_model_dir):
    from domaintune.train.speed.fused_lora import use_fused_lora_linear

    model = _fusable_lora_model(tiny_model_dir, 0.0, use_dora=True)
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
    from domaintune.train.speed.fused_lora import use_fused_lora_linear

    model = _fusable_lora_model(tiny_model_dir, 0.1)
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
        assert _rel(grads[name], want) < 1e-5, name


@pytest.mark.parametrize("fused", [True, False])
def test_build_trainable_follows_the_fused_linear_setting(tiny_model_dir, fused):
    from domaintune.train.config import TrainConfig
    from domaintune.train.methods import build_trainable

    cfg = TrainConfig(precision="fp32", lora={"dropout": 0.1, "fused_linear": fused})
    model, info = build_trainable("lora", cfg, tiny_model_dir, None, "float32")
    model.train()
    if fused:
        assert info["fused_lora_linear"] == N_LINEAR_LORA_LAYERS
    else:
        assert "fused_lora_linear" not in info
    loss = model(input_ids=_IDS, labels=_IDS).loss
    assert _graph_nodes(loss, _FUSED_NODE) == (N_LINEAR_LORA_LAYERS if fused else 0)


# ------------------------------------------------------------------------------------------ domaintune_cpu attention


def _tiny_llama(hidden=64, heads=4, kv_heads=2, **extra):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        vocab_size=256,
        max_position_embeddings=64,
        use_cache=False,
        pad_token_id=0,
        **extra,
    )
    return LlamaForCausalLM(config).train()


def _padded_batch(vocab=256):
    ids = torch.randint(1, vocab, (2, 12), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0  # the second row is right-padded
    ids[1, 8:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def _logits_and_grads(model, batch, autocast=False):
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        logits = model(**batch).logits
    keep = batch["attention_mask"].bool()
    (logits.float()[keep] * torch.linspace(-1, 1, logits.shape[-1])).sum().backward()
    return logits.detach().float(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize(("hidden", "heads"), [(64, 4), (48, 4)])  # head size 16 (scale 1/4) and 12 (not 2^k)
def test_domaintune_cpu_attention_matches_eager_attention(hidden, heads):
    from transformers import AttentionInterface

    from domaintune.train.speed.cpu_attention import ATTENTION_NAME, cpu_attention_forward, register
    from domaintune.train.methods import select_attention

    eager = _tiny_llama(hidden, heads)
    eager.set_attn_implementation("eager")
    ours = copy.deepcopy(eager)
    assert select_attention(ours, ATTENTION_NAME) == ATTENTION_NAME
    assert ours.config._attn_implementation == ATTENTION_NAME
    assert eager.config._attn_implementation == "eager"
    batch = _padded_batch()
    logits_ref, grads_ref = _logits_and_grads(eager, batch)
    calls = []

    def counting(*args, **kwargs):
        calls.append(1)
        return cpu_attention_forward(*args, **kwargs)

    AttentionInterface.register(ATTENTION_NAME, counting)  # see that the model really calls ours
    try:
        logits, grads = _logits_and_grads(ours, batch)
    finally:
        register()
    assert len(calls) == 2  # one call per decoder layer
    keep = batch["attention_mask"].bool()
    torch.testing.assert_close(logits[keep], logits_ref[keep], rtol=1e-5, atol=1e-5)
    assert grads.keys() == grads_ref.keys() and len(grads) == len(list(eager.parameters()))
    for name, want in grads_ref.items():
        assert _rel(grads[name], want) < 1e-5, name
    # The padding mask is applied: changing a padded token changes nothing in the row's real positions.
    with torch.no_grad():
        other = dict(batch, input_ids=batch["input_ids"].clone())
        other["input_ids"][1, 9] = 17
        torch.testing.assert_close(ours(**other).logits[1, :8], logits[1, :8], rtol=1e-5, atol=1e-5)


def test_domaintune_cpu_attention_under_bf16_autocast_tracks_eager():
    from domaintune.train.methods import select_attention

    eager = _tiny_llama()
    eager.set_attn_implementation("eager")
    ours = copy.deepcopy(eager)
    select_attention(ours, "domaintune_cpu")
    batch = _padded_batch()
    keep = batch["attention_mask"].bool()
    logits_ref, grads_ref = _logits_and_grads(eager, batch, autocast=True)
    logits, grads = _logits_and_grads(ours, batch, autocast=True)
    torch.testing.assert_close(logits[keep], logits_ref[keep], rtol=3e-2, atol=3e-2)
    for name in (
        "model.layers.0.self_attn.q_proj.weight",
        "model.layers.1.self_attn.k_proj.weight",
        "model.embed_tokens.weight",
    ):
        assert grads[name].dtype == torch.float32
        assert _rel(grads[name], grads_ref[name]) < 0.05, name


def test_select_attention_auto_picks_domaintune_cpu_only_where_it_is_exact():
    from transformers import GPT2Config, GPT2LMHeadModel

    from domaintune.errors import UserError
    from domaintune.train.methods import select_attention

    assert not torch.cuda.is_available()
    llama = _tiny_llama()
    assert select_attention(llama, "auto") == "domaintune_cpu"
    assert llama.config._attn_implementation == "domaintune_cpu"
    # An architecture outside the allow-list keeps its own implementation.
    gpt2 = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=64, n_positions=32))
    own = gpt2.config._attn_implementation
    assert own != "domaintune_cpu"
    assert select_attention(gpt2, "auto") == own
    assert gpt2.config._attn_implementation == own
    # Attention dropout: auto keeps the model's default, an explicit request is a user error.
    dropping = _tiny_llama(attention_dropout=0.1)
    own = dropping.config._attn_implementation
    assert select_attention(dropping, "auto") == own != "domaintune_cpu"
    with pytest.raises(UserError, match="attention_dropout"):
        select_attention(dropping, "domaintune_cpu")
    assert dropping.config._attn_implementation == own


def test_cpu_attention_forward_refuses_what_it_does_not_implement():
    from domaintune.train.speed.cpu_attention import cpu_attention_forward

    module = nn.Module().train()
    q, k, v = torch.randn(1, 4, 5, 16), torch.randn(1, 2, 5, 16), torch.randn(1, 2, 5, 16)
    out, weights = cpu_attention_forward(module, q, k, v, None, 0.25)
    assert out.shape == (1, 5, 4, 16) and weights.shape == (1, 4, 5, 5)
    torch.testing.assert_close(weights.sum(-1), torch.ones(1, 4, 5))
    with pytest.raises(ValueError, match="soft-capping"):
        cpu_attention_forward(module, q, k, v, None, 0.25, softcap=30.0)
    with pytest.raises(ValueError, match="dropout"):
        cpu_attention_forward(module, q, k, v, None, 0.25, dropout=0.1)
    module.eval()  # no dropout outside training: the dropout argument is then harmless
    torch.testing.assert_close(cpu_attention_forward(module, q, k, v, None, 0.25, dropout=0.1)[0], out)


# -------------------------------------------------------------------------------------- glibc kept freed buffers


_KEPT = {
    "malloc": "glibc: freed buffers kept for reuse",
    "mmap_threshold": 32 * 1024 * 1024,
    "trim_threshold": 2**31 - 1,
    "top_pad": 256 * 1024 * 1024,
}


def _is_glibc_linux() -> bool:
    import platform

    return platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"


@pytest.mark.skipif(not _is_glibc_linux(), reason="mallopt tuning applies to Linux/glibc only")
def test_keep_freed_buffers_sets_glibc_malloc_thresholds():
    from domaintune.train.speed.allocator import keep_freed_buffers

    assert keep_freed_buffers() == _KEPT
    assert keep_freed_buffers() == _KEPT  # idempotent: mallopt accepts the same values again


@pytest.mark.skipif(not _is_glibc_linux(), reason="mallopt tuning applies to Linux/glibc only")
@pytest.mark.parametrize("keep", [True, False])
def test_run_train_records_allocator_and_speed_levers(tmp_path, keep):
    from domaintune.train.runner import run_train

    run = make_run_dir(tmp_path, n_train=8, n_val=4, n_general=4)
    metrics = run_train(tiny_config(keep_freed_buffers=keep, max_steps=2), run)
    assert metrics["steps"] == 2
    assert metrics["device"]["allocator"] == (_KEPT if keep else {"malloc": "unchanged"})
    params = metrics["params"]
    assert params["method"] == "lora"
    assert params["attention"] == "domaintune_cpu"
    assert params["fused_head_loss"] is True
    assert params["cheap_mask_dropout"] == N_LINEAR_LORA_LAYERS  # default LoRA dropout 0.05
    assert params["fused_lora_linear"] == N_LINEAR_LORA_LAYERS
    on_disk = json.loads((run / "train" / "metrics.json").read_text())
    assert on_disk["device"]["allocator"] == metrics["device"]["allocator"]
    assert on_disk["params"]["fused_lora_linear"] == N_LINEAR_LORA_LAYERS

"""The CPU speed levers of the train stage keep the maths of what they replace.

- `CheapMaskDropout` (LoRA input dropout from 16 random bits per element): same drop law and scaling as
  `nn.Dropout`, right gradient, reproducible under `torch.manual_seed`, and `build_trainable` installs it only
  when `train.lora.cheap_mask_dropout` is on.
- `LinearCrossEntropy` / `label_token_loss` (fused head + cross-entropy over the label tokens only): the same
  loss and gradients as a plain head and `F.cross_entropy`, as the model's own loss, chunked or not, and the
  model's output head is always put back.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from domaintune.model.config import ModelConfig
from domaintune.model.loader import load_tokenizer
from domaintune.train import sft_trainer
from domaintune.train.dataset import encode_rows, make_collator
from domaintune.train.fast_dropout import CheapMaskDropout, use_cheap_mask_dropout
from domaintune.train.sft_trainer import LinearCrossEntropy, fused_head_supported, label_token_loss

N_LINEAR_LORA_LAYERS = 14  # tiny Llama: 7 linear layers x 2 decoder layers

CONVERSATION = [
    {"role": "system", "content": "You are a careful doctor."},
    {"role": "user", "content": "头痛怎么办？"},
    {"role": "assistant", "content": "多休息，多喝水。"},
    {"role": "user", "content": "What else?"},
    {"role": "assistant", "content": "See a doctor if it lasts."},
]


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
    return get_peft_model(base, LoraConfig(r=4, lora_dropout=dropout, target_modules="all-linear",
                                           task_type="CAUSAL_LM"))


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
    fused, grads_fused = _loss_and_grads(lambda: label_token_loss(model, batch, unwrapped=model)[0], model, params)
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

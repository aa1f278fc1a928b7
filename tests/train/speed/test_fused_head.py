"""`LinearCrossEntropy` / `label_token_loss` (train/speed/fused_head.py): the fused head + cross-entropy over the
label tokens only, and the `sparse_causal_lm_loss` fallback.

The same loss and gradients as a plain head and `F.cross_entropy`, as the model's own loss, chunked or not, and
the model's output head is always put back.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from domaintune.model.config import ModelConfig
from domaintune.model.loader import load_tokenizer
from domaintune.train.dataset import encode_rows, make_collator
from domaintune.train.speed import fused_head
from domaintune.train.speed.fused_head import (
    LinearCrossEntropy,
    fused_head_supported,
    label_token_loss,
    sparse_causal_lm_loss,
)
from train_helpers import CONVERSATION, lora_model


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
        monkeypatch.setattr(fused_head, "_CHUNK_ELEMENTS", rows_per_chunk * weight.shape[0])
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
        monkeypatch.setattr(fused_head, "_CHUNK_ELEMENTS", 7 * head.weight.shape[0])
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
    model = lora_model(tiny_model_dir, 0.0)
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


@pytest.mark.parametrize("packing", [False, True])
def test_sparse_logits_loss_equals_the_models_own_loss(tokenizer, tiny_model_dir, packing):
    """Logits only where a label exists give exactly the full causal-LM loss (and its gradient)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model.config.use_cache = False
    rows = [{"messages": CONVERSATION}, {"messages": CONVERSATION[:3]}, {"messages": CONVERSATION[1:3]}]
    examples, _ = encode_rows(tokenizer, rows, max_length=512)
    batch = make_collator(tokenizer, packing=packing)(examples)
    full = model(**batch).loss
    full.backward()
    grad_full = model.model.layers[0].mlp.up_proj.weight.grad.clone()
    model.zero_grad()
    sparse, outputs = sparse_causal_lm_loss(model, batch)
    sparse.backward()
    assert outputs.logits.shape[1] < batch["input_ids"].shape[1]  # fewer positions projected on the vocabulary
    torch.testing.assert_close(sparse, full, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(model.model.layers[0].mlp.up_proj.weight.grad, grad_full, atol=1e-6, rtol=1e-4)

"""`domaintune_cpu` attention (train/speed/cpu_attention.py).

The same logits and gradients as eager attention on a padded batch (head size 16 and 12), close under bf16
autocast; `select_attention("auto")` picks it only for allow-listed architectures without attention dropout;
soft-capping and attention dropout are refused.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from domaintune.errors import UserError
from domaintune.train.speed.cpu_attention import ATTENTION_NAME, cpu_attention_forward, register, select_attention
from train_helpers import relative_error


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
        assert relative_error(grads[name], want) < 1e-5, name
    # The padding mask is applied: changing a padded token changes nothing in the row's real positions.
    with torch.no_grad():
        other = dict(batch, input_ids=batch["input_ids"].clone())
        other["input_ids"][1, 9] = 17
        torch.testing.assert_close(ours(**other).logits[1, :8], logits[1, :8], rtol=1e-5, atol=1e-5)


def test_domaintune_cpu_attention_under_bf16_autocast_tracks_eager():
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
        assert relative_error(grads[name], grads_ref[name]) < 0.05, name


def test_select_attention_auto_picks_domaintune_cpu_only_where_it_is_exact():
    from transformers import GPT2Config, GPT2LMHeadModel

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

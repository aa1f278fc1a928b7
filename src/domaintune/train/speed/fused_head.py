"""The SFT loss, projecting onto the vocabulary only the tokens that have a label (`train.speed.fused_head_loss`).

With assistant-only labels most positions (system prompt, question, template) carry -100, yet a plain
causal-LM forward projects every position onto the 49k-word vocabulary and log-softmaxes it.

- Fast path (`label_token_loss`): the model runs with its output head swapped for the identity, so it returns
  the final hidden states; the (row, position) pairs that predict a label are gathered, and one fused
  head + cross-entropy (`LinearCrossEntropy`) computes the loss and its gradient chunk by chunk. Only the
  label tokens are projected (not every position that any row of the batch labels), and the log-softmax and
  its backward run once instead of as separate autograd nodes over fp32 copies.
- Fallback (`sparse_causal_lm_loss`): transformers' `logits_to_keep` with the positions that predict a label in
  any row. Used where the head cannot be called on its own: FSDP and DeepSpeed ZeRO-3 shard it, and some
  architectures scale or soft-cap logits after the head (`_POST_HEAD_LOGIT_FIELDS`).

Both compute the same token-mean cross-entropy as the model's own loss (tested). `SparseLogitsTrainer`
(train/trainers.py) calls one or the other.
"""

from __future__ import annotations

import contextlib

import torch
from transformers.modeling_outputs import CausalLMOutputWithPast

IGNORE_INDEX = -100
# Config fields of architectures that transform logits after the output head (Gemma 2/3 soft-capping, Cohere,
# Granite, Falcon-H1 scaling): the fused head would skip that step, so those models use the fallback.
_POST_HEAD_LOGIT_FIELDS = (
    "final_logit_softcapping",
    "logit_scale",
    "logits_scaling",
    "lm_head_multiplier",
    "output_multiplier_scale",
)
# Rows of logits materialised at once by LinearCrossEntropy (fp32): bounds its memory (~48 MiB for a 49k
# vocabulary) whatever the batch.
_CHUNK_ELEMENTS = 1 << 22


def label_positions(labels):
    """Positions whose next token is a label (any row of the batch); sorted 1-D index tensor."""
    wanted = (labels[:, 1:] != IGNORE_INDEX).any(dim=0)
    return torch.nonzero(wanted, as_tuple=False).flatten()


def sparse_causal_lm_loss(model, inputs, num_items_in_batch=None):
    import torch.nn.functional as F

    inputs = dict(inputs)
    labels = inputs.pop("labels")
    positions = label_positions(labels)
    outputs = model(**inputs, logits_to_keep=positions, use_cache=False)
    logits = outputs.logits.float()  # [batch, len(positions), vocab]
    targets = labels[:, positions + 1]
    loss = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
    )
    count = num_items_in_batch if num_items_in_batch is not None else (targets != IGNORE_INDEX).sum()
    return loss / count, outputs


class LinearCrossEntropy(torch.autograd.Function):
    """sum_i CE(hidden_i @ weight.T, target_i), gradient computed in the forward pass, chunk by chunk.

    The loss is the last operation of the graph, so d loss / d logits = softmax - onehot is known in the
    forward pass: each chunk's logits are turned into that gradient in place and multiplied back through the
    head at once (as Liger-Kernel's fused linear cross-entropy does on GPUs). Backward only scales the stored
    gradients. Logits are computed in `compute_dtype` (the autocast dtype, as a plain head under autocast) and
    softmaxed in fp32.
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, compute_dtype):
        w = weight.to(compute_dtype)
        h_all = hidden.to(compute_dtype)
        rows = h_all.shape[0]
        chunk = max(1, _CHUNK_ELEMENTS // weight.shape[0])
        grad_hidden = torch.empty_like(h_all) if ctx.needs_input_grad[0] else None
        grad_weight = (
            torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if ctx.needs_input_grad[1] else None
        )
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, rows, chunk):
            h = h_all[start : start + chunk]
            t = targets[start : start + chunk]
            logits = (h @ w.T).float()
            lse = torch.logsumexp(logits, dim=-1)
            total += (lse - logits.gather(1, t[:, None]).squeeze(1)).sum()
            # softmax - onehot, in place
            probs = logits.sub_(lse[:, None]).exp_()
            probs[torch.arange(len(t), device=t.device), t] -= 1.0
            g = probs.to(compute_dtype)
            if grad_hidden is not None:
                grad_hidden[start : start + chunk] = g @ w
            if grad_weight is not None:
                grad_weight += (g.T @ h).float()
        ctx.save_for_backward(*(x for x in (grad_hidden, grad_weight) if x is not None))
        ctx.has = (grad_hidden is not None, grad_weight is not None)
        ctx.dtypes = (hidden.dtype, weight.dtype)
        return total

    @staticmethod
    def backward(ctx, grad_output):
        saved = list(ctx.saved_tensors)
        grad_hidden = saved.pop(0).mul(grad_output).to(ctx.dtypes[0]) if ctx.has[0] else None
        grad_weight = saved.pop(0).mul(grad_output).to(ctx.dtypes[1]) if ctx.has[1] else None
        return grad_hidden, grad_weight, None, None


def output_head_slot(model):
    """(parent module, attribute name, head module) of the model's output embeddings."""
    head = model.get_output_embeddings()
    if head is None:
        return None
    for module in model.modules():
        for child_name, child in module.named_children():
            if child is head:
                return module, child_name, head
    return None


def fused_head_supported(model) -> bool:
    config = getattr(model, "config", None)
    if config is None or any(getattr(config, f, None) not in (None, 1, 1.0) for f in _POST_HEAD_LOGIT_FIELDS):
        return False
    slot = output_head_slot(model)
    return slot is not None and isinstance(slot[2], torch.nn.Linear) and slot[2].bias is None


@contextlib.contextmanager
def _head_as_identity(slot):
    parent, name, head = slot
    setattr(parent, name, torch.nn.Identity())
    try:
        yield head
    finally:
        setattr(parent, name, head)


def _compute_dtype(device: torch.device, fallback: torch.dtype) -> torch.dtype:
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return fallback


def label_token_loss(model, inputs, num_items_in_batch=None, head_slot=None):
    """Token-mean cross-entropy over the label tokens, projecting only those tokens onto the vocabulary.

    `model` is what the Trainer calls (possibly a DDP wrapper); `head_slot` the `output_head_slot` of the model
    inside it, found once by the caller (default: looked up on `model`).
    """
    inputs = dict(inputs)
    labels = inputs.pop("labels")
    positions = label_positions(labels)
    slot = head_slot if head_slot is not None else output_head_slot(model)
    with _head_as_identity(slot) as head:
        outputs = model(**inputs, logits_to_keep=positions, use_cache=False)
    hidden = outputs.logits  # the head was the identity: final hidden states at `positions`
    targets = labels[:, positions + 1]
    selected = targets != IGNORE_INDEX
    hidden, targets = hidden[selected], targets[selected]
    loss_sum = LinearCrossEntropy.apply(hidden, head.weight, targets, _compute_dtype(hidden.device, hidden.dtype))
    count = num_items_in_batch if num_items_in_batch is not None else targets.numel()
    # No logits were materialised; evaluation asks for the loss only (prediction_loss_only).
    return loss_sum / count, CausalLMOutputWithPast(loss=None)

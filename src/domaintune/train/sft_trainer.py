"""Trainer whose loss computes vocabulary logits only where a label exists.

With assistant-only labels most positions (system prompt, question, template) carry -100, yet a
plain causal-LM forward projects every position onto the 49k-word vocabulary and log-softmaxes it.
transformers' `logits_to_keep` accepts position indices, so we ask the model for the logits of the
positions that predict a label and compute the same token-mean cross-entropy there.
"""

from __future__ import annotations

from transformers import Trainer

IGNORE_INDEX = -100


def label_positions(labels):
    """Positions whose next token is a label (any row of the batch); sorted 1-D index tensor."""
    import torch

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
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                           ignore_index=IGNORE_INDEX, reduction="sum")
    count = num_items_in_batch if num_items_in_batch is not None else (targets != IGNORE_INDEX).sum()
    return loss / count, outputs


class SparseLogitsTrainer(Trainer):
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss, outputs = sparse_causal_lm_loss(model, inputs, num_items_in_batch)
        if num_items_in_batch is not None and self.args.average_tokens_across_devices:
            # num_items_in_batch counts the labels of every process while DDP/FSDP average the gradients over
            # processes: scale back as Trainer.compute_loss does, so N processes match one on the same global batch.
            loss = loss * self.accelerator.num_processes
        return (loss, outputs) if return_outputs else loss

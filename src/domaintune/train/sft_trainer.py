"""The SFT Trainer: its loss projects onto the vocabulary only the positions that predict a label."""

from __future__ import annotations

from transformers import Trainer

from domaintune.train.speed.fused_head import (
    fused_head_supported,
    label_token_loss,
    output_head_slot,
    sparse_causal_lm_loss,
)


class SparseLogitsTrainer(Trainer):
    """`fused_head`: use `label_token_loss` (checked against the model by `fused_head_supported`), else
    `sparse_causal_lm_loss` (logits at the positions any row labels)."""

    def __init__(self, *args, fused_head: bool = True, **kwargs):
        super().__init__(*args, **kwargs)
        self.fused_head = fused_head and fused_head_supported(self.model)
        # DDP wraps the model later but keeps its modules: the slot found now stays valid (not a per-step walk).
        self._head_slot = output_head_slot(self.model) if self.fused_head else None

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self.fused_head:
            loss, outputs = label_token_loss(model, inputs, num_items_in_batch, head_slot=self._head_slot)
        else:
            loss, outputs = sparse_causal_lm_loss(model, inputs, num_items_in_batch)
        if num_items_in_batch is not None and self.args.average_tokens_across_devices:
            # num_items_in_batch counts the labels of every process while DDP/FSDP average the gradients over
            # processes: scale back as Trainer.compute_loss does, so N processes match one on the same global batch.
            loss = loss * self.accelerator.num_processes
        return (loss, outputs) if return_outputs else loss

"""Record what each optimizer step trained on, so two tools can be shown to see the same tokens and labels.

Used by bench_train.py (domaintune, in-process) and lf_runner.py (LLaMA-Factory, in its own venv): both
wrap `transformers.Trainer.training_step` and store, per step, one signature per example (a hash of its
token ids and its label ids) plus its token and label counts. Padded batches are split by the attention
mask, padding-free (flattened) batches by their position_ids restarting at 0. A label at an example's
first position is ignored (it predicts nothing; the flattening collator writes -100 there).
Only plain torch/hashlib here: this file is imported by both venvs.
"""

from __future__ import annotations

import hashlib
from itertools import pairwise

IGNORE_INDEX = -100


def _examples(inputs):
    ids, labels = inputs["input_ids"], inputs["labels"]
    mask = inputs.get("attention_mask")
    if mask is not None and mask.dim() == 2:
        for row in range(ids.shape[0]):
            keep = mask[row].bool()
            yield ids[row][keep].tolist(), labels[row][keep].tolist()
        return
    positions = inputs.get("position_ids")
    if positions is None:
        raise ValueError("batch has neither a 2-D attention_mask nor position_ids: cannot split examples")
    for row in range(ids.shape[0]):
        starts = (positions[row] == 0).nonzero().flatten().tolist() + [ids.shape[1]]
        for a, b in pairwise(starts):
            yield ids[row, a:b].tolist(), labels[row, a:b].tolist()


def batch_record(inputs) -> dict:
    sigs, tokens, label_tokens = [], 0, 0
    for ids, labels in _examples(inputs):
        labels = [IGNORE_INDEX] + labels[1:]
        sigs.append(hashlib.sha1(repr((ids, labels)).encode()).hexdigest()[:16])
        tokens += len(ids)
        label_tokens += sum(1 for x in labels if x != IGNORE_INDEX)
    return {"examples": sorted(sigs), "tokens": tokens, "label_tokens": label_tokens}


def install(trainer_cls, records: list) -> None:
    """Append a batch_record for every training step of trainer_cls (and its subclasses)."""
    original = trainer_cls.training_step

    def training_step(self, model, inputs, *args, **kwargs):
        records.append(batch_record(inputs))
        return original(self, model, inputs, *args, **kwargs)

    trainer_cls.training_step = training_step


def step_clock():
    """A TrainerCallback measuring both tools the same way: tokens the Trainer fed (state.num_input_tokens_seen:
    non-padding tokens, or every token of a padding-free batch) over the wall and process-CPU seconds spent
    between on_step_begin and on_step_end (forward, backward, optimizer step; no evaluation or saving)."""
    import time

    from transformers import TrainerCallback

    class StepClock(TrainerCallback):
        def __init__(self):
            self.wall = self.cpu = 0.0
            self.tokens = 0
            self.gradient_checkpointing = None
            self._start = None

        def on_train_begin(self, args, state, control, model=None, **kw):
            self.gradient_checkpointing = bool(getattr(model, "is_gradient_checkpointing", False))

        def on_step_begin(self, args, state, control, **kw):
            self._start = (time.perf_counter(), time.process_time(), state.num_input_tokens_seen)

        def on_step_end(self, args, state, control, **kw):
            wall, cpu, tokens = self._start
            self.wall += time.perf_counter() - wall
            self.cpu += time.process_time() - cpu
            self.tokens += state.num_input_tokens_seen - tokens

        def figures(self) -> dict:
            return {
                "tokens": self.tokens,
                "step_seconds": self.wall,
                "step_cpu_seconds": self.cpu,
                "tokens_per_second": self.tokens / self.wall if self.wall else None,
                "tokens_per_cpu_second": self.tokens / self.cpu if self.cpu else None,
                "gradient_checkpointing": self.gradient_checkpointing,
            }

    return StepClock()

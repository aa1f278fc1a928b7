"""Generation metrics during training: at every evaluation, answer a fixed few val prompts greedily and score them.

`GenerationEvalCallback` adds `eval_<metric>` (e.g. `eval_rougeL_char`, 0-100, higher is better) to the
evaluation's log entry, before the other callbacks see it: the progress line, TensorBoard/MLflow, the Trainer's
log history (so train/metrics.json and loss.png) and, with `train.early_stopping_metric: <metric>`, the best
checkpoint and early stopping.

The prompts are the first `train.generation_eval.items` rows of val.jsonl (the data stage's seeded split, so the
same rows every evaluation and every run), tokenised once with the chat template and its generation prompt,
and batched once with left padding. Generation is greedy, stops at end of turn, and runs in eval mode; the
model's train mode is restored afterwards.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from domaintune.errors import UserError

log = logging.getLogger(__name__)

METRIC_FAMILIES = ("rouge", "bleu", "chrf", "exact_match", "token_f1")


def metric_family(metric: str) -> str:
    """The `score_item` metric group that produces `metric` (rougeL_char -> rouge)."""
    for family in METRIC_FAMILIES:
        if metric.startswith(family):
            return family
    raise UserError(f"generation_eval.metric {metric!r} is not a text metric (rougeL_char, bleu, chrf, ...)")


def load_prompts(val_file: Path, items: int) -> list[tuple[list[dict], str]]:
    """(prompt messages, reference answer) of the first `items` val rows that end with an assistant turn."""
    from domaintune.train.dataset import load_message_rows

    pairs = []
    for row in load_message_rows(val_file):
        messages = row["messages"]
        if messages and messages[-1].get("role") == "assistant":
            pairs.append((list(messages[:-1]), str(messages[-1].get("content") or "")))
        if len(pairs) == items:
            break
    if not pairs:
        raise UserError(f"train.generation_eval: {val_file} has no row ending with an assistant answer")
    return pairs


class GenerationEvalCallback(TrainerCallback):
    """Scores greedy answers to fixed val prompts at every evaluation and logs `eval_<metric>`."""

    def __init__(self, tokenizer, prompts: list[tuple[list[dict], str]], metric: str, *, max_new_tokens: int,
                 batch_size: int, max_prompt_tokens: int, repetition_penalty: float = 1.0):  # fmt: skip
        self.tokenizer = tokenizer
        self.metric = metric
        self.key = f"eval_{metric}"
        self.family = metric_family(metric)
        self.max_new_tokens = max_new_tokens
        self.repetition_penalty = repetition_penalty
        self.references = [reference for _, reference in prompts]
        self.batches = _batches(tokenizer, [messages for messages, _ in prompts], batch_size, max_prompt_tokens)
        self.history: list[tuple[int, float]] = []

    def on_log(self, args, state, control, logs=None, model=None, **kwargs):
        # The evaluation's log entry: `Trainer.log` appended it to the history just before calling this.
        if not logs or "eval_loss" not in logs or "loss" in logs or self.key in logs or model is None:
            return
        value = self.score(model, _half_dtype(args))
        logs[self.key] = value  # the same dict `evaluate` returns: best checkpoint and early stopping read it
        if state.log_history and state.log_history[-1].get("eval_loss") == logs["eval_loss"]:
            state.log_history[-1][self.key] = value
        self.history.append((state.global_step, value))

    def score(self, model, autocast_dtype: Any = None) -> float:
        """The mean `metric` of greedy answers to the cached prompts."""
        from domaintune.eval.metrics import score_item

        answers = self.generate(model, autocast_dtype)
        scores = []
        for answer, reference in zip(answers, self.references):
            value = score_item(answer, reference, [self.family]).get(self.metric)
            scores.append(float(value) if value is not None else 0.0)
        return sum(scores) / len(scores)

    def generate(self, model, autocast_dtype: Any = None) -> list[str]:
        import torch

        from domaintune.model.loader import end_of_turn_token_ids

        stop = end_of_turn_token_ids(self.tokenizer) or self.tokenizer.eos_token_id
        was_training = model.training
        model.eval()
        answers: list[str] = []
        try:
            device = next(model.parameters()).device
            # the same autocast as the training step: a bf16 base with fp32 adapters needs it outside the Trainer
            autocast = torch.autocast(
                device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None
            )
            with torch.inference_mode(), autocast:
                for input_ids, attention_mask in self.batches:
                    out = model.generate(
                        input_ids=input_ids.to(device),
                        attention_mask=attention_mask.to(device),
                        max_new_tokens=self.max_new_tokens,
                        do_sample=False,
                        repetition_penalty=self.repetition_penalty,
                        eos_token_id=stop,
                        pad_token_id=_pad_id(self.tokenizer),
                        use_cache=True,
                    )
                    new = out[:, input_ids.shape[1] :]
                    answers += [t.strip() for t in self.tokenizer.batch_decode(new, skip_special_tokens=True)]
        finally:
            if was_training:
                model.train()
        return answers


def _pad_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def _batches(tokenizer, prompts: list[list[dict]], batch_size: int, max_prompt_tokens: int) -> list[tuple[Any, Any]]:
    """The prompts tokenised with the chat template (generation prompt on; longer ones keep their last tokens),
    left-padded in batches of `batch_size`: done once, reused at every evaluation."""
    import torch

    encoded = []
    for messages in prompts:
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
        if isinstance(ids, dict) or hasattr(ids, "keys"):
            ids = ids["input_ids"]
        encoded.append(list(ids)[-max_prompt_tokens:])
    batches = []
    for start in range(0, len(encoded), batch_size):
        chunk = encoded[start : start + batch_size]
        width = max(len(ids) for ids in chunk)
        input_ids = torch.tensor([[_pad_id(tokenizer)] * (width - len(ids)) + ids for ids in chunk])
        mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in chunk])
        batches.append((input_ids, mask))
    return batches


def build_generation_eval(tcfg, primary_metric: str, tokenizer, val_file: Path) -> GenerationEvalCallback | None:
    """The callback for `train.generation_eval` (None when off, or for methods without SFT val rows)."""
    settings = tcfg.generation_eval
    if settings.items == 0:
        return None
    if tcfg.trainer_loss in ("dpo", "preference"):
        log.warning("train.generation_eval: skipped for method %s (its val rows are preference pairs)", tcfg.method)
        return None
    metric = settings.metric or primary_metric
    if tcfg.early_stopping_metric not in ("loss", metric):
        raise UserError(
            f"train.early_stopping_metric {tcfg.early_stopping_metric!r} is not the metric generation_eval "
            f"scores ({metric!r}, from eval.primary_metric): set train.generation_eval.metric"
        )
    prompts = load_prompts(val_file, settings.items)
    return GenerationEvalCallback(
        tokenizer,
        prompts,
        metric,
        max_new_tokens=settings.max_new_tokens,
        repetition_penalty=settings.repetition_penalty,
        batch_size=settings.batch_size,
        max_prompt_tokens=tcfg.max_length,
    )


def _half_dtype(args: Any) -> Any:
    """The autocast dtype the Trainer trains under (None: full precision)."""
    import torch

    if getattr(args, "bf16", False):
        return torch.bfloat16
    if getattr(args, "fp16", False):
        return torch.float16
    return None

"""The reward model: a sequence-classification head (one logit) on the base model, trained on preference pairs.

`build_reward_model` makes the trainable model (whole model or LoRA + the new `score` head), `RewardModelScorer`
loads a saved `model/` folder (adapter or full) and scores prompt + answer pairs, `pairwise_accuracy` is how
often it scores the chosen answer above the rejected one on held-out pairs.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from domaintune.errors import UserError
from domaintune.train.config import TrainConfig
from domaintune.train.preference.tool_rows import turns_of


def build_reward_model(tcfg: TrainConfig, model_dir: Path, dtype: str) -> tuple[Any, dict[str, Any]]:
    """(model, info): AutoModelForSequenceClassification with num_labels=1, wrapped in LoRA unless `full`."""
    from transformers import AutoModelForSequenceClassification

    from domaintune.model.loader import torch_dtype

    model = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=1, dtype=torch_dtype(dtype))
    model.config.use_cache = False
    if tcfg.reward.adapter == "lora":
        from peft import LoraConfig, TaskType, get_peft_model

        lora = tcfg.lora
        model = get_peft_model(
            model,
            LoraConfig(
                task_type=TaskType.SEQ_CLS,
                r=lora.r,
                lora_alpha=lora.alpha,
                lora_dropout=lora.dropout,
                target_modules=lora.target_modules,
            ),
        )
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return model, {"method": "reward", "head": "sequence_classification", "trainable_params": trainable,
                   "total_params": total}  # fmt: skip


def load_reward_model(folder: Path, dtype: str = "float32") -> tuple[Any, Any]:
    """(model, tokenizer) from a `method: reward` run's model/ folder (adapter on its recorded base, or full)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from domaintune.model.config import ModelConfig
    from domaintune.model.loader import resolve_model_dir, torch_dtype

    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"reward model folder {folder} does not exist (train one with `train.method: reward`)")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    adapter_cfg = folder / "adapter_config.json"
    if not adapter_cfg.is_file():
        model = AutoModelForSequenceClassification.from_pretrained(folder, num_labels=1, dtype=torch_dtype(dtype))
    else:
        from peft import PeftModel

        base_path = json.loads(adapter_cfg.read_text())["base_model_name_or_path"]
        if not Path(base_path).is_dir():
            base_path = str(resolve_model_dir(ModelConfig(name_or_path=base_path)))
        base = AutoModelForSequenceClassification.from_pretrained(base_path, num_labels=1, dtype=torch_dtype(dtype))
        model = PeftModel.from_pretrained(base, folder)
    model.config.pad_token_id = tokenizer.pad_token_id
    model.eval()
    return model, tokenizer


def _as_messages(value: Any, role: str) -> list[dict[str, str]]:
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    return [{"role": m["role"], "content": m["content"]} for m in value]


class RewardModelScorer:
    """Scores (prompt, completion) pairs with a saved reward model: the head's logit per pair."""

    def __init__(self, folder: Path, batch_size: int = 8):
        self.model, self.tokenizer = load_reward_model(folder)
        self.batch_size = batch_size

    def texts(self, prompts: Sequence[Any], completions: Sequence[Any]) -> list[str]:
        return [
            self.tokenizer.apply_chat_template(_as_messages(p, "user") + _as_messages(c, "assistant"), tokenize=False)
            for p, c in zip(prompts, completions, strict=True)
        ]

    def __call__(self, prompts: Sequence[Any], completions: Sequence[Any], **fields: Any) -> list[float]:
        import torch

        texts = self.texts(turns_of(prompts, fields), completions)
        scores: list[float] = []
        for start in range(0, len(texts), self.batch_size):
            batch = self.tokenizer(
                texts[start : start + self.batch_size], return_tensors="pt", padding=True, add_special_tokens=False
            )
            with torch.no_grad():
                scores += self.model(**batch).logits[:, 0].float().tolist()
        return scores


def pairwise_accuracy(scorer: RewardModelScorer, pairs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Share of pairs whose chosen answer scores above the rejected one, with a 95% Wilson interval."""
    from domaintune.train.preference.stats import wilson_interval

    prompts = [p["prompt"] for p in pairs]
    chosen = scorer(prompts, [p["chosen"] for p in pairs])
    rejected = scorer(prompts, [p["rejected"] for p in pairs])
    wins = sum(c > r for c, r in zip(chosen, rejected, strict=True))
    low, high = wilson_interval(wins, len(pairs))
    return {"pairs": len(pairs), "accuracy": wins / len(pairs) if pairs else None, "ci95": [low, high],
            "mean_margin": sum(c - r for c, r in zip(chosen, rejected, strict=True)) / max(1, len(pairs))}  # fmt: skip

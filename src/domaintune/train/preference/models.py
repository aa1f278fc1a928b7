"""The trainable model of a preference / reinforcement method, and the speed levers it may use."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from domaintune.train.config import TrainConfig
from domaintune.train.preference import GENERATING_METHODS


def build_preference_model(
    tcfg: TrainConfig, model_dir: Path, init_adapter: Path | None, dtype: str
) -> tuple[Any, dict[str, Any]]:
    """(model, info): a sequence classifier for `reward`, else the causal LM of the adapter method (train/methods.py).

    info records what the registry should know: the reference model and the reward definition."""
    if tcfg.method == "reward":
        from domaintune.train.preference.reward import build_reward_model

        model, info = build_reward_model(tcfg, model_dir, dtype)
    else:
        from domaintune.train.methods import build_trainable

        model, info = build_trainable(tcfg.trained_as, tcfg, model_dir, init_adapter, dtype)
    info["preference"] = preference_summary(tcfg, model_dir, init_adapter)
    return model, info


def preference_summary(tcfg: TrainConfig, model_dir: Path, init_adapter: Path | None) -> dict[str, Any]:
    """The method, its reference model and its reward definition (train/metrics.json, then the registry)."""
    reference_free = tcfg.method in ("orpo", "simpo", "reward")
    reference = None if reference_free else str(init_adapter or model_dir)
    summary: dict[str, Any] = {"method": tcfg.method, "reference_model": reference}
    if tcfg.method == "grpo":
        summary["reward"] = [
            spec.model_dump(mode="json", by_alias=True, exclude_defaults=True) for spec in tcfg.grpo.rewards
        ]
    elif tcfg.method == "ppo" and tcfg.ppo is not None:
        summary["reward"] = {"reward_model": str(tcfg.ppo.reward_model)}
    return summary


def speed_settings(tcfg: TrainConfig) -> TrainConfig:
    """Methods that generate while training use sdpa attention, peft's own LoRA forward and fp32 base weights (the
    CPU training kernels are for teacher-forced steps, and trl generates outside the bf16 autocast)."""
    if tcfg.method not in GENERATING_METHODS:
        return tcfg
    update = {"attention": "sdpa", "fused_lora_linear": False, "half_precision_base": False}
    speed = tcfg.speed.model_copy(update=update)
    return tcfg.model_copy(update={"speed": speed})

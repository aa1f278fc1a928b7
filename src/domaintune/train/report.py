"""`<run>/train/metrics.json` and `loss.png`: what was trained, on what, how fast, and the loss curves."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from domaintune.layout import RunLayout
from domaintune.train.callbacks import StepTimerCallback
from domaintune.train.data import TrainData
from domaintune.train.distributed import Session
from domaintune.train.init_from import Start
from domaintune.train.plot import GENERATION_METRIC_KEYS
from domaintune.utils.io import write_json
from domaintune.utils.versions import library_versions

if TYPE_CHECKING:
    from domaintune.config import ProjectConfig

# The libraries train/metrics.json records the versions of.
TRAIN_LIBRARIES = ("torch", "transformers", "peft", "trl", "accelerate", "datasets", "domaintune")


@dataclass
class TrainOutcome:
    """What one training session produced, for the report."""

    trainer: Any
    output: Any  # Trainer.train's TrainOutput
    timer: StepTimerCallback
    saved_kind: str
    train_wall: float
    started: float  # time.time() at the start of run_train
    resume_from: Path | None = None
    params: dict[str, Any] = field(default_factory=dict)  # build_trainable's info plus the engaged speed levers
    speed: dict[str, Any] = field(default_factory=dict)  # speed.apply's report
    chosen: dict[str, Any] = field(default_factory=dict)  # precision / num_threads: value, reason (and warning)


def device_summary() -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {
        "cuda": torch.cuda.is_available(),
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def build_metrics(cfg: ProjectConfig, start: Start, data: TrainData, session: Session, out: TrainOutcome) -> dict:
    tcfg = cfg.train
    state = out.trainer.state
    history = state.log_history
    evals = [(h["step"], h["eval_loss"]) for h in history if "eval_loss" in h]
    losses = [(h["step"], h["loss"]) for h in history if "loss" in h and "eval_loss" not in h]
    timer = out.timer
    return {
        "name": cfg.name,
        "method": tcfg.method,
        "trained_as": tcfg.trained_as,
        "model_kind": out.saved_kind,
        "base_model": cfg.model.name_or_path,
        "base_model_dir": str(start.model_dir),
        "init_from": str(start.init_ref) if start.init_ref else None,
        "config": tcfg.model_dump(mode="json"),
        "data": data.info,
        "data_fingerprint": data.fingerprint,
        "truncated": data.info["truncated"],
        "params": out.params,
        "versions": library_versions(TRAIN_LIBRARIES),
        "device": {**device_summary(), "allocator": out.speed.get("allocator", {"malloc": "unchanged"})},
        "speed": out.speed.get("why", {}),
        "precision": tcfg.precision,
        "neftune": neftune_summary(out.trainer),
        "chosen": out.chosen,  # what `auto` (or the config) set precision and threads to, and why
        "steps": state.global_step,
        "max_steps": state.max_steps,
        "epochs": state.epoch,
        "stopped_early": state.global_step < state.max_steps,
        "resumed_from": str(out.resume_from) if out.resume_from else None,
        "step0_val_loss": next((loss for step, loss in evals if step == 0), None),
        "final_train_loss": losses[-1][1] if losses else None,
        "mean_train_loss": out.output.training_loss,
        "final_val_loss": evals[-1][1] if evals else None,
        "best_val_loss": min((loss for _, loss in evals), default=None),
        "best_checkpoint": state.best_model_checkpoint,
        "tokens_seen": state.num_input_tokens_seen,
        "tokens_this_session": timer.tokens,
        "tokens_per_second": timer.tokens / timer.train_seconds if timer.train_seconds else None,
        "train_step_seconds": timer.train_seconds,
        "train_wall_seconds": out.train_wall,
        "wall_seconds": time.time() - out.started,
        "train_curve": losses,
        "val_curve": evals,
        "generation_eval": generation_metrics(tcfg, history),
        "distributed": session.summary(),
    }


def neftune_summary(trainer) -> dict[str, Any]:
    """Whether the Trainer added NEFTune noise to the input embeddings in training steps, and its alpha."""
    alpha = getattr(trainer.args, "neftune_noise_alpha", None)
    return {"on": alpha is not None, "noise_alpha": alpha}


def generation_metrics(tcfg, history: list[dict]) -> dict | None:
    """`train.generation_eval`'s metric at every evaluation (None when it was off)."""
    settings = tcfg.generation_eval
    key = next((k for h in history for k in h if k.startswith("eval_") and k[5:] in GENERATION_METRIC_KEYS), None)
    if settings.items == 0 or key is None:
        return None
    curve = [[h["step"], h[key]] for h in history if key in h]
    return {
        "metric": key[5:],
        "items": settings.items,
        "max_new_tokens": settings.max_new_tokens,
        "curve": curve,
        "final": curve[-1][1],
        "best": max(value for _, value in curve),
    }


def write_reports(cfg: ProjectConfig, layout: RunLayout, metrics: dict, log_history: list[dict]) -> None:
    """metrics.json and the loss plot (rank 0 only: the caller checks)."""
    from domaintune.train.plot import plot_losses

    write_json(layout.train_metrics, metrics)
    plot_losses(log_history, layout.train_dir / "loss.png", title=f"{cfg.name}: {cfg.train.method}")

"""The Trainer for the configured method: its arguments, callbacks, and the loss it computes.

- SFT (full, freeze, LoRA/DoRA/QLoRA, IA3): `SparseLogitsTrainer`, the label-token loss of
  `train/speed/fused_head.py`;
- prompt learning (prefix, prompt, ptuning): the plain Trainer (virtual tokens shift positions inside peft's
  forward, so the model's own loss is used);
- distill: `DistillTrainer` (train/distill.py); dpo: trl's `DPOTrainer`;
- kto, orpo, simpo, reward, ppo, grpo: trl's trainers, built in train/preference/trainers.py.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from domaintune.errors import UserError
from domaintune.layout import RunLayout
from domaintune.train.callbacks import FinalEvalCallback, ReplayEpochCallback, RichProgressCallback, StepTimerCallback
from domaintune.train.config import TrainConfig
from domaintune.train.data import TrainData
from domaintune.train.dataset import ReplayMixDataset
from domaintune.train.distributed import Session

if TYPE_CHECKING:
    from transformers import Trainer, TrainerCallback

    from domaintune.config import ProjectConfig


@dataclass
class TrainerParts:
    """What the Trainer is built from, besides the config."""

    model: Any
    tokenizer: Any
    data: TrainData
    seed: int
    resume: bool
    fused_head: bool  # what `speed.apply` engaged for the label-token loss
    teacher: Any = None  # distillation only


def check_tracking(tcfg: TrainConfig) -> None:
    if tcfg.tracking == "mlflow":
        import importlib.util

        if importlib.util.find_spec("mlflow") is None:
            raise UserError("train.tracking: mlflow is not installed: pip install 'domaintune[tracking]' (or mlflow)")


def build_trainer(
    cfg: ProjectConfig,
    layout: RunLayout,
    parts: TrainerParts,
    session: Session,
    extra_callbacks: Sequence[TrainerCallback] = (),
) -> tuple[Trainer, StepTimerCallback]:
    """The Trainer for `cfg.train.method`, with rank 0's progress bar and logs; returns it and its step timer."""
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    from domaintune.train.generation_eval import build_generation_eval

    tcfg = cfg.train
    timer = StepTimerCallback()
    primary = cfg.eval.primary_metric if tcfg.generation_eval.items and not tcfg.generation_eval.metric else ""
    generation = build_generation_eval(tcfg, primary, parts.tokenizer, layout.val_file)
    callbacks = _callbacks(tcfg, layout, cfg.name, parts.data, session, timer, generation) + list(extra_callbacks)
    tokens_mode = "all" if (tcfg.packing and tcfg.trainer_loss not in ("dpo", "preference")) else "non_padding"
    arguments = {
        "include_num_input_tokens_seen": tokens_mode,
        **session.trainer_arguments(parts.model, layout.train_dir),
    }
    trainer = _trainer(tcfg, layout.checkpoints_dir, parts, callbacks, arguments)
    trainer.remove_callback(ProgressCallback)
    trainer.remove_callback(PrinterCallback)
    session.prepare_trainer(trainer)
    return trainer, timer


def _trainer(tcfg: TrainConfig, checkpoint_dir: Path, parts: TrainerParts, callbacks: list, arguments: dict):
    if tcfg.trainer_loss == "preference":  # kto, orpo, simpo, reward, ppo, grpo
        from domaintune.train.preference.trainers import build_preference_trainer

        def make_args(args_cls, **extra):
            return training_arguments(
                tcfg, parts.seed, checkpoint_dir, not parts.resume, args_cls=args_cls, **extra, **arguments
            )

        return build_preference_trainer(tcfg, parts, callbacks, make_args)
    if tcfg.trainer_loss == "dpo":
        from trl import DPOConfig, DPOTrainer

        dpo_args = training_arguments(
            tcfg,
            parts.seed,
            checkpoint_dir,
            not parts.resume,
            args_cls=DPOConfig,
            beta=tcfg.dpo.beta,
            loss_type=[tcfg.dpo.loss_type],
            label_smoothing=tcfg.dpo.label_smoothing,
            max_length=tcfg.max_length,
            **arguments,
        )
        return DPOTrainer(
            model=parts.model,
            ref_model=None,
            args=dpo_args,
            train_dataset=parts.data.train,
            eval_dataset=parts.data.val,
            processing_class=parts.tokenizer,
            callbacks=callbacks,
        )
    kwargs = {
        "model": parts.model,
        "args": training_arguments(tcfg, parts.seed, checkpoint_dir, not parts.resume, **arguments),
        "train_dataset": parts.data.train,
        "eval_dataset": parts.data.val,
        "data_collator": parts.data.collator,
        "processing_class": parts.tokenizer,
        "callbacks": callbacks,
    }
    if tcfg.trainer_loss == "distill":
        from domaintune.train.distill import DistillTrainer

        assert tcfg.distill is not None  # the config requires it for method distill
        return DistillTrainer(
            teacher=parts.teacher, alpha=tcfg.distill.alpha, temperature=tcfg.distill.temperature, **kwargs
        )
    if tcfg.trainer_loss == "model":
        from transformers import Trainer

        return Trainer(**kwargs)
    from domaintune.train.sft_trainer import SparseLogitsTrainer

    return SparseLogitsTrainer(fused_head=parts.fused_head, **kwargs)


def _callbacks(
    tcfg: TrainConfig, layout: RunLayout, run_name: str, data: TrainData, session: Session, timer, generation=None
) -> list:
    # generation_eval first: it adds its metric to the evaluation's log entry before the others read it
    callbacks: list = [generation] if generation is not None else []
    progress = RichProgressCallback(disable=not session.world.is_main, metric=generation.metric if generation else None)
    callbacks += [progress, timer, FinalEvalCallback()]
    if isinstance(data.train, ReplayMixDataset):
        callbacks.append(ReplayEpochCallback(data.train))
    if tcfg.early_stopping_patience:
        from transformers import EarlyStoppingCallback

        callbacks.append(
            EarlyStoppingCallback(
                early_stopping_patience=tcfg.early_stopping_patience,
                early_stopping_threshold=tcfg.early_stopping_min_delta,
            )
        )
    if session.world.is_main:  # TensorBoard/MLflow logs from rank 0 only
        callbacks += tracking_callbacks(tcfg, layout.train_dir, run_name)
    return callbacks


def training_arguments(
    tcfg: TrainConfig,
    seed: int,
    checkpoint_dir: Path,
    run_eval_on_start: bool,
    args_cls=None,
    per_device_batch_size: int | None = None,
    **extra,
):
    import torch
    from transformers import TrainingArguments

    args_cls = args_cls or TrainingArguments
    batch = per_device_batch_size or tcfg.batch_size
    # DeepSpeed picks its own accelerator (CUDA, or its CPU accelerator): accelerate must not force plain CPU.
    use_cpu = not torch.cuda.is_available() and "deepspeed" not in extra
    return args_cls(
        output_dir=str(checkpoint_dir),
        per_device_train_batch_size=batch,
        per_device_eval_batch_size=batch,
        gradient_accumulation_steps=tcfg.gradient_accumulation_steps,
        learning_rate=tcfg.learning_rate,
        warmup_steps=tcfg.warmup_ratio,  # a float < 1 is a ratio of the total steps
        lr_scheduler_type=tcfg.lr_scheduler,
        weight_decay=tcfg.weight_decay,
        num_train_epochs=tcfg.epochs,
        max_steps=tcfg.max_steps or -1,
        activation_checkpointing=tcfg.gradient_checkpointing,  # transformers 5 name (gradient_* is a deprecated alias)
        seed=seed,
        data_seed=seed,
        bf16=tcfg.precision == "bf16",
        fp16=tcfg.precision == "fp16",
        use_cpu=use_cpu,
        eval_strategy="steps",
        eval_steps=tcfg.eval_steps,
        eval_on_start=run_eval_on_start,
        save_strategy="steps",
        save_steps=tcfg.save_steps,
        save_total_limit=tcfg.save_total_limit,
        load_best_model_at_end=True,
        # every generation_eval metric (rougeL_char, bleu, ...) is higher-is-better; the val loss is not
        metric_for_best_model=f"eval_{tcfg.early_stopping_metric}",
        greater_is_better=tcfg.early_stopping_metric != "loss",
        logging_steps=tcfg.logging_steps,
        logging_first_step=True,
        report_to=[],
        disable_tqdm=True,
        remove_unused_columns=False,
        prediction_loss_only=True,  # evaluation needs the loss only: never keep every batch's logits
        dataloader_num_workers=0,
        dataloader_pin_memory=False,
        # NEFTune: transformers' Trainer hooks the input embeddings for training steps (config: SFT methods only)
        neftune_noise_alpha=tcfg.neftune_noise_alpha,
        **extra,
    )


def tracking_callbacks(tcfg: TrainConfig, train_dir: Path, run_name: str) -> list:
    if tcfg.tracking == "none":
        return []
    from torch.utils.tensorboard import SummaryWriter
    from transformers.integrations import TensorBoardCallback

    callbacks: list = [TensorBoardCallback(tb_writer=SummaryWriter(log_dir=str(train_dir / "tensorboard")))]
    if tcfg.tracking == "mlflow":
        from transformers.integrations import MLflowCallback

        class RunFolderMLflowCallback(MLflowCallback):
            """MLFLOW_TRACKING_URI when set; otherwise a SQLite store in train/mlflow.db, not mlflow's cwd default."""

            def setup(self, args, state, model):
                if not os.environ.get("MLFLOW_TRACKING_URI"):
                    self._ml_flow.set_tracking_uri(f"sqlite:///{(train_dir / 'mlflow.db').resolve()}")
                super().setup(args, state, model)

        os.environ.setdefault("MLFLOW_EXPERIMENT_NAME", run_name)
        callbacks.append(RunFolderMLflowCallback())
    return callbacks

"""`run_train`: fine-tune the configured base model on `<run>/data/*.jsonl` with transformers' Trainer.

Trainer gives checkpoints with optimizer/scheduler/RNG/data position (so `--resume` after a
`kill -9` continues exactly), evaluation cadence, best-checkpoint tracking and early stopping; this
module chooses the method (peft adapters, freezing, distillation, DPO via trl), builds the
assistant-only-label datasets, and writes `model/`, `train/metrics.json` and `train/loss.png`.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import shutil
import time
from pathlib import Path
from typing import Any

from domaintune.errors import UserError
from domaintune.model.config import ModelConfig
from domaintune.model.loader import (
    BUNDLED_SMOLLM2,
    TINY_RANDOM_LLAMA,
    is_adapter_dir,
    load_tokenizer,
    resolve_model_dir,
)
from domaintune.train.config import ADAPTER_METHODS, PROMPT_LEARNING_METHODS, TrainConfig
from domaintune.train.dataset import (
    EncodeStats,
    ReplayMixDataset,
    encode_rows,
    load_message_rows,
    load_preference_rows,
    make_collator,
)
from domaintune.utils.io import fingerprint_files, write_json

log = logging.getLogger(__name__)

CHECKPOINT_PREFIX = "checkpoint-"


# --------------------------------------------------------------------------- helpers


def resolve_model_reference(ref: str, cfg) -> Path:
    """`registry://name@alias` through the registry; otherwise a local folder."""
    if ref.startswith("registry://"):
        from domaintune.registry import registry_from_config  # lazy: the registry stage is optional here

        return Path(registry_from_config(cfg).resolve(ref))
    path = Path(ref).expanduser()
    if not path.is_absolute() and cfg.config_path is not None:
        candidate = cfg.base_dir / path
        if candidate.exists():
            path = candidate
    if not path.is_dir():
        raise UserError(f"train.init_from: {ref} is not a folder or a registry:// uri")
    return path


def last_complete_checkpoint(checkpoint_dir: Path) -> Path | None:
    """Newest checkpoint whose trainer_state.json (written last) parses; a half-written one is skipped."""
    if not checkpoint_dir.is_dir():
        return None
    candidates = []
    for child in checkpoint_dir.iterdir():
        if (
            child.is_dir()
            and child.name.startswith(CHECKPOINT_PREFIX)
            and child.name[len(CHECKPOINT_PREFIX) :].isdigit()
        ):
            candidates.append((int(child.name[len(CHECKPOINT_PREFIX) :]), child))
    for _, child in sorted(candidates, reverse=True):
        try:
            json.loads((child / "trainer_state.json").read_text())
            return child
        except (OSError, ValueError):
            log.warning("skipping incomplete checkpoint %s", child)
    return None


def library_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for name in ("torch", "transformers", "peft", "trl", "accelerate", "datasets", "domaintune"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            pass
    return out


def _device_summary() -> dict[str, Any]:
    import torch

    info = {"cuda": torch.cuda.is_available(), "threads": torch.get_num_threads(), "cpu_count": os.cpu_count()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def _check_tracking(tcfg: TrainConfig) -> None:
    if tcfg.tracking == "mlflow":
        import importlib.util

        if importlib.util.find_spec("mlflow") is None:
            raise UserError("train.tracking: mlflow is not installed: pip install 'domaintune[tracking]' (or mlflow)")


def _check_precision(tcfg: TrainConfig) -> None:
    import torch

    # (bf16 autocast on a CPU is correct everywhere, and fast with AVX-512-BF16 / AMX.)
    if tcfg.precision == "fp16" and not torch.cuda.is_available():
        raise UserError("train.precision: fp16 needs a CUDA GPU; use bf16 or fp32 on a CPU")


def _training_arguments(
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
        metric_for_best_model="eval_loss",
        greater_is_better=False,
        logging_steps=tcfg.logging_steps,
        logging_first_step=True,
        report_to=[],
        disable_tqdm=True,
        remove_unused_columns=False,
        prediction_loss_only=True,  # evaluation needs the loss only: never keep every batch's logits
        dataloader_num_workers=0,
        dataloader_pin_memory=False,
        **extra,
    )


def _adapter_base_reference(model_cfg: ModelConfig, model_dir: Path) -> str:
    """What adapter_config.json records as base: the bundled/tiny name (portable) or the folder."""
    if model_cfg.name_or_path in (BUNDLED_SMOLLM2, TINY_RANDOM_LLAMA):
        return model_cfg.name_or_path
    return str(model_dir)


# --------------------------------------------------------------------------- entry point


def run_train(cfg, output_dir, resume: bool = False, extra_callbacks: list | None = None) -> dict:
    """Train `cfg.train.method` on `<output_dir>/data/` and write model/ and train/. Returns the metrics dict."""
    import torch

    started = time.time()
    output_dir = Path(output_dir)
    tcfg: TrainConfig = cfg.train
    seed = tcfg.seed if tcfg.seed is not None else cfg.seed
    _check_tracking(tcfg)
    _check_precision(tcfg)
    if tcfg.num_threads:
        torch.set_num_threads(tcfg.num_threads)
    allocator = {"malloc": "unchanged"}
    if tcfg.keep_freed_buffers and not torch.cuda.is_available():
        from domaintune.train.speed.allocator import keep_freed_buffers

        allocator = keep_freed_buffers()

    from domaintune.train import distributed as dist

    world = dist.current_world()
    dist.check_launch(tcfg, world, output_dir / "train")
    dist_state = None
    if dist.launched_by_torchrun() and tcfg.distributed.strategy != "none":
        dist_state = dist.init_process_group(tcfg.distributed)
    per_device_batch = dist.per_device_batch_size(tcfg, world)

    train_dir = output_dir / "train"
    checkpoint_dir = train_dir / "checkpoints"
    model_out = output_dir / "model"
    resume_from = None
    if resume:
        resume_from = last_complete_checkpoint(checkpoint_dir)
        if resume_from is None:
            raise UserError(f"--resume: no complete checkpoint in {checkpoint_dir} (train without --resume)")
    train_dir.mkdir(parents=True, exist_ok=True)

    # Base model, possibly a full model from init_from; an adapter from init_from is continued.
    model_cfg = cfg.model
    init_adapter = None
    init_ref = None
    if tcfg.init_from:
        init_ref = resolve_model_reference(tcfg.init_from, cfg)
        if is_adapter_dir(init_ref):
            init_adapter = init_ref
        elif (init_ref / "config.json").is_file():
            model_cfg = model_cfg.model_copy(update={"name_or_path": str(init_ref)})
        else:
            raise UserError(f"train.init_from: {init_ref} holds neither an adapter nor a model")
    model_dir = resolve_model_dir(model_cfg)
    tokenizer = load_tokenizer(model_cfg, model_dir)

    method = tcfg.method
    if method == "dpo":
        effective = tcfg.dpo.adapter
    elif method == "distill":
        effective = tcfg.distill.student_method
    else:
        effective = method

    data_dir = output_dir / "data"
    if method == "dpo":
        datasets, data_info, collator = _dpo_data(tcfg, data_dir, seed, default_preference_path(cfg, output_dir))
    else:
        datasets, data_info, collator = _sft_data(tcfg, tokenizer, data_dir, seed)

    if world.is_main:  # only rank 0 writes; the others wait for it below
        _check_resume_identity(train_dir, tcfg, data_info["fingerprint"], resume)
        if not resume and checkpoint_dir.exists():
            log.info("starting fresh: removing old checkpoints in %s", checkpoint_dir)
            shutil.rmtree(checkpoint_dir)
    if dist_state is not None:
        dist_state.wait_for_everyone()

    from transformers import set_seed

    from domaintune.train.methods import build_trainable

    set_seed(seed)  # adapter initialisation (LoRA A, prompt embeddings...) draws from the global RNG
    base_dtype = cfg.model.dtype
    if tcfg.half_precision_base and tcfg.precision != "fp32" and effective in ADAPTER_METHODS and effective != "qlora":
        base_dtype = "bfloat16" if tcfg.precision == "bf16" else "float16"
    model, method_info = build_trainable(effective, tcfg, model_dir, init_adapter, base_dtype)
    method_info["base_dtype"] = base_dtype
    if tcfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if hasattr(model, "enable_input_require_grads"):
            model.enable_input_require_grads()

    from domaintune.train.callbacks import (
        FinalEvalCallback,
        ReplayEpochCallback,
        RichProgressCallback,
        StepTimerCallback,
    )

    timer = StepTimerCallback()
    callbacks = [RichProgressCallback(disable=not world.is_main), timer, FinalEvalCallback()]
    if isinstance(datasets["train"], ReplayMixDataset):
        callbacks.append(ReplayEpochCallback(datasets["train"]))
    if tcfg.early_stopping_patience:
        from transformers import EarlyStoppingCallback

        callbacks.append(
            EarlyStoppingCallback(
                early_stopping_patience=tcfg.early_stopping_patience,
                early_stopping_threshold=tcfg.early_stopping_min_delta,
            )
        )
    if world.is_main:  # TensorBoard/MLflow logs from rank 0 only
        callbacks += _tracking_callbacks(tcfg, train_dir, cfg.name)
    callbacks += list(extra_callbacks or [])

    tokens_mode = "all" if (tcfg.packing and method != "dpo") else "non_padding"
    common = dict(include_num_input_tokens_seen=tokens_mode, per_device_batch_size=per_device_batch)
    common.update(dist.training_arguments(tcfg, world, model, train_dir))
    if "deepspeed" in common:
        common["deepspeed"] = dist.deepspeed_config(tcfg)  # validated by check_launch
    if method == "dpo":
        trainer = _dpo_trainer(tcfg, seed, checkpoint_dir, not resume, model, tokenizer, datasets, callbacks, common)
    else:
        args = _training_arguments(tcfg, seed, checkpoint_dir, not resume, **common)
        trainer_kwargs = dict(
            model=model,
            args=args,
            train_dataset=datasets["train"],
            eval_dataset=datasets["val"],
            data_collator=collator,
            processing_class=tokenizer,
            callbacks=callbacks,
        )
        if method == "distill":
            from domaintune.train.distill import DistillTrainer, load_teacher

            teacher = load_teacher(tcfg.distill.teacher, cfg, model)
            trainer = DistillTrainer(
                teacher=teacher, alpha=tcfg.distill.alpha, temperature=tcfg.distill.temperature, **trainer_kwargs
            )
        elif effective in PROMPT_LEARNING_METHODS:
            from transformers import Trainer

            # Virtual tokens shift positions inside peft's forward: use the model's own loss.
            trainer = Trainer(**trainer_kwargs)
        else:
            from domaintune.train.speed.fused_head import SparseLogitsTrainer

            # FSDP and ZeRO-3 shard the output head, so it cannot be called outside the model's forward.
            sharded_head = dist_state is not None and (
                tcfg.distributed.strategy == "fsdp"
                or (tcfg.distributed.strategy == "deepspeed" and tcfg.distributed.deepspeed.zero_stage == 3)
            )
            trainer = SparseLogitsTrainer(fused_head=tcfg.fused_head_loss and not sharded_head, **trainer_kwargs)
            method_info["fused_head_loss"] = trainer.fused_head
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    trainer.remove_callback(ProgressCallback)
    trainer.remove_callback(PrinterCallback)
    if dist_state is not None:
        if tcfg.distributed.strategy == "fsdp":
            dist.enable_fsdp_on_cpu(trainer)
            dist.create_checkpoint_folder_first(trainer)
        dist.check_strategy_active(trainer, tcfg)

    train_start = time.perf_counter()
    output = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    train_wall = time.perf_counter() - train_start

    # Save what the best checkpoint holds (load_best_model_at_end put it in trainer.model).
    if dist_state is not None:
        saved_kind = _save_model_distributed(trainer, tokenizer, model_out, model_cfg, model_dir, effective, method)
    else:
        saved_kind = _save_model(trainer, tokenizer, model_out, model_cfg, model_dir, effective, method)

    metrics = _metrics(
        cfg,
        tcfg,
        trainer,
        output,
        timer,
        data_info,
        method_info,
        effective,
        saved_kind,
        train_wall,
        time.time() - started,
        resume_from,
        model_dir,
        init_ref,
    )
    metrics["device"]["allocator"] = allocator
    metrics["distributed"] = {
        "strategy": tcfg.distributed.strategy if dist_state is not None else "none",
        "world_size": world.world_size,
        "per_device_batch_size": per_device_batch,
        "global_batch_size": per_device_batch * world.world_size,
        "backend": None if dist_state is None else str(dist_state.backend),
    }
    if world.is_main:  # reports and plots from rank 0 only
        write_json(train_dir / "metrics.json", metrics)
        from domaintune.train.plot import plot_losses

        plot_losses(trainer.state.log_history, train_dir / "loss.png", title=f"{cfg.name}: {method}")
    if dist_state is not None:
        dist_state.wait_for_everyone()
    return metrics


def _check_resume_identity(train_dir: Path, tcfg: TrainConfig, fingerprint: str, resume: bool) -> None:
    """A resumed run must see the same data and settings as the run that wrote the checkpoints."""
    path = train_dir / "run_identity.json"
    # Settings that define what the checkpoints are; max_steps, cadence etc. may change on resume.
    keys = (
        "method",
        "lora",
        "freeze",
        "prompt_learning",
        "ia3",
        "distill",
        "dpo",
        "init_from",
        "max_length",
        "packing",
        "batch_size",
        "gradient_accumulation_steps",
        "replay",
        "seed",
        "max_train_samples",
    )
    settings = {k: v for k, v in tcfg.model_dump(mode="json").items() if k in keys}
    if resume and path.is_file():
        old = json.loads(path.read_text())
        if old.get("fingerprint") != fingerprint:
            raise UserError(
                "--resume: the training files changed since the checkpoints were written "
                "(data fingerprint differs); train again without --resume"
            )
        changed = sorted(
            k for k in set(settings) | set(old.get("settings", {})) if settings.get(k) != old.get("settings", {}).get(k)
        )
        if changed:
            raise UserError(f"--resume: train settings changed since the checkpoints were written: {changed}")
    elif not resume:
        write_json(path, {"fingerprint": fingerprint, "settings": settings})


# --------------------------------------------------------------------------- data


def _sft_data(tcfg: TrainConfig, tokenizer, data_dir: Path, seed: int):
    train_path, val_path = data_dir / "train.jsonl", data_dir / "val.jsonl"
    train_rows = load_message_rows(train_path, tcfg.max_train_samples)
    val_rows = load_message_rows(val_path, tcfg.max_val_samples)
    train_examples, train_stats = encode_rows(tokenizer, train_rows, tcfg.max_length)
    val_examples, val_stats = encode_rows(tokenizer, val_rows, tcfg.max_length)
    if not train_examples:
        raise UserError(f"{train_path}: no example keeps an assistant token within max_length={tcfg.max_length}")
    if not val_examples:
        raise UserError(f"{val_path}: no example keeps an assistant token within max_length={tcfg.max_length}")
    files = [train_path, val_path]
    info: dict[str, Any] = {
        "train_file": str(train_path),
        "val_file": str(val_path),
        "train": train_stats.as_dict(),
        "val": val_stats.as_dict(),
    }
    train_ds: Any = train_examples
    if tcfg.replay.ratio > 0:
        general_path = Path(tcfg.replay.path) if tcfg.replay.path else data_dir / "general.jsonl"
        general_rows = load_message_rows(general_path)
        general_examples, general_stats = encode_rows(tokenizer, general_rows, tcfg.max_length, EncodeStats())
        if not general_examples:
            raise UserError(f"{general_path}: no usable replay rows within max_length={tcfg.max_length}")
        train_ds = ReplayMixDataset(train_examples, general_examples, tcfg.replay.ratio, seed)
        files.append(general_path)
        info["replay"] = {
            "file": str(general_path),
            "ratio": tcfg.replay.ratio,
            "rows_per_epoch": train_ds.n_replay,
            "general_rows": len(general_examples),
            "general": general_stats.as_dict(),
        }
    info["fingerprint"] = fingerprint_files(files)
    info["truncated"] = train_stats.truncated
    return {"train": train_ds, "val": val_examples}, info, make_collator(tokenizer, tcfg.packing)


def default_preference_path(cfg, output_dir: Path) -> Path:
    """DPO's default pairs: the file `domaintune feedback export` writes (<serve.feedback_dir>/preference.jsonl)."""
    from domaintune.serve.feedback import PREFERENCE_FILE, feedback_export_dir

    return feedback_export_dir(cfg, output_dir) / PREFERENCE_FILE


def _dpo_data(tcfg: TrainConfig, data_dir: Path, seed: int, default_path: Path):
    import random

    from datasets import Dataset

    path = Path(tcfg.dpo.path) if tcfg.dpo.path else default_path
    rows = load_preference_rows(path, tcfg.max_train_samples)
    files = [path]
    if tcfg.dpo.val_path:
        val = load_preference_rows(tcfg.dpo.val_path, tcfg.max_val_samples)
        files.append(Path(tcfg.dpo.val_path))
        train = rows
    else:
        if len(rows) < 2:
            raise UserError(f"{path}: need at least 2 preference rows to hold one out for validation")
        shuffled = rows[:]
        random.Random(seed).shuffle(shuffled)
        n_val = max(1, len(rows) // 10)
        val, train = shuffled[:n_val], shuffled[n_val:]
    info = {
        "train_file": str(path),
        "train": {"rows": len(train)},
        "val": {"rows": len(val)},
        "fingerprint": fingerprint_files(files),
        "truncated": None,
    }
    return {"train": Dataset.from_list(train), "val": Dataset.from_list(val)}, info, None


def _dpo_trainer(tcfg, seed, checkpoint_dir, eval_on_start, model, tokenizer, datasets, callbacks, common):
    from trl import DPOConfig, DPOTrainer

    args = _training_arguments(
        tcfg,
        seed,
        checkpoint_dir,
        eval_on_start,
        args_cls=DPOConfig,
        beta=tcfg.dpo.beta,
        max_length=tcfg.max_length,
        **common,
    )
    return DPOTrainer(
        model=model,
        ref_model=None,
        args=args,
        train_dataset=datasets["train"],
        eval_dataset=datasets["val"],
        processing_class=tokenizer,
        callbacks=callbacks,
    )


def _tracking_callbacks(tcfg: TrainConfig, train_dir: Path, run_name: str) -> list:
    if tcfg.tracking == "none":
        return []
    from torch.utils.tensorboard import SummaryWriter
    from transformers.integrations import TensorBoardCallback

    callbacks = [TensorBoardCallback(tb_writer=SummaryWriter(log_dir=str(train_dir / "tensorboard")))]
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


# --------------------------------------------------------------------------- outputs


def _save_model(trainer, tokenizer, model_out: Path, model_cfg: ModelConfig, model_dir: Path, effective, method) -> str:
    model = trainer.model
    tmp = model_out.with_name(model_out.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    from peft import PeftModel

    if isinstance(model, PeftModel):
        model.save_pretrained(tmp)
        kind = "adapter"
    else:
        model.config.use_cache = True
        model.save_pretrained(tmp, safe_serialization=True)
        kind = "full"
    _publish_model_folder(tmp, model_out, kind, tokenizer, model_cfg, model_dir, effective, method)
    return kind


def _publish_model_folder(
    tmp: Path, model_out: Path, kind: str, tokenizer, model_cfg: ModelConfig, model_dir: Path, effective, method
) -> None:
    """Complete a saved model folder (portable adapter base, tokenizer, domaintune.json) and move it into place."""
    if kind == "adapter":
        # Record a portable base reference so load_trained finds it on another machine.
        cfg_path = tmp / "adapter_config.json"
        data = json.loads(cfg_path.read_text())
        data["base_model_name_or_path"] = _adapter_base_reference(model_cfg, model_dir)
        cfg_path.write_text(json.dumps(data, indent=2))
    tokenizer.save_pretrained(tmp)
    (tmp / "domaintune.json").write_text(
        json.dumps({"method": method, "trained_as": effective, "kind": kind, "base": str(model_dir)}, indent=2)
    )
    if model_out.exists():
        shutil.rmtree(model_out)
    os.replace(tmp, model_out)


def _save_model_distributed(
    trainer, tokenizer, model_out: Path, model_cfg: ModelConfig, model_dir: Path, effective, method
) -> str:
    """Gather the (possibly sharded) weights with the Trainer's own save_model; rank 0 writes a plain folder."""
    from peft import PeftModel

    unwrapped = trainer.accelerator.unwrap_model(trainer.model)
    kind = "adapter" if isinstance(unwrapped, PeftModel) else "full"
    if kind == "full":
        unwrapped.config.use_cache = True
    tmp = model_out.with_name(model_out.name + ".tmp")
    if trainer.args.should_save and tmp.exists():
        shutil.rmtree(tmp)
    trainer.accelerator.wait_for_everyone()
    if getattr(trainer, "is_fsdp_enabled", False):
        from domaintune.train.distributed import save_fsdp_consolidated

        save_fsdp_consolidated(trainer, unwrapped, tmp)
    else:
        trainer.save_model(str(tmp))  # a collective under ZeRO-3: every rank takes part, rank 0 writes
    if trainer.args.should_save:
        (tmp / "training_args.bin").unlink(missing_ok=True)
        _publish_model_folder(tmp, model_out, kind, tokenizer, model_cfg, model_dir, effective, method)
    trainer.accelerator.wait_for_everyone()
    return kind


def _metrics(
    cfg,
    tcfg,
    trainer,
    output,
    timer,
    data_info,
    method_info,
    effective,
    saved_kind,
    train_wall,
    total_wall,
    resume_from,
    model_dir,
    init_ref,
) -> dict:
    history = trainer.state.log_history
    evals = [(h["step"], h["eval_loss"]) for h in history if "eval_loss" in h]
    losses = [(h["step"], h["loss"]) for h in history if "loss" in h and "eval_loss" not in h]
    step0 = next((loss for step, loss in evals if step == 0), None)
    best = min((loss for _, loss in evals), default=None)
    tokens = trainer.state.num_input_tokens_seen
    return {
        "name": cfg.name,
        "method": tcfg.method,
        "trained_as": effective,
        "model_kind": saved_kind,
        "base_model": cfg.model.name_or_path,
        "base_model_dir": str(model_dir),
        "init_from": str(init_ref) if init_ref else None,
        "config": tcfg.model_dump(mode="json"),
        "data": data_info,
        "data_fingerprint": data_info["fingerprint"],
        "truncated": data_info["truncated"],
        "params": method_info,
        "versions": library_versions(),
        "device": _device_summary(),
        "precision": tcfg.precision,
        "steps": trainer.state.global_step,
        "max_steps": trainer.state.max_steps,
        "epochs": trainer.state.epoch,
        "stopped_early": trainer.state.global_step < trainer.state.max_steps,
        "resumed_from": str(resume_from) if resume_from else None,
        "step0_val_loss": step0,
        "final_train_loss": losses[-1][1] if losses else None,
        "mean_train_loss": output.training_loss,
        "final_val_loss": evals[-1][1] if evals else None,
        "best_val_loss": best,
        "best_checkpoint": trainer.state.best_model_checkpoint,
        "tokens_seen": tokens,
        "tokens_this_session": timer.tokens,
        "tokens_per_second": timer.tokens / timer.train_seconds if timer.train_seconds else None,
        "train_step_seconds": timer.train_seconds,
        "train_wall_seconds": train_wall,
        "wall_seconds": total_wall,
        "train_curve": losses,
        "val_curve": evals,
    }

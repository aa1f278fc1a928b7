"""`run_train`: fine-tune the configured base model on `<run>/data/*.jsonl` with transformers' Trainer.

Read top to bottom, `run_train` is the stage: settle `precision` and `num_threads` for this machine (`auto`:
hardware/autoselect.py), settle the process (threads, torchrun ranks), find where training
starts (`init_from.py`), load the tokenizer, build the datasets (`data.py`), build the trainable model for the
method (`methods.py`) and switch the speed levers on (`speed/`), build the Trainer (`trainers.py`), train,
save `model/` (`save.py`) and write `train/metrics.json` and `train/loss.png` (`report.py`).

The Trainer gives checkpoints with optimizer/scheduler/RNG/data position (so `--resume` after a `kill -9`
continues exactly), evaluation cadence, best-checkpoint tracking and early stopping.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from rich.console import Console

from domaintune.errors import UserError
from domaintune.hardware.autoselect import Choice, choose_precision, choose_threads
from domaintune.layout import RunLayout
from domaintune.model.loader import load_tokenizer
from domaintune.train import distributed, speed
from domaintune.train.checkpoints import last_complete_checkpoint, prepare_train_dir, resume_point
from domaintune.train.config import TrainConfig
from domaintune.train.data import TrainData, build_datasets
from domaintune.train.init_from import Start, resolve_start
from domaintune.train.report import TrainOutcome, build_metrics, write_reports
from domaintune.train.save import save_model
from domaintune.train.trainers import TrainerParts, build_trainer, check_tracking

if TYPE_CHECKING:
    from transformers import TrainerCallback

    from domaintune.config import ProjectConfig

__all__ = ["last_complete_checkpoint", "run_train"]

log = logging.getLogger(__name__)


def run_train(
    cfg: ProjectConfig,
    layout: RunLayout,
    *,
    resume: bool = False,
    extra_callbacks: Sequence[TrainerCallback] = (),
) -> dict[str, Any]:
    """Train `cfg.train.method` on `layout.data_dir` and write `layout.model_dir` and `layout.train_dir`.

    `resume` continues from the last complete checkpoint; `extra_callbacks` are added to the Trainer's (tests,
    benchmarks). Returns the metrics that train/metrics.json holds.
    """
    started = time.time()
    cfg, chosen = _choose_for_this_machine(cfg)
    tcfg = cfg.train
    seed = tcfg.seed if tcfg.seed is not None else cfg.seed
    session = _setup_process(tcfg, layout)
    resume_from = resume_point(layout, resume)
    start = resolve_start(cfg)
    tokenizer = load_tokenizer(start.model_cfg, start.model_dir)
    data = build_datasets(cfg, layout, tokenizer, seed)
    _warn_partial_pass(tcfg, data, session.world.world_size)
    _setup_train_dir(layout, tcfg, data, resume, session)
    model, params, engaged = _setup_model(cfg, start, seed, session)
    parts = TrainerParts(model, tokenizer, data, seed, resume, engaged.get("fused_head_loss", False))
    parts.teacher = _setup_teacher(cfg, model)
    trainer, timer = build_trainer(cfg, layout, parts, session, extra_callbacks)
    output, train_wall = _train(trainer, resume_from)
    saved_kind = save_model(trainer, tokenizer, layout, start, tcfg, distributed=session.active)
    outcome = TrainOutcome(trainer, output, timer, saved_kind, train_wall, started, resume_from, params, engaged)
    outcome.chosen = {name: choice.describe() for name, choice in chosen.items()}
    metrics = build_metrics(cfg, start, data, session, outcome)
    if session.world.is_main:  # reports and plots from rank 0 only
        write_reports(cfg, layout, metrics, trainer.state.log_history)
    session.barrier()
    return metrics


def _choose_for_this_machine(cfg: ProjectConfig) -> tuple[ProjectConfig, dict[str, Choice]]:
    """`precision` and `num_threads` settled for this machine (`auto`: from the hardware, hardware/autoselect.py).

    Returns the config with the chosen values in `train` (everything after reads those) and the choices with
    why, for train/metrics.json. bf16 forced on a CPU that only emulates it is kept, with a warning.
    """
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    chosen = {
        "precision": choose_precision(cfg.train.precision, device),
        "num_threads": choose_threads(cfg.train.num_threads),
    }
    for choice in chosen.values():
        if choice.warning:
            _warn(choice.warning)
    train = cfg.train.model_copy(update={name: choice.value for name, choice in chosen.items()})
    return cfg.model_copy(update={"train": train}), chosen


def _warn_partial_pass(tcfg: TrainConfig, data: TrainData, world_size: int) -> None:
    """Say so when `max_steps` ends training before one pass over the rows: the rest are never read, so a larger
    training set (e.g. `data.sample.train`) changes which rows are seen, not how many. Recorded in metrics.json."""
    if not tcfg.max_steps or tcfg.packing or not hasattr(data.train, "__len__"):
        return  # packed steps hold a varying number of rows
    rows = len(data.train)
    per_step = tcfg.batch_size * tcfg.gradient_accumulation_steps * world_size
    read = min(rows, tcfg.max_steps * per_step)
    data.info["coverage"] = {"rows": rows, "rows_per_step": per_step, "rows_read": read, "epochs": read / rows}
    if read < rows:
        message = (
            f"train.max_steps={tcfg.max_steps} at {per_step} rows a step reads {read:,} of the {rows:,} training rows "
            f"({read / rows:.0%}, replay included); the other {rows - read:,} are never seen. More rows need more "
            "steps: remove max_steps (train.epochs counts passes) or raise it"
        )
        _warn(message)


def _warn(message: str) -> None:
    """A start-up warning in the log and on the console (stderr), where a user watching the run sees it."""
    log.warning(message)
    Console(stderr=True).print(f"[yellow]warning:[/] {message}", markup=True, highlight=False)


def _setup_process(tcfg: TrainConfig, layout: RunLayout) -> distributed.Session:
    """Fail early on what this machine cannot run, set torch's threads, and join the torchrun job if any."""
    import torch

    check_tracking(tcfg)
    # (bf16 autocast on a CPU is correct everywhere, and fast with AVX-512-BF16 / AMX.)
    if tcfg.precision == "fp16" and not torch.cuda.is_available():
        raise UserError("train.precision: fp16 needs a CUDA GPU; use bf16 or fp32 on a CPU")
    torch.set_num_threads(int(tcfg.num_threads or torch.get_num_threads()))
    return distributed.start_session(tcfg, layout.train_dir)


def _setup_model(cfg: ProjectConfig, start: Start, seed: int, session: distributed.Session):
    """The trainable model for the method, speed levers on; returns (model, params info, speed report)."""
    from transformers import set_seed

    from domaintune.train.methods import build_trainable

    tcfg = cfg.train
    set_seed(seed)  # adapter initialisation (LoRA A, prompt embeddings...) draws from the global RNG
    if tcfg.trainer_loss == "preference":  # kto, orpo, simpo, reward, ppo, grpo: train/preference/
        from domaintune.train.preference.models import build_preference_model, speed_settings

        tcfg = speed_settings(tcfg)
        base_dtype = speed.base_dtype(tcfg, cfg.model.dtype)
        model, params = build_preference_model(tcfg, start.model_dir, start.init_adapter, base_dtype)
        engaged = speed.apply(model, tcfg, sharded_head=session.sharded_head)
    else:
        base_dtype = speed.base_dtype(tcfg, cfg.model.dtype)
        model, params = build_trainable(tcfg.trained_as, tcfg, start.model_dir, start.init_adapter, base_dtype)
        engaged = speed.apply(model, tcfg, sharded_head=session.sharded_head)
    params.update({k: v for k, v in engaged.items() if k not in ("allocator", "why")})
    params["base_dtype"] = base_dtype
    if tcfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if hasattr(model, "enable_input_require_grads"):
            model.enable_input_require_grads()
    return model, params, engaged


def _setup_train_dir(
    layout: RunLayout, tcfg: TrainConfig, data: TrainData, resume: bool, session: distributed.Session
) -> None:
    """train/ exists, and rank 0 has checked or recorded what the checkpoints in it are of."""
    layout.train_dir.mkdir(parents=True, exist_ok=True)
    if session.world.is_main:  # only rank 0 writes; the others wait for it
        prepare_train_dir(layout, tcfg, data.fingerprint, resume)
    session.barrier()


def _setup_teacher(cfg: ProjectConfig, student):
    """Distillation's teacher (None for every other method)."""
    if cfg.train.trainer_loss != "distill":
        return None
    from domaintune.train.distill import load_teacher

    assert cfg.train.distill is not None  # the config requires it for method distill
    return load_teacher(cfg.train.distill.teacher, cfg, student)


def _train(trainer, resume_from) -> tuple[Any, float]:
    """Trainer.train from the start or the resume checkpoint; returns its output and the wall seconds it took."""
    train_start = time.perf_counter()
    output = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    return output, time.perf_counter() - train_start

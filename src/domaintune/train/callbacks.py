"""Trainer callbacks: rich progress bar, replay epoch, final-step evaluation, training-time accounting, and a
hook called after every evaluation (the sweep's pruning)."""

from __future__ import annotations

import time

from transformers import TrainerCallback


class RichProgressCallback(TrainerCallback):
    """One rich progress bar: step, loss, val loss (and the generation_eval metric), tokens/s and ETA."""

    def __init__(self, console=None, disable: bool = False, metric: str | None = None):
        self.console = console
        self.disable = disable
        self.metric = metric  # train.generation_eval's metric, shown after the val loss
        self.metric_value = float("nan")
        self.progress = None
        self.task = None
        self.loss = float("nan")
        self.val_loss = float("nan")

    def on_train_begin(self, args, state, control, **kwargs):
        if self.disable:
            return
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self.progress = Progress(
            TextColumn("[bold]train"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn(
                "loss {task.fields[loss]:.4f} val {task.fields[val]:.4f}{task.fields[gen]} {task.fields[tps]:.0f} tok/s"
            ),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            console=self.console or Console(stderr=True),
            transient=False,
        )
        self.progress.start()
        self.task = self.progress.add_task(
            "train",
            total=state.max_steps,
            completed=state.global_step,
            loss=self.loss,
            val=self.val_loss,
            gen=self._metric_text(),
            tps=0.0,
        )
        self._t0 = time.perf_counter()
        self._tokens0 = state.num_input_tokens_seen
        self._step0 = state.global_step

    def on_step_end(self, args, state, control, **kwargs):
        if self.progress is None:
            return
        elapsed = max(time.perf_counter() - self._t0, 1e-9)
        tps = (state.num_input_tokens_seen - self._tokens0) / elapsed
        self.progress.update(self.task, completed=state.global_step, tps=tps, loss=self.loss, val=self.val_loss)

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = logs or {}
        if "loss" in logs:
            self.loss = float(logs["loss"])
        if "eval_loss" in logs:
            self.val_loss = float(logs["eval_loss"])
        if self.metric and f"eval_{self.metric}" in logs:
            self.metric_value = float(logs[f"eval_{self.metric}"])
        if self.progress is not None:
            self.progress.update(self.task, loss=self.loss, val=self.val_loss, gen=self._metric_text())
            if not self.progress.console.is_terminal and ("loss" in logs or "eval_loss" in logs):
                # Logs / CI: no live bar, so print one line per logging step instead.
                elapsed = max(time.perf_counter() - self._t0, 1e-9)
                done = state.global_step - self._step0
                eta = f"{elapsed / done * (state.max_steps - state.global_step):.0f}s" if done > 0 else "-"
                tps = (state.num_input_tokens_seen - self._tokens0) / elapsed
                loss = f"{self.loss:.4f}" if self.loss == self.loss else "-"  # nan before the first logged step
                self.progress.console.print(
                    f"step {state.global_step}/{state.max_steps} loss {loss} val {self.val_loss:.4f}{self._metric_text()} "
                    f"{tps:.0f} tok/s elapsed {elapsed:.0f}s ETA {eta}",
                    highlight=False,
                )

    def _metric_text(self) -> str:
        if not self.metric:
            return ""
        value = f"{self.metric_value:.2f}" if self.metric_value == self.metric_value else "-"
        return f" {self.metric} {value}"

    def on_train_end(self, args, state, control, **kwargs):
        if self.progress is not None:
            self.progress.update(self.task, completed=state.global_step)
            self.progress.stop()
            self.progress = None


class StepTimerCallback(TrainerCallback):
    """Wall time spent in optimizer steps only (no evaluation, no checkpoint writing) and tokens in them."""

    def __init__(self):
        self.train_seconds = 0.0
        self.tokens = 0
        self._start = None
        self._tokens_at_start = 0

    def on_step_begin(self, args, state, control, **kwargs):
        self._start = time.perf_counter()
        self._tokens_at_start = state.num_input_tokens_seen

    def on_step_end(self, args, state, control, **kwargs):
        if self._start is not None:
            self.train_seconds += time.perf_counter() - self._start
            self.tokens += state.num_input_tokens_seen - self._tokens_at_start
            self._start = None


class ReplayEpochCallback(TrainerCallback):
    """Tells the replay-mixing dataset which epoch starts, so every epoch draws fresh general rows."""

    def __init__(self, dataset):
        self.dataset = dataset

    def on_epoch_begin(self, args, state, control, **kwargs):
        self.dataset.set_epoch(int((state.epoch or 0.0) + 1e-6))


class FinalEvalCallback(TrainerCallback):
    """Evaluate and checkpoint on the last step too, so final val loss and best checkpoint are up to date."""

    def on_step_end(self, args, state, control, **kwargs):
        if state.max_steps and state.global_step >= state.max_steps:
            control.should_evaluate = True
            control.should_save = True
        return control


class EvaluateHookCallback(TrainerCallback):
    """Calls `hook(step, metrics)` after every evaluation, with the evaluation's metrics (`eval_loss` and, with
    train.generation_eval on, `eval_<metric>`). The sweep reports them to its Optuna trial here; an exception the
    hook raises (the trial's prune signal) stops training and leaves the stage failed."""

    def __init__(self, hook):
        self.hook = hook

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        self.hook(state.global_step, dict(metrics or {}))

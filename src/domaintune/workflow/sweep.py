"""`domaintune sweep`: an Optuna study over the project's settings, each trial a pipeline run.

Read top to bottom: `run_sweep` loads the project, settles the objective and the pruning metric, refuses an
objective set that an eval gate reads (the winner's curse: choose on `<name>_dev`, gate on `<name>`), checks that
every bound and choice of `sweep.search_space` loads as a config, opens (or continues) the study stored in
`<output_dir>/sweep/study.db`, and runs `--trials` more trials. A trial sets its sampled values as `--set`
overrides would, then runs the stages in `<output_dir>/sweep/trial_<n>/` with `run_pipeline`: train, and
eval when the objective is read from the eval report. The data stage runs once per distinct data config in
`sweep/data/<fingerprint>/` and the trials link to it, so only a searched data setting re-runs it. The base
model's eval answers and perplexities are shared in `sweep/shared_eval/` (`domaintune.eval.shared_base`).

TPE samples the settings; Optuna's MedianPruner stops a trial whose in-training metric (the val loss or
train.generation_eval's metric, reported at every evaluation through the train stage's evaluate hook) is
worse than the median of earlier trials at the same step. The study is resumable: a second invocation adds
trials to it, and a trial left running by a killed sweep is failed and queued again in its own folder (its
training resumes from the last checkpoint). The results table, the plot, best.yaml and the MLflow runs are
written by `sweep_report.py`.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from domaintune.config import ConfigError, ProjectConfig, load_config
from domaintune.errors import UserError
from domaintune.eval.gates import gate_set, parse_gate
from domaintune.layout import RunLayout
from domaintune.workflow.pipeline import STAGES, RunState, default_stage_runners, run_pipeline, stage_fingerprint
from domaintune.workflow.sweep_config import SweepParam
from domaintune.workflow.sweep_report import (
    SweepPaths,
    TrialRow,
    json_coded,
    mlflow_trial_logger,
    trial_row,
    trial_rows,
    write_best_yaml,
    write_trials_csv,
    write_trials_plot,
)

if TYPE_CHECKING:
    import optuna


@dataclass(frozen=True)
class Objective:
    """`sweep.objective` with its defaults settled, and the in-training metric the pruner watches."""

    source: str
    set: str
    metric: str
    model: str
    direction: str
    prune_key: str  # `eval_loss` or `eval_<generation metric>` in the Trainer's evaluation metrics
    prune_sign: float  # +1 when a larger prune value is better in the study's direction, else -1
    prune: bool

    @property
    def label(self) -> str:
        if self.source == "eval":
            return f"{self.set}.{self.model}.{self.metric}"
        return f"train {self.metric}"


@dataclass
class SweepResult:
    paths: SweepPaths
    study_name: str
    objective: Objective
    rows: list[TrialRow]
    ran: int  # trials this invocation finished (complete, pruned or failed)
    best: TrialRow | None = None
    notes: list[str] = field(default_factory=list)


def run_sweep(
    config: Path,
    overrides: list[str] | tuple[str, ...] = (),
    output_dir: Path | None = None,
    overlays: list[Path] | tuple[Path, ...] = (),
    *,
    trials: int,
    timeout: float | None = None,
    on_stage: Callable[[str, str], None] | None = None,
    on_trial: Callable[[TrialRow], None] | None = None,
) -> SweepResult:
    """Run `trials` more trials of the study in `<output_dir>/sweep/` (or until `timeout` seconds), then report."""
    import optuna

    base = load_config(config, overrides, output_dir, overlays)
    if not base.sweep.search_space:
        raise ConfigError(f"{config}: sweep.search_space is empty: name the settings to search (docs/sweep.md)")
    if trials < 1:
        raise UserError(f"--trials {trials}: run at least one trial")
    objective = resolve_objective(base)
    check_objective_set(base, objective, str(config))
    check_search_space(config, list(overrides), list(overlays), output_dir, base.sweep.search_space)
    paths = SweepPaths(base.layout.root / "sweep")
    paths.root.mkdir(parents=True, exist_ok=True)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    with _exclusive(paths):
        study, notes = open_study(base, paths, objective)
        before = _finished(study)
        runner = TrialRunner(config, list(overrides), list(overlays), base, paths, objective, on_stage)
        callbacks: list[Any] = [_report_each(base.sweep.search_space, on_trial)] if on_trial else []
        if base.train.tracking == "mlflow":
            callbacks.append(mlflow_trial_logger(base, paths, objective.label, base.sweep.search_space))
        try:
            study.optimize(runner, n_trials=trials, timeout=timeout, callbacks=callbacks)
        finally:  # also on Ctrl-C or a failed trial: the trials that finished keep their table, plot and best.yaml
            result = _write_report(study, base, objective, paths, config, _finished(study) - before, notes)
    return result


def _finished(study: optuna.Study) -> int:
    """Trials that ran to an end; enqueued trials wait in the study as WAITING and must not count as run."""
    from optuna.trial import TrialState

    return len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)))


def _write_report(
    study: optuna.Study,
    base: ProjectConfig,
    objective: Objective,
    paths: SweepPaths,
    config: Path,
    ran: int,
    notes: list[str],
) -> SweepResult:
    rows = trial_rows(study, base.sweep.search_space)
    result = SweepResult(paths, study.study_name, objective, rows, ran, notes=notes)
    result.best = _best(rows, objective.direction)
    write_trials_csv(study, paths.trials_csv)
    write_trials_plot(rows, paths.trials_png, objective.label, objective.direction)
    if result.best is not None:
        write_best_yaml(result.best, paths.best_yaml, objective.label, config)
    return result


def resolve_objective(cfg: ProjectConfig) -> Objective:
    """The objective's metric defaults (eval.primary_metric / the generation metric) and the pruning metric."""
    sweep, gen = cfg.sweep, cfg.train.generation_eval
    gen_metric = gen.metric or cfg.eval.primary_metric if gen.items > 0 else None
    metric = sweep.objective.metric or (gen_metric if sweep.objective.source == "train_generation_eval" else None)
    metric = metric or cfg.eval.primary_metric
    if sweep.objective.source == "train_generation_eval":
        if gen_metric is None:
            raise ConfigError(
                "sweep.objective.source train_generation_eval needs train.generation_eval.items > 0 "
                "(the in-training metric is off); or use source: eval"
            )
        if metric != gen_metric:
            raise ConfigError(
                f"sweep.objective.metric {metric!r}: training scores {gen_metric!r} (train.generation_eval.metric, "
                "else eval.primary_metric)"
            )
    watched = sweep.pruning.metric or gen_metric or "loss"
    if watched != "loss" and watched != gen_metric:
        raise ConfigError(
            f"sweep.pruning.metric {watched!r}: training logs `loss` (the val loss)"
            + (f" and {gen_metric!r}" if gen_metric else " only (train.generation_eval is off)")
        )
    higher_is_better = watched != "loss"
    maximize = sweep.objective.direction == "maximize"
    return Objective(
        source=sweep.objective.source,
        set=sweep.objective.set,
        metric=metric,
        model=sweep.objective.model,
        direction=sweep.objective.direction,
        prune_key=f"eval_{watched}",
        prune_sign=1.0 if higher_is_better == maximize else -1.0,
        prune=sweep.pruning.enabled,
    )


def check_objective_set(cfg: ProjectConfig, objective: Objective, where: str) -> None:
    """The objective's set is one that no eval.gates entry reads (unless sweep.objective.allow_gated_set): a
    recipe chosen for its score on a set carries that set's luck, so a gate on the same set would pass it by luck
    (the winner's curse). A `<name>_dev` set must be one the data stage writes (holdout_group.dev_rows)."""
    if objective.source != "eval":
        return
    hg = cfg.data.split.holdout_group
    dev = f"{hg.name}_dev" if hg else "<name>_dev"
    entries = {e.name: e for e in cfg.eval.sets or []}
    given = objective.set in entries and entries[objective.set].file
    if objective.set.endswith("_dev") and not given and (hg is None or not hg.dev_rows or objective.set != dev):
        raise ConfigError(
            f"{where}: sweep.objective.set {objective.set!r}: no data.split.holdout_group writes it: set "
            f"data.split.holdout_group.dev_rows (holdout name {objective.set.removesuffix('_dev')!r}) in the project "
            "config, or give the set a `file:` in eval.sets"
        )
    if cfg.sweep.objective.allow_gated_set:
        return
    names = set(entries) | {"test", "general", objective.set} | ({hg.name, f"{hg.name}_dev"} if hg else set())
    gates = [g for g in cfg.eval.gates if gate_set(parse_gate(g).name, names) == objective.set]
    if gates:
        raise ConfigError(
            f"{where}: sweep.objective.set {objective.set!r} is read by the gate {gates[0]!r} (eval.gates): a "
            "recipe chosen for its score on a set passes a gate on that set partly by luck (the winner's curse); "
            f"use {dev} (data.split.holdout_group.dev_rows) or val rows via eval.sets file: as the objective set, "
            "or set sweep.objective.allow_gated_set: true to accept the bias"
        )


def check_search_space(
    config: Path, overrides: list[str], overlays: list[Path], output_dir: Path | None, space: dict[str, SweepParam]
) -> None:
    """Every bound and every choice loads as a config, so a bad value fails now and not at trial 7."""
    for key, param in space.items():
        for value in param.edge_values():
            try:
                load_config(config, overrides + [assignment(key, value)], output_dir, overlays)
            except ConfigError as exc:
                raise ConfigError(f"sweep.search_space.{key}: the value {value!r} does not load: {exc}") from None


def assignment(key: str, value: Any) -> str:
    """`key=value` as `--set` takes it (JSON is YAML, so lists and strings keep their type)."""
    return f"{key}={json.dumps(value, ensure_ascii=False)}"


def open_study(cfg: ProjectConfig, paths: SweepPaths, objective: Objective) -> tuple[optuna.Study, list[str]]:
    """The study in sweep/study.db: created with its objective, or continued when the objective is the same."""
    import optuna

    name = cfg.sweep.study_name or cfg.name
    storage = f"sqlite:///{paths.study_db.resolve()}"
    recorded = {"objective": objective.label, "direction": objective.direction}
    notes: list[str] = []
    existing = {s.study_name: s for s in optuna.get_all_study_summaries(storage)} if paths.study_db.exists() else {}
    if name in existing:
        previous = existing[name].user_attrs.get("objective")
        if previous and previous != recorded:
            raise UserError(
                f"{paths.study_db}: study {name!r} optimises {previous['direction']} {previous['objective']}, not "
                f"{objective.direction} {objective.label}: set sweep.study_name for a new study"
            )
    done = existing[name].n_trials if name in existing else 0
    study = optuna.create_study(
        storage=storage,
        study_name=name,
        direction=objective.direction,  # type: ignore[arg-type]
        load_if_exists=True,
        # a fresh seed per invocation: the same seed again would repeat the first invocation's random trials
        sampler=optuna.samplers.TPESampler(seed=cfg.seed + done, n_startup_trials=cfg.sweep.startup_trials),
        pruner=_pruner(cfg, objective),
    )
    if name not in existing:
        study.set_user_attr("objective", recorded)
        for params in cfg.sweep.enqueue:
            study.enqueue_trial(encode_params(params, cfg.sweep.search_space))
    notes += _requeue_interrupted(study)
    return study, notes


def _pruner(cfg: ProjectConfig, objective: Objective) -> optuna.pruners.BasePruner:
    import optuna

    if not objective.prune:
        return optuna.pruners.NopPruner()
    settings = cfg.sweep.pruning
    return optuna.pruners.MedianPruner(
        n_startup_trials=settings.n_startup_trials, n_warmup_steps=settings.n_warmup_steps
    )


def _requeue_interrupted(study: optuna.Study) -> list[str]:
    """A trial still `RUNNING` belongs to a sweep that was killed (the lock says no other runs): fail it and queue
    its settings again, in its own folder, where training resumes from the last checkpoint."""
    from optuna.trial import TrialState

    notes = []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        study.tell(trial.number, state=TrialState.FAIL)
        study.enqueue_trial(
            trial.params, user_attrs={"folder": trial.user_attrs.get("folder"), "retry_of": trial.number}
        )
        notes.append(f"trial {trial.number} was interrupted: queued again in {trial.user_attrs.get('folder')}")
    return notes


@contextmanager
def _exclusive(paths: SweepPaths) -> Iterator[None]:
    """One sweep process per sweep folder: a second one would see the first one's running trials as interrupted."""
    with open(paths.root / ".lock", "w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UserError(f"{paths.root}: another `domaintune sweep` is running on this folder") from None
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


# ------------------------------------------------------------------------------------------------ one trial


class TrialRunner:
    """The study's objective function: one trial = sampled overrides -> pipeline run -> objective value."""

    def __init__(
        self,
        config: Path,
        overrides: list[str],
        overlays: list[Path],
        base: ProjectConfig,
        paths: SweepPaths,
        objective: Objective,
        on_stage: Callable[[str, str], None] | None,
    ):
        self.config, self.overrides, self.overlays = config, overrides, overlays
        self.space = base.sweep.search_space
        self.paths, self.objective, self.on_stage = paths, objective, on_stage

    def __call__(self, trial: optuna.Trial) -> float:
        params = {key: suggest(trial, key, param) for key, param in self.space.items()}
        folder = Path(trial.user_attrs.get("folder") or self.paths.trial_dir(trial.number))
        trial.set_user_attr("folder", str(folder))
        cfg = load_config(
            self.config, self.overrides + [assignment(k, v) for k, v in params.items()], folder, self.overlays
        )
        check_objective_set(cfg, self.objective, f"trial {trial.number}")  # a searched eval.gates included
        self._reuse_data(cfg)
        stages = ["train", "eval"] if self.objective.source == "eval" else ["train"]
        runners = default_stage_runners()
        runners["train"] = _train_with_hook(PruneHook(trial, self.objective))
        runners["eval"] = _eval_sharing_base(self.paths.root / "shared_eval")
        started = time.perf_counter()
        try:
            run_pipeline(cfg, stages, runners=runners, on_stage=self._tell(trial.number))
        finally:
            trial.set_user_attr("seconds", round(time.perf_counter() - started, 1))
        baseline = read_baseline(cfg.layout, self.objective)
        if baseline is not None:
            trial.set_user_attr("baseline", baseline)
        return read_objective(cfg.layout, self.objective)

    def _tell(self, number: int) -> Callable[[str, str], None] | None:
        on_stage = self.on_stage
        if on_stage is None:
            return None
        return lambda name, what: on_stage(f"trial {number} {name}", what)

    def _reuse_data(self, cfg: ProjectConfig) -> None:
        """The data stage's output for this data config, run once in sweep/data/<fingerprint>/ and linked here."""
        fingerprint = stage_fingerprint(cfg, STAGES["data"], {})
        shared = RunLayout(self.paths.data_cache / fingerprint)
        run_pipeline(cfg.model_copy(update={"output_dir": shared.root}), ["data"], on_stage=self.on_stage)
        layout = cfg.layout
        layout.root.mkdir(parents=True, exist_ok=True)
        if layout.data_dir.is_symlink():
            layout.data_dir.unlink()
        if layout.data_dir.exists():
            raise UserError(f"{layout.data_dir}: a trial folder's data/ must be the sweep's link; remove the folder")
        layout.data_dir.symlink_to(os.path.relpath(shared.data_dir, layout.root), target_is_directory=True)
        RunState(layout).update("data", **RunState(shared).stage("data"))


def suggest(trial: optuna.Trial, key: str, param: SweepParam) -> Any:
    """The trial's value for one parameter (categorical lists and mappings travel through Optuna as JSON text)."""
    if param.type == "float":
        low, high = param.bounds
        return trial.suggest_float(key, low, high, log=param.log, step=param.step)
    if param.type == "int":
        low, high = param.bounds
        return trial.suggest_int(key, int(low), int(high), step=int(param.step or 1), log=param.log)
    choices = param.choices or []
    if not json_coded(param):
        return trial.suggest_categorical(key, choices)
    return json.loads(trial.suggest_categorical(key, [json.dumps(c, ensure_ascii=False) for c in choices]))


def encode_params(params: dict[str, Any], space: dict[str, SweepParam]) -> dict[str, Any]:
    """Settings as Optuna stores them (the inverse of `decode_params`), for `enqueue`."""
    return {
        key: json.dumps(value, ensure_ascii=False) if json_coded(space[key]) else value for key, value in params.items()
    }


class PruneHook:
    """Called after every evaluation of a trial's training: reports the in-training metric, prunes below median."""

    def __init__(self, trial: optuna.Trial, objective: Objective):
        self.trial, self.objective = trial, objective

    def __call__(self, step: int, metrics: dict[str, float]) -> None:
        import optuna

        key = self.objective.prune_key
        if key not in metrics:
            raise UserError(
                f"sweep.pruning: training logged no {key} at step {step} (it logged {', '.join(sorted(metrics))})"
            )
        self.trial.report(self.objective.prune_sign * float(metrics[key]), step)
        if self.trial.should_prune():
            self.trial.set_user_attr("pruned_at", step)
            raise optuna.TrialPruned(
                f"step {step}: {key} {metrics[key]:.4g} is worse than the median of earlier trials"
            )


def _train_with_hook(hook: Callable[[int, dict[str, float]], None]) -> Callable[..., dict[str, Any]]:
    def run(cfg: ProjectConfig, layout: RunLayout, ctx: dict[str, Any]) -> dict[str, Any]:
        from domaintune.train.callbacks import EvaluateHookCallback
        from domaintune.train.runner import run_train

        return run_train(
            cfg, layout, resume=ctx.get("resume_train", False), extra_callbacks=[EvaluateHookCallback(hook)]
        )

    return run


def _eval_sharing_base(folder: Path) -> Callable[..., dict[str, Any]]:
    """The eval stage with the sweep's shared base rows: the base model's answers and perplexities, computed by
    the first trial and read by the later ones (keyed by everything that can change them; the tuned model's
    rows are never shared)."""

    def run(cfg: ProjectConfig, layout: RunLayout, ctx: dict[str, Any]) -> dict[str, Any]:
        from domaintune.eval.runner import run_eval

        return run_eval(cfg, layout, shared_base=folder)

    return run


# ------------------------------------------------------------------------------------------ the objective


def read_objective(layout: RunLayout, objective: Objective) -> float:
    """The trial's score: the eval report's metric, or the generation metric at the checkpoint training kept."""
    if objective.source == "eval":
        report = json.loads(layout.eval_report.read_text(encoding="utf-8"))
        return eval_report_value(report, objective.set, objective.model, objective.metric, layout.eval_report)
    metrics = json.loads(layout.train_metrics.read_text(encoding="utf-8"))
    gen = metrics.get("generation_eval")
    if not gen or not gen.get("curve"):
        raise UserError(f"{layout.train_metrics}: no generation_eval curve (train.generation_eval was off)")
    curve = {int(step): float(value) for step, value in gen["curve"]}
    kept = re.search(r"checkpoint-(\d+)$", str(metrics.get("best_checkpoint") or ""))
    if kept and int(kept.group(1)) in curve:
        return curve[int(kept.group(1))]
    return float(gen["curve"][-1][1])


def read_baseline(layout: RunLayout, objective: Objective) -> float | None:
    """The base model's value of the objective's metric on the objective's set, for the plot's reference line;
    None where there is none to compare with (a training-time objective, a gain, or the base itself)."""
    delta = any(objective.metric.endswith(s) for s in _DELTA_SUFFIXES)
    if objective.source != "eval" or delta or objective.model == "base":
        return None
    report = json.loads(layout.eval_report.read_text(encoding="utf-8"))
    try:
        return eval_report_value(report, objective.set, "base", objective.metric, layout.eval_report)
    except UserError:
        return None  # eval.models without `base`: nothing to draw


def eval_report_value(report: dict[str, Any], set_name: str, model: str, metric: str, source: Path) -> float:
    """`metric` of `model` on `set_name` in an eval report (`<metric>_delta`: the gain over the base model;
    `<metric>_delta_ci_low` / `_ci_high`: its bootstrap interval's bounds).

    Reads `metrics.<set>.<model>.<metric>` / `deltas.<set>.<model>.<metric>.delta`, and the per-set shape
    `sets.<set>.metrics.<model>.<metric>` / `sets.<set>.deltas.<model>.<metric>.delta`.
    """
    suffix = next((s for s in _DELTA_SUFFIXES if metric.endswith(s)), None)
    if suffix is not None:
        name, key = metric[: -len(suffix)], _DELTA_SUFFIXES[suffix]
        paths = [("deltas", set_name, model, name, key), ("sets", set_name, "deltas", model, name, key)]
    else:
        paths = [("metrics", set_name, model, metric), ("sets", set_name, "metrics", model, metric)]
    for path in paths:
        value = _dig(report, path)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    known = sorted(set(report.get("metrics") or {}) | set(report.get("sets") or {}))
    raise UserError(
        f"{source}: no {metric} of model {model!r} on set {set_name!r} (sets in the report: {', '.join(known)}); "
        "check sweep.objective"
    )


# objective-name suffix -> the field of a report's `deltas` entry it reads
_DELTA_SUFFIXES = {"_delta_ci_low": "ci_low", "_delta_ci_high": "ci_high", "_delta": "delta"}


def _dig(node: Any, path: tuple[str, ...]) -> Any:
    for part in path:
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def _best(rows: list[TrialRow], direction: str) -> TrialRow | None:
    done = [(r.value, r) for r in rows if r.state == "COMPLETE" and r.value is not None]
    if not done:
        return None
    sign = 1.0 if direction == "maximize" else -1.0
    return max(done, key=lambda pair: sign * pair[0])[1]


def _report_each(space: dict[str, SweepParam], on_trial: Callable[[TrialRow], None]) -> Callable[..., None]:
    def callback(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        on_trial(trial_row(trial, space))

    return callback

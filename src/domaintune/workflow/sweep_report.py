"""What `domaintune sweep` leaves in `<output_dir>/sweep/`: the trials table (trials.csv and the console table),
trials.png (the objective per trial and the best so far), best.yaml (the best trial's settings as an overlay for
`domaintune run --overlay`), and one MLflow run per trial when `train.tracking: mlflow`."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from domaintune.workflow.sweep_config import SweepParam

if TYPE_CHECKING:
    import optuna
    from rich.table import Table

    from domaintune.config import ProjectConfig


@dataclass(frozen=True)
class SweepPaths:
    root: Path  # <output_dir>/sweep

    @property
    def study_db(self) -> Path:
        return self.root / "study.db"

    @property
    def data_cache(self) -> Path:
        """One data-stage run folder per distinct data config: `data/<fingerprint>/`."""
        return self.root / "data"

    def trial_dir(self, number: int) -> Path:
        return self.root / f"trial_{number}"

    @property
    def trials_csv(self) -> Path:
        return self.root / "trials.csv"

    @property
    def trials_png(self) -> Path:
        return self.root / "trials.png"

    @property
    def best_yaml(self) -> Path:
        return self.root / "best.yaml"

    @property
    def mlflow_db(self) -> Path:
        return self.root / "mlflow.db"


@dataclass
class TrialRow:
    number: int
    state: str  # COMPLETE | PRUNED | FAIL | RUNNING | WAITING
    value: float | None
    params: dict[str, Any]  # dotted key -> the value the trial ran with
    seconds: float | None = None
    pruned_at: int | None = None  # the optimizer step it was pruned at
    folder: str | None = None
    intermediate: dict[int, float] = field(default_factory=dict)
    baseline: float | None = None  # the base model's score on the objective's set and metric, when it has one


def json_coded(param: SweepParam | None) -> bool:
    """Optuna's categorical values are scalars: a parameter with list or mapping choices travels as JSON text."""
    return (
        param is not None
        and param.type == "categorical"
        and any(isinstance(c, (list, dict)) for c in param.choices or [])
    )


def decode_params(params: dict[str, Any], space: dict[str, SweepParam]) -> dict[str, Any]:
    """Optuna's stored values back as config values."""
    return {
        key: json.loads(value) if json_coded(space.get(key)) and isinstance(value, str) else value
        for key, value in params.items()
    }


def trial_row(trial: optuna.trial.FrozenTrial, space: dict[str, SweepParam]) -> TrialRow:
    return TrialRow(
        number=trial.number,
        state=trial.state.name,
        # Optuna gives a pruned trial its last in-training value: not the objective, so not shown as one
        value=trial.value if trial.state.name == "COMPLETE" else None,
        params=decode_params(trial.params, space),
        seconds=trial.user_attrs.get("seconds"),
        pruned_at=trial.user_attrs.get("pruned_at"),
        folder=trial.user_attrs.get("folder"),
        intermediate=dict(trial.intermediate_values),
        baseline=trial.user_attrs.get("baseline"),
    )


def trial_rows(study: optuna.Study, space: dict[str, SweepParam]) -> list[TrialRow]:
    return [trial_row(t, space) for t in study.get_trials(deepcopy=False)]


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, dict)):
        return json.dumps(value, ensure_ascii=False)
    return str(value)


def results_table(rows: list[TrialRow], label: str, best: TrialRow | None) -> Table:
    """The console table: one row per trial, its state, objective, seconds and settings; the best marked."""
    from rich.table import Table

    keys = list(dict.fromkeys(k for r in rows for k in r.params))
    table = Table(title=f"sweep: {label}", show_lines=False)
    for column in ["trial", "state", label, "s"] + keys:
        table.add_column(column, justify="right" if column in (label, "s", "trial") else "left")
    for r in rows:
        state = r.state.lower() + (f" @{r.pruned_at}" if r.pruned_at is not None else "")
        mark = " *" if best is not None and r.number == best.number else ""
        table.add_row(
            f"{r.number}{mark}",
            state,
            _fmt(r.value) if r.value is not None else "-",
            f"{r.seconds:.0f}" if r.seconds is not None else "-",
            *[_fmt(r.params[k]) if k in r.params else "-" for k in keys],
        )
    return table


def write_trials_csv(study: optuna.Study, path: Path) -> Path:
    """Optuna's trials dataframe (number, value, state, params, durations, user attributes) as CSV."""
    study.trials_dataframe().to_csv(path, index=False)
    return path


def write_trials_plot(rows: list[TrialRow], path: Path, label: str, direction: str) -> Path:
    """trials.png: each finished trial's objective (pruned trials as marks on the axis), the best so far and the
    base model's score on the same set and metric (a dashed line) when the trials recorded it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    done = [(r.number, r.value) for r in rows if r.state == "COMPLETE" and r.value is not None]
    pruned = [r.number for r in rows if r.state == "PRUNED"]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    if done:
        ax.scatter(*zip(*done), label="trial", color="tab:blue", zorder=3)
        best: list[float] = []
        for _, value in done:
            better = max if direction == "maximize" else min
            best.append(value if not best else better(best[-1], value))
        ax.step([n for n, _ in done], best, where="post", label="best so far", color="tab:orange", linewidth=1.5)
    if pruned:
        ax.scatter(pruned, [0.0] * len(pruned), transform=ax.get_xaxis_transform(), marker="x", color="tab:gray",
                   label="pruned", clip_on=False, zorder=3)  # fmt: skip
    baselines = [(r.number, r.baseline) for r in rows if r.baseline is not None]
    if baselines and len({value for _, value in baselines}) == 1:  # the usual case: one base, one set
        value = baselines[0][1]
        ax.axhline(value, linestyle="--", color="tab:red", linewidth=1, label=f"base model ({value:.4g})")
    elif baselines:  # the search changes what the base is scored on (decoding, data): its score per trial
        base_trials, base_values = zip(*baselines)
        ax.scatter(base_trials, base_values, marker="_", s=200, color="tab:red", label="base model", zorder=2)
    numbers = [r.number for r in rows]
    if numbers:
        ax.set_xlim(min(numbers) - 0.5, max(numbers) + 0.5)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("trial")
    ax.set_ylabel(label)
    ax.set_title(f"sweep: {label} ({direction})")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def nested(params: dict[str, Any]) -> dict[str, Any]:
    """Dotted keys as nested mappings (`train.lora.r: 8` -> `train: {lora: {r: 8}}`), as a project YAML reads."""
    tree: dict[str, Any] = {}
    for key, value in params.items():
        node = tree
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return tree


def write_best_yaml(best: TrialRow, path: Path, label: str, config: Path) -> Path:
    """best.yaml: the best trial's settings as an overlay (`domaintune run CONFIG --overlay best.yaml`)."""
    header = (
        f"# domaintune sweep: trial {best.number} has the best {label} ({_fmt(best.value)}) so far\n"
        f"# apply: domaintune run {config} --overlay {path}\n"
    )
    body = yaml.safe_dump(nested(best.params), allow_unicode=True, sort_keys=False)
    path.write_text(header + body, encoding="utf-8")
    return path


def mlflow_trial_logger(cfg: ProjectConfig, paths: SweepPaths, label: str, space: dict[str, SweepParam]) -> Any:
    """An Optuna callback that records each finished trial as an MLflow run (experiment `<name>-sweep`): its
    settings as params, the objective and the in-training values as metrics, state and folder as tags.

    The server in MLFLOW_TRACKING_URI when set, else a SQLite store in sweep/mlflow.db (as train does)."""
    import importlib.util

    from domaintune.errors import UserError

    if importlib.util.find_spec("mlflow") is None:
        raise UserError("train.tracking: mlflow is not installed: pip install 'domaintune[tracking]' (or mlflow)")
    from mlflow.tracking import MlflowClient

    uri = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{paths.mlflow_db.resolve()}"
    client = MlflowClient(tracking_uri=uri)
    name = f"{cfg.name}-sweep"
    experiment = client.get_experiment_by_name(name)
    experiment_id = experiment.experiment_id if experiment else client.create_experiment(name)
    metric_name = "objective"

    def log_trial(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        row = trial_row(trial, space)
        tags = {"optuna.study": study.study_name, "optuna.trial": str(row.number), "state": row.state,
                "objective": label, "folder": row.folder or ""}  # fmt: skip
        run = client.create_run(experiment_id, run_name=f"trial_{row.number}", tags=tags)
        run_id = run.info.run_id
        for key, value in row.params.items():
            client.log_param(
                run_id, key, json.dumps(value, ensure_ascii=False) if isinstance(value, (list, dict)) else value
            )
        if row.value is not None:
            client.log_metric(run_id, metric_name, row.value)
        for step, value in sorted(row.intermediate.items()):
            client.log_metric(run_id, "intermediate", value, step=step)
        client.set_terminated(run_id, status="FINISHED" if row.state in ("COMPLETE", "PRUNED") else "FAILED")

    return log_trial

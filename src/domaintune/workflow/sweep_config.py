"""The `sweep:` section: what `domaintune sweep` searches (`search_space`), what it optimises (`objective`), how.

Each search-space key is a dotted config path, set in a trial exactly as `--set key=value` would set it
(`train.learning_rate`, `train.lora.r`, `data.sources.0.max_rows`, ...). The parameter types are Optuna's:
`float` (`log: true` for a learning rate), `int` (with `step`), `categorical` (any YAML values; lists such as
`[q_proj, v_proj]` included). The pipeline stages never read this section.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from domaintune.utils.config_types import StrictModel

# The top-level keys a trial may change (the sweep section itself, the name and the folders may not).
SEARCHABLE_ROOTS = ("model", "data", "train", "eval", "export", "seed")


class SweepParam(StrictModel):
    """One searched setting: Optuna's `suggest_float`, `suggest_int` or `suggest_categorical`."""

    type: Literal["float", "int", "categorical"] = Field(..., description="Optuna distribution kind.")
    low: float | None = Field(None, description="float / int: the smallest value tried.")
    high: float | None = Field(None, description="float / int: the largest value tried.")
    log: bool = Field(False, description="float / int: sample on a log scale (learning rates).")
    step: float | None = Field(None, description="float / int: the grid step (int default 1; not with log).")
    choices: list[Any] | None = Field(
        None, description="categorical: the values tried (any YAML value; a list such as [q_proj, v_proj] too)."
    )

    @property
    def bounds(self) -> tuple[float, float]:
        """(low, high) of a float or int parameter."""
        if self.low is None or self.high is None:
            raise ValueError(f"a {self.type} parameter has no low/high")
        return self.low, self.high

    def edge_values(self) -> list[Any]:
        """The values a config must accept for the search to be sound: every choice, or both bounds."""
        if self.type == "categorical":
            return list(self.choices or [])
        low, high = self.bounds
        return [int(low), int(high)] if self.type == "int" else [low, high]

    @model_validator(mode="after")
    def _complete(self) -> SweepParam:
        if self.type == "categorical":
            if not self.choices:
                raise ValueError("a categorical parameter needs `choices` (a non-empty list)")
            if self.low is not None or self.high is not None:
                raise ValueError("a categorical parameter takes `choices`, not `low`/`high`")
            return self
        if self.choices is not None:
            raise ValueError(f"a {self.type} parameter takes `low` and `high`, not `choices`")
        if self.low is None or self.high is None or self.low > self.high:
            raise ValueError(f"a {self.type} parameter needs `low` <= `high` (got low={self.low}, high={self.high})")
        if self.log and (self.low <= 0 or self.step is not None):
            raise ValueError("`log: true` needs low > 0 and no `step`")
        if self.type == "int" and not (float(self.low).is_integer() and float(self.high).is_integer()):
            raise ValueError(f"an int parameter needs whole `low` and `high` (got {self.low}, {self.high})")
        return self


class SweepObjective(StrictModel):
    """What a trial is scored by; the study keeps the best."""

    source: Literal["train_generation_eval", "eval"] = Field(
        "eval",
        description=(
            "`eval`: the eval stage's report (a trial runs data -> train -> eval); `train_generation_eval`: "
            "train.generation_eval's in-training metric at the checkpoint training kept (no eval stage; needs "
            "train.generation_eval.items > 0)."
        ),
    )
    set: str = Field(
        "test",
        description=(
            "source eval: the eval set scored (`test`, `general`, or a named `eval.sets` entry). Choose by a set "
            "the training sources never saw and no gate reads: `<name>_dev` (data.split.holdout_group.dev_rows) "
            "or val rows given as an eval.sets `file:`; a set that an eval.gates entry reads is refused."
        ),
    )
    allow_gated_set: bool = Field(
        False,
        description=(
            "Let the objective be a set that an eval.gates entry reads. Dangerous: the recipe chosen for its score "
            "on a set has that set's luck in its score too (the winner's curse), so the gate on the same set "
            "passes more often than the recipe deserves. For a study that is not followed by a gated run."
        ),
    )
    metric: str | None = Field(
        None,
        description=(
            "Metric name: rougeL_char, chrf, ... (source eval: `<metric>_delta` for the gain over the base model, "
            "`<metric>_delta_ci_low` for the lower bound of its interval). "
            "Default: `eval.primary_metric` (or train.generation_eval.metric)."
        ),
    )
    model: str = Field("tuned", description="source eval: whose score counts (the report's model name).")
    direction: Literal["maximize", "minimize"] = Field(
        "maximize", description="maximize for text metrics and gains; minimize for perplexity or a loss."
    )


class SweepPruning(StrictModel):
    """Optuna's MedianPruner on the in-training metric, reported at every evaluation step of training."""

    enabled: bool = Field(
        True, description="Stop a trial whose in-training metric is below the median of earlier ones."
    )
    metric: str | None = Field(
        None,
        description=(
            "In-training metric watched: `loss` (the val loss) or train.generation_eval's metric. "
            "Default: the generation_eval metric when generation_eval is on, else `loss`."
        ),
    )
    n_startup_trials: int = Field(2, ge=0, description="Trials that finish before any is pruned.")
    n_warmup_steps: int = Field(0, ge=0, description="Optimizer steps of a trial before it can be pruned.")


class SweepConfig(StrictModel):
    """`domaintune sweep`: Optuna TPE over `search_space`, each trial a pipeline run in `<output_dir>/sweep/`."""

    search_space: dict[str, SweepParam] = Field(
        default_factory=dict,
        description=(
            "Dotted config path -> parameter, e.g. `train.learning_rate: {type: float, low: 1e-5, high: 1e-3, "
            "log: true}` or `train.lora.r: {type: categorical, choices: [4, 8, 16]}`."
        ),
    )
    objective: SweepObjective = Field(default_factory=SweepObjective, description="What a trial is scored by.")
    pruning: SweepPruning = Field(default_factory=SweepPruning, description="Median pruning during training.")
    startup_trials: int = Field(
        5, ge=0, description="Random trials before TPE starts modelling (Optuna's TPESampler n_startup_trials)."
    )
    enqueue: list[dict[str, Any]] = Field(
        default_factory=list,
        description=(
            "Trials run first, before any sampled one, as `{dotted.key: value}` for every search-space key "
            "(e.g. the project's current settings as a baseline); queued once, when the study is created."
        ),
    )
    study_name: str | None = Field(None, description="Optuna study name in sweep/study.db. Default: the project name.")

    @model_validator(mode="after")
    def _keys_are_searchable(self) -> SweepConfig:
        for key in self.search_space:
            root = key.split(".", 1)[0]
            if root not in SEARCHABLE_ROOTS or key.endswith(".") or ".." in key:
                raise ValueError(
                    f"search_space key {key!r}: a dotted path under {', '.join(SEARCHABLE_ROOTS)} (as --set takes it)"
                )
        for i, trial in enumerate(self.enqueue):
            unknown = sorted(set(trial) - set(self.search_space))
            missing = sorted(set(self.search_space) - set(trial))
            if unknown or missing:
                raise ValueError(
                    f"enqueue[{i}]: give a value for every search_space key"
                    + (f"; not in search_space: {unknown}" if unknown else "")
                    + (f"; missing: {missing}" if missing else "")
                )
        return self

"""`domaintune sweep`: the recipe search (workflow/sweep.py), its table and where its files are."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.console import Console

from domaintune.cli.common import ConfigArg, OutputDirOpt, OverlayOpt, SetOpt, friendly_errors, result_console


def register(app: typer.Typer) -> None:
    @app.command("sweep")
    @friendly_errors
    def sweep(
        config: ConfigArg,
        trials: Annotated[int, typer.Option("--trials", min=1, help="Trials to add to the study this time.")] = 10,
        timeout: Annotated[
            float | None,
            typer.Option("--timeout", help="Start no new trial after this many seconds (a running one finishes)."),
        ] = None,
        set_: SetOpt = None,
        output_dir: OutputDirOpt = None,
        overlay: OverlayOpt = None,
    ) -> None:
        """Search the settings in `sweep.search_space` with Optuna (TPE, median pruning), in <output_dir>/sweep/.

        Each trial runs train (and eval when the objective is read from the eval report) in sweep/trial_<n>/;
        the study in sweep/study.db continues when run again. Writes trials.csv, trials.png and best.yaml
        (apply with `domaintune run CONFIG --overlay .../sweep/best.yaml`). See docs/sweep.md.

        Example: domaintune sweep examples/medical-zh.yaml --trials 4 --set train.max_steps=24
        """
        from domaintune.workflow.sweep import run_sweep
        from domaintune.workflow.sweep_report import TrialRow, results_table

        console = Console(stderr=True)

        def on_trial(row: TrialRow) -> None:
            value = f"{row.value:.4g}" if row.value is not None else "-"
            where = f" at step {row.pruned_at}" if row.pruned_at is not None else ""
            console.print(f"trial {row.number}: {row.state.lower()}{where}, objective {value}", highlight=False)

        result = run_sweep(
            config,
            set_ or [],
            output_dir,
            overlay or [],
            trials=trials,
            timeout=timeout,
            on_stage=lambda name, what: console.rule(f"[bold]{name}[/]: {what}"),
            on_trial=on_trial,
        )
        out = result_console()
        for note in result.notes:
            out.print(f"note: {note}", highlight=False)
        out.print(results_table(result.rows, result.objective.label, result.best))
        paths = result.paths
        if result.best is None:
            out.print(f"no trial finished yet; study: {paths.study_db}", highlight=False)
            return
        out.print(
            f"best: trial {result.best.number}, {result.objective.label} {result.best.value:.4g} "
            f"({result.objective.direction}); {result.ran} trial(s) this run, {len(result.rows)} in the study",
            highlight=False,
        )
        out.print(f"overlay: {paths.best_yaml}  (domaintune run {config} --overlay {paths.best_yaml})", highlight=False)
        out.print(f"table: {paths.trials_csv}  plot: {paths.trials_png}  study: {paths.study_db}", highlight=False)

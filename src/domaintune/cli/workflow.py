"""`domaintune run`: the whole loop in one command."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.console import Console

from domaintune.cli.common import ConfigArg, OutputDirOpt, SetOpt, friendly_errors, load


def register(app: typer.Typer) -> None:
    @app.command("run")
    @friendly_errors
    def run(
        config: ConfigArg,
        set_: SetOpt = None,
        output_dir: OutputDirOpt = None,
        stages: Annotated[
            str | None, typer.Option("--stages", help="Comma-separated subset of data,train,eval,export,register.")
        ] = None,
        from_stage: Annotated[
            str | None, typer.Option("--from", help="Force this stage and every later one to re-run.")
        ] = None,
        workers: Annotated[int, typer.Option("--workers", help="Processes for the data stage.")] = 1,
        continue_from: Annotated[
            str | None,
            typer.Option(
                "--continue-from",
                help="Incremental round: registry://name@alias to train on top of; "
                "its training data is merged with the new data and the result is registered as its child.",
            ),
        ] = None,
    ) -> None:
        """Run data -> train -> eval -> export -> register in one run folder, skipping unchanged stages.

        Example: domaintune run examples/medical-zh.yaml
        Example: domaintune run examples/medical-zh.yaml --from train --set train.epochs=2
        Example: domaintune run examples/medical-zh.yaml --continue-from registry://medical-zh@production
        """
        from domaintune.workflow.pipeline import run_pipeline
        from domaintune.workflow.summary import print_summary, write_summary_html

        cfg = load(config, set_, output_dir)
        parent = None
        if continue_from:
            from domaintune.workflow.incremental import prepare_continuation

            cfg, parent = prepare_continuation(cfg, continue_from)
        console = Console(stderr=True)

        def on_stage(name: str, what: str) -> None:
            console.rule(f"[bold]{name}[/]: {what}")

        stage_list = [s.strip() for s in stages.split(",") if s.strip()] if stages else None
        result = run_pipeline(cfg, stage_list, from_stage, workers, parent_version=parent, on_stage=on_stage)
        print_summary(result, Console())
        html = write_summary_html(result)
        Console().print(f"summary: {html}")
        if result.gates_passed is False:
            console.print(
                "[bold red]eval gates failed:[/] "
                + "; ".join(result.gate_failures)
                + (f" — version {result.version} registered as rejected" if result.version else "")
            )
            raise typer.Exit(1)

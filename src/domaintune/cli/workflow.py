"""`domaintune run`: the whole loop in one command; `domaintune round`: one incremental round from feedback."""

from __future__ import annotations

import json
import os
from typing import Annotated, Literal

import typer
from rich.console import Console

from domaintune.cli.common import ConfigArg, OutputDirOpt, OverlayOpt, SetOpt, friendly_errors, load, result_console


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
        overlay: OverlayOpt = None,
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
        Example: domaintune run examples/medical-zh.yaml --overlay runs/medical-zh/sweep/best.yaml
        """
        from domaintune.workflow.pipeline import run_pipeline
        from domaintune.workflow.summary import print_summary, write_summary_html

        cfg = load(config, set_, output_dir, overlay)
        parent = None
        if continue_from:
            from domaintune.workflow.incremental import prepare_continuation

            cfg, parent = prepare_continuation(cfg, continue_from)
        console = Console(stderr=True)

        def on_stage(name: str, what: str) -> None:
            console.rule(f"[bold]{name}[/]: {what}")

        stage_list = [s.strip() for s in stages.split(",") if s.strip()] if stages else None
        result = run_pipeline(cfg, stage_list, from_stage, workers, parent_version=parent, on_stage=on_stage)
        print_summary(result, result_console())
        html = write_summary_html(result)
        result_console().print(f"summary: {html}")
        if result.gates_passed is False:
            console.print(
                "[bold red]eval gates failed:[/] "
                + "; ".join(result.gate_failures)
                + (f" — version {result.version} registered as rejected" if result.version else "")
            )
            raise typer.Exit(1)

    app.command("round")(friendly_errors(round_cmd))


def round_cmd(
    config: ConfigArg,
    from_: Annotated[
        str, typer.Option("--from", help="The version to improve, e.g. registry://name@production.", show_default=False)
    ],
    set_: SetOpt = None,
    output_dir: OutputDirOpt = None,
    window: Annotated[
        str | None,
        typer.Option("--window", help="Only feedback from the last 7d / 12h / 2w (and after the parent's round)."),
    ] = None,
    thumbs: Annotated[
        Literal["off", "approved"],
        typer.Option("--thumbs", help="`approved`: a reviewer's thumbs-up makes the model's answer a training row."),
    ] = "off",
    reviewer: Annotated[
        list[str] | None,
        typer.Option("--reviewer", help="API key name whose ratings approve or veto (repeatable; admin keys count)."),
    ] = None,
    holdout: Annotated[
        float, typer.Option("--holdout", min=0.0, max=0.9, help="Share of feedback held out to compare child/parent.")
    ] = 0.2,
    webhook: Annotated[
        str | None,
        typer.Option("--webhook", help="POST the round's summary here (default: $DOMAINTUNE_ROUND_WEBHOOK)."),
    ] = None,
    canary: Annotated[
        bool, typer.Option("--canary/--no-canary", help="Make a child that passes the canary's candidate.")
    ] = True,
    parent_gate: Annotated[
        bool,
        typer.Option("--parent-gate/--no-parent-gate", help="Reject a child worse than its parent on the test set."),
    ] = True,
    force: Annotated[bool, typer.Option("--force", help="Run even when this round was already registered.")] = False,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Stop before training: what would be taken, merged and dropped.")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary as JSON.")] = False,
) -> None:
    """One unattended round: feedback since the parent's round -> merge -> train -> compare -> register -> canary.

    Does nothing (and says so) when there is no new feedback or the same round was already registered.
    Exit 1 when the child failed its gates. Summary: <output_dir>/rounds/latest.json (and the webhook).

    Example: domaintune round examples/medical-zh.yaml --from registry://medical-zh@production --window 7d
    """
    from domaintune.workflow.round import ReviewRules, RoundOptions, parse_window, run_round, summary_lines

    cfg = load(config, set_, output_dir)
    options = RoundOptions(
        window=parse_window(window) if window else None,
        rules=ReviewRules(thumbs=thumbs, reviewers=tuple(reviewer or ()), holdout=holdout),
        force=force,
        webhook=webhook or os.environ.get("DOMAINTUNE_ROUND_WEBHOOK") or None,
        canary=canary,
        parent_gate=parent_gate,
        dry_run=dry_run,
    )
    console = Console(stderr=True)
    result = run_round(cfg, from_, options, on_stage=lambda name, what: console.rule(f"[bold]{name}[/]: {what}"))
    out = result_console()
    if as_json:
        out.print_json(json.dumps(result.summary, default=str))
    else:
        for line in summary_lines(result.summary):
            out.print(line, soft_wrap=True, highlight=False, markup=False)
    if result.status == "rejected":
        raise typer.Exit(1)

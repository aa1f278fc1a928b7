"""Commands of the data stage."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from domaintune.cli.common import ConfigArg, OutputDirOpt, SetOpt, friendly_errors, load, result_console


def register(app: typer.Typer) -> None:
    """Adds the data stage's commands to the root app."""

    @app.command("data")
    @friendly_errors
    def data(
        config: ConfigArg,
        set_: SetOpt = None,
        output_dir: OutputDirOpt = None,
        workers: Annotated[int, typer.Option("--workers", min=1, help="Worker processes for per-row work.")] = 1,
        strict: Annotated[
            bool, typer.Option("--strict", help="Fail on the first unparseable line instead of quarantining it.")
        ] = False,
    ) -> None:
        """Turn raw sources into clean, split, accounted train/val/test JSONL (+ general set and report).

        Example: domaintune data examples/medical-zh.yaml --workers 2 --set data.sample.train=1000
        """
        from domaintune.data.pipeline import run_data

        cfg = load(config, set_, output_dir)
        report = run_data(cfg, cfg.layout, workers=workers, strict=strict)
        console = result_console()
        table = Table(title=f"data: {cfg.name}")
        holdout = report.get("holdout")
        dev = (holdout or {}).get("dev")
        places = ["train", "val", "test"] + (["holdout"] if holdout else []) + (["holdout_dev"] if dev else [])
        for col in ("source", "input", *places, "dropped", "balanced"):
            table.add_column(col, justify="right" if col != "source" else "left")
        for name, s in report["sources"].items():
            table.add_row(
                name,
                str(s["input"]),
                *(str(s["kept"].get(p, 0)) for p in places),
                str(s["dropped_total"]),
                "yes" if s["balanced"] else "NO",
            )
        console.print(table)
        if holdout:
            console.print(
                f"holdout {holdout['name']!r} ({holdout['field']} "
                + (f"after {holdout['after']}" if holdout["after"] else f"in {holdout['values']}")
                + f"): {holdout['rows']} rows -> {cfg.layout.holdout_file(holdout['name'])}",
                highlight=False,
            )
        if holdout and dev:
            console.print(
                f"holdout dev (choose recipes on set {dev['set']!r}; the gates read {holdout['name']!r}): "
                f"{dev['rows']} rows -> {cfg.layout.holdout_dev_file(holdout['name'])}",
                highlight=False,
            )
        reasons = ", ".join(f"{k}={v}" for k, v in list(report["drop_reasons"].items())[:8])
        console.print(f"drop reasons: {reasons}")
        pairs = report["leakage"]["pairs"]
        if pairs:
            shared = ", ".join(f"{p['split']}/{p['against']} {p['exact']}+{p['near']}" for p in pairs)
            console.print(f"prompts shared between splits (exact+near): {shared}")
        for v in report["guards"]["violations"]:
            console.print(f"[yellow]warning[/yellow]: {v['message']}")
        if report["pii"]["counts"]:
            console.print(f"PII redacted: {report['pii']['counts']}")
        if report.get("general"):
            g = report["general"]
            console.print(f"general set: {g['written']} rows (of {g['input']} instances)")
        console.print(f"outputs: {report['output_dir']} (report.html, report.json, quarantine.jsonl)")

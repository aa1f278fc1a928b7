"""Commands of the train stage."""

from __future__ import annotations

from typing import Annotated

import typer

from domaintune.cli.common import ConfigArg, OutputDirOpt, SetOpt, console, friendly_errors, load


def _fmt(value, spec: str = ".4f") -> str:
    return "-" if value is None else format(value, spec)


@friendly_errors
def train(
    config: ConfigArg,
    set_: SetOpt = None,
    output_dir: OutputDirOpt = None,
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue from the last complete checkpoint in <run>/train/checkpoints.")
    ] = False,
) -> None:
    """Fine-tune the base model on <run>/data/ with train.method; writes <run>/model and <run>/train.

    Example: domaintune train examples/medical-zh.yaml --set train.max_steps=50
    """
    from rich.table import Table

    from domaintune.train.runner import run_train

    cfg = load(config, set_, output_dir)
    metrics = run_train(cfg, cfg.output_dir, resume=resume)
    table = Table(title=f"train: {cfg.name} ({metrics['method']}, {metrics['model_kind']})", show_header=False)
    table.add_row("steps", f"{metrics['steps']} / {metrics['max_steps']}" + (" (early stop)" if metrics["stopped_early"] else ""))
    table.add_row("val loss step 0 -> best", f"{_fmt(metrics['step0_val_loss'])} -> {_fmt(metrics['best_val_loss'])}")
    table.add_row("final train / val loss", f"{_fmt(metrics['final_train_loss'])} / {_fmt(metrics['final_val_loss'])}")
    table.add_row("tokens seen", f"{metrics['tokens_seen']:,}")
    table.add_row("tokens/s (training steps)", _fmt(metrics["tokens_per_second"], ".1f"))
    table.add_row("truncated examples", str(metrics["truncated"]))
    table.add_row("wall time", f"{metrics['wall_seconds']:.1f} s")
    table.add_row("model", str(cfg.output_dir / "model"))
    table.add_row("metrics / curve", f"{cfg.output_dir / 'train' / 'metrics.json'}, loss.png")
    console.print(table)


def register(app: typer.Typer) -> None:
    """Adds the train stage's commands to the root app."""
    app.command("train")(train)

"""`domaintune config ...`: validate a project file and print the YAML reference."""

from __future__ import annotations

import json

import typer
from rich.console import Console

from domaintune.cli.common import ConfigArg, OutputDirOpt, SetOpt, friendly_errors, load
from domaintune.config_reference import render_reference


def register(app: typer.Typer) -> None:
    @app.command("validate")
    @friendly_errors
    def validate(config: ConfigArg, set_: SetOpt = None, output_dir: OutputDirOpt = None) -> None:
        """Check a project YAML and print it fully resolved (defaults filled in).

        Example: domaintune validate examples/medical-zh.yaml --set train.epochs=2
        """
        cfg = load(config, set_, output_dir)
        Console().print_json(json.dumps(cfg.model_dump(mode="json"), ensure_ascii=False))

    @app.command("config-reference")
    def config_reference() -> None:
        """Print the YAML reference (every section, key, type, default), generated from the config models."""
        typer.echo(render_reference())

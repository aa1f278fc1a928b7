"""Options and error handling shared by every command, so each command stays a thin call."""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.text import Text

from domaintune.config import ProjectConfig, load_config
from domaintune.errors import UserError

console = Console(stderr=True)

ConfigArg = Annotated[Path, typer.Argument(help="Project YAML (one file, a section per stage).", show_default=False)]
SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", help="Override a setting: dotted.key=value (YAML value). Repeatable.", show_default=False),
]
OutputDirOpt = Annotated[
    Path | None,
    typer.Option(
        "--output-dir", help="Run folder (default: output_dir in the YAML, else runs/<name> beside the YAML)."
    ),
]


def load(config: Path, overrides: list[str] | None, output_dir: Path | None) -> ProjectConfig:
    return load_config(config, overrides or [], output_dir)


def friendly_errors(func: Callable[..., Any]) -> Callable[..., Any]:
    """Turn expected user errors into one red line and exit code 2 instead of a traceback."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except (UserError, FileNotFoundError) as exc:
            # soft_wrap: one line at any terminal width (scripts grep it); Text: brackets in the message stay
            console.print(Text.assemble(("error: ", "bold red"), str(exc)), soft_wrap=True, highlight=False)
            raise typer.Exit(2) from None

    return wrapper

"""Options and error handling shared by every command, so each command stays a thin call."""

from __future__ import annotations

import functools
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import click
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


def result_console() -> Console:
    """The console for results: piped or captured output keeps a fixed width, so tables neither wrap nor truncate."""
    return Console(width=None if sys.stdout.isatty() else 160)


OverlayOpt = Annotated[
    list[Path] | None,
    typer.Option(
        "--overlay",
        help="A YAML of settings laid over the config before --set (e.g. a sweep's best.yaml). Repeatable.",
        show_default=False,
    ),
]


def load(
    config: Path, overrides: list[str] | None, output_dir: Path | None, overlays: list[Path] | None = None
) -> ProjectConfig:
    return load_config(config, overrides or [], output_dir, overlays or [])


# Exit codes every command keeps (README "Exit codes"): a script tells a rejected model from a broken run.
EXIT_OK = 0
EXIT_GATE_REJECTED = 1  # the run worked; an eval gate (or a check such as `registry verify`) said no
EXIT_USER_ERROR = 2  # configuration or input error: the message names what to fix
EXIT_CRASHED = 3  # a stage crashed (a bug or the environment): the traceback is printed above the last line


def report_crash(exc: BaseException) -> None:
    """The traceback, then one line naming the crash (scripts read the last line)."""
    traceback.print_exception(type(exc), exc, exc.__traceback__, file=sys.stderr)
    message = f"crashed ({type(exc).__name__}: {exc}); exit code {EXIT_CRASHED}, the traceback is above"
    console.print(Text.assemble(("error: ", "bold red"), message), soft_wrap=True, highlight=False)


def friendly_errors(func: Callable[..., Any]) -> Callable[..., Any]:
    """User errors: one red line, exit 2. Any other exception: its traceback and exit 3 (never 1, the gate's code)."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except (UserError, FileNotFoundError) as exc:
            # soft_wrap: one line at any terminal width (scripts grep it); Text: brackets in the message stay
            console.print(Text.assemble(("error: ", "bold red"), str(exc)), soft_wrap=True, highlight=False)
            raise typer.Exit(EXIT_USER_ERROR) from None
        except (typer.Exit, typer.Abort, click.exceptions.Exit, click.exceptions.Abort, click.ClickException):
            raise
        except Exception as exc:
            report_crash(exc)
            raise typer.Exit(EXIT_CRASHED) from None

    return wrapper

"""`domaintune` command line: a thin layer over each stage's plain functions."""

from __future__ import annotations

import importlib

import typer

app = typer.Typer(
    name="domaintune",
    help="Turn an open LLM into a domain expert: data -> train -> eval -> export -> registry -> serve.",
    no_args_is_help=True,
    rich_markup_mode="rich",
    pretty_exceptions_show_locals=False,
)

# One module per stage; each exposes register(app). Kept as a list so a stage's
# commands live beside nothing else's.
_COMMAND_MODULES = [
    "workflow",
    "sweep",
    "data",
    "train",
    "eval",
    "export",
    "registry",
    "serve",
    "hardware",
    "config",
    "studio",
    "annotate",
    "template",
]

for _name in _COMMAND_MODULES:
    importlib.import_module(f"domaintune.cli.{_name}").register(app)


def main() -> None:
    """Run the CLI; an exception no command caught is a crash: exit 3, never 1 (1 means a gate rejected)."""
    from domaintune.cli.common import EXIT_CRASHED, report_crash

    try:
        app()
    except typer.Exit as exc:  # normally turned into SystemExit by typer; kept exact if one escapes
        raise SystemExit(exc.exit_code) from None
    except Exception as exc:  # SystemExit and KeyboardInterrupt are not Exceptions: they pass through
        report_crash(exc)
        raise SystemExit(EXIT_CRASHED) from None

"""Commands of the train stage."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    """Adds the train stage's commands to the root app."""

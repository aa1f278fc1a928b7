"""Commands of the data stage."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    """Adds the data stage's commands to the root app."""

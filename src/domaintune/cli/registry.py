"""Commands of the registry stage."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    """Adds the registry stage's commands to the root app."""

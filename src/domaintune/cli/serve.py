"""Commands of the serve stage."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    """Adds the serve stage's commands to the root app."""

"""Commands of the export stage."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    """Adds the export stage's commands to the root app."""

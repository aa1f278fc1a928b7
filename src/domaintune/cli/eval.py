"""Commands of the eval stage."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    """Adds the eval stage's commands to the root app."""

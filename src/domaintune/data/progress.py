"""The data stage's progress bars (rich). A disabled bar draws nothing and costs nothing."""

from __future__ import annotations

from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    SpinnerColumn,
    Task,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text


class RateColumn(ProgressColumn):
    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        return Text(f"{speed:,.0f} rows/s" if speed else "… rows/s", style="progress.data.speed")


class CountColumn(ProgressColumn):
    def render(self, task: Task) -> Text:
        total = f"/~{task.total:,.0f}" if task.total else ""
        return Text(f"{task.completed:,.0f}{total} rows", style="progress.download")


def rows_progress(enabled: bool) -> Progress:
    """Rows read against an estimated total (the readers' cheap line counts)."""
    return Progress(
        SpinnerColumn(),
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        CountColumn(),
        RateColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        transient=False,
        disable=not enabled,
    )


def items_progress(enabled: bool) -> Progress:
    """Items done of a known number (augmentation ops, generator batches)."""
    return Progress(
        SpinnerColumn(),
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        RateColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        disable=not enabled,
    )

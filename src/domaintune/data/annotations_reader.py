"""`reader: annotations`: the settled rows of an annotation project (`domaintune annotate finalize`).

`path` is the project folder (or its `annotations.jsonl`). Each row carries instruction/input/output (the
adjudicated answer when the task corrects answers) and one field per label; keep the labels you want on the
training rows with `keep:` (e.g. `keep: [intent]`). A project whose agreement gate failed is refused unless it
was finalised with --force (then its rows say so in `annotation`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from domaintune.data.source_config import SourceConfig
from domaintune.errors import UserError


def annotation_files(src: SourceConfig) -> list[Path]:
    path = Path(src.path)  # type: ignore[arg-type]  # the config requires a path for this reader
    file = path / "annotations.jsonl" if path.is_dir() else path
    if not file.is_file():
        raise UserError(f"{path}: no annotations.jsonl (run `domaintune annotate finalize` on the project first)")
    return [file]


def read_annotations(src: SourceConfig, name: str, read_jsonl: Callable[..., Iterator[Any]]) -> Iterator[Any]:
    """The project's rows as JSON-lines records (`read_jsonl` is the readers' own, passed in: no import circle)."""
    for file in annotation_files(src):
        yield from read_jsonl(file, src, name)

"""`Spooled`: the rows that survived the per-row stages, on disk, with the few numbers per row that the
whole-corpus steps (outliers, split, difficulty, sampling) need in memory.

A row's index is its position in the spool file; the later steps refer to rows by that index only.
"""

from __future__ import annotations

import contextlib
import json
from array import array
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class Spooled:
    path: Path  # one {"source", "file", "loc", "row"} JSON line per row
    length: array[int] = field(default_factory=lambda: array("l"))  # characters of the row's text fields
    answer_length: array[int] = field(default_factory=lambda: array("l"))  # characters of its answer
    stratum: array[int] = field(default_factory=lambda: array("l"))  # code into `strata`
    strata: dict[str, int] = field(default_factory=dict)  # stratum label -> code
    time: list[Any] = field(default_factory=list)  # the time field's value (split by time only)
    score: array[float] = field(default_factory=lambda: array("d"))  # difficulty by a named field only

    def __len__(self) -> int:
        return len(self.length)

    def add_stratum(self, label: str) -> None:
        self.stratum.append(self.strata.setdefault(label, len(self.strata)))

    def stratum_names(self) -> dict[int, str]:
        return {code: name for name, code in self.strata.items()}

    def read(self) -> Iterator[tuple[int, dict[str, Any]]]:
        """(index, spooled item) in spool order."""
        with self.path.open("r", encoding="utf-8") as fh:
            for i, line in enumerate(fh):
                yield i, json.loads(line)


@contextlib.contextmanager
def spool_file(data_dir: Path) -> Iterator[Path]:
    """A scratch file under `data_dir/.work/`, removed (with the folder, when empty) afterwards."""
    work = data_dir / ".work"
    work.mkdir(parents=True, exist_ok=True)
    path = work / "rows.jsonl"
    try:
        yield path
    finally:
        path.unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            work.rmdir()

"""`Ledger`: where every row of the data stage went.

One object keeps the per-source accounts (rows read, dropped by stage and reason, kept by split),
the funnel (rows dropped per stage) and the quarantine file, so a drop is recorded in all three
at once. Rows that were never input rows (the general set, synthetic candidates) are quarantined
too, each in its own book. `check` is the stage's promise: every input row is kept or dropped,
and the quarantine holds exactly the dropped rows plus the books.
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from pathlib import Path
from types import TracebackType
from typing import Any, NamedTuple

from domaintune.layout import SPLIT_NAMES
from domaintune.utils.io import atomic_write


class Where(NamedTuple):
    """Where a row came from: its source's name, its file and its place in the file."""

    source: str
    file: str
    loc: str


class Ledger:
    """Accounts, funnel and quarantine of one data stage run (`quarantine.jsonl` is published on `close`)."""

    def __init__(self, quarantine_file: Path):
        self._out = atomic_write(quarantine_file)
        self._fh = self._out.__enter__()
        self._open = True
        self.input: Counter[str] = Counter()  # rows read, by source
        self.dropped: dict[str, Counter[str]] = defaultdict(Counter)  # by source: "stage: reason" -> rows
        self.kept: dict[str, Counter[str]] = defaultdict(Counter)  # by source: split -> rows
        self.funnel: Counter[str] = Counter()  # stage -> rows dropped there
        self.books: Counter[str] = Counter()  # quarantined rows that were never input rows, by book
        self.quarantined = 0

    # -- recording -------------------------------------------------------------------------------
    def read(self, source: str) -> None:
        """One input row met (parseable or not)."""
        self.input[source] += 1

    def drop(self, where: Where, stage: str, reason: str, *, counted_as: str | None = None, **detail: Any) -> None:
        """An input row dropped at `stage`: counted under `counted_as` (default `reason`), quarantined with
        the full `reason` and `detail`."""
        self.dropped[where.source][f"{stage}: {reason if counted_as is None else counted_as}"] += 1
        self.funnel[stage] += 1
        self._quarantine(where, stage, reason, detail)

    def keep(self, source: str, split: str) -> None:
        self.kept[source][split] += 1

    def set_aside(self, where: Where, stage: str, reason: str, *, book: str, **detail: Any) -> None:
        """A row that is not an input row (general set, synthetic candidate) quarantined in `book`."""
        self.books[book] += 1
        self._quarantine(where, stage, reason, detail)

    def _quarantine(self, where: Where, stage: str, reason: str, detail: dict[str, Any]) -> None:
        entry = {"source": where.source, "file": where.file, "loc": where.loc, "stage": stage, "reason": reason}
        entry.update(detail)
        self._fh.write(json.dumps(entry, ensure_ascii=False, default=str) + "\n")
        self.quarantined += 1

    # -- reading -----------------------------------------------------------------------------------
    @property
    def rows_in(self) -> int:
        return sum(self.input.values())

    def dropped_at(self, stage: str) -> int:
        return self.funnel[stage]

    def summary(self) -> dict[str, Any]:
        """Per source: input, kept by split (and `holdout` when a holdout group was kept), dropped by reason (most
        first), and whether they balance."""
        out = {}
        places = [*SPLIT_NAMES, *sorted({s for c in self.kept.values() for s in c} - set(SPLIT_NAMES))]  # + holdout
        for source in self.input:
            dropped = dict(sorted(self.dropped[source].items(), key=lambda kv: -kv[1]))
            kept = {s: self.kept[source][s] for s in places}
            total_dropped = sum(dropped.values())
            total_kept = sum(kept.values())
            out[source] = {
                "input": self.input[source],
                "kept": kept,
                "kept_total": total_kept,
                "dropped": dropped,
                "dropped_total": total_dropped,
                "balanced": self.input[source] == total_kept + total_dropped,
            }
        return out

    def drop_reasons(self) -> dict[str, int]:
        """All sources together: "stage: reason" -> rows, most first."""
        total: Counter[str] = Counter()
        for counts in self.dropped.values():
            total.update(counts)
        return dict(total.most_common())

    @property
    def balanced(self) -> bool:
        """Every input row kept or dropped, and the quarantine holds the dropped rows plus the books."""
        rows_dropped = sum(sum(c.values()) for c in self.dropped.values())
        rows_kept = sum(sum(c.values()) for c in self.kept.values())
        return (
            all(s["balanced"] for s in self.summary().values())
            and self.rows_in == rows_kept + rows_dropped
            and self.quarantined == rows_dropped + sum(self.books.values())
        )

    def check(self, **books: int) -> None:
        """Raise when the accounts do not balance, or a book's count differs from what its section reported
        (e.g. `check(general=3)`): that would be a bug, said loudly rather than shipped in a wrong report."""
        if not self.balanced:
            raise RuntimeError(
                f"data accounting does not balance: {json.dumps(self.summary(), ensure_ascii=False)}; "
                f"{self.quarantined} rows quarantined, books {dict(self.books)}"
            )
        for book, expected in books.items():
            if self.books[book] != expected:
                raise RuntimeError(f"{book}: {expected} rows reported dropped, {self.books[book]} quarantined")

    # -- the quarantine file -------------------------------------------------------------------------
    def close(self, ok: bool = True) -> None:
        """Publish `quarantine.jsonl` (ok) or discard it."""
        if self._open:
            self._open = False
            self._out.__exit__(None if ok else RuntimeError, None, None)

    def __enter__(self) -> Ledger:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close(ok=exc_type is None)

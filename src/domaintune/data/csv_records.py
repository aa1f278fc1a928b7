"""`csv_records`: a CSV/TSV file as records, where one broken quote costs one record, not the rest of the file.

Python's csv reader joins lines while a quoted field is open, so one unbalanced opening quote swallows every
following line into one field. Here the lines are parsed strictly and watched:

* a record that reaches the end of the file inside quotes, spans more than `max_lines` lines, or breaks the
  quoting rules over several lines (a stray quote closed by the opening quote of a later field) is reported as
  an error at its *first* line, and reading goes on with the line after it;
* a quoting slip within one line (`"abc" ,def`) is read leniently, as the csv module always did;
* a record with an undecodable line is reported as an error at its first line.

A stray quote closed within `max_lines` lines by a quote that a delimiter or a line end follows (another stray
quote ending a field, `5",`, or the opening quote of a field that starts with the delimiter, `",…"`) still joins
those lines into one record: that is a well-formed CSV record, which no reader can tell from a real one.
"""

from __future__ import annotations

import csv
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path


@dataclass
class CsvRecord:
    line: int  # where the record starts (1-based)
    fields: list[str] | None  # None: unreadable (then `error` and `raw` say why and what)
    error: str | None = None
    raw: str = ""


class _RecordTooLongError(Exception):
    """The record being read has taken more lines than allowed."""


class _Lines:
    """The file's decoded lines for the csv reader, remembering the lines of the record being read; lines given
    back are read again first. An undecodable line is read with replacement characters and marks its record."""

    def __init__(self, path: Path, encoding: str, max_lines: int):
        self.max_lines = max_lines
        self.taken: list[tuple[int, str, str | None]] = []  # (line number, text, why it does not decode)
        self.pending: deque[tuple[int, str, str | None]] = deque()
        self.eof = False
        self._source = self._decode(path, encoding)

    @staticmethod
    def _decode(path: Path, encoding: str) -> Iterator[tuple[int, str, str | None]]:
        codec = "utf-8" if encoding == "utf-8-sig" else encoding
        with path.open("rb") as handle:
            for line_no, raw in enumerate(handle, start=1):
                if line_no == 1 and raw.startswith(b"\xef\xbb\xbf"):
                    raw = raw[3:]
                try:
                    yield line_no, raw.decode(codec), None
                except UnicodeDecodeError as exc:
                    yield (
                        line_no,
                        raw.decode(codec, errors="replace"),
                        f"undecodable bytes as {encoding} at byte {exc.start}",
                    )

    def __iter__(self) -> _Lines:
        return self

    def __next__(self) -> str:
        if len(self.taken) >= self.max_lines:
            raise _RecordTooLongError
        if self.pending:
            item = self.pending.popleft()
        else:
            found = next(self._source, None)
            if found is None:
                self.eof = True
                raise StopIteration
            item = found
        self.taken.append(item)
        return item[1]

    def take(self) -> tuple[int, str, str | None]:
        """(first line, its text, why the record does not decode) of the record just read; forgets its lines."""
        taken, self.taken = self.taken, []
        first = taken[0]
        bad = next(((n, why) for n, _, why in taken if why), None)
        if bad is None:
            return first[0], first[1], None
        return first[0], first[1], bad[1] if bad[0] == first[0] else f"{bad[1]} (line {bad[0]})"

    def give_back(self) -> None:
        """The lines of the record being read, but its first, are read again."""
        taken, self.taken = self.taken[1:], []
        self.pending.extendleft(reversed(taken))
        if taken:
            self.eof = False


def csv_records(path: Path, encoding: str, delimiter: str, max_lines: int) -> Iterator[CsvRecord]:
    """Every record of the file in order (the header included), readable or not."""
    lines = _Lines(path, encoding, max_lines)
    while True:
        try:
            for fields in csv.reader(lines, delimiter=delimiter, strict=True):
                first, text, undecodable = lines.take()
                yield CsvRecord(first, None, undecodable, text) if undecodable else CsvRecord(first, fields)
            return
        except _RecordTooLongError:
            error = f"record spans more than {max_lines} lines (an unbalanced quote? see sources[*].max_record_lines)"
        except csv.Error as exc:
            if len(lines.taken) == 1 and not lines.eof:  # a quoting slip within one line: read it as before
                first, text, undecodable = lines.take()
                fields = next(csv.reader([text], delimiter=delimiter), [])
                yield CsvRecord(first, None, undecodable, text) if undecodable else CsvRecord(first, fields)
                continue
            error = (
                "unbalanced quote: the record reaches the end of the file inside quotes"
                if lines.eof
                else f"unbalanced quote: the record breaks the quoting rules {len(lines.taken)} lines on ({exc})"
            )
        first, text = lines.taken[0][:2]
        lines.give_back()  # read on with the line after the broken record's first
        yield CsvRecord(first, None, error, text)

"""JSONL reading/writing and atomic file and folder writes used by every stage."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def read_jsonl_numbered(path: str | Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield (line number, row) per non-empty line; a broken line raises with file and line number."""
    path = Path(path)
    with path.open("r", encoding="utf-8") as handle:
        for line_no, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                yield line_no, json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{line_no}: invalid JSON ({exc.msg})") from exc


def read_jsonl(path: str | Path) -> Iterator[dict[str, Any]]:
    """Yield one dict per non-empty line; a broken line raises with file and line number."""
    for _, row in read_jsonl_numbered(path):
        yield row


def write_jsonl(path: str | Path, rows: Iterable[dict[str, Any]]) -> int:
    """Write rows atomically; returns how many were written."""
    count = 0
    with atomic_write(path) as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
            count += 1
    return count


class atomic_write:  # noqa: N801 - used as a context manager like open()
    """Write to a temp file in the same folder, then rename: readers never see half a file."""

    def __init__(self, path: str | Path, mode: str = "w", encoding: str | None = "utf-8"):
        self.path = Path(path)
        self.mode = mode
        self.encoding = None if "b" in mode else encoding

    def __enter__(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, self._tmp = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.name}.", suffix=".tmp")
        self._handle = os.fdopen(fd, self.mode, encoding=self.encoding)
        return self._handle

    def __exit__(self, exc_type, exc, tb):
        self._handle.close()
        if exc_type is None:
            os.replace(self._tmp, self.path)
        else:
            os.unlink(self._tmp)
        return False


def write_json(path: str | Path, data: Any) -> None:
    with atomic_write(path) as handle:
        json.dump(data, handle, ensure_ascii=False, indent=2, default=str)
        handle.write("\n")


def sha256_file(path: str | Path, chunk_size: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        while chunk := handle.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def fingerprint_files(paths: Iterable[str | Path]) -> str:
    """One sha256 over several files' contents, in the given order."""
    digest = hashlib.sha256()
    for path in paths:
        digest.update(sha256_file(path).encode())
    return digest.hexdigest()


STAGING_MARK = ".staging-"


@contextmanager
def atomic_dir(target: str | Path, *, if_exists: str = "replace") -> Iterator[Path]:
    """Build a folder in a staging sibling, then move it into place as one rename.

    Readers see the old folder or the new one, never half of one. If the body raises, the staging
    folder is deleted and `target` is left as it was. `if_exists="keep"` is for caches that several
    processes may fill at once: when `target` already exists the finished staging folder is dropped.
    """
    if if_exists not in ("replace", "keep"):
        raise ValueError(f"if_exists must be 'replace' or 'keep', not {if_exists!r}")
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}{STAGING_MARK}{os.getpid()}-"))
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    publish_dir(staging, target, if_exists=if_exists)


def publish_dir(staging: Path, target: Path, *, if_exists: str = "replace") -> None:
    """Move a finished folder to `target`; an existing target is replaced (or kept, with if_exists="keep")."""
    if target.exists() and if_exists == "keep":
        shutil.rmtree(staging, ignore_errors=True)
        return
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}-{time.time_ns()}")
        os.rename(target, old)
    try:
        os.rename(staging, target)
    except OSError:
        if if_exists == "keep" and target.exists():  # another process published first
            shutil.rmtree(staging, ignore_errors=True)
            return
        if old is not None:
            os.rename(old, target)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def remove_stale_staging(parent: str | Path, name: str) -> list[Path]:
    """Delete staging folders of `name` left in `parent` by processes that were killed; returns them."""
    from domaintune.utils.process import pid_alive

    removed = []
    prefix = f".{name}{STAGING_MARK}"
    for folder in Path(parent).glob(f"{prefix}*"):
        pid_text = folder.name[len(prefix) :].split("-", 1)[0]
        if not pid_text.isdigit() or not pid_alive(int(pid_text)):
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
    return removed

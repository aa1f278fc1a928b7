"""Uploads of the Data screen: store a file, detect its format and encoding, list its columns, preview a mapping."""

from __future__ import annotations

import re
from itertools import islice
from pathlib import Path
from typing import Any

from domaintune.data.readers import detect_encoding, iter_source, reader_for
from domaintune.data.source_config import SourceConfig
from domaintune.errors import UserError

ALLOWED = {".csv", ".tsv", ".jsonl", ".json", ".xlsx", ".xls", ".xml", ".pdf", ".docx", ".parquet"}
_TEXT = {".csv", ".tsv", ".jsonl", ".json", ".xml"}
_SAFE = re.compile(r"[^\w.\-]+", re.UNICODE)
MAPPED = ("instruction", "input", "output", "id")


def uploads_dir(config_path: Path) -> Path:
    return config_path.parent / "uploads"


def save_upload(config_path: Path, filename: str, body: bytes) -> Path:
    name = _SAFE.sub("_", Path(filename).name).strip("._") or "upload"
    suffix = Path(name).suffix.lower()
    if suffix not in ALLOWED:
        raise UserError(f"{filename}: unsupported file type {suffix or '(none)'}; use {', '.join(sorted(ALLOWED))}")
    if not body:
        raise UserError(f"{filename}: the file is empty")
    folder = uploads_dir(config_path)
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / name
    target.write_bytes(body)
    return target


def list_uploads(config_path: Path) -> list[Path]:
    folder = uploads_dir(config_path)
    return sorted(p for p in folder.iterdir() if p.is_file()) if folder.is_dir() else []


def upload_path(config_path: Path, name: str) -> Path:
    path = uploads_dir(config_path) / Path(name).name
    if not path.is_file():
        raise UserError(f"upload {name!r} not found")
    return path


def inspect(path: Path, record_path: str | None = None, limit: int = 50) -> dict[str, Any]:
    """Reader, encoding, columns and the first rows of an upload; a clear error instead of a traceback."""
    info: dict[str, Any] = {
        "file": path.name,
        "reader": None,
        "encoding": None,
        "columns": [],
        "rows": [],
        "errors": [],
    }
    try:
        if path.suffix.lower() == ".xml" and not record_path:
            raise UserError(f"{path.name}: XML needs the record path (the XPath of one record, e.g. .//QAPair)")
        source = SourceConfig(path=path, record_path=record_path or None)
        info["reader"] = reader_for(source, path)
        if path.suffix.lower() in _TEXT:
            info["encoding"] = detect_encoding(path)
        for record in islice(iter_source(source, 0, path.parent), limit):
            if record.error:
                info["errors"].append(f"{record.loc}: {record.error}")
            elif record.data is not None:
                info["rows"].append(record.data)
    except UserError as exc:
        info["errors"].append(str(exc))
    except Exception as exc:  # a reader's own failure on a broken file: say what it was
        info["errors"].append(f"{path.name}: cannot read ({type(exc).__name__}: {exc})")
    columns: list[str] = []
    for row in info["rows"]:
        columns.extend(k for k in row if k not in columns)
    info["columns"] = columns
    return info


def source_entry(path: Path, config_path: Path, mapping: dict[str, str], keep: list[str], record_path: str) -> dict:
    """The `data.sources` item for this upload and mapping (path relative to the YAML)."""
    fields = {k: v for k, v in mapping.items() if k in MAPPED and v}
    if "output" not in fields or "instruction" not in fields:
        raise UserError("pick the columns for instruction (question) and output (answer)")
    entry: dict[str, Any] = {"path": str(path.relative_to(config_path.parent)), "fields": fields}
    if path.suffix.lower() == ".xml":
        if not record_path:
            raise UserError("XML needs the record path (e.g. .//QAPair)")
        entry["record_path"] = record_path
    if keep:
        entry["keep"] = keep
    return entry


def preview(info: dict[str, Any], mapping: dict[str, str], limit: int = 10) -> list[dict[str, str]]:
    rows = []
    for row in info["rows"][:limit]:
        rows.append({k: str(row.get(col, "")) for k, col in mapping.items() if col})
    return rows

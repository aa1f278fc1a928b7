"""Readers: every source yields `Record`s (one per input row) or parse errors, streaming.

A record carries its source, file and location (line, record or row number) so that every
input row can be accounted for in the output or in quarantine.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from domaintune.data.csv_records import csv_records
from domaintune.data.source_config import SourceConfig
from domaintune.data.xml_records import xml_records
from domaintune.errors import UserError

_EXT_READERS = {
    ".csv": "csv",
    ".tsv": "tsv",
    ".json": "json",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".parquet": "parquet",
    ".pq": "parquet",
    ".xlsx": "excel",
    ".xlsm": "excel",
    ".xml": "xml",
    ".pdf": "pdf",
    ".docx": "docx",
}
_CSV_FIELD_LIMIT = 1 << 27
csv.field_size_limit(_CSV_FIELD_LIMIT)


@dataclass
class Record:
    source: str
    file: str
    loc: str
    data: dict[str, Any] | None = None
    error: str | None = None  # set for unparseable input (then `raw` holds a snippet)
    raw: str | None = None
    kind: str = "table"  # table | alpaca | sharegpt | messages | text (default field mapping)


def source_name(src: SourceConfig, index: int) -> str:
    if src.name:
        return src.name
    if src.path is not None:
        return Path(src.path).stem
    return f"source{index}"


def reader_for(src: SourceConfig, path: Path | None) -> str:
    if src.reader != "auto":
        return src.reader
    if path is None:
        raise UserError("reader auto needs a path")
    if path.name == "dataset_info.json":
        return "dataset_info"
    reader = _EXT_READERS.get(path.suffix.lower())
    if reader is None:
        raise UserError(f"{path}: cannot tell the reader from the extension; set `reader:` on this source")
    return reader


def source_files(src: SourceConfig) -> list[Path]:
    path = Path(os.path.normpath(src.path))  # type: ignore[arg-type]  # no `proj/../data` in the report
    if path.is_dir():
        registry = path / "dataset_info.json"
        if src.reader == "dataset_info" or (src.reader == "auto" and src.glob == "**/*" and registry.exists()):
            if not registry.exists():
                raise UserError(f"{path}: no dataset_info.json in this folder")
            return [registry]
        files = sorted(p for p in path.glob(src.glob) if p.is_file())
        if src.reader == "auto":
            files = [p for p in files if p.suffix.lower() in _EXT_READERS]
        if not files:
            raise UserError(f"{path}: no files match glob {src.glob!r}")
        return files
    if not path.exists():
        raise UserError(f"{path}: source file not found")
    return [path]


# ---------------------------------------------------------------------------------------------
# encodings


def detect_encoding(path: Path, sample_size: int = 1 << 20) -> str:
    """UTF-8 (with or without BOM) when the sample decodes as such, else charset-normalizer's guess.

    A sample that stops before the end of the file is cut back to its last line break first, so that a
    multi-byte character split by the sample boundary cannot spoil the guess (then up to 3 more bytes are
    tried off its end, for a sample without a line break). GB2312/GBK guesses are widened to GB18030.
    """
    with path.open("rb") as handle:
        sample = handle.read(sample_size + 1)
    if sample.startswith(b"\xef\xbb\xbf"):
        return "utf-8-sig"
    if sample.startswith((b"\xff\xfe", b"\xfe\xff")):
        return "utf-16"
    candidates = [sample]
    if len(sample) > sample_size:  # cut by the sample boundary
        sample = sample[:sample_size]
        cut = sample.rfind(b"\n")
        candidates = [sample[: cut + 1]] if cut > 0 else []
        candidates += [sample[: len(sample) - k] for k in range(4)]
    encoding = _guess(candidates)
    if encoding is None:
        raise UserError(f"{path}: cannot detect the text encoding; set `encoding:` on this source")
    return encoding


def _guess(candidates: list[bytes]) -> str | None:
    """The first encoding found for one of the samples, in order."""
    from charset_normalizer import from_bytes

    for sample in candidates:
        try:
            sample.decode("utf-8")
            return "utf-8"
        except UnicodeDecodeError:
            pass
    for sample in candidates:
        best = from_bytes(sample).best()
        if best is not None:
            enc = best.encoding.lower().replace("-", "_")
            return "gb18030" if enc in ("gb2312", "gbk", "cp936", "hz", "gb18030") else best.encoding
    return None


def _snippet(raw: bytes | str, limit: int = 300) -> str:
    text = raw.decode("utf-8", errors="replace") if isinstance(raw, bytes) else raw
    text = text.rstrip("\r\n")
    return text if len(text) <= limit else text[:limit] + "…"


def _decoded_lines(path: Path, encoding: str, bad: list, where: dict) -> Iterator[str]:
    """Decode line by line; undecodable lines are reported into `bad` instead of stopping."""
    codec_enc = "utf-8" if encoding == "utf-8-sig" else encoding
    with path.open("rb") as handle:
        for line_no, raw in enumerate(handle, start=1):
            where["line"] = line_no
            if line_no == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]
            try:
                yield raw.decode(codec_enc)
            except UnicodeDecodeError as exc:
                bad.append((line_no, raw, f"undecodable bytes as {encoding} at byte {exc.start}"))


# ---------------------------------------------------------------------------------------------
# readers


def read_csv(path: Path, src: SourceConfig, name: str, delimiter: str) -> Iterator[Record]:
    """One record per CSV record (`csv_records`: a broken quote costs its own record only), located by the line
    the record starts on; the first record is the header."""
    encoding = src.encoding or detect_encoding(path)
    header: list[str] | None = None
    file = str(path)
    for rec in csv_records(path, encoding, delimiter, src.max_record_lines):
        loc = f"line {rec.line}"
        if rec.fields is None:
            if header is None:
                raise UserError(f"{path}: {loc}: the header row cannot be read: {rec.error}")
            yield Record(name, file, loc, error=rec.error, raw=_snippet(rec.raw))
            continue
        row = rec.fields
        if header is None:
            if row:
                header = [h.strip() for h in row]
            continue
        if not row or (len(row) == 1 and not row[0].strip()):
            continue
        if len(row) != len(header):
            error = f"wrong column count: expected {len(header)}, got {len(row)}"
            yield Record(name, file, loc, error=error, raw=_snippet(delimiter.join(row)))
            continue
        yield Record(name, file, loc, data=dict(zip(header, row)))
    if header is None:
        raise UserError(f"{path}: empty file (no header row)")


def read_jsonl(path: Path, src: SourceConfig, name: str, kind: str = "table") -> Iterator[Record]:
    encoding = src.encoding or detect_encoding(path)
    bad: list = []
    where = {"line": 0}
    for line in _decoded_lines(path, encoding, bad, where):
        while bad:
            line_no, raw, why = bad.pop(0)
            yield Record(name, str(path), f"line {line_no}", error=why, raw=_snippet(raw), kind=kind)
        if not line.strip():
            continue
        loc = f"line {where['line']}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            yield Record(
                name,
                str(path),
                loc,
                error=f"invalid JSON: {exc.msg} (column {exc.colno})",
                raw=_snippet(line),
                kind=kind,
            )
            continue
        if not isinstance(obj, dict):
            yield Record(
                name,
                str(path),
                loc,
                error=f"expected a JSON object, got {type(obj).__name__}",
                raw=_snippet(line),
                kind=kind,
            )
            continue
        yield Record(name, str(path), loc, data=obj, kind=kind)
    while bad:
        line_no, raw, why = bad.pop(0)
        yield Record(name, str(path), f"line {line_no}", error=why, raw=_snippet(raw), kind=kind)


def read_json(path: Path, src: SourceConfig, name: str, kind: str = "table") -> Iterator[Record]:
    encoding = src.encoding or detect_encoding(path)
    try:
        text = path.read_text(encoding=encoding)
    except UnicodeDecodeError as exc:
        yield Record(name, str(path), "file", error=f"undecodable bytes as {encoding} at byte {exc.start}", raw="")
        return
    stripped = text.lstrip()
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        # A .json file that is really JSON lines is common: fall back to line reading.
        if exc.msg == "Extra data" and stripped.startswith("{"):
            yield from read_jsonl(path, src, name, kind)
            return
        yield Record(
            name,
            str(path),
            f"line {exc.lineno}",
            error=f"invalid JSON: {exc.msg} (column {exc.colno})",
            raw=_snippet(text.splitlines()[exc.lineno - 1] if text.splitlines() else ""),
            kind=kind,
        )
        return
    records = doc
    if src.json_records:
        for part in src.json_records.split("."):
            if not isinstance(records, dict) or part not in records:
                raise UserError(f"{path}: json_records {src.json_records!r}: key {part!r} not found")
            records = records[part]
    if isinstance(records, dict):
        records = [records]
    if not isinstance(records, list):
        raise UserError(f"{path}: expected a list of records (set json_records to the key holding it)")
    for i, obj in enumerate(records, start=1):
        loc = f"record {i}"
        if not isinstance(obj, dict):
            yield Record(
                name,
                str(path),
                loc,
                error=f"expected a JSON object, got {type(obj).__name__}",
                raw=_snippet(json.dumps(obj, ensure_ascii=False)),
                kind=kind,
            )
            continue
        yield Record(name, str(path), loc, data=obj, kind=kind)


def read_json_any(path: Path, src: SourceConfig, name: str, kind: str) -> Iterator[Record]:
    if path.suffix.lower() in (".jsonl", ".ndjson"):
        return read_jsonl(path, src, name, kind)
    return read_json(path, src, name, kind)


def read_parquet(path: Path, src: SourceConfig, name: str) -> Iterator[Record]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as exc:
        raise UserError(f"{path}: not a readable Parquet file ({exc})") from None
    n = 0
    for batch in pf.iter_batches(batch_size=2048):
        for obj in batch.to_pylist():
            n += 1
            yield Record(name, str(path), f"row {n}", data=obj)


def read_excel(path: Path, src: SourceConfig, name: str) -> Iterator[Record]:
    import openpyxl

    try:
        wb = openpyxl.load_workbook(path, read_only=True, data_only=True)
    except Exception as exc:
        raise UserError(f"{path}: not a readable Excel workbook ({exc})") from None
    try:
        if src.sheet is None:
            ws = wb.worksheets[0]
        elif isinstance(src.sheet, int):
            ws = wb.worksheets[src.sheet]
        else:
            if src.sheet not in wb.sheetnames:
                raise UserError(f"{path}: sheet {src.sheet!r} not found (sheets: {', '.join(wb.sheetnames)})")
            ws = wb[src.sheet]
        header = None
        for row_no, values in enumerate(ws.iter_rows(values_only=True), start=1):
            if header is None:
                if all(v is None for v in values):
                    continue
                header = [str(v).strip() if v is not None else f"column{i + 1}" for i, v in enumerate(values)]
                continue
            if all(v is None or (isinstance(v, str) and not v.strip()) for v in values):
                continue
            yield Record(name, str(path), f"{ws.title}!row {row_no}", data=dict(zip(header, values)))
    finally:
        wb.close()


def xml_paths(src: SourceConfig) -> list[str]:
    paths: list[str] = []
    for value in src.fields.model_dump().values():
        if isinstance(value, str):
            paths.append(value)
        elif isinstance(value, list):
            paths.extend(value)
    paths.extend(src.keep_map().values())
    return list(dict.fromkeys(paths))


def _xpath_text(node, path: str) -> str | None:
    result = node.xpath(path)
    if isinstance(result, (str, bytes)):
        return str(result)
    if isinstance(result, (int, float, bool)):
        return str(result)
    if not result:
        return None
    parts = []
    for item in result:
        if hasattr(item, "itertext"):
            parts.append("".join(item.itertext()))
        else:
            parts.append(str(item))
    return "\n".join(parts)


def read_xml(path: Path, src: SourceConfig, name: str) -> Iterator[Record]:
    """One record per element `record_path` selects; in a malformed file each record is parsed on its own, so
    a broken one costs only itself (`xml_records`)."""
    from lxml import etree

    paths = xml_paths(src)
    file = str(path)
    try:
        for i, rec in enumerate(xml_records(path, src.record_path or ""), start=1):
            where = f"line {rec.line}" if rec.line is not None else "the file"
            if rec.node is None:
                yield Record(name, file, f"record {i} ({where})" if rec.line else "file", error=rec.error, raw=rec.raw)
                continue
            data = {}
            for p in paths:
                try:
                    data[p] = _xpath_text(rec.node, p)
                except etree.XPathError as exc:
                    raise UserError(f"{path}: field path {p!r}: invalid XPath ({exc})") from None
            yield Record(name, file, f"record {i} ({where})", data=data)
    except etree.XPathError as exc:
        raise UserError(f"record_path {src.record_path!r}: invalid XPath ({exc})") from None
    except OSError as exc:
        yield Record(name, file, "file", error=f"unreadable XML: {exc}", raw="")


def read_pdf(path: Path, src: SourceConfig, name: str) -> Iterator[Record]:
    from pypdf import PdfReader

    try:
        reader = PdfReader(str(path))
        pages = [page.extract_text() or "" for page in reader.pages]
    except Exception as exc:
        yield Record(name, str(path), "file", error=f"unreadable PDF: {exc}", raw="", kind="text")
        return
    if src.pages == "page":
        for i, text in enumerate(pages, start=1):
            yield Record(name, str(path), f"page {i}", data={"text": text, "title": path.stem, "page": i}, kind="text")
    else:
        yield Record(name, str(path), "document", data={"text": "\n".join(pages), "title": path.stem}, kind="text")


def read_docx(path: Path, src: SourceConfig, name: str) -> Iterator[Record]:
    import docx

    try:
        document = docx.Document(str(path))
    except Exception as exc:
        yield Record(name, str(path), "file", error=f"unreadable DOCX: {exc}", raw="", kind="text")
        return
    parts = [p.text for p in document.paragraphs]
    for table in document.tables:
        for row in table.rows:
            parts.append("\t".join(cell.text for cell in row.cells))
    yield Record(name, str(path), "document", data={"text": "\n".join(parts), "title": path.stem}, kind="text")


def read_sql(src: SourceConfig, name: str, base_dir: Path) -> Iterator[Record]:
    import sqlalchemy as sa

    if src.url is None or src.query is None:  # the config refuses this; here for the type checker
        raise UserError("reader sql needs `url` and `query`")
    url = sa.engine.make_url(src.url)
    if url.drivername.startswith("sqlite") and url.database and url.database != ":memory:":
        db = Path(url.database)
        if not db.is_absolute():
            db = base_dir / db
        if not db.exists():
            raise UserError(f"{src.url}: SQLite file {db} not found")
        url = url.set(database=str(db))
    shown = url.render_as_string(hide_password=True)
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            try:
                result = conn.execution_options(stream_results=True).execute(sa.text(src.query))
            except sa.exc.SQLAlchemyError as exc:
                raise UserError(
                    f"{shown}: query failed: {exc.__class__.__name__}: {getattr(exc, 'orig', None) or exc}"
                ) from None
            for i, row in enumerate(result, start=1):
                yield Record(name, shown, f"row {i}", data=dict(row._mapping))
    finally:
        engine.dispose()


def read_dataset_info(path: Path, src: SourceConfig, name: str) -> Iterator[Record]:
    """LLaMA-Factory `dataset_info.json`: each entry names a local file, its format and columns."""
    from domaintune.data.formats import canonical_from_llamafactory

    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise UserError(f"{path}:{exc.lineno}: invalid JSON ({exc.msg})") from None
    if not isinstance(info, dict):
        raise UserError(f"{path}: expected a mapping of dataset names")
    wanted = src.datasets or list(info)
    for entry_name in wanted:
        if entry_name not in info:
            raise UserError(f"{path}: dataset {entry_name!r} not in dataset_info (has: {', '.join(info)})")
        entry = info[entry_name]
        if "file_name" not in entry:
            raise UserError(f"{path}: dataset {entry_name!r} has no local file_name (hub/script entries unsupported)")
        file = path.parent / entry["file_name"]
        if not file.exists():
            raise UserError(f"{path}: dataset {entry_name!r}: file {file} not found")
        formatting = entry.get("formatting", "alpaca")
        columns = entry.get("columns", {})
        tags = entry.get("tags", {})
        for rec in read_json_any(file, src, name, "table"):
            if rec.data is not None:
                try:
                    rec.data = canonical_from_llamafactory(rec.data, formatting, columns, tags)
                    rec.kind = "canonical"
                except ValueError as exc:
                    rec.error, rec.raw, rec.data = str(exc), _snippet(json.dumps(rec.data, ensure_ascii=False)), None
            yield rec


def iter_source(src: SourceConfig, index: int, base_dir: Path) -> Iterator[Record]:
    name = source_name(src, index)
    if src.reader == "sql":
        yield from read_sql(src, name, base_dir)
        return
    if src.reader == "annotations":  # an annotation project's settled rows (domaintune.annotate)
        from domaintune.data.annotations_reader import read_annotations

        yield from read_annotations(src, name, read_jsonl)
        return
    for path in source_files(src):
        reader = reader_for(src, path)
        if reader == "csv":
            yield from read_csv(path, src, name, src.delimiter or ",")
        elif reader == "tsv":
            yield from read_csv(path, src, name, src.delimiter or "\t")
        elif reader == "jsonl":
            yield from read_jsonl(path, src, name)
        elif reader == "json":
            yield from read_json(path, src, name)
        elif reader in ("alpaca", "sharegpt", "messages"):
            yield from read_json_any(path, src, name, reader)
        elif reader == "parquet":
            yield from read_parquet(path, src, name)
        elif reader == "excel":
            yield from read_excel(path, src, name)
        elif reader == "xml":
            yield from read_xml(path, src, name)
        elif reader == "pdf":
            yield from read_pdf(path, src, name)
        elif reader == "docx":
            yield from read_docx(path, src, name)
        elif reader == "dataset_info":
            yield from read_dataset_info(path, src, name)
        else:  # pragma: no cover - the config's Literal prevents this
            raise UserError(f"unknown reader {reader!r}")


def estimate_rows(src: SourceConfig) -> int | None:
    """Cheap row estimate for the progress bar (line or tag counts); None when unknown."""
    if src.reader == "sql" or src.path is None:
        return None
    total = 0
    try:
        files = source_files(src)
    except UserError:
        return None
    for path in files:
        reader = reader_for(src, path)
        if reader in ("csv", "tsv", "jsonl"):
            with path.open("rb") as handle:
                total += sum(chunk.count(b"\n") for chunk in iter(lambda: handle.read(1 << 20), b""))
        elif reader == "xml" and src.record_path and src.record_path.startswith(".//"):
            tag = src.record_path[3:].encode()
            if not tag.replace(b"_", b"").isalnum():
                return None
            data = path.read_bytes()
            total += data.count(b"<" + tag + b">") + data.count(b"<" + tag + b" ")
        elif reader in ("pdf", "docx"):
            total += 1
        else:
            return None
    return total

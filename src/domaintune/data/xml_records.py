"""`xml_records`: the record elements of an XML file, where one malformed record costs only itself.

A well-formed file is parsed once, as a whole. A file that is not is taken apart: each element with the record
tag (the last step of `record_path`, e.g. `QAPair` of `.//QAPair`) is cut out of the text and parsed on its
own; what is left (the document around the records) is parsed with libxml2's recovery, and the records that
parse are put back where they were, so field paths that leave the record (`../../Focus`) still work. A record
that does not parse, or that the recovered document has no place for, is reported as an error with its
position, and every other record is read as usual.
"""

from __future__ import annotations

import re
from bisect import bisect_left
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lxml import etree

_PLACEHOLDER = "domaintune-record"
_LINE = re.compile(r", line (\d+)")
_SOURCE = re.compile(r" \(<string>, line \d+\)")
_LAST_STEP = re.compile(r"(?:^|/)([A-Za-z_][\w.-]*)(?:\[[^\]]*\])*$")


@dataclass
class XmlRecord:
    line: int | None
    node: Any = None  # the record element; None for a record that could not be parsed
    error: str | None = None
    raw: str = ""


def _parser(recover: bool = False) -> etree.XMLParser:
    return etree.XMLParser(resolve_entities=False, huge_tree=True, recover=recover)


def xml_records(path: Path, record_path: str) -> Iterator[XmlRecord]:
    """The records `record_path` selects, in document order; raises etree.XPathError for a bad path."""
    try:
        root = etree.parse(str(path), _parser()).getroot()
    except etree.XMLSyntaxError as exc:
        yield from _recovered(path, record_path, f"invalid XML: {exc}")
        return
    for node in root.xpath(record_path):
        yield XmlRecord(node.sourceline, node)


@dataclass
class _Chunk:
    start: int  # byte offsets of the element's text
    end: int
    line: int


def _chunks(data: bytes, tag: str) -> list[_Chunk]:
    """The byte spans of the elements named `tag`: from an opening tag to its closing tag, to a self-closing
    end, or (unterminated) to the next opening tag or the end of the file. Nested same-name elements end at
    the first closing tag."""
    found: list[_Chunk] = []
    start: int | None = None
    for m in re.finditer(rb"<(/?)" + re.escape(tag.encode()) + rb"(?=[\s/>])", data):
        gt = data.find(b">", m.end())
        gt = len(data) - 1 if gt < 0 else gt
        if m.group(1):  # a closing tag
            if start is not None:
                found.append(_Chunk(start, gt + 1, 0))
                start = None
            continue
        if start is not None:  # the open element never closed
            found.append(_Chunk(start, m.start(), 0))
            start = None
        if data[gt - 1 : gt] == b"/":
            found.append(_Chunk(m.start(), gt + 1, 0))
        else:
            start = m.start()
    if start is not None:
        found.append(_Chunk(start, len(data), 0))
    for chunk in found:
        chunk.line = data.count(b"\n", 0, chunk.start) + 1
    return found


def _recovered(path: Path, record_path: str, file_error: str) -> Iterator[XmlRecord]:
    """The records of a malformed file, each parsed on its own (see the module docstring)."""
    data = path.read_bytes()
    last = _LAST_STEP.search(record_path.strip())
    chunks = _chunks(data, last.group(1)) if last else []
    if not chunks:  # nothing to take apart: the file is one broken input
        yield XmlRecord(None, error=file_error)
        return
    skeleton, pos = [], 0
    for k, chunk in enumerate(chunks):
        skeleton += [data[pos : chunk.start], f'<{_PLACEHOLDER} n="{k}"/>'.encode()]
        pos = chunk.end
    skeleton.append(data[pos:])
    root = etree.fromstring(b"".join(skeleton), _parser(recover=True))
    if root is None:
        yield XmlRecord(None, error=file_error)
        return
    if root.tag == _PLACEHOLDER:  # the record is the whole document, and it is broken
        yield XmlRecord(chunks[0].line, error=file_error)
        return
    encoding = root.getroottree().docinfo.encoding or "utf-8"
    places = {int(el.get("n")): el for el in root.iter(_PLACEHOLDER)}
    order: dict[int, int] = {}  # id of a record element put back -> its chunk's index
    kept: list[Any] = []
    found: list[tuple[float, XmlRecord]] = []
    for k, chunk in enumerate(chunks):
        text = data[chunk.start : chunk.end]
        element, error = _put_back(text, chunk.line, places.get(k), encoding)
        if element is not None:
            order[id(element)] = k
            kept.append(element)  # a live reference keeps the element's Python object (and so its id)
        else:
            found.append((k, XmlRecord(chunk.line, error=error, raw=_text(text))))
    lines = [c.line for c in chunks]
    for node in root.xpath(record_path):
        chunk_index = order.get(id(node))
        key = chunk_index if chunk_index is not None else bisect_left(lines, node.sourceline or 0) - 0.5
        found.append((key, XmlRecord(node.sourceline, node)))
    yield from (rec for _, rec in sorted(found, key=lambda item: item[0]))


def _put_back(text: bytes, line: int, place: Any, encoding: str) -> tuple[Any, str | None]:
    """Parse one record element and put it in its placeholder's place: (the element, None), or (None, why not)."""
    declaration = f'<?xml version="1.0" encoding="{encoding}"?>\n'.encode() if encoding.lower() != "utf-8" else b""
    shift = line - 1 - (1 if declaration else 0)  # a line within the text -> a line of the file
    try:
        element = etree.fromstring(declaration + text, _parser())
    except etree.XMLSyntaxError as exc:
        if place is not None:
            _remove(place)
        message = _SOURCE.sub("", str(exc))  # lxml's "(<string>, line 2)": the line is said once, shifted below
        where = _LINE.sub(lambda m: f", line {int(m.group(1)) + shift}", message)
        return None, f"invalid XML in this record: {where}"
    if place is None:
        return None, "record lost: the malformed XML around it has no place for it"
    for node in element.iter():
        if node.sourceline is not None:
            node.sourceline += shift
    element.tail = place.tail
    place.getparent().replace(place, element)
    return element, None


def _remove(place: Any) -> None:
    """Drop a placeholder, keeping the text after it."""
    parent = place.getparent()
    if place.tail:
        prev = place.getprevious()
        if prev is not None:
            prev.tail = (prev.tail or "") + place.tail
        else:
            parent.text = (parent.text or "") + place.tail
    parent.remove(place)


def _text(raw: bytes, limit: int = 300) -> str:
    text = raw.decode("utf-8", errors="replace").strip()
    return text if len(text) <= limit else text[:limit] + "…"

"""Rows to label: sampled from a data source of the project (raw records, mapped the way the data stage maps
them) or from a split of its run folder."""

from __future__ import annotations

import random
from pathlib import Path
from typing import TYPE_CHECKING, Any

from domaintune.annotate.config import SampleFrom
from domaintune.errors import UserError
from domaintune.utils.io import read_jsonl

if TYPE_CHECKING:
    from domaintune.config import ProjectConfig

_SKIP = {"id", "messages", "source", "origin", "derived_from"}


def _item(row_id: str, fields: dict[str, Any], origin: dict[str, Any]) -> dict[str, Any]:
    return {"id": row_id, "fields": fields, "origin": origin}


def source_rows(cfg: ProjectConfig, name: str) -> list[dict[str, Any]]:
    """Every parseable, mappable record of the named source as an item (instruction/input/output + kept fields)."""
    from domaintune.data.processing import Drop, map_record
    from domaintune.data.readers import iter_source, source_name

    names = [source_name(s, i) for i, s in enumerate(cfg.data.sources)]
    if name not in names:
        raise UserError(f"sample.source {name!r} is not a data source (have: {', '.join(names) or 'none'})")
    index = names.index(name)
    src = cfg.data.sources[index]
    out = []
    for seq, rec in enumerate(iter_source(src, index, cfg.base_dir), start=1):
        if rec.error is not None:
            continue
        try:
            row = map_record(rec, src, f"{name}-{seq:06d}")
        except Drop:
            continue
        fields = {k: v for k, v in row["fields"].items() if v}
        if row["messages"]:
            fields.update(_from_messages(row["messages"]))
        fields.update({k: v for k, v in row["extra"].items() if k not in fields})
        out.append(_item(row["id"], fields, {"source": name, "file": rec.file, "loc": rec.loc}))
    return out


def _from_messages(messages: list[dict[str, str]]) -> dict[str, str]:
    users = [m["content"] for m in messages if m["role"] == "user"]
    answers = [m["content"] for m in messages if m["role"] == "assistant"]
    return {"instruction": users[-1] if users else "", "output": answers[-1] if answers else ""}


def split_rows(cfg: ProjectConfig, split: str) -> list[dict[str, Any]]:
    path = cfg.layout.split_file(split)
    if not path.is_file():
        raise UserError(f"{path} does not exist: run `domaintune data CONFIG` first")
    out = []
    for row in read_jsonl(path):
        fields: dict[str, Any] = {}
        if "messages" in row:
            fields.update(_from_messages(row["messages"]))
        for k, v in row.items():
            if k not in _SKIP and k not in fields:
                fields[k] = v
        out.append(_item(str(row["id"]), fields, {"split": split, "source": row.get("source")}))
    return out


def labelled_ids(projects: list[Path]) -> set[str]:
    ids: set[str] = set()
    for folder in projects:
        path = Path(folder) / "items.jsonl"
        if not path.is_file():
            raise UserError(f"{folder}: not an annotation project (no items.jsonl)")
        ids.update(str(r["id"]) for r in read_jsonl(path))
    return ids


def candidate_rows(cfg: ProjectConfig, sample: SampleFrom) -> list[dict[str, Any]]:
    """All rows of the sample's source or split, minus rows already in the `exclude` projects."""
    rows = source_rows(cfg, sample.source) if sample.source else split_rows(cfg, sample.split or "train")
    seen: set[str] = set()
    unique = []
    for r in rows:  # ids are the item keys: the first row with an id wins
        if r["id"] not in seen:
            seen.add(r["id"])
            unique.append(r)
    done = labelled_ids(list(sample.exclude))
    return [r for r in unique if r["id"] not in done]


def sample_rows(rows: list[dict[str, Any]], n: int | None, seed: int) -> list[dict[str, Any]]:
    if n is None or n >= len(rows):
        return list(rows)
    keep = sorted(random.Random(seed).sample(range(len(rows)), n))
    return [rows[i] for i in keep]

"""Incremental rounds: train on top of a registered version, with exactly the data it was registered with.

A version records the sha256 of every data file it was trained and tested on (`data.files` in its
metadata) and, with `registry.training_data: store` (the default), keeps the files themselves. The
next round reads the stored copy (checked against the artefact checksums), or the parent's run
folder when the version only references its data, and refuses a file whose sha256 is not the one
on record, naming both checksums: a run folder overwritten by a later run never passes as the
parent's data. What was merged is written to `run/merged.json` and registered as `lineage.merged`.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from domaintune.errors import UserError
from domaintune.registry.run import merged_record
from domaintune.registry.uri import parse_registry_uri
from domaintune.utils.io import sha256_file, write_json

if TYPE_CHECKING:
    from domaintune.config import ProjectConfig
    from domaintune.registry.store import ModelRegistry

DATA_FILES = ("train", "val", "test", "general", "general_holdout")


@dataclass(frozen=True)
class ParentData:
    """A registered version's data files, each checked against the sha256 recorded at registration."""

    name: str
    version: str
    kept: str  # stored | reference: where the files were read from
    files: dict[str, Path]  # split name (train, val, test, general, general_holdout) -> checked file
    sha256: dict[str, str]
    rows: dict[str, int]
    metadata: dict[str, Any]

    @property
    def uri(self) -> str:
        return f"registry://{self.name}@{self.version}"

    @property
    def semver(self) -> str:
        return self.version.split("_")[0]


def parent_data(registry: ModelRegistry, uri: str, required: tuple[str, ...] = ("train",)) -> ParentData:
    """The data files of the version `uri` names, verified; `required` splits must be on record."""
    ref = parse_registry_uri(uri)
    info = registry.show(ref.name, ref.ref)
    meta = info["metadata"] or {}
    recorded: dict[str, str] = (meta.get("data") or {}).get("files") or {}
    stored = {a["path"] for a in info["artifacts"]}
    files, sha, kept = {}, {}, "reference"
    for split in DATA_FILES:
        name = f"{split}.jsonl"
        if name not in recorded and f"data/{name}" not in stored:
            if split in required:
                raise UserError(
                    f"{uri} -> {info['version']}: no checksum of its data/{name} on record, so the rows it was "
                    "trained on cannot be checked; register it again from its run folder"
                )
            continue
        if f"data/{name}" in stored:
            path = registry.resolve(f"registry://{ref.name}@{info['version']}/data/{name}")  # checks the sha256
            kept = "stored"
        else:
            path = Path(meta["lineage"]["data_run"]["path"]) / name
        files[split], sha[split] = path, _checked(uri, info["version"], path, recorded.get(name), meta, split)
    rows = {split: _count_rows(path) for split, path in files.items()}
    return ParentData(ref.name, info["version"], kept, files, sha, rows, meta)


def _checked(uri: str, version: str, path: Path, expected: str | None, meta: dict[str, Any], split: str) -> str:
    """The file's sha256 when it is the one on record; a UserError naming both checksums when not."""
    if not path.is_file():
        raise UserError(
            f"{uri} -> {version}: its {split} set {path} is no longer on disk and the version does not store it; "
            "keep `registry.training_data: store` so registered versions keep their data"
        )
    actual = sha256_file(path)
    if expected is not None and actual != expected:
        recorded_rows = ((meta.get("data") or {}).get("rows") or {}).get(split)
        raise UserError(
            f"{uri} -> {version}: its {split} set {path} has sha256 {actual} ({_count_rows(path)} rows) but "
            f"{version} was registered with sha256 {expected} ({recorded_rows} rows): the file was changed or "
            "overwritten after registration (a later run in the same folder?), so it is not the data this version "
            "was trained on; refusing to continue from it"
        )
    return actual


def _count_rows(path: Path) -> int:
    with path.open("rb") as handle:
        return sum(1 for line in handle if line.strip())


def previous_training_set(registry: ModelRegistry, uri: str) -> Path:
    """The parent's `data/train.jsonl`, verified against its registered sha256."""
    return parent_data(registry, uri).files["train"]


def snapshot(parent: ParentData, split: str, folder: Path) -> Path:
    """A copy of one of the parent's checked files in `folder` (a later change to the source cannot reach it)."""
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / f"{parent.name}-{parent.semver}-{split}.jsonl"
    if not target.is_file() or sha256_file(target) != parent.sha256[split]:
        shutil.copy2(parent.files[split], target)
    if sha256_file(target) != parent.sha256[split]:
        raise UserError(f"{target}: the copy of {parent.uri}'s {split} set does not match its sha256")
    return target


def merged_entry(parent: ParentData, split: str, path: Path, role: str) -> dict[str, Any]:
    """What `lineage.merged` records of one of the parent's files read by the child."""
    return {
        "role": role,
        "from": parent.uri,
        "file": f"data/{split}.jsonl",
        "kept": parent.kept,
        "path": str(path),
        "sha256": parent.sha256[split],
        "rows": parent.rows[split],
    }


def prepare_continuation(cfg: ProjectConfig, uri: str) -> tuple[ProjectConfig, str]:
    """Return a config that starts from `uri`'s weights and also reads its training set, plus the parent version.

    The parent's training rows (messages form, exactly the registered file) become one more data
    source, so dedup and decontamination treat old and new rows together; `train.init_from` loads
    the parent's weights; `run/merged.json` says which file with which sha256 was merged.
    """
    from domaintune.registry import registry_from_config

    registry = registry_from_config(cfg)
    parent = parent_data(registry, uri)
    layout = cfg.layout
    copy = snapshot(parent, "train", layout.run_dir / "parents")
    data = cfg.data.model_dump()
    data["sources"] = list(data["sources"]) + [
        {"name": f"previous-{parent.name}-{parent.semver}", "path": copy, "reader": "messages"}
    ]
    updated = cfg.model_copy(
        update={
            "data": type(cfg.data).model_validate(data),
            "train": cfg.train.model_copy(update={"init_from": parent.uri}),
        }
    )
    write_json(merged_record(layout), {"parent": parent.uri, "merged": [merged_entry(parent, "train", copy, "parent")]})
    return updated, parent.version

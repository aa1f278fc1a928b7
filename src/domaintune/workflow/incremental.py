"""Incremental rounds: train on top of a registered version, with its training data merged in."""

from __future__ import annotations

from pathlib import Path

from domaintune.config import ProjectConfig
from domaintune.errors import UserError
from domaintune.registry.uri import parse_registry_uri


def previous_training_set(registry, uri: str) -> Path:
    """The parent's `data/train.jsonl`: its registered copy when `registry.artifacts` kept one, else its run folder."""
    ref = parse_registry_uri(uri)
    info = registry.show(ref.name, ref.ref)
    if any(a["path"].startswith("data/train.jsonl") for a in info["artifacts"]):
        return registry.resolve(f"registry://{ref.name}@{info['version']}/data/train.jsonl")
    data_run = Path(info["metadata"]["lineage"]["data_run"]["path"])
    path = data_run / "train.jsonl"
    if not path.is_file():
        raise UserError(
            f"--continue-from {uri}: its training set {path} is no longer on disk; add `data/train.jsonl` to "
            "registry.artifacts so registered versions keep their training data"
        )
    return path


def prepare_continuation(cfg: ProjectConfig, uri: str) -> tuple[ProjectConfig, str]:
    """Return a config that starts from `uri`'s weights and also reads its training set, plus the parent version.

    The parent's training rows (messages form) become one more data source, so dedup and
    decontamination treat old and new rows together; `train.init_from` loads the parent's weights.
    """
    from domaintune.registry import registry_from_config

    registry = registry_from_config(cfg)
    ref = parse_registry_uri(uri)
    version = registry.version_of(uri)
    previous = previous_training_set(registry, uri)
    data = cfg.data.model_dump()
    data["sources"] = list(data["sources"]) + [
        {"name": f"previous-{ref.name}-{version.split('_')[0]}", "path": previous, "reader": "messages"}
    ]
    updated = cfg.model_copy(
        update={
            "data": type(cfg.data).model_validate(data),
            "train": cfg.train.model_copy(update={"init_from": f"registry://{ref.name}@{version}"}),
        }
    )
    return updated, version

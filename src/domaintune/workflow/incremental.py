"""Incremental rounds: train on top of a registered version, with its training data merged in."""

from __future__ import annotations

from pathlib import Path

from domaintune.config import ProjectConfig
from domaintune.errors import UserError


def prepare_continuation(cfg: ProjectConfig, uri: str) -> tuple[ProjectConfig, str]:
    """Return a config that starts from `uri`'s weights and also reads its training set, plus the parent version.

    The parent's training rows (its run's `data/train.jsonl`, in messages form) become one more data
    source, so dedup and decontamination treat old and new rows together.
    """
    from domaintune.registry import registry_from_config

    registry = registry_from_config(cfg)
    version = registry.get_version(uri)
    previous_train = Path(version.lineage.get("data_run", "")) / "data" / "train.jsonl"
    if not previous_train.is_file():
        raise UserError(f"--continue-from {uri}: its training set {previous_train} is no longer on disk")
    data = cfg.data.model_dump()
    data["sources"] = list(data["sources"]) + [
        {"name": f"previous:{version.version}", "path": previous_train, "reader": "messages"}
    ]
    updated = cfg.model_copy(
        update={
            "data": type(cfg.data).model_validate(data),
            "train": cfg.train.model_copy(update={"init_from": uri}),
        }
    )
    return updated, version.version

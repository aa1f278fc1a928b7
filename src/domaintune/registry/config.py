"""The `registry:` section: where versions are recorded and their artefacts kept."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from domaintune.utils.config_types import ConfigPath, StrictModel
from domaintune.utils.names import check_model_name


class RegistryConfig(StrictModel):
    url: str | None = Field(
        None,
        description=(
            "SQLAlchemy URL of the registry database (e.g. postgresql+psycopg://user@host/db). Default: a SQLite "
            "file `registry/registry.db` beside the run folder (runs/registry/ for runs/<name>). A relative "
            "sqlite:/// path is resolved against the YAML's folder."
        ),
    )
    store: ConfigPath | None = Field(
        None,
        description="Folder holding the registered artefacts (copied in). Default: `artifacts/` beside the SQLite file.",
    )
    name: str | None = Field(None, description="Registered model name. Default: the project name.")
    artifacts: list[str] = Field(
        default_factory=lambda: ["model", "export"],
        description=(
            "Run-folder paths copied into the store on `register` (those that exist; at least one must). "
            "`model` is what `registry://name@alias` resolves to."
        ),
    )
    training_data: Literal["store", "reference"] = Field(
        "store",
        description=(
            "How a version keeps the data it was trained and tested on (`data/{train,val,test,general,"
            "general_holdout}.jsonl`). `store`: copied into the version with the other artefacts, so `--continue-from` "
            "and `domaintune round` read exactly those rows however the run folder changes later. `reference`: only "
            "their sha256 is recorded; the next round reads the run folder and refuses files whose checksum differs."
        ),
    )

    @field_validator("name")
    @classmethod
    def _registry_name(cls, value: str | None) -> str | None:
        """One name pattern for config, registry and API (`utils/names.py`); a registry name has no '/'."""
        return None if value is None else check_model_name(value, segments=1)

"""The `registry:` section: where versions are recorded and their artefacts kept."""

from __future__ import annotations

from pydantic import Field

from domaintune.utils.config_types import ConfigPath, StrictModel


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

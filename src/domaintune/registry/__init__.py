"""The model registry: versions with lineage, checksummed artefacts, aliases, events.

from domaintune.registry import ModelRegistry, registry_from_config, register_run
reg = registry_from_config(cfg)                 # SQLite beside the run folder by default
version = register_run(cfg, cfg.layout)         # v0.0.1_<data hash>_<UTC time>
reg.promote(cfg.name, version, alias="production")
folder = reg.resolve(f"registry://{cfg.name}@production")   # checksums verified
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from domaintune.registry.run import register_run, registry_from_config
    from domaintune.registry.store import ModelRegistry
    from domaintune.registry.uri import parse_registry_uri as parse_uri

__all__ = ["ModelRegistry", "parse_uri", "register_run", "registry_from_config"]


def __getattr__(name: str):
    # Lazy: `import domaintune.registry` stays cheap for commands that never touch the database.
    if name == "ModelRegistry":
        from domaintune.registry.store import ModelRegistry

        return ModelRegistry
    if name == "parse_uri":  # the name the workflow knows; the parser lives in registry.uri
        from domaintune.registry.uri import parse_registry_uri

        return parse_registry_uri
    if name in ("register_run", "registry_from_config"):
        from domaintune.registry import run

        return getattr(run, name)
    raise AttributeError(name)

"""The `registry:` section (the registry stage fills this in)."""

from __future__ import annotations

from domaintune.utils.config_types import StrictModel


class RegistryConfig(StrictModel):
    pass

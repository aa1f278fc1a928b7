"""The `data:` section (the data stage fills this in)."""

from __future__ import annotations

from domaintune.utils.config_types import StrictModel


class DataConfig(StrictModel):
    pass

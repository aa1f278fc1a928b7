"""The `export:` section (the export stage fills this in)."""

from __future__ import annotations

from domaintune.utils.config_types import StrictModel


class ExportConfig(StrictModel):
    pass

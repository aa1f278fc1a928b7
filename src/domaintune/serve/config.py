"""The `serve:` section (the serve stage fills this in)."""

from __future__ import annotations

from domaintune.utils.config_types import StrictModel


class ServeConfig(StrictModel):
    pass

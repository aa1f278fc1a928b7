"""The `eval:` section (the eval stage fills this in)."""

from __future__ import annotations

from domaintune.utils.config_types import StrictModel


class EvalConfig(StrictModel):
    pass

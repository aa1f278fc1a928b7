"""The `train:` section (the train stage fills this in)."""

from __future__ import annotations

from domaintune.utils.config_types import StrictModel


class TrainConfig(StrictModel):
    pass

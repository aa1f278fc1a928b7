"""Base pydantic model and field types shared by every stage's config."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict, ValidationInfo


class StrictModel(BaseModel):
    """Every config section rejects unknown keys, so a typo never passes silently."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


def _resolve_against_config_dir(value: Path, info: ValidationInfo) -> Path:
    # Relative paths in a YAML file mean "relative to that file", wherever the command runs.
    base_dir = (info.context or {}).get("base_dir")
    value = Path(value).expanduser()
    if base_dir is not None and not value.is_absolute():
        value = Path(base_dir) / value
    return Path(str(value))


ConfigPath = Annotated[Path, AfterValidator(_resolve_against_config_dir)]

"""The project file: one YAML with a section per stage, plus `--set` overrides.

Every stage reads its own section (`cfg.data`, `cfg.train`, ...) and the shared
`cfg.output_dir`; relative paths in the YAML are resolved against the YAML's folder.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import Field, ValidationError, model_validator

from domaintune.data.config import DataConfig
from domaintune.errors import UserError
from domaintune.eval.config import EvalConfig
from domaintune.export.config import ExportConfig
from domaintune.layout import RunLayout
from domaintune.model.config import ModelConfig
from domaintune.registry.config import RegistryConfig
from domaintune.serve.config import ServeConfig
from domaintune.train.config import TrainConfig
from domaintune.utils.config_types import ConfigPath, StrictModel
from domaintune.workflow.sweep_config import SweepConfig


class ConfigError(UserError):
    """A project file that cannot be used; the message names the file and the dotted field."""


class ProjectConfig(StrictModel):
    name: str = Field(..., description="Project name; also names the registry model and the default run folder.")
    output_dir: ConfigPath | None = Field(
        None, description="Run folder for every stage's outputs. Default: `runs/<name>` beside the YAML."
    )
    seed: int = Field(42, description="Seed shared by every stage unless a stage sets its own.")
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    export: ExportConfig = Field(default_factory=ExportConfig)
    registry: RegistryConfig = Field(default_factory=RegistryConfig)
    serve: ServeConfig = Field(default_factory=ServeConfig)
    sweep: SweepConfig = Field(
        default_factory=SweepConfig, description="`domaintune sweep`: the recipe search (no stage reads it)."
    )

    # Folder of the YAML file (None for configs built in code); not a user setting.
    config_path: Path | None = Field(None, exclude=True, description="Set by the loader; do not write it.")

    @model_validator(mode="after")
    def _default_output_dir(self) -> ProjectConfig:
        if self.output_dir is None:
            base = self.config_path.parent if self.config_path else Path.cwd()
            object.__setattr__(self, "output_dir", base / "runs" / self.name)
        return self

    @property
    def layout(self) -> RunLayout:
        """The run folder's paths (`output_dir` is always set once the config is validated)."""
        if self.output_dir is None:  # only a config built with model_construct() can get here
            raise ConfigError("output_dir is not set")
        return RunLayout(self.output_dir)

    @property
    def base_dir(self) -> Path:
        return self.config_path.parent if self.config_path else Path.cwd()


_INDEX = re.compile(r"^\d+$")


def apply_override(data: dict[str, Any], assignment: str) -> None:
    """Apply one `dotted.key=value` (value parsed as YAML).

    List items by index (`data.sources.0.path=x`); `dotted.key.+=value` (or `dotted.key+=value`) appends the
    value to the list there, creating it when the key is unset: `data.sources.+={path: fb.jsonl, reader: messages}`.
    """
    if "=" not in assignment:
        raise ConfigError(f"--set {assignment!r}: expected dotted.key=value")
    key, raw_value = assignment.split("=", 1)
    key = key.strip()
    append = key.endswith("+")
    parts = [p for p in (key[:-1] if append else key).split(".") if p]
    if not parts:
        raise ConfigError(f"--set {assignment!r}: empty key")
    value = yaml.safe_load(raw_value) if raw_value.strip() else ""
    node = _parent_node(data, parts, key)
    last = parts[-1]
    if append:
        _append(node, last, value, key)
    elif isinstance(node, list):
        if not _INDEX.match(last) or int(last) >= len(node):
            raise ConfigError(f"--set {key}: {last} is not an index of a list of {len(node)} items (append with +=)")
        node[int(last)] = value
    elif isinstance(node, dict):
        node[last] = value
    else:
        raise ConfigError(f"--set {key}: {'.'.join(parts[:-1])} is a value, not a section")


def _parent_node(data: dict[str, Any], parts: list[str], key: str) -> Any:
    """The section or list that holds the last part of a dotted key (sections are created on the way)."""
    node: Any = data
    for i, part in enumerate(parts[:-1]):
        where = ".".join(parts[: i + 1])
        if isinstance(node, list):
            if not _INDEX.match(part) or int(part) >= len(node):
                raise ConfigError(f"--set {key}: {where} is not an index of a list of {len(node)} items")
            node = node[int(part)]
        elif isinstance(node, dict):
            node = node.setdefault(part, {})
        else:
            raise ConfigError(f"--set {key}: {'.'.join(parts[:i])} is a value, not a section")
    return node


def _append(node: Any, last: str, value: Any, key: str) -> None:
    """`key.+=value`: one more item at the end of the list `node[last]` (a new list when it is unset)."""
    if isinstance(node, list):
        if not _INDEX.match(last) or int(last) >= len(node):
            raise ConfigError(f"--set {key}: {last} is not an index of a list of {len(node)} items")
        target = node[int(last)]
    elif isinstance(node, dict):
        target = node.setdefault(last, [])
        if target is None:
            target = node[last] = []
    else:
        raise ConfigError(f"--set {key}: the parent of {last} is a value, not a section")
    if not isinstance(target, list):
        raise ConfigError(f"--set {key}: {last} is {type(target).__name__}, not a list; += appends to lists only")
    target.append(value)


def format_validation_error(exc: ValidationError, source: str) -> str:
    lines = [f"{source}: {exc.error_count()} invalid setting(s)"]
    for err in exc.errors():
        dotted = ".".join(str(part) for part in err["loc"]) or "(top level)"
        message = err["msg"]
        if err["type"] == "extra_forbidden":
            message = "unknown key (check the spelling; see `domaintune config-reference`)"
        got = err.get("input")
        got_text = "" if err["type"] in ("missing", "extra_forbidden") else f" (got {got!r})"
        if len(got_text) > 120:
            got_text = got_text[:117] + "...)"
        lines.append(f"  {dotted}: {message}{got_text}")
    return "\n".join(lines)


def _read_mapping(path: Path, what: str) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"{path}: {what} file not found")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections (model:, data:, train:, ...)")
    return data


# Mappings whose keys are dotted config paths themselves: an overlay sets them whole, it does not descend.
_WHOLE_MAPPINGS = ("sweep.search_space",)


def overlay_assignments(overlay: dict[str, Any], prefix: str = "") -> list[str]:
    """An overlay mapping as `--set` assignments: nested mappings merge key by key, any other value replaces.

    A key may itself be dotted (`train: {lora.r: 8}` or `data.sources.0.max_rows: 10`), as `--set` takes it;
    `sweep.search_space` (keyed by dotted paths) is set whole.
    """
    assignments: list[str] = []
    for key, value in overlay.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and value and dotted not in _WHOLE_MAPPINGS:
            assignments += overlay_assignments(value, dotted + ".")
        else:
            assignments.append(f"{dotted}={json.dumps(value, ensure_ascii=False, default=str)}")
    return assignments


def load_config(
    path: str | Path,
    overrides: list[str] | tuple[str, ...] = (),
    output_dir: str | Path | None = None,
    overlays: list[Path] | tuple[Path, ...] = (),
) -> ProjectConfig:
    """Read a project YAML, apply overlay files (e.g. a sweep's best.yaml), then `--set` overrides, and validate.

    Errors name the file and the dotted field.
    """
    path = Path(path)
    data = _read_mapping(path, "config")
    for overlay in overlays:
        for assignment in overlay_assignments(_read_mapping(Path(overlay), "overlay")):
            try:
                apply_override(data, assignment)
            except ConfigError as exc:
                raise ConfigError(f"{overlay}: {exc}".replace("--set ", "")) from None
    for assignment in overrides:
        apply_override(data, assignment)
    if output_dir is not None:
        data["output_dir"] = str(Path(output_dir).resolve())
    source = " + ".join([str(path), *(str(o) for o in overlays)])
    return config_from_dict(data, config_path=path.resolve(), source=source)


def config_from_dict(data: dict[str, Any], config_path: Path | None = None, source: str = "config") -> ProjectConfig:
    base_dir = config_path.parent if config_path else Path.cwd()
    data = dict(data)
    data["config_path"] = config_path
    try:
        return ProjectConfig.model_validate(data, context={"base_dir": base_dir})
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, source)) from None

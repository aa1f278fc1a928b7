"""The Configure screen: form fields generated from the pydantic config models, kept in sync with the YAML.

Every scalar setting (str, int, float, bool, a choice, a path; optional or not) becomes one field named
by its dotted key; lists and mappings are edited in the YAML beside the form. A submitted field that
differs from the effective value is applied to the YAML as a `--set` override would be, and the result
is validated by `config_from_dict`: errors come back per dotted key with the `validate` command's words.
"""

from __future__ import annotations

import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Union

from pydantic import BaseModel

from domaintune.config import ConfigError, ProjectConfig, apply_override, config_from_dict

_SCALARS = (str, int, float, bool, Path)
_SKIP = {"config_path"}


@dataclass
class FormField:
    key: str
    kind: str  # text | int | float | bool | choice
    choices: list[str]
    optional: bool
    description: str
    value: str = ""


def _unwrap(annotation: Any) -> tuple[Any, bool]:
    """(inner type, optional) for `X | None`; other unions stay as they are."""
    origin = typing.get_origin(annotation)
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        optional = len(args) < len(typing.get_args(annotation))
        if len(args) == 1:
            return _unwrap(args[0])[0], optional
        return annotation, optional
    if origin is typing.Annotated:
        return _unwrap(typing.get_args(annotation)[0])
    return annotation, False


def _kind(annotation: Any) -> tuple[str, list[str]] | None:
    if typing.get_origin(annotation) is Literal:
        return "choice", [str(a) for a in typing.get_args(annotation)]
    if annotation is bool:
        return "bool", []
    if annotation is int:
        return "int", []
    if annotation is float:
        return "float", []
    if isinstance(annotation, type) and issubclass(annotation, (str, Path)):
        return "text", []
    return None


def form_fields(model: type[BaseModel] = ProjectConfig, prefix: str = "") -> list[FormField]:
    fields: list[FormField] = []
    for name, info in model.model_fields.items():
        if name in _SKIP:
            continue
        inner, optional = _unwrap(info.annotation)
        key = f"{prefix}{name}"
        if isinstance(inner, type) and issubclass(inner, BaseModel):
            fields.extend(form_fields(inner, key + "."))
            continue
        kind = _kind(inner)
        if kind is not None:
            fields.append(FormField(key, kind[0], kind[1], optional, info.description or ""))
    return fields


def _value_at(cfg: BaseModel, key: str) -> Any:
    node: Any = cfg
    for part in key.split("."):
        node = getattr(node, part, None)
        if node is None:
            return None
    return node


def render_value(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def fields_with_values(cfg: ProjectConfig | None) -> list[FormField]:
    fields = form_fields()
    if cfg is not None:
        for f in fields:
            f.value = render_value(_value_at(cfg, f.key))
    return fields


def parse_errors(exc: Exception) -> dict[str, str]:
    """dotted key -> message, from the `validate` command's text (one `  key: message` per line)."""
    errors: dict[str, str] = {}
    for line in str(exc).splitlines()[1:]:
        key, _, message = line.strip().partition(": ")
        if key:
            errors[key] = message
    if not errors:
        errors["(top level)"] = str(exc)
    return errors


def apply_form(data: dict[str, Any], submitted: dict[str, str], cfg: ProjectConfig | None) -> dict[str, Any]:
    """The YAML data with every changed form field applied (an emptied optional field becomes null)."""
    for f in form_fields():
        if f.key not in submitted:
            continue
        new = submitted[f.key].strip()
        old = render_value(_value_at(cfg, f.key)) if cfg is not None else ""
        if new == old:
            continue
        if new == "" and f.optional:
            new = "null"
        elif f.kind in ("text", "choice"):
            new = _yaml_string(new)
        apply_override(data, f"{f.key}={new}")
    return data


def _yaml_string(text: str) -> str:
    """A YAML scalar that always parses back as this exact string."""
    return "'" + text.replace("'", "''") + "'"


def validate(data: dict[str, Any], config_path: Path) -> tuple[ProjectConfig | None, dict[str, str]]:
    try:
        return config_from_dict(data, config_path=config_path.resolve(), source=str(config_path)), {}
    except ConfigError as exc:
        return None, parse_errors(exc)

"""The YAML reference, generated from the pydantic config models so it never drifts."""

from __future__ import annotations

import typing
from types import UnionType
from typing import Any, get_args, get_origin

from pydantic import BaseModel
from pydantic_core import PydanticUndefined


def _type_name(annotation: Any) -> str:
    origin = get_origin(annotation)
    if origin is typing.Annotated:
        return _type_name(get_args(annotation)[0])
    if origin is typing.Literal:
        return " | ".join(repr(a) for a in get_args(annotation))
    if origin in (typing.Union, UnionType):
        return " | ".join(_type_name(a) for a in get_args(annotation))
    if origin is not None:
        args = ", ".join(_type_name(a) for a in get_args(annotation))
        return f"{getattr(origin, '__name__', str(origin))}[{args}]"
    if annotation is type(None):
        return "null"
    return getattr(annotation, "__name__", str(annotation))


def _nested_models(annotation: Any) -> list[type[BaseModel]]:
    found: list[type[BaseModel]] = []
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    for arg in get_args(annotation):
        found.extend(_nested_models(arg))
    return found


def _walk(model: type[BaseModel], prefix: str, rows: list[tuple[str, str, str, str]], seen: set) -> None:
    for name, field in model.model_fields.items():
        if field.exclude:
            continue
        dotted = f"{prefix}{name}"
        if field.default is not PydanticUndefined:
            default = repr(field.default)
        elif field.default_factory is not None:
            default = "(section)" if _nested_models(field.annotation) else "(computed)"
        else:
            default = "required"
        rows.append((dotted, _type_name(field.annotation), default, (field.description or "").replace("\n", " ")))
        for nested in _nested_models(field.annotation):
            if nested in seen:
                continue
            is_list = get_origin(field.annotation) is list or "list" in _type_name(field.annotation)
            is_map = get_origin(field.annotation) is dict  # a mapping of name -> section: `key.<name>.field`
            inner = f"{dotted}[]." if is_list else f"{dotted}.<name>." if is_map else f"{dotted}."
            _walk(nested, inner, rows, seen | {nested})


def render_reference() -> str:
    from domaintune.config import ProjectConfig

    rows: list[tuple[str, str, str, str]] = []
    _walk(ProjectConfig, "", rows, set())
    lines = ["| key | type | default | meaning |", "| --- | --- | --- | --- |"]
    for dotted, type_name, default, description in rows:
        cells = [dotted, type_name, default, description]
        lines.append("| " + " | ".join(f"`{c}`" if i < 3 else c for i, c in enumerate(cells)).replace("\n", " ") + " |")
    return "\n".join(lines)

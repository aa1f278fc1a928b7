"""One pattern for model names, shared by the serve config, the model registry and the HTTP API.

A name is one or two segments (`medical-zh`, `HuggingFaceTB/SmolLM2-135M-Instruct`); a segment
starts with a letter or a digit and goes on with letters, digits, `.`, `_` and `-`, never `..`.
So a name is safe as a folder name (registry names are one segment), as an HTTP header value and
in a log line: no spaces, no control characters, no non-ASCII letters, no path tricks.
"""

from __future__ import annotations

import re
from pathlib import PurePath

MAX_NAME_LENGTH = 128
_SEGMENT = r"[A-Za-z0-9](?:[A-Za-z0-9_-]|\.(?!\.))*"
NAME_SEGMENT_RE = re.compile(_SEGMENT)
MODEL_NAME_RE = re.compile(rf"{_SEGMENT}(?:/{_SEGMENT})?")
NAME_RULE = (
    f"at most {MAX_NAME_LENGTH} characters: letters, digits, '.', '_' and '-', starting with a letter or a "
    "digit, with at most one '/' between two such parts and no '..'"
)


def model_name_problem(name: object, segments: int = 2) -> str | None:
    """Why `name` is not a valid model name (None when it is); `segments=1` for registry names (no '/')."""
    if not isinstance(name, str):
        return f"a model name is a string, not {type(name).__name__}"
    if not name:
        return "the model name is empty"
    if len(name) > MAX_NAME_LENGTH:
        return f"the model name is {len(name)} characters long; use {NAME_RULE}"
    pattern = MODEL_NAME_RE if segments > 1 else NAME_SEGMENT_RE
    if pattern.fullmatch(name) is None:
        return f"{name!r} is not a valid model name; use {NAME_RULE}"
    return None


def is_model_name(name: object, segments: int = 2) -> bool:
    return model_name_problem(name, segments) is None


def check_model_name(name: str, segments: int = 2) -> str:
    """`name` itself, or ValueError saying what is wrong (pydantic validators turn it into a field error)."""
    problem = model_name_problem(name, segments)
    if problem is not None:
        raise ValueError(problem)
    return name


def default_model_name(name_or_path: str) -> str:
    """A valid public name for a model known by a hub id or a local path (its last part, cleaned)."""
    if is_model_name(name_or_path):
        return name_or_path
    last = PurePath(name_or_path.rstrip("/\\")).name or "model"
    cleaned = re.sub(r"[^A-Za-z0-9._-]+", "-", last).strip("-._")
    cleaned = re.sub(r"\.{2,}", ".", cleaned)[:MAX_NAME_LENGTH]
    return cleaned if is_model_name(cleaned) else "model"

"""`registry://name@ref[/sub/path]` URIs, parsed in one place for the CLI, train, serve and the registry."""

from __future__ import annotations

from dataclasses import dataclass

from domaintune.errors import UserError
from domaintune.utils.names import model_name_problem

REGISTRY_SCHEME = "registry://"
_FORM = "registry://name@alias or registry://name@v1.2.3"


@dataclass(frozen=True)
class RegistryRef:
    name: str
    ref: str  # an alias (production, candidate, ...) or a version (v1.2.3)
    subpath: str | None = None  # a path inside the version (`export/gguf`)

    def __str__(self) -> str:
        sub = f"/{self.subpath}" if self.subpath else ""
        return f"{REGISTRY_SCHEME}{self.name}@{self.ref}{sub}"


def is_registry_uri(value: object) -> bool:
    return isinstance(value, str) and value.startswith(REGISTRY_SCHEME)


def parse_registry_uri(uri: str) -> RegistryRef:
    """Split a registry URI; anything malformed is a UserError that shows the expected form."""
    if not is_registry_uri(uri):
        raise UserError(f"{uri}: not a registry URI ({_FORM})")
    name, sep, ref = uri[len(REGISTRY_SCHEME) :].partition("@")
    ref, _, sub = ref.partition("/")
    if not sep or not name or not ref:
        raise UserError(f"{uri}: a registry URI looks like {_FORM}")
    problem = model_name_problem(name, segments=1)
    if problem is not None:
        raise UserError(f"{uri}: {problem}")
    return RegistryRef(name, ref, sub or None)

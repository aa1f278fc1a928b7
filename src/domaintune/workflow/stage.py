"""The stage contract: `run_<stage>(cfg, layout, **options) -> Report`, and what each stage reads.

Every stage declares the config sections it reads (`reads`) and the stages whose outputs it uses
(`upstream`). The pipeline computes a stage's fingerprint from exactly that declaration, and hands
the stage a config that refuses any other section, so a stage cannot depend on a setting without
declaring it (the bug where export read `eval.primary_metric` but was not re-run when it changed).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from domaintune.layout import RunLayout

if TYPE_CHECKING:
    from domaintune.config import ProjectConfig

Report = dict[str, Any]
StageRunner = Callable[["ProjectConfig", RunLayout, dict[str, Any]], Report]

SECTIONS = ("model", "data", "train", "eval", "export", "registry", "serve")


@dataclass(frozen=True)
class StageSpec:
    name: str
    # config sections the stage reads, or single fields (`serve.feedback_dir`) where it reads one setting
    # of a section whose other settings must not re-run it; its fingerprint hashes exactly these
    reads: tuple[str, ...]
    upstream: tuple[str, ...]  # stages whose outputs it reads; their fingerprints chain into its own
    outputs: tuple[str, ...]  # RunLayout attributes that must exist for the stage to be skipped
    hash_input_files: bool = False  # also hash size and mtime of every file its sections name

    def __post_init__(self) -> None:
        unknown = [s for s in self.reads if s.split(".", 1)[0] not in SECTIONS or s.count(".") > 1]
        if unknown:
            raise ValueError(f"stage {self.name}: unknown config section(s) {unknown}")

    @property
    def sections(self) -> tuple[str, ...]:
        """The whole sections it reads."""
        return tuple(r for r in self.reads if "." not in r)

    def fields_of(self, section: str) -> tuple[str, ...]:
        """The single fields it reads of a section it does not read whole."""
        return tuple(r.split(".", 1)[1] for r in self.reads if r.startswith(section + "."))

    def read_values(self, cfg: Any) -> dict[str, Any]:
        """What the fingerprint hashes: each declared section, or each declared field, as JSON."""
        values: dict[str, Any] = {}
        for read in self.reads:
            section, _, name = read.partition(".")
            dumped = getattr(cfg, section).model_dump(mode="json")
            values[read] = dumped[name] if name else dumped
        return values

    def output_paths(self, layout: RunLayout) -> list[Path]:
        return [getattr(layout, attr) for attr in self.outputs]


class UndeclaredConfigReadError(AttributeError):
    """A stage read a config section it did not declare in its StageSpec.reads."""


class ScopedConfig:
    """A project config through which a stage sees only the sections it declared.

    Everything that is not a section (name, seed, output_dir, base_dir, config_path, model_dump,
    ...) passes through; so do the declared sections. Reading any other section raises.
    """

    def __init__(self, cfg: ProjectConfig, spec: StageSpec):
        object.__setattr__(self, "_cfg", cfg)
        object.__setattr__(self, "_spec", spec)

    def __getattr__(self, name: str) -> Any:
        spec: StageSpec = object.__getattribute__(self, "_spec")
        value = getattr(object.__getattribute__(self, "_cfg"), name)
        if name not in SECTIONS or name in spec.sections:
            return value
        fields = spec.fields_of(name)
        if fields:
            return _ScopedSection(value, f"{spec.name}", name, fields)
        raise UndeclaredConfigReadError(_undeclared(spec.name, f"cfg.{name}", spec.reads, name))

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("a stage's config is read-only")


class _ScopedSection:
    """One config section through which a stage sees only the fields it declared."""

    def __init__(self, section: Any, stage: str, name: str, fields: tuple[str, ...]):
        object.__setattr__(self, "_view", (section, stage, name, fields))

    def __getattr__(self, field: str) -> Any:
        section, stage, name, fields = object.__getattribute__(self, "_view")
        if field in fields:
            return getattr(section, field)
        declared = tuple(f"{name}.{f}" for f in fields)
        raise UndeclaredConfigReadError(_undeclared(stage, f"cfg.{name}.{field}", declared, f"{name}.{field}"))

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("a stage's config is read-only")


def _undeclared(stage: str, what: str, reads: tuple[str, ...], add: str) -> str:
    return (
        f"stage {stage!r} read {what} but declares reads={reads}: add {add!r} to its StageSpec in "
        "domaintune/workflow/pipeline.py so a change to it re-runs the stage"
    )


def scoped(cfg: ProjectConfig, spec: StageSpec) -> ProjectConfig:
    """`cfg` as the stage may see it (typed as the config it stands in for)."""
    return cast("ProjectConfig", ScopedConfig(cfg, spec))

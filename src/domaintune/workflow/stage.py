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
    reads: tuple[str, ...]  # config sections the stage reads; its fingerprint hashes exactly these
    upstream: tuple[str, ...]  # stages whose outputs it reads; their fingerprints chain into its own
    outputs: tuple[str, ...]  # RunLayout attributes that must exist for the stage to be skipped
    hash_input_files: bool = False  # also hash size and mtime of every file its sections name

    def __post_init__(self) -> None:
        unknown = [s for s in self.reads if s not in SECTIONS]
        if unknown:
            raise ValueError(f"stage {self.name}: unknown config section(s) {unknown}")

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
        if name in SECTIONS and name not in spec.reads:
            raise UndeclaredConfigReadError(
                f"stage {spec.name!r} read cfg.{name} but declares reads={spec.reads}: add {name!r} to its "
                "StageSpec in domaintune/workflow/pipeline.py so a change to it re-runs the stage"
            )
        return getattr(object.__getattribute__(self, "_cfg"), name)

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("a stage's config is read-only")


def scoped(cfg: ProjectConfig, spec: StageSpec) -> ProjectConfig:
    """`cfg` as the stage may see it (typed as the config it stands in for)."""
    return cast("ProjectConfig", ScopedConfig(cfg, spec))

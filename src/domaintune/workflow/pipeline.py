"""`domaintune run`: the stages in order in one run folder, each skipped when nothing it depends on changed.

A stage's fingerprint hashes the config sections it declares in `reads`, the seed, the
fingerprints of its upstream stages, and (for the data stage) the size and mtime of every input
file. It is stored in `run/state.json` when the stage finishes; a stage whose fingerprint matches
and whose outputs are still there is skipped. A stage that was interrupted is marked `running` and
is re-run (training resumes from its last checkpoint). Each stage gets a config that refuses the
sections it did not declare (`workflow/stage.py`), so the declaration cannot fall behind the code.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from domaintune import __version__
from domaintune.errors import UserError
from domaintune.layout import RunLayout
from domaintune.utils.io import write_json
from domaintune.workflow.stage import Report, StageRunner, StageSpec, scoped

if TYPE_CHECKING:
    from domaintune.config import ProjectConfig

STAGE_ORDER = ["data", "train", "eval", "export", "register"]
_EVERYTHING_BUT_SERVE = ("model", "data", "train", "eval", "export", "registry")

STAGES: dict[str, StageSpec] = {
    "data": StageSpec("data", ("data", "model"), (), ("train_file", "data_report"), hash_input_files=True),
    # DPO without train.dpo.path reads the feedback export folder (the data stage's splits with data.kind other
    # than sft); no other serve setting re-trains;
    # train.generation_eval scores eval.primary_metric unless it names its own metric
    "train": StageSpec(
        "train",
        ("model", "train", "registry", "serve.feedback_dir", "eval.primary_metric", "data.kind"),
        ("data",),
        ("model_dir", "train_metrics"),
    ),
    # eval reads train.replay to refuse a retention set that training replayed
    "eval": StageSpec("eval", ("model", "eval", "train"), ("data", "train"), ("eval_report",)),
    # export measures eval.primary_metric on its artefacts; the Modelfile carries data.system_prompt
    "export": StageSpec(
        "export", ("model", "export", "eval", "data.system_prompt"), ("data", "train"), ("export_manifest",)
    ),
    # register records the whole project config with the version, so it reads every section
    "register": StageSpec("register", _EVERYTHING_BUT_SERVE, ("data", "train", "eval", "export"), ("registered_file",)),
}


@dataclass
class StageOutcome:
    name: str
    status: str  # ran | skipped | failed
    seconds: float
    result: dict[str, Any] = field(default_factory=dict)
    reason: str = ""


@dataclass
class RunResult:
    output_dir: Path
    outcomes: list[StageOutcome]
    gates_passed: bool | None
    gate_failures: list[str]
    version: str | None


def _input_files(value: Any) -> list[Path]:
    """Every existing file named by a Path anywhere in a config section (folders expanded)."""
    found: list[Path] = []
    if isinstance(value, Path):
        if value.is_file():
            found.append(value)
        elif value.is_dir():
            found.extend(sorted(p for p in value.rglob("*") if p.is_file()))
    elif isinstance(value, dict):
        for item in value.values():
            found.extend(_input_files(item))
    elif isinstance(value, (list, tuple)):
        for item in value:
            found.extend(_input_files(item))
    return found


def stage_fingerprint(cfg: ProjectConfig, spec: StageSpec, upstream_fingerprints: dict[str, str]) -> str:
    """sha256 over the declared sections, the seed, the version and the upstream fingerprints."""
    digest = hashlib.sha256()
    sections = spec.read_values(cfg)
    digest.update(json.dumps({"sections": sections, "seed": cfg.seed, "version": __version__}, sort_keys=True).encode())
    for name in spec.upstream:
        digest.update(f"{name}={upstream_fingerprints.get(name, 'absent')}".encode())
    if spec.hash_input_files:
        for section in spec.sections:
            for path in _input_files(getattr(cfg, section).model_dump(mode="python")):
                stat = path.stat()
                digest.update(f"{path}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return digest.hexdigest()[:16]


class RunState:
    """`run/state.json`: per stage its fingerprint, status and timings; written after every change."""

    def __init__(self, layout: RunLayout):
        self.path = layout.state_file
        self.data: dict[str, Any] = {"stages": {}}
        if self.path.is_file():
            self.data = json.loads(self.path.read_text(encoding="utf-8"))

    def stage(self, name: str) -> dict[str, Any]:
        return dict(self.data["stages"].get(name, {}))

    def update(self, name: str, **values: Any) -> None:
        self.data["stages"].setdefault(name, {}).update(values)
        write_json(self.path, self.data)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _run_data(cfg: ProjectConfig, layout: RunLayout, ctx: dict[str, Any]) -> Report:
    from domaintune.data.pipeline import run_data

    return run_data(cfg, layout, workers=ctx.get("workers", 1))


def _run_train(cfg: ProjectConfig, layout: RunLayout, ctx: dict[str, Any]) -> Report:
    from domaintune.train.runner import run_train

    return run_train(cfg, layout, resume=ctx.get("resume_train", False))


def _run_eval(cfg: ProjectConfig, layout: RunLayout, ctx: dict[str, Any]) -> Report:
    from domaintune.eval.runner import run_eval

    return run_eval(cfg, layout)


def _run_export(cfg: ProjectConfig, layout: RunLayout, ctx: dict[str, Any]) -> Report:
    from domaintune.export.runner import run_export

    return run_export(cfg, layout)


def _run_register(cfg: ProjectConfig, layout: RunLayout, ctx: dict[str, Any]) -> Report:
    from domaintune.workflow.registration import run_register

    return run_register(cfg, layout, parent=ctx.get("parent_version"))


def default_stage_runners() -> dict[str, StageRunner]:
    """Each stage's entry point, imported lazily so `run --stages data` never loads torch."""
    return {
        "data": _run_data,
        "train": _run_train,
        "eval": _run_eval,
        "export": _run_export,
        "register": _run_register,
    }


def select_stages(stages: list[str] | None, from_stage: str | None) -> tuple[list[str], set[str]]:
    """Return (stages to consider, stages forced to re-run)."""
    chosen = stages or list(STAGE_ORDER)
    unknown = [s for s in chosen + ([from_stage] if from_stage else []) if s not in STAGES]
    if unknown:
        raise UserError(f"unknown stage(s) {unknown}; stages are {', '.join(STAGE_ORDER)}")
    chosen = [s for s in STAGE_ORDER if s in chosen]
    forced: set[str] = set()
    if from_stage:
        forced = set(STAGE_ORDER[STAGE_ORDER.index(from_stage) :]) & set(chosen)
    return chosen, forced


@dataclass
class _Run:
    """What the stage loop shares: the config, the folder, the state file and the options."""

    cfg: ProjectConfig
    layout: RunLayout
    state: RunState
    runners: dict[str, StageRunner]
    chosen: list[str]
    forced: set[str]
    options: dict[str, Any]
    on_stage: Callable[[str, str], None] | None
    fingerprints: dict[str, str] = field(default_factory=dict)

    def tell(self, name: str, what: str) -> None:
        if self.on_stage:
            self.on_stage(name, what)


def run_pipeline(
    cfg: ProjectConfig,
    stages: list[str] | None = None,
    from_stage: str | None = None,
    workers: int = 1,
    parent_version: str | None = None,
    runners: dict[str, StageRunner] | None = None,
    on_stage: Callable[[str, str], None] | None = None,
) -> RunResult:
    layout = cfg.layout
    layout.root.mkdir(parents=True, exist_ok=True)
    chosen, forced = select_stages(stages, from_stage)
    state = RunState(layout)
    run = _Run(
        cfg,
        layout,
        state,
        runners or default_stage_runners(),
        chosen,
        forced,
        {"workers": workers, "parent_version": parent_version},
        on_stage,
        {name: state.stage(name).get("fingerprint", "absent") for name in STAGE_ORDER},
    )
    outcomes = [_run_stage(run, STAGES[name]) for name in chosen]
    passed, failures = _read_gates(layout)
    registered = layout.registered_file
    version = json.loads(registered.read_text())["version"] if registered.is_file() else None
    return RunResult(layout.root, outcomes, passed, failures, version)


def _run_stage(run: _Run, spec: StageSpec) -> StageOutcome:
    name = spec.name
    missing = [u for u in spec.upstream if run.state.stage(u).get("status") != "done" and u not in run.chosen]
    if missing:
        raise UserError(f"stage {name} needs {', '.join(missing)} first (add it to --stages)")
    fingerprint = stage_fingerprint(run.cfg, spec, run.fingerprints)
    run.fingerprints[name] = fingerprint
    previous = run.state.stage(name)
    if _can_skip(run, spec, previous, fingerprint):
        run.tell(name, "skipped (inputs and config unchanged)")
        return StageOutcome(name, "skipped", 0.0, previous.get("summary", {}), "unchanged")
    interrupted = previous.get("status") == "running" and previous.get("fingerprint") == fingerprint
    ctx = dict(run.options)
    ctx["resume_train"] = name == "train" and interrupted and _has_complete_checkpoint(run.layout)
    run.tell(name, "resuming" if ctx["resume_train"] else "running")
    run.state.update(name, status="running", fingerprint=fingerprint, started_at=_now())
    start = time.perf_counter()
    try:
        result = run.runners[name](scoped(run.cfg, spec), run.layout, ctx) or {}
    except BaseException:
        run.state.update(name, status="failed" if not interrupted else "running", failed_at=_now())
        raise
    seconds = time.perf_counter() - start
    summary = summarise_stage(name, result)
    run.state.update(
        name, status="done", fingerprint=fingerprint, finished_at=_now(), seconds=round(seconds, 1), summary=summary
    )
    return StageOutcome(name, "ran", seconds, summary)


def _can_skip(run: _Run, spec: StageSpec, previous: dict[str, Any], fingerprint: str) -> bool:
    return (
        spec.name not in run.forced
        and previous.get("status") == "done"
        and previous.get("fingerprint") == fingerprint
        and all(path.exists() for path in spec.output_paths(run.layout))
    )


def _has_complete_checkpoint(layout: RunLayout) -> bool:
    from domaintune.train.checkpoints import last_complete_checkpoint

    return last_complete_checkpoint(layout.checkpoints_dir) is not None


def _read_gates(layout: RunLayout) -> tuple[bool | None, list[str]]:
    if not layout.eval_report.is_file():
        return None, []
    gates = json.loads(layout.eval_report.read_text(encoding="utf-8")).get("gates", {})
    return gates.get("passed"), list(gates.get("failures", []))


def summarise_stage(name: str, result: dict[str, Any]) -> dict[str, Any]:
    """Keep a small JSON-safe part of a stage's result in the state file (full reports stay on disk)."""
    keep: dict[str, Any] = {}
    for key, value in result.items():
        if isinstance(value, (int, float, str, bool)) or value is None:
            keep[key] = value
    return keep

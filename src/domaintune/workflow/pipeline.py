"""`domaintune run`: the stages in order in one run folder, each skipped when nothing it depends on changed.

A stage's fingerprint hashes its own config sections, the seed, the fingerprints of the stages
it reads from, and (for the data stage) the size and mtime of every input file. It is stored in
`run/state.json` when the stage finishes; a stage whose fingerprint matches and whose outputs are
still there is skipped. A stage that was interrupted is marked `running` and is re-run (training
resumes from its last checkpoint).
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from domaintune import __version__
from domaintune.config import ProjectConfig
from domaintune.errors import UserError
from domaintune.utils.io import write_json

STAGE_ORDER = ["data", "train", "eval", "export", "register"]


@dataclass
class StageSpec:
    name: str
    config_sections: list[str]
    upstream: list[str]
    outputs: list[str]  # paths (relative to the run folder) that must exist for a skip
    hash_input_files: bool = False


STAGES: dict[str, StageSpec] = {
    "data": StageSpec("data", ["data"], [], ["data/train.jsonl", "data/report.json"], hash_input_files=True),
    "train": StageSpec("train", ["model", "train"], ["data"], ["model", "train/metrics.json"]),
    "eval": StageSpec("eval", ["model", "eval"], ["data", "train"], ["eval/report.json"]),
    "export": StageSpec("export", ["export"], ["train"], ["export/manifest.json"]),
    "register": StageSpec("register", ["registry"], ["data", "train", "eval", "export"], ["run/registered.json"]),
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
    digest = hashlib.sha256()
    sections = {name: getattr(cfg, name).model_dump(mode="json") for name in spec.config_sections}
    digest.update(json.dumps({"sections": sections, "seed": cfg.seed, "version": __version__}, sort_keys=True).encode())
    for name in spec.upstream:
        digest.update(f"{name}={upstream_fingerprints.get(name, 'absent')}".encode())
    if spec.hash_input_files:
        for section in spec.config_sections:
            for path in _input_files(getattr(cfg, section).model_dump(mode="python")):
                stat = path.stat()
                digest.update(f"{path}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return digest.hexdigest()[:16]


class RunState:
    """`run/state.json`: per stage its fingerprint, status and timings; written after every change."""

    def __init__(self, output_dir: Path):
        self.path = output_dir / "run" / "state.json"
        self.data: dict[str, Any] = {"stages": {}}
        if self.path.is_file():
            self.data = json.loads(self.path.read_text(encoding="utf-8"))

    def stage(self, name: str) -> dict[str, Any]:
        return self.data["stages"].get(name, {})

    def update(self, name: str, **values: Any) -> None:
        self.data["stages"].setdefault(name, {}).update(values)
        write_json(self.path, self.data)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def default_stage_runners() -> dict[str, Callable[..., dict[str, Any]]]:
    """Each stage's plain entry point, imported lazily so `run --stages data` never loads torch."""

    def data(cfg: ProjectConfig, out: Path, ctx: dict[str, Any]) -> dict[str, Any]:
        from domaintune.data.pipeline import run_data

        return run_data(cfg, out, workers=ctx.get("workers", 1))

    def train(cfg: ProjectConfig, out: Path, ctx: dict[str, Any]) -> dict[str, Any]:
        from domaintune.train.runner import run_train

        return run_train(cfg, out, resume=ctx.get("resume_train", False))

    def eval_(cfg: ProjectConfig, out: Path, ctx: dict[str, Any]) -> dict[str, Any]:
        from domaintune.eval.runner import run_eval

        return run_eval(cfg, out)

    def export(cfg: ProjectConfig, out: Path, ctx: dict[str, Any]) -> dict[str, Any]:
        from domaintune.export.runner import run_export

        return run_export(cfg, out)

    def register(cfg: ProjectConfig, out: Path, ctx: dict[str, Any]) -> dict[str, Any]:
        from domaintune.workflow.registration import register_outcome

        return register_outcome(cfg, out, parent=ctx.get("parent_version"))

    return {"data": data, "train": train, "eval": eval_, "export": export, "register": register}


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


def run_pipeline(
    cfg: ProjectConfig,
    stages: list[str] | None = None,
    from_stage: str | None = None,
    workers: int = 1,
    parent_version: str | None = None,
    runners: dict[str, Callable[..., dict[str, Any]]] | None = None,
    on_stage: Callable[[str, str], None] | None = None,
) -> RunResult:
    output_dir = Path(cfg.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    runners = runners or default_stage_runners()
    chosen, forced = select_stages(stages, from_stage)
    state = RunState(output_dir)
    fingerprints = {name: state.stage(name).get("fingerprint", "absent") for name in STAGE_ORDER}
    outcomes: list[StageOutcome] = []
    for name in chosen:
        spec = STAGES[name]
        missing_upstream = [u for u in spec.upstream if state.stage(u).get("status") != "done" and u not in chosen]
        if missing_upstream:
            raise UserError(f"stage {name} needs {', '.join(missing_upstream)} first (add it to --stages)")
        fingerprint = stage_fingerprint(cfg, spec, fingerprints)
        previous = state.stage(name)
        outputs_present = all((output_dir / rel).exists() for rel in spec.outputs)
        if (
            name not in forced
            and previous.get("status") == "done"
            and previous.get("fingerprint") == fingerprint
            and outputs_present
        ):
            outcomes.append(StageOutcome(name, "skipped", 0.0, previous.get("summary", {}), "unchanged"))
            fingerprints[name] = fingerprint
            if on_stage:
                on_stage(name, "skipped (inputs and config unchanged)")
            continue
        interrupted = previous.get("status") == "running" and previous.get("fingerprint") == fingerprint
        ctx = {
            "workers": workers,
            "resume_train": name == "train" and interrupted and _has_complete_checkpoint(output_dir),
            "parent_version": parent_version,
        }
        if on_stage:
            on_stage(name, "resuming" if ctx["resume_train"] else "running")
        state.update(name, status="running", fingerprint=fingerprint, started_at=_now())
        start = time.perf_counter()
        try:
            result = runners[name](cfg, output_dir, ctx) or {}
        except BaseException:
            state.update(name, status="failed" if not interrupted else "running", failed_at=_now())
            raise
        seconds = time.perf_counter() - start
        summary = summarise_stage(name, result)
        state.update(
            name, status="done", fingerprint=fingerprint, finished_at=_now(), seconds=round(seconds, 1), summary=summary
        )
        fingerprints[name] = fingerprint
        outcomes.append(StageOutcome(name, "ran", seconds, summary))
    gates = _read_gates(output_dir)
    registered = output_dir / "run" / "registered.json"
    version = json.loads(registered.read_text())["version"] if registered.is_file() else None
    return RunResult(output_dir, outcomes, gates[0], gates[1], version)


def _has_complete_checkpoint(output_dir: Path) -> bool:
    from domaintune.train.runner import last_complete_checkpoint

    return last_complete_checkpoint(output_dir / "train" / "checkpoints") is not None


def _read_gates(output_dir: Path) -> tuple[bool | None, list[str]]:
    report = output_dir / "eval" / "report.json"
    if not report.is_file():
        return None, []
    gates = json.loads(report.read_text(encoding="utf-8")).get("gates", {})
    return gates.get("passed"), list(gates.get("failures", []))


def summarise_stage(name: str, result: dict[str, Any]) -> dict[str, Any]:
    """Keep a small JSON-safe part of a stage's result in the state file (full reports stay on disk)."""
    keep: dict[str, Any] = {}
    for key, value in result.items():
        if isinstance(value, (int, float, str, bool)) or value is None:
            keep[key] = value
    return keep

"""`domaintune round`: one unattended incremental round from production feedback.

    parent (registry://name@production) -> feedback since the parent's round, reviewed -> merged with the
    parent's registered data -> trained from the parent's weights -> child vs parent vs base -> registered
    as the parent's child -> the canary's candidate when the gates pass

A round runs in its own folder, `<output_dir>/rounds/<parent vX.Y.Z>-<fingerprint>/`, named by what it
trains on (the parent version, the feedback rows taken, new source files, the review rules): re-run for
the same window it finds its version in the registry and does nothing; killed half-way, it resumes in
the same folder. Its test and validation sets are the parent's, byte for byte, so every round of a
lineage is measured on the same items and the parent never saw them; the feedback it holds out
(a stable share by request id) is a second test set neither has trained on.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from domaintune.errors import UserError
from domaintune.layout import RunLayout
from domaintune.registry.run import merged_record, registry_url, source_inputs
from domaintune.registry.uri import is_registry_uri, parse_registry_uri
from domaintune.utils.io import read_jsonl, sha256_file, write_json, write_jsonl
from domaintune.workflow.incremental import ParentData, merged_entry, parent_data, snapshot
from domaintune.workflow.pipeline import default_stage_runners, run_pipeline
from domaintune.workflow.round_feedback import Intake, ReviewRules, read_feedback, redact, screen
from domaintune.workflow.round_report import compare, notify, parent_gate_failures, summary_lines, write_summary

if TYPE_CHECKING:
    from collections.abc import Callable

    from domaintune.config import ProjectConfig
    from domaintune.registry.store import ModelRegistry
    from domaintune.workflow.stage import StageRunner

_WINDOW = re.compile(r"^\s*(\d+)\s*([smhdw])\s*$")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


def parse_window(text: str) -> timedelta:
    """`7d`, `12h`, `2w`, `30m`, `90s` as a timedelta."""
    match = _WINDOW.match(text)
    if not match or int(match.group(1)) == 0:
        raise UserError(f"--window {text!r}: use a positive number and a unit, e.g. 7d, 12h, 2w")
    return timedelta(**{_UNITS[match.group(2)]: int(match.group(1))})


@dataclass
class RoundOptions:
    window: timedelta | None = None  # only feedback posted within this long before now
    rules: ReviewRules = field(default_factory=ReviewRules)
    force: bool = False  # run even when a version was already registered for the same data
    webhook: str | None = None  # POST the summary here
    canary: bool = True  # make the child the canary's candidate when serve.canary is configured
    parent_gate: bool = True  # reject a child that is worse than its parent on the test set
    dry_run: bool = False  # stop before training: what the round would take, merge and drop
    now: datetime | None = None  # naive UTC; tests set it


@dataclass
class RoundResult:
    status: str  # candidate | rejected | nothing_to_do | already_done | dry_run
    message: str
    summary: dict[str, Any]
    folder: Path | None = None
    version: str | None = None


@dataclass
class _Round:
    """What one round's steps share."""

    cfg: ProjectConfig  # the project's
    registry: ModelRegistry
    name: str
    parent: ParentData
    options: RoundOptions
    window: tuple[datetime | None, datetime]
    started: float = field(default_factory=time.perf_counter)
    intake: Intake = field(default_factory=Intake)
    candidates: list[dict[str, Any]] = field(default_factory=list)
    new_sources: list[dict[str, Any]] = field(default_factory=list)
    inputs: list[dict[str, Any]] = field(default_factory=list)  # project sources merged so far, by sha256
    source_rows: int = 0  # rows the new sources gave
    fingerprint: str = ""
    folder: Path | None = None
    child: ProjectConfig | None = None
    snapshots: dict[str, Path] = field(default_factory=dict)
    stages: dict[str, float] = field(default_factory=dict)

    @property
    def round_dir(self) -> Path:
        if self.folder is None:
            raise RuntimeError("the round has no folder yet")
        return self.folder / "round"

    @property
    def new_rows_file(self) -> Path:
        return self.round_dir / "new_train.jsonl"

    @property
    def holdout_file(self) -> Path:
        return self.round_dir / "feedback_holdout.jsonl"

    @property
    def comparison_file(self) -> Path:
        return self.round_dir / "comparison.json"

    def window_iso(self) -> dict[str, str | None]:
        start, end = self.window
        return {"start": _iso(start, exact=True) if start else None, "end": _iso(end, exact=True)}


def _iso(when: datetime, exact: bool = False) -> str:
    """UTC as text; `exact` keeps the microseconds (a window's ends: the next round starts where this one ended)."""
    return when.strftime("%Y-%m-%dT%H:%M:%S.%fZ" if exact else "%Y-%m-%dT%H:%M:%SZ")


def _parse_iso(text: str) -> datetime:
    for form in ("%Y-%m-%dT%H:%M:%S.%fZ", "%Y-%m-%dT%H:%M:%SZ"):
        try:
            return datetime.strptime(text, form)
        except ValueError:
            continue
    raise UserError(f"{text!r}: not a UTC time such as 2026-01-31T12:00:00Z")


def _utc_now() -> datetime:
    return datetime.now(timezone.utc).replace(tzinfo=None)


def run_round(
    cfg: ProjectConfig,
    from_uri: str,
    options: RoundOptions | None = None,
    on_stage: Callable[[str, str], None] | None = None,
) -> RoundResult:
    """One round on top of `from_uri` (e.g. registry://name@production); see the module docstring."""
    from domaintune.registry import registry_from_config

    options = options or RoundOptions()
    registry = registry_from_config(cfg)
    name = cfg.registry.name or cfg.name
    if parse_registry_uri(from_uri).name != name:
        raise UserError(f"--from {from_uri}: this project registers versions of {name!r}")
    parent = parent_data(registry, from_uri, required=("train", "val", "test"))
    r = _Round(cfg, registry, name, parent, options, _window(parent, options.window, options.now or _utc_now()))
    try:
        return _run(r, on_stage)
    except Exception as exc:
        _finish(r, "failed", f"{type(exc).__name__}: {exc}")
        raise


def _run(r: _Round, on_stage: Callable[[str, str], None] | None) -> RoundResult:
    cfg = r.cfg
    start, end = r.window
    store_url = cfg.serve.store_url or _default_store_url(cfg.layout.root)
    r.intake, r.candidates = read_feedback(store_url, cfg.serve.key_hash_iterations, start, end, r.options.rules)
    r.new_sources, r.inputs = _new_sources(cfg, r.parent)
    if not r.candidates and not r.new_sources:
        since = f"since {_iso(start)}" if start else "so far"
        return _finish(r, "nothing_to_do", f"no new feedback {since} that the review rules take, and no new sources")
    r.fingerprint = _fingerprint(r)
    done = r.registry.find_by_metadata(r.name, "round.fingerprint", r.fingerprint)
    if done and not r.options.force:
        last = done[-1]
        since = _since_registered(r, last["version"])
        return _finish(
            r,
            "already_done",
            f"this round (same parent, feedback and sources) was registered as {last['version']} ({last['status']}"
            f"{since}); nothing to do (--force runs it again)",
            version=last["version"],
            round_name=f"{r.parent.semver}-{r.fingerprint[:12]}",
        )
    r.folder = cfg.layout.root / "rounds" / f"{r.parent.semver}-{r.fingerprint[:12]}"
    _prepare(r)
    if not r.intake.train:
        return _finish(
            r,
            "nothing_to_do",
            f"{len(r.candidates)} candidate rows, none left to train on after holdout, dedup and decontamination",
        )
    child = r.child
    assert child is not None
    if r.options.dry_run:
        rows = r.parent.rows["train"] + len(r.intake.train)
        return _finish(
            r, "dry_run", f"would train {rows} rows from {r.parent.version} in {r.folder} (nothing registered)"
        )
    result = run_pipeline(child, parent_version=r.parent.version, runners=_runners(r), on_stage=on_stage)
    r.stages = {o.name: round(o.seconds, 1) for o in result.outcomes}
    registered = json.loads(child.layout.registered_file.read_text(encoding="utf-8"))
    version, status = registered["version"], registered["status"]
    canary = _canary_step(r, version, status)
    message = f"registered {version} as {status}, child of {r.parent.version}" + (
        f" ({'; '.join(registered['reasons'])})" if registered["reasons"] else ""
    )
    return _finish(r, status, message, version=version, canary=canary)


def _since_registered(r: _Round, version: str) -> str:
    """`; canary rolled back: <reason>` when serving decided about the version since it was registered."""
    decided = [e for e in r.registry.events(r.name, version) if e["kind"] in ("canary_rolled_back", "canary_promoted")]
    if not decided:
        return ""
    last = decided[-1]
    return f"; {last['kind'].replace('_', ' ')}: {last['details'].get('reason', '')}"


def _default_store_url(root: Path) -> str:
    from domaintune.serve.store import default_store_url

    return default_store_url(root)


def _window(parent: ParentData, window: timedelta | None, now: datetime) -> tuple[datetime | None, datetime]:
    """(start, end]: feedback after the parent's own round (if it was one) and within `window` of now."""
    starts = []
    previous = ((parent.metadata.get("round") or {}).get("window") or {}).get("end")
    if previous:
        starts.append(_parse_iso(previous))
    if window is not None:
        starts.append(now - window)
    return (max(starts) if starts else None), now


def _new_sources(cfg: ProjectConfig, parent: ParentData) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(project sources the lineage has not merged yet, every source merged once this round is done)."""
    current = source_inputs(cfg)
    merged = (parent.metadata.get("round") or {}).get("inputs")
    if merged is None:
        merged = (parent.metadata.get("data") or {}).get("inputs")
    if merged is None:  # registered before inputs were recorded: the sources of its config count as merged
        paths = {
            str(s.get("path")) for s in ((parent.metadata.get("config") or {}).get("data") or {}).get("sources", [])
        }
        merged = [i for i in current if i["path"] in paths]
    known = {i["sha256"] for i in merged}
    new = [i for i in current if i["sha256"] not in known]
    return new, [*merged, *new]


def _fingerprint(r: _Round) -> str:
    taken = sorted((str(c["request_id"]), tuple(c.get("feedback_ids", []))) for c in r.candidates)
    content = {
        "parent": r.parent.version,
        "feedback": taken,
        "sources": sorted(i["sha256"] for i in r.new_sources),
        "rules": r.options.rules.as_dict(),
    }
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()


# ---------------------------------------------------------------------- preparing the round's folder


def _prepare(r: _Round) -> None:
    """Redact and screen the new rows, write them, snapshot the parent's files, build the child's config."""
    cfg, rules = r.cfg, r.options.rules
    r.round_dir.mkdir(parents=True, exist_ok=True)
    if rules.redact_pii:
        redact(r.candidates, cfg.data, r.intake)
    folder = r.folder
    assert folder is not None
    r.snapshots = {split: snapshot(r.parent, split, folder / "run" / "parents") for split in r.parent.files}
    parent_train = list(read_jsonl(r.snapshots["train"]))
    test_sets: dict[str, list[dict[str, Any]]] = {
        s: list(read_jsonl(r.snapshots[s])) for s in ("val", "test", "general_holdout") if s in r.snapshots
    }
    if cfg.eval.test_file and Path(cfg.eval.test_file).is_file():
        test_sets["eval.test_file"] = list(read_jsonl(cfg.eval.test_file))
    source_rows = _new_source_rows(cfg, r)
    r.source_rows = len(source_rows)
    screen(r.candidates + source_rows, parent_train, test_sets, cfg.data, rules, r.intake, _near_threshold(cfg))
    for path, rows in (
        (r.new_rows_file, r.intake.train),
        (r.holdout_file, r.intake.holdout),
        (r.round_dir / "quarantine.jsonl", r.intake.dropped),
    ):
        _write_unless_same(path, rows)
    r.child = _child_config(r)
    write_json(r.round_dir / "plan.json", _metadata(r))


def _near_threshold(cfg: ProjectConfig) -> float | None:
    """The stricter of the data stage's and eval's near-duplicate prompt thresholds (eval refuses a test prompt
    seen in training at its own threshold, so new rows must pass that one too)."""
    found = [
        t
        for t in (
            getattr(cfg.data.decontaminate, "near_threshold", None),
            getattr(cfg.eval, "overlap_near_threshold", None),
        )
        if t is not None
    ]
    return min(found) if found else None


def _write_unless_same(path: Path, rows: list[dict[str, Any]]) -> None:
    """Write rows, leaving a file that already holds exactly them untouched (its mtime too), so a round run
    again in its folder (after a kill) finds its data stage unchanged and resumes training."""
    fresh = path.with_name(path.name + ".new")
    write_jsonl(fresh, rows)
    if path.is_file() and sha256_file(path) == sha256_file(fresh):
        fresh.unlink()
    else:
        fresh.replace(path)


def _new_source_rows(cfg: ProjectConfig, r: _Round) -> list[dict[str, Any]]:
    """Rows of the project sources the lineage has not merged yet, through the data stage (all splits)."""
    if not r.new_sources:
        return []
    from domaintune.data.pipeline import run_data

    paths = {i["path"] for i in r.new_sources}
    data = cfg.data.model_dump()
    data.update(
        sources=[s.model_dump() for s in cfg.data.sources if s.path and str(s.path) in paths],
        general=None,
        format="messages",
    )
    data["decontaminate"]["enabled"] = False  # against the lineage's test sets, below
    data["split"].update(ratios=[1, 0, 0], by="random")  # every row is a training candidate: the test sets stay
    layout = RunLayout(r.round_dir / "new-sources")
    scratch = cfg.model_copy(update={"data": type(cfg.data).model_validate(data), "output_dir": layout.root})
    run_data(scratch, layout)
    rows = []
    for split in ("train", "val", "test"):
        for row in read_jsonl(layout.split_file(split)):
            rows.append({**row, "id": f"src-{row.get('id')}", "round_input": "new source"})
    return rows


def _child_config(r: _Round) -> ProjectConfig:
    """The project's config for the child: the round's folder, the composed data, the parent's weights, the
    parent as one more evaluated model, and the project's registry (pinned: the folder moved)."""
    cfg = r.cfg
    data = cfg.data.model_dump()
    data.update(
        format="messages",
        sources=[
            {"name": f"parent-{r.parent.semver}", "path": str(r.snapshots["train"]), "reader": "messages"},
            {"name": "round-new-rows", "path": str(r.new_rows_file), "reader": "messages"},
        ],
    )
    parent_model = r.registry.resolve(r.parent.uri)  # checksums verified
    evaluation = cfg.eval.model_dump()
    if any(m["name"] == "parent" for m in evaluation["models"]):
        raise UserError("eval.models already has a model named `parent`; a round evaluates its parent under that name")
    evaluation["models"] = [*evaluation["models"], {"name": "parent", "path": str(parent_model)}]
    registry = {**cfg.registry.model_dump(), "url": registry_url(cfg), "store": str(r.registry.store)}
    return cfg.model_copy(
        update={
            "output_dir": r.folder,
            "data": type(cfg.data).model_validate(data),
            "train": cfg.train.model_copy(update={"init_from": r.parent.uri}),
            "eval": type(cfg.eval).model_validate(evaluation),
            "registry": type(cfg.registry).model_validate(registry),
        }
    )


def _metadata(r: _Round, comparison: dict[str, Any] | None = None) -> dict[str, Any]:
    """What the registry records under `round`, and `round/plan.json` says before training."""
    intake = r.intake
    return {
        "fingerprint": r.fingerprint,
        "folder": str(r.folder),
        "parent": r.parent.version,
        "window": r.window_iso(),
        "rules": r.options.rules.as_dict(),
        "feedback": {
            "rows_in_window": intake.seen,
            "requests": intake.requests,
            "candidates": len(r.candidates),
            "train_rows": intake.feedback_train_rows(),
            "holdout_rows": len(intake.holdout),
            "dropped_total": len(intake.dropped),
            "dropped": intake.counts(),
            "pii_redacted": dict(intake.pii),
            "request_ids": sorted(str(c["request_id"]) for c in r.candidates),
        },
        "new_sources": r.new_sources,
        "inputs": r.inputs,
        "rows": {
            "parent_train": r.parent.rows["train"],
            "new_rows": len(intake.train),
            "train": r.parent.rows["train"] + len(intake.train),
            "val": r.parent.rows.get("val"),
            "test": r.parent.rows.get("test"),
        },
        "comparison": comparison or {},
    }


# ---------------------------------------------------------------------- the stages


def _runners(r: _Round) -> dict[str, StageRunner]:
    """The pipeline's stages, with the round's data, evaluation and registration."""
    runners = default_stage_runners()
    runners["data"] = lambda cfg, layout, ctx: _compose_data(r, layout)
    runners["eval"] = lambda cfg, layout, ctx: _evaluate(r, cfg, layout)
    runners["register"] = lambda cfg, layout, ctx: _register(r, cfg, layout)
    return runners


def _compose_data(r: _Round, layout: RunLayout) -> dict[str, Any]:
    """data/: the parent's training rows + the new rows; val, test and the general files are the parent's."""
    layout.data_dir.mkdir(parents=True, exist_ok=True)
    write_jsonl(layout.train_file, [*read_jsonl(r.snapshots["train"]), *read_jsonl(r.new_rows_file)])
    targets = {
        "val": layout.val_file,
        "test": layout.test_file,
        "general": layout.general_file,
        "general_holdout": layout.general_holdout_file,
    }
    for split, target in targets.items():
        if split in r.snapshots:
            shutil.copyfile(r.snapshots[split], target)
    write_jsonl(layout.quarantine_file, r.intake.dropped)
    merged = [merged_entry(r.parent, "train", r.snapshots["train"], "parent training rows")]
    merged.append(
        {
            "role": "new rows (feedback and new sources)",
            "path": str(r.new_rows_file),
            "sha256": sha256_file(r.new_rows_file),
            "rows": len(r.intake.train),
        }
    )
    merged += [merged_entry(r.parent, s, t, f"{s} set (the parent's)") for s, t in targets.items() if s in r.snapshots]
    write_json(merged_record(layout), {"parent": r.parent.uri, "merged": merged})
    report = _data_report(r)
    write_json(layout.data_report, report)
    return {"train_rows": report["split"]["sizes"]["train"], "new_rows": len(r.intake.train)}


def _data_report(r: _Round) -> dict[str, Any]:
    """The data stage's report for a composed round: every request and row accounted for."""
    intake, rows = r.intake, r.parent.rows
    given = rows["train"] + intake.requests + r.source_rows  # each request gives one row or a review drop
    kept = rows["train"] + len(intake.train)
    return {
        "round": _metadata(r),
        "totals": {"input": given, "kept": kept, "dropped": given - kept, "held_out": len(intake.holdout)},
        "split": {"sizes": {"train": kept, "val": rows.get("val", 0), "test": rows.get("test", 0)}},
        "quarantine": intake.counts(),
    }


def _evaluate(r: _Round, cfg: ProjectConfig, layout: RunLayout) -> dict[str, Any]:
    """The eval stage (base, child, parent on the parent's test set), then the held-out feedback, then the
    child-vs-parent comparison both ways."""
    from domaintune.eval.runner import run_eval

    report = run_eval(cfg, layout)
    ecfg = cfg.eval
    seed = ecfg.decoding.seed if ecfg.decoding.seed is not None else cfg.seed

    def versus(run: RunLayout, child: str) -> dict[str, Any]:
        return compare(
            run.eval_items,
            child,
            "parent",
            primary=ecfg.primary_metric,
            samples=ecfg.bootstrap_samples,
            seed=seed,
            report_file=run.eval_report,
        )

    comparison = {"test": versus(layout, "tuned")}
    if r.intake.holdout:
        comparison["feedback holdout"] = versus(_evaluate_feedback(r, layout), "child")
    write_json(r.comparison_file, comparison)
    return report


def _evaluate_feedback(r: _Round, layout: RunLayout) -> RunLayout:
    """base, parent and child on the feedback the round held out (no retention set, no gates)."""
    from domaintune.eval.config import ModelSpec
    from domaintune.eval.runner import run_eval

    child = r.child
    assert child is not None
    ecfg = child.eval.model_copy(
        update={
            "test_file": r.holdout_file,
            "general_file": None,
            "tuned": False,
            "models": [*child.eval.models, ModelSpec(name="child", path=layout.model_dir)],
            "gates": [],
            "stratum_field": None,
            "robustness": child.eval.robustness.model_copy(update={"enabled": False}),
        }
    )
    replay = child.train.replay.model_copy(update={"ratio": 0.0})
    held = RunLayout(r.round_dir / "feedback-eval")
    run_eval(child.model_copy(update={"eval": ecfg, "train": child.train.model_copy(update={"replay": replay})}), held)
    return held


def _register(r: _Round, cfg: ProjectConfig, layout: RunLayout) -> dict[str, Any]:
    """The eval gates and the parent gate decide; registered as the parent's child with the round's record."""
    from domaintune.registry import register_run, registry_from_config
    from domaintune.workflow.registration import gate_verdict

    status, reasons = gate_verdict(layout)
    comparison = json.loads(r.comparison_file.read_text(encoding="utf-8"))
    failures = parent_gate_failures(comparison) if r.options.parent_gate else []
    if failures:
        status, reasons = "rejected", [*reasons, *failures]
    meta = _metadata(r, comparison)
    meta["gate"] = {"status": status, "reasons": reasons}
    version = register_run(cfg, layout, status=status, reasons=reasons, parent=r.parent.version, extra={"round": meta})
    registry = registry_from_config(cfg)
    registry.record_event(
        r.name,
        version,
        "round",
        {
            "parent": r.parent.version,
            "window": meta["window"],
            "feedback_rows": meta["feedback"]["train_rows"],
            "holdout_rows": meta["feedback"]["holdout_rows"],
            "new_rows": meta["rows"]["new_rows"],
            "status": status,
            "folder": str(r.folder),
        },
    )
    if status == "candidate":
        registry.promote(r.name, version, alias="candidate", note=f"round {r.fingerprint[:12]}")
    write_json(layout.registered_file, {"version": version, "status": status, "reasons": reasons})
    return {"version": version, "status": status, "reasons": "; ".join(reasons)}


# ---------------------------------------------------------------------- after the pipeline


def _canary_step(r: _Round, version: str, status: str) -> dict[str, Any]:
    """Point the alias the canary's candidate names at the child, so serving starts it as the candidate."""
    canary = r.cfg.serve.canary
    if status != "candidate":
        return {"started": False, "message": "not started: the child failed its gates"}
    if canary is None:
        return {"started": False, "message": f"serve.canary is not configured; {version} holds the candidate alias"}
    if not r.options.canary:
        return {"started": False, "message": "not started (--no-canary); the child holds the candidate alias"}
    source = canary.candidate
    ref = parse_registry_uri(source) if is_registry_uri(source) else None
    if ref is None or ref.name != r.name or ref.ref == "latest" or re.match(r"^v\d", ref.ref):
        return {"started": False, "message": f"serve.canary.candidate {source} is not an alias of {r.name}; not moved"}
    r.registry.promote(r.name, version, alias=ref.ref, note=f"round {r.fingerprint[:12]}: canary candidate")
    details = {"model": canary.model, "alias": ref.ref, "stable": canary.stable, "share": canary.candidate_share}
    r.registry.record_event(r.name, version, "canary_candidate", details)
    stable = r.registry.version_of(canary.stable) if is_registry_uri(canary.stable) else canary.stable
    return {
        "started": True,
        **details,
        "stable_version": stable,
        "message": f"{version} is the candidate ({source}) against {stable}, {canary.candidate_share:.0%} of users; "
        "a server started with this config serves it (restart running replicas)",
    }


def _finish(r: _Round, status: str, message: str, **extra: Any) -> RoundResult:
    """Write and send the summary; the result the CLI prints."""
    summary: dict[str, Any] = {
        "round": r.folder.name if r.folder else extra.get("round_name"),
        "status": status,
        "message": message,
        "project": r.name,
        "parent": r.parent.version,
        "child": extra.get("version"),
        "window": r.window_iso(),
        "at": _iso(_utc_now()),
        "wall_s": round(time.perf_counter() - r.started, 1),
        "stages": r.stages,
    }
    if r.child is not None:  # the round was prepared: what it took, merged and measured
        meta = _metadata(r, _read_json(r.comparison_file))
        summary.update(
            feedback=meta["feedback"], rows=meta["rows"], new_sources=meta["new_sources"], comparison=meta["comparison"]
        )
    elif r.intake.seen:  # stopped before screening: what the review rules made of the window
        summary["feedback"] = {
            "rows_in_window": r.intake.seen,
            "requests": r.intake.requests,
            "candidates": len(r.candidates),
            "dropped_total": len(r.intake.dropped),
            "dropped": r.intake.counts(),
        }
    if r.folder and r.child is not None and r.child.layout.eval_report.is_file():
        gates = json.loads(r.child.layout.eval_report.read_text(encoding="utf-8")).get("gates") or {}
        registered = _read_json(r.child.layout.registered_file) or {}
        summary["gates"] = {"passed": status == "candidate", "eval": gates, "failures": registered.get("reasons", [])}
    if "canary" in extra:
        summary["canary"] = extra["canary"]
    rounds_dir = r.cfg.layout.root / "rounds"
    rounds_dir.mkdir(parents=True, exist_ok=True)
    if r.options.dry_run:  # a rehearsal: not sent, not in the history
        if r.folder is not None and r.folder.is_dir():
            write_json(r.round_dir / "summary.json", summary)
    else:
        summary["webhook_error"] = notify(r.options.webhook, summary)
        write_summary(rounds_dir, r.folder if r.folder and r.folder.is_dir() else None, summary)
    return RoundResult(status, message, summary, r.folder, extra.get("version"))


def _read_json(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


__all__ = ["ReviewRules", "RoundOptions", "RoundResult", "parse_window", "run_round", "summary_lines"]

"""Register a run folder: gather lineage and metadata from what each stage wrote, copy artefacts in."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from domaintune.errors import UserError
from domaintune.layout import RunLayout
from domaintune.registry.training_record import training_record
from domaintune.registry.uri import is_registry_uri
from domaintune.utils.io import fingerprint_files, sha256_file
from domaintune.utils.versions import RECORDED_PACKAGES, library_versions

if TYPE_CHECKING:
    from domaintune.config import ProjectConfig
    from domaintune.registry.store import ModelRegistry

# The registry also records the version of its database layer.
REGISTRY_LIBRARIES = (*RECORDED_PACKAGES, "sqlalchemy")
TRAIN_METRICS = (
    "final_train_loss",
    "final_val_loss",
    "best_val_loss",
    "step0_val_loss",
    "steps",
    "tokens_seen",
    "tokens_per_second",
)


def default_registry_dir(cfg: ProjectConfig) -> Path:
    """`registry/` beside the run folder (runs/registry/ for the default runs/<name>)."""
    return cfg.layout.root.resolve().parent / "registry"


def registry_url(cfg: ProjectConfig) -> str:
    url = cfg.registry.url
    if not url:
        return f"sqlite:///{default_registry_dir(cfg) / 'registry.db'}"
    prefix = "sqlite:///"
    if url.startswith(prefix) and url != "sqlite:///:memory:":
        path = Path(url[len(prefix) :]).expanduser()
        if not path.is_absolute():
            path = cfg.base_dir / path
        return f"{prefix}{path}"
    return url


def registry_from_config(cfg: ProjectConfig) -> ModelRegistry:
    from domaintune.registry.store import ModelRegistry

    store = cfg.registry.store
    if store is None and not cfg.registry.url:
        store = default_registry_dir(cfg) / "artifacts"
    return ModelRegistry(registry_url(cfg), store=store)


def register_run(
    cfg: ProjectConfig,
    layout: RunLayout,
    bump: str = "patch",
    status: str | None = None,
    reasons: list[str] | None = None,
    parent: str | None = None,
    extra: dict[str, Any] | None = None,
) -> str:
    """Register the run folder as a new version of `registry.name` (default: the project name).

    status None: `candidate` when the eval gates passed, `rejected` (with the failed gates as
    reasons) when they failed, `registered` when there is no eval report. parent None: the version
    `train.init_from` names when it is a registry URI, else none (trained from the base model).
    `extra`: more top-level metadata (a round's window, feedback and comparison under `round`).
    The data files are stored with the version (`registry.training_data: store`) or referenced by
    sha256; what an incremental run merged (`run/merged.json`) is recorded as `lineage.merged`.
    """
    if not layout.root.is_dir():
        raise UserError(f"run folder {layout.root} does not exist")
    registry = registry_from_config(cfg)
    artifacts = _artifacts(cfg, layout)
    meta, data_hash = gather_run_metadata(cfg, layout)
    if status is None:
        status, reasons = _status_from_gates(meta["metrics"].get("gates") or {}, reasons)
    if parent is None:
        parent = _weights_parent(cfg, registry)
    meta["lineage"]["parent_version"] = parent
    meta["lineage"]["merged"] = merged_inputs(cfg, layout)
    meta.update(extra or {})
    return registry.register(
        cfg.registry.name or cfg.name,
        artifacts=artifacts,
        metadata=meta,
        data_hash=data_hash,
        bump=bump,
        status=status,
        reasons=reasons,
        parent=parent,
    )


def _artifacts(cfg: ProjectConfig, layout: RunLayout) -> dict[str, str | Path]:
    """The `registry.artifacts` paths that exist in the run folder; an export must still match its manifest."""
    from domaintune.export.runner import verify_manifest

    artifacts: dict[str, str | Path] = {}
    for rel in cfg.registry.artifacts:
        source = layout.root / rel  # a run-folder path named in the config
        if source.exists():
            artifacts[rel] = source
    if cfg.registry.training_data == "store" and any(r.split("/")[0] != "data" for r in artifacts):
        for path in data_files(layout):
            if path.is_file():
                artifacts.setdefault(layout.relative(path), path)
    if not artifacts:
        raise UserError(
            f"{layout.root}: none of registry.artifacts {cfg.registry.artifacts} exist; run `domaintune train` "
            "(and export) first"
        )
    if layout.export_manifest.is_file() and any(r.split("/")[0] == "export" for r in artifacts):
        problems = verify_manifest(layout.export_dir)
        if problems:
            raise UserError(f"{layout.export_dir}: files differ from export/manifest.json: {'; '.join(problems[:3])}")
    return artifacts


def _status_from_gates(gates: dict[str, Any], reasons: list[str] | None) -> tuple[str, list[str] | None]:
    """`candidate` when the eval gates passed, `rejected` with the failures when not, `registered` without a report."""
    if "passed" not in gates:
        return "registered", [*(reasons or []), "no eval report with gates in the run folder"]
    if gates["passed"]:
        return "candidate", reasons
    return "rejected", [*(reasons or []), *gates.get("failures", [])]


def gather_run_metadata(cfg: ProjectConfig, layout: RunLayout) -> tuple[dict, str]:
    """Metadata and the training-data fingerprint from `data/`, `train/`, `eval/` and `export/`."""
    split_files = [f for f in _data_files(layout) if f.is_file()]
    records = {
        path: _read_json(path)
        for path in (layout.data_report, layout.train_metrics, layout.eval_report, layout.export_manifest)
    }
    train_metrics = records[layout.train_metrics]
    data_fingerprint = None
    if split_files:
        data_fingerprint = fingerprint_files(split_files)
    elif train_metrics and train_metrics.get("data_fingerprint"):
        data_fingerprint = str(train_metrics["data_fingerprint"])

    recorded = [f for f in data_files(layout) if f.is_file()]
    data = {
        "fingerprint": data_fingerprint,
        "rows": {f.stem: _count_lines(f) for f in recorded},
        "files": {f.name: sha256_file(f) for f in recorded},
        "kept": cfg.registry.training_data,
        "inputs": source_inputs(cfg),
    }
    if train_metrics and train_metrics.get("data_fingerprint"):
        data["train_fingerprint"] = train_metrics["data_fingerprint"]
    meta = {
        "project": cfg.name,
        "run_dir": str(layout.root),
        "base_model": (train_metrics or {}).get("base_model") or cfg.model.name_or_path,
        "method": (train_metrics or {}).get("method") or getattr(cfg.train, "method", None),
        "hyperparameters": (train_metrics or {}).get("config") or cfg.train.model_dump(mode="json"),
        "training": training_record(cfg, train_metrics),  # method, reward definition, reference model
        "config": cfg.model_dump(mode="json", exclude={"config_path"}),
        "data": data,
        "metrics": _metrics(records[layout.eval_report], train_metrics, records[layout.export_manifest]),
        "libraries": library_versions(REGISTRY_LIBRARIES),
        "lineage": _lineage(layout, data_fingerprint, records),
    }
    return meta, data_fingerprint or "nodata"


def _data_files(layout: RunLayout) -> list[Path]:
    """The data stage's splits and general pool, which fingerprint the training data."""
    return [layout.train_file, layout.val_file, layout.test_file, layout.general_file]


def data_files(layout: RunLayout) -> list[Path]:
    """Every data file a version records by sha256 (and stores, with `training_data: store`), the out-of-source
    holdouts (data/holdout_<name>.jsonl) included: the sets its eval report scored."""
    return [*_data_files(layout), layout.general_holdout_file, *layout.holdout_files().values()]


def source_inputs(cfg: ProjectConfig) -> list[dict[str, Any]]:
    """The data sources read, by content: name, path and sha256 (of a file; of its files' list for a folder)."""
    inputs = []
    for source in cfg.data.sources:
        path = Path(source.path) if source.path else None
        if path is None or not path.exists():
            continue
        digest = (
            sha256_file(path)
            if path.is_file()
            else fingerprint_files(sorted(p for p in path.rglob("*") if p.is_file()))
        )
        inputs.append({"name": source.name or path.name, "path": str(path), "sha256": digest})
    return inputs


MERGED_FILE = "merged.json"  # in the run folder's `run/`: what an incremental run merged


def merged_record(layout: RunLayout) -> Path:
    return layout.run_dir / MERGED_FILE


def merged_inputs(cfg: ProjectConfig, layout: RunLayout) -> list[dict[str, Any]]:
    """`run/merged.json`'s entries that this run still used (a stale record from an earlier run is left out):
    a data source with the same sha256, or a file the run folder holds byte for byte (a pinned test set)."""
    record = _read_json(merged_record(layout)) or {}
    sources = {str(Path(s.path)) for s in cfg.data.sources if s.path}
    kept = []
    for entry in record.get("merged", []):
        path = Path(entry["path"])
        as_source = str(path) in sources and path.is_file() and sha256_file(path) == entry["sha256"]
        held = layout.root / entry.get("file", "-")
        as_copy = entry.get("file") is not None and held.is_file() and sha256_file(held) == entry["sha256"]
        if as_source or as_copy:
            kept.append(entry)
    return kept


def _metrics(eval_report: dict | None, train_metrics: dict | None, export_manifest: dict | None) -> dict[str, Any]:
    """Headline metrics of the eval report (with its gates), of training and of each exported artefact."""
    metrics: dict[str, Any] = {}
    if eval_report:
        metrics["eval"] = eval_report.get("metrics", {})
        if eval_report.get("gates") is not None:
            metrics["gates"] = eval_report["gates"]
        if eval_report.get("primary_metric"):
            metrics["primary_metric"] = eval_report["primary_metric"]
    if train_metrics:
        metrics["train"] = {k: train_metrics.get(k) for k in TRAIN_METRICS if train_metrics.get(k) is not None}
    if export_manifest:
        metrics["export"] = {
            name: {k: entry[k] for k in ("bytes", "perplexity_delta_vs_merged") if k in entry}
            | ({"perplexity": entry["metric"]["perplexity"]} if "metric" in entry else {})
            for name, entry in export_manifest.get("artifacts", {}).items()
        }
    return metrics


def _lineage(layout: RunLayout, data_fingerprint: str | None, records: dict[Path, dict | None]) -> dict[str, Any]:
    """Where each stage wrote its output, with the sha256 of the record it left (None where it left none)."""

    def sha256_of(path: Path) -> str | None:
        return sha256_file(path) if records[path] else None

    return {
        "data_run": {
            "path": str(layout.data_dir),
            "fingerprint": data_fingerprint,
            "report_sha256": sha256_of(layout.data_report),
        },
        "train_run": {
            "path": str(layout.train_dir),
            "metrics_sha256": sha256_of(layout.train_metrics),
            "init_from": (records[layout.train_metrics] or {}).get("init_from"),
        },
        "eval_run": {"path": str(layout.eval_dir), "report_sha256": sha256_of(layout.eval_report)},
        "export": {"path": str(layout.export_dir), "manifest_sha256": sha256_of(layout.export_manifest)},
    }


def _read_json(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise UserError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None


def _count_lines(path: Path) -> int:
    with path.open("rb") as handle:
        return sum(1 for line in handle if line.strip())


def _weights_parent(cfg: ProjectConfig, registry: ModelRegistry) -> str | None:
    """The registered version whose weights training started from (`train.init_from: registry://...`).

    A run trained from the base model has no parent: lineage follows weights, not registration order, so a
    rejected or unrelated earlier version never becomes a parent by accident.
    """
    init_from = cfg.train.init_from
    if init_from is None or not is_registry_uri(init_from):
        return None
    return registry.version_of(init_from)

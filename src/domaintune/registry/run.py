"""Register a run folder: gather lineage and metadata from what each stage wrote, copy artefacts in."""

from __future__ import annotations

import json
import platform
from pathlib import Path
from typing import Any

from domaintune.errors import UserError
from domaintune.utils.io import fingerprint_files, sha256_file

DATA_SPLITS = ("train", "val", "test", "general")


def default_registry_dir(cfg) -> Path:
    """`registry/` beside the run folder (runs/registry/ for the default runs/<name>)."""
    return Path(cfg.output_dir).resolve().parent / "registry"


def registry_url(cfg) -> str:
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


def registry_from_config(cfg):
    from domaintune.registry.store import ModelRegistry

    store = cfg.registry.store
    if store is None and not cfg.registry.url:
        store = default_registry_dir(cfg) / "artifacts"
    return ModelRegistry(registry_url(cfg), store=store)


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


def library_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for pkg in (
        "domaintune",
        "torch",
        "transformers",
        "peft",
        "trl",
        "datasets",
        "accelerate",
        "safetensors",
        "gguf",
        "sqlalchemy",
    ):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            continue
    return out


def _numeric_leaves(value: Any, prefix: str = "", depth: int = 0) -> dict[str, float]:
    out: dict[str, float] = {}
    if isinstance(value, dict) and depth < 4:
        for key, item in value.items():
            out.update(_numeric_leaves(item, f"{prefix}.{key}" if prefix else str(key), depth + 1))
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        out[prefix] = value
    return out


def gather_run_metadata(cfg, output_dir: Path) -> tuple[dict, str]:
    """Metadata and the training-data fingerprint from `data/`, `train/`, `eval/` and `export/`."""
    data_dir, train_dir, eval_dir, export_dir = (output_dir / s for s in ("data", "train", "eval", "export"))
    split_files = [data_dir / f"{s}.jsonl" for s in DATA_SPLITS if (data_dir / f"{s}.jsonl").is_file()]
    data_report = _read_json(data_dir / "report.json")
    train_metrics = _read_json(train_dir / "metrics.json")
    eval_report = _read_json(eval_dir / "report.json")
    export_manifest = _read_json(export_dir / "manifest.json")

    data_fingerprint = None
    if split_files:
        data_fingerprint = fingerprint_files(split_files)
    elif train_metrics and train_metrics.get("data_fingerprint"):
        data_fingerprint = str(train_metrics["data_fingerprint"])

    data = {
        "fingerprint": data_fingerprint,
        "rows": {f.stem: _count_lines(f) for f in split_files},
        "files": {f.name: sha256_file(f) for f in split_files},
    }
    if train_metrics and train_metrics.get("data_fingerprint"):
        data["train_fingerprint"] = train_metrics["data_fingerprint"]

    metrics: dict[str, Any] = {}
    if eval_report:
        metrics["eval"] = eval_report.get("metrics", {})
        if eval_report.get("gates") is not None:
            metrics["gates"] = eval_report["gates"]
        if eval_report.get("primary_metric"):
            metrics["primary_metric"] = eval_report["primary_metric"]
    if train_metrics:
        metrics["train"] = {
            k: train_metrics.get(k)
            for k in (
                "final_train_loss",
                "final_val_loss",
                "best_val_loss",
                "step0_val_loss",
                "steps",
                "tokens_seen",
                "tokens_per_second",
            )
            if train_metrics.get(k) is not None
        }
    if export_manifest:
        metrics["export"] = {
            name: {k: entry[k] for k in ("bytes", "perplexity_delta_vs_merged") if k in entry}
            | ({"perplexity": entry["metric"]["perplexity"]} if "metric" in entry else {})
            for name, entry in export_manifest.get("artifacts", {}).items()
        }

    method = (train_metrics or {}).get("method") or getattr(cfg.train, "method", None)
    meta = {
        "project": cfg.name,
        "run_dir": str(output_dir),
        "base_model": (train_metrics or {}).get("base_model") or cfg.model.name_or_path,
        "method": method,
        "hyperparameters": (train_metrics or {}).get("config") or cfg.train.model_dump(mode="json"),
        "config": cfg.model_dump(mode="json", exclude={"config_path"}),
        "data": data,
        "metrics": metrics,
        "libraries": library_versions(),
        "lineage": {
            "data_run": {
                "path": str(data_dir),
                "fingerprint": data_fingerprint,
                "report_sha256": sha256_file(data_dir / "report.json") if data_report else None,
            },
            "train_run": {
                "path": str(train_dir),
                "metrics_sha256": sha256_file(train_dir / "metrics.json") if train_metrics else None,
                "init_from": (train_metrics or {}).get("init_from"),
            },
            "eval_run": {
                "path": str(eval_dir),
                "report_sha256": sha256_file(eval_dir / "report.json") if eval_report else None,
            },
            "export": {
                "path": str(export_dir),
                "manifest_sha256": sha256_file(export_dir / "manifest.json") if export_manifest else None,
            },
        },
    }
    return meta, data_fingerprint or "nodata"


def _weights_parent(cfg, registry: ModelRegistry) -> str | None:
    """The registered version whose weights training started from (`train.init_from: registry://...`).

    A run trained from the base model has no parent: lineage follows weights, not registration order, so a
    rejected or unrelated earlier version never becomes a parent by accident.
    """
    init_from = cfg.train.init_from
    if not init_from or not str(init_from).startswith("registry://"):
        return None
    return registry.version_of(str(init_from))


def register_run(
    cfg,
    output_dir,
    bump: str = "patch",
    status: str | None = None,
    reasons: list[str] | None = None,
    parent: str | None = None,
) -> str:
    """Register `<output_dir>` as a new version of `registry.name` (default: the project name).

    status None: `candidate` when the eval gates passed, `rejected` (with the failed gates as
    reasons) when they failed, `registered` when there is no eval report. parent None: the version
    `train.init_from` names when it is a registry URI, else none (trained from the base model).
    """
    from domaintune.export.runner import verify_manifest

    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        raise UserError(f"run folder {output_dir} does not exist")
    registry = registry_from_config(cfg)
    name = cfg.registry.name or cfg.name

    artifacts: dict[str, Path] = {}
    for rel in cfg.registry.artifacts:
        source = output_dir / rel
        if source.exists():
            artifacts[rel] = source
    if not artifacts:
        raise UserError(
            f"{output_dir}: none of registry.artifacts {cfg.registry.artifacts} exist; run `domaintune train` "
            "(and export) first"
        )
    if (output_dir / "export" / "manifest.json").is_file() and any(r.split("/")[0] == "export" for r in artifacts):
        problems = verify_manifest(output_dir / "export")
        if problems:
            raise UserError(
                f"{output_dir / 'export'}: files differ from export/manifest.json: {'; '.join(problems[:3])}"
            )

    meta, data_hash = gather_run_metadata(cfg, output_dir)
    if status is None:
        gates = meta["metrics"].get("gates") or {}
        if "passed" not in gates:
            status, reasons = "registered", list(reasons or []) + ["no eval report with gates in the run folder"]
        elif gates["passed"]:
            status = "candidate"
        else:
            status, reasons = "rejected", list(reasons or []) + list(gates.get("failures", []))
    if parent is None:
        parent = _weights_parent(cfg, registry)
    meta["lineage"]["parent_version"] = parent
    return registry.register(
        name,
        artifacts=artifacts,
        metadata=meta,
        data_hash=data_hash,
        bump=bump,
        status=status,
        reasons=reasons,
        parent=parent,
    )

"""The register stage: the eval gates decide whether a version is a candidate or rejected."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from domaintune.config import ProjectConfig
from domaintune.utils.io import write_json


def register_outcome(cfg: ProjectConfig, output_dir: Path, parent: str | None = None) -> dict[str, Any]:
    from domaintune.registry import register_run, registry_from_config

    report_path = output_dir / "eval" / "report.json"
    gates = json.loads(report_path.read_text(encoding="utf-8")).get("gates", {}) if report_path.is_file() else {}
    passed = gates.get("passed")
    failures = list(gates.get("failures", []))
    if passed is None:
        status, reasons = "rejected", ["no evaluation report: a model that was not evaluated is never promoted"]
    elif passed:
        status, reasons = "candidate", []
    else:
        status, reasons = "rejected", failures
    version = register_run(cfg, output_dir, bump="patch", status=status, reasons=reasons, parent=parent)
    if status == "candidate":
        registry_from_config(cfg).promote(cfg.registry.name or cfg.name, version, alias="candidate")
    result = {"version": version, "status": status, "reasons": reasons}
    write_json(output_dir / "run" / "registered.json", result)
    return {"version": version, "status": status, "reasons": "; ".join(reasons)}

"""The register stage: the eval gates decide whether a version is a candidate or rejected."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from domaintune.layout import RunLayout
from domaintune.utils.io import write_json

if TYPE_CHECKING:
    from domaintune.config import ProjectConfig


def gate_verdict(layout: RunLayout) -> tuple[str, list[str]]:
    """(status, reasons): `candidate` when the eval gates passed, else `rejected` with why."""
    report = layout.eval_report
    gates = json.loads(report.read_text(encoding="utf-8")).get("gates", {}) if report.is_file() else {}
    passed = gates.get("passed")
    if passed is None:
        return "rejected", ["no evaluation report: a model that was not evaluated is never promoted"]
    if passed:
        return "candidate", []
    return "rejected", list(gates.get("failures", []))


def run_register(cfg: ProjectConfig, layout: RunLayout, *, parent: str | None = None) -> dict[str, Any]:
    from domaintune.registry import register_run, registry_from_config

    status, reasons = gate_verdict(layout)
    version = register_run(cfg, layout, bump="patch", status=status, reasons=reasons, parent=parent)
    if status == "candidate":
        registry_from_config(cfg).promote(cfg.registry.name or cfg.name, version, alias="candidate")
    result = {"version": version, "status": status, "reasons": reasons}
    write_json(layout.registered_file, result)
    return {"version": version, "status": status, "reasons": "; ".join(reasons)}

"""Projects of a studio workspace: every `*.yaml` / `*/*.yaml` with a `name`, read and written as the CLI reads them.

A project made in the studio lives in `<workspace>/<name>/project.yaml` with its uploads in
`<workspace>/<name>/uploads/`; its run folder is whatever the YAML says (`runs/<name>` beside it by default).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from domaintune.config import ConfigError, ProjectConfig, load_config
from domaintune.errors import UserError
from domaintune.layout import RunLayout

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")

TEMPLATES: dict[str, dict[str, Any]] = {
    "medical": {
        "system_prompt": "You are a careful medical assistant. Answer accurately and advise seeing a doctor when needed.",
        "eval": {"primary_metric": "rougeL_char"},
    },
    "legal": {
        "system_prompt": "You are a legal assistant. Cite the relevant rule and say when a lawyer should be consulted.",
        "eval": {"primary_metric": "rougeL_word"},
    },
    "finance": {
        "system_prompt": "You are a finance assistant. Be precise with numbers and state the assumptions you make.",
        "eval": {"primary_metric": "rougeL_word"},
    },
    "customer-service": {
        "system_prompt": "You are the support assistant of the company. Answer briefly and politely.",
        "eval": {"primary_metric": "rougeL_word"},
    },
}


@dataclass
class Project:
    name: str
    path: Path
    cfg: ProjectConfig | None
    error: str | None

    @property
    def layout(self) -> RunLayout | None:
        return self.cfg.layout if self.cfg else None


def project_files(workspace: Path) -> list[Path]:
    found = []
    for path in sorted([*workspace.glob("*.yaml"), *workspace.glob("*/*.yaml")]):
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except (OSError, yaml.YAMLError):
            continue
        if isinstance(data, dict) and isinstance(data.get("name"), str):
            found.append(path)
    return found


def _slug(path: Path, workspace: Path) -> str:
    rel = path.relative_to(workspace)
    return rel.parent.name if rel.name == "project.yaml" and rel.parent.name else rel.stem


def list_projects(workspace: Path) -> list[Project]:
    return [open_project(workspace, _slug(p, workspace)) for p in project_files(workspace)]


def project_path(workspace: Path, slug: str) -> Path:
    if not _NAME.match(slug):
        raise UserError(f"project {slug!r}: not a valid name")
    for path in project_files(workspace):
        if _slug(path, workspace) == slug:
            return path
    raise UserError(f"project {slug!r} not found in {workspace}")


def open_project(workspace: Path, slug: str) -> Project:
    path = project_path(workspace, slug)
    try:
        return Project(slug, path, load_config(path), None)
    except ConfigError as exc:
        return Project(slug, path, None, str(exc))


def create_project(workspace: Path, name: str, template: str) -> Path:
    if not _NAME.match(name):
        raise UserError("project name: letters, digits, '-', '_' or '.', starting with a letter or digit")
    if template not in TEMPLATES:
        raise UserError(f"template {template!r}: choose one of {', '.join(TEMPLATES)}")
    folder = workspace / name
    if (folder / "project.yaml").exists() or any(_slug(p, workspace) == name for p in project_files(workspace)):
        raise UserError(f"project {name!r} already exists")
    (folder / "uploads").mkdir(parents=True, exist_ok=True)
    spec = TEMPLATES[template]
    data = {
        "name": name,
        "model": {"name_or_path": "smollm2-135m-instruct"},
        "data": {"sources": [], "system_prompt": spec["system_prompt"]},
        "train": {"method": "lora"},
        "eval": dict(spec["eval"]),
    }
    write_yaml(folder / "project.yaml", data)
    return folder / "project.yaml"


def read_yaml(path: Path) -> dict[str, Any]:
    data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    if not isinstance(data, dict):
        raise UserError(f"{path}: the top level must be a mapping")
    return data


def write_yaml(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_suffix(".yaml.tmp")
    tmp.write_text(yaml.safe_dump(data, allow_unicode=True, sort_keys=False), encoding="utf-8")
    tmp.replace(path)


def read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None
    except (OSError, ValueError):
        return None


def run_overview(project: Project) -> dict[str, Any]:
    """Status per stage, the registered version and the headline delta of a project's run folder."""
    if project.layout is None:
        return {"stages": {}, "version": None, "headline": None}
    layout = project.layout
    state = read_json(layout.state_file) or {"stages": {}}
    registered = read_json(layout.registered_file) or {}
    report = read_json(layout.eval_report) or {}
    headline = None
    primary = report.get("primary_metric")
    delta = ((report.get("deltas") or {}).get("test") or {}).get("tuned", {}).get(primary or "")
    if delta:
        headline = {"metric": primary, **delta}
    stages = {name: s.get("status", "") for name, s in state.get("stages", {}).items()}
    return {
        "stages": stages,
        "version": registered.get("version"),
        "status": registered.get("status"),
        "headline": headline,
    }

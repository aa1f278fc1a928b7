"""Annotation screens: annotation projects of a studio project (`<run>/annotate/<name>`), blind labelling by
annotators, the arbitration queue for experts, agreement with the kappa gate, finalize and Label Studio export.

Everything is read and written through `domaintune.annotate` (labels/<annotator>.jsonl, decisions.jsonl, ...):
the studio keeps no copy. Who may do what comes from the task file: a user whose name is in `annotators` labels
their assigned items (never seeing anyone else's labels); a user in `arbitration.experts` (or any admin/engineer
when no experts are listed) decides disputes; admins and engineers create, watch, export and finalize.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import yaml
from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, RedirectResponse, Response

from domaintune.annotate.config import load_task
from domaintune.annotate.items import candidate_rows, sample_rows
from domaintune.annotate.labelstudio import write_labelstudio
from domaintune.annotate.project import Project as Annotation
from domaintune.annotate.project import create_project
from domaintune.annotate.report import build_report
from domaintune.errors import UserError
from domaintune.studio.auth import User
from domaintune.studio.core import ForbiddenError, Studio, first
from domaintune.studio.workspace import Project, list_projects

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_LS_FILE = re.compile(r"^(config\.xml|tasks-[A-Za-z0-9_.@-]+\.json)$")
MAX_TASK_CHARS = 200_000


# ---- where annotation projects live, and who may see them ---------------------------------------------------
def annotate_root(project: Project) -> Path:
    if project.layout is None:
        raise UserError(f"the project file is invalid: {project.error}")
    return project.layout.root / "annotate"


def annotations_of(project: Project) -> list[Annotation]:
    root = annotate_root(project) if project.layout else None
    if root is None or not root.is_dir():
        return []
    return [Annotation(p.parent) for p in sorted(root.glob("*/project.json"))]


def open_annotation(project: Project, name: str) -> Annotation:
    if not _NAME.match(name):
        raise UserError(f"annotation project {name!r} not found")
    return Annotation(annotate_root(project) / name)


def is_expert(ann: Annotation, user: User) -> bool:
    experts = ann.task.arbitration.experts
    return user.name in experts if experts else user.is_staff


def roles_in(ann: Annotation, user: User) -> dict[str, bool]:
    return {
        "annotator": user.name in ann.task.annotators,
        "expert": is_expert(ann, user),
        "staff": user.is_staff,
    }


def task_files(project: Project) -> list[Path]:
    return sorted((project.path.parent / "tasks").glob("*.yaml"))


# ---- creating ----------------------------------------------------------------------------------------------
def save_task_text(project: Project, text: str) -> Path:
    """A pasted or uploaded task YAML, kept as `<project dir>/tasks/<name>.yaml` (code list paths resolve there)."""
    if len(text) > MAX_TASK_CHARS:
        raise UserError("task file too large")
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise UserError(f"task file: not valid YAML: {exc}") from None
    name = str(data.get("name", "")) if isinstance(data, dict) else ""
    if not _NAME.match(name):
        raise UserError("task file: `name` must be letters, digits, '-', '_' or '.'")
    path = project.path.parent / "tasks" / f"{name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def create_annotation(project: Project, task_path: Path) -> Annotation:
    """What `domaintune annotate create` does: sample the task's rows into `<run>/annotate/<task name>`."""
    if project.cfg is None:
        raise UserError(f"the project file is invalid: {project.error}")
    task = load_task(task_path)
    if not _NAME.match(task.name):
        raise UserError("task `name` must be letters, digits, '-', '_' or '.'")
    rows = sample_rows(candidate_rows(project.cfg, task.sample), task.sample.n, task.sample.seed)
    origin = {"config": str(project.path), "task": str(task_path), **task.sample.model_dump(mode="json")}
    return create_project(annotate_root(project) / task.name, task, rows, origin)


# ---- labelling ---------------------------------------------------------------------------------------------
def _empty(value: Any) -> bool:
    return value is None or value == "" or value == []


def _submitted(ann: Annotation, item_id: str, data: dict[str, list[str]]) -> dict[str, Any]:
    labels: dict[str, Any] = {}
    for spec in ann.specs:
        raw = data.get(f"{spec.name}::{item_id}") or []
        if spec.kind == "multi":
            labels[spec.name] = [v for v in raw if v]
        elif spec.kind == "spans":
            try:
                labels[spec.name] = json.loads(raw[0]) if raw and raw[0] else []
            except json.JSONDecodeError:
                raise UserError(f"item {item_id}: {spec.name}: bad span data") from None
        else:
            labels[spec.name] = raw[0].strip() if raw and raw[0].strip() else None
    return labels


def parse_labels(ann: Annotation, annotator: str, data: dict[str, list[str]]) -> dict[str, Any]:
    """The form's labels: complete items (every required label given) as entries, the rest as problems;
    untouched items are skipped. The submitted values are kept so a refused item is shown as typed."""
    entries, problems, values = [], [], {}
    for item in ann.items_of(annotator):
        item_id = str(item["id"])
        labels = _submitted(ann, item_id, data)
        if all(_empty(v) for v in labels.values()):
            continue
        values[item_id] = labels
        missing = [s.name for s in ann.specs if s.required and s.kind != "spans" and _empty(labels.get(s.name))]
        if missing:
            problems.append({"item": item_id, "missing": missing})
            continue
        try:
            entries.append({"item": item_id, "labels": ann.check_labels(item_id, labels)})
        except UserError as exc:
            problems.append({"item": item_id, "error": str(exc)})
    return {"entries": entries, "problems": problems, "values": values}


def label_view(ann: Annotation, annotator: str, values: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    """Only the annotator's items and only their own labels (blind)."""
    mine = ann.labels_of(annotator)
    shown = {**mine, **(values or {})}
    items = ann.items_of(annotator)
    return {
        "ann": ann,
        "items": items,
        "values": shown,
        "done": sum(1 for it in items if str(it["id"]) in mine),
        "labelled": set(mine),
        "specs_json": {s.name: s.model_dump(mode="json") for s in ann.specs},
    }


# ---- arbitration -------------------------------------------------------------------------------------------
def parse_decisions(ann: Annotation, data: dict[str, list[str]]) -> list[tuple[list[dict[str, Any]], str]]:
    """Per queued item: (decisions {item, field, value}, note). A field's value is the picked annotator value
    (JSON) or, when given, the 'other value' field."""
    out = []
    for entry in ann.queue():
        item_id = entry["item"]
        decided = []
        for field in entry["fields"]:
            other = first(data, f"other::{item_id}::{field}").strip()
            picked = first(data, f"pick::{item_id}::{field}")
            if other:
                decided.append({"item": item_id, "field": field, "value": other})
            elif picked:
                try:
                    decided.append({"item": item_id, "field": field, "value": json.loads(picked)})
                except json.JSONDecodeError:
                    raise UserError(f"item {item_id}: {field}: bad choice") from None
        if decided:
            out.append((decided, first(data, f"note::{item_id}").strip()))
    return out


def arbitration_view(ann: Annotation, user: User) -> dict[str, Any]:
    queue = ann.queue()
    for entry in queue:
        entry["fields_shown"] = ann.items[entry["item"]]["fields"]
        item = ann.items[entry["item"]]
        entry["shown"] = {f: {a: _display(ann, f, v, item) for a, v in by.items()} for f, by in entry["values"].items()}
        entry["choices"] = {
            f: [(k, _display(ann, f, v, item)) for k, v in _distinct(list(by.values()))]
            for f, by in entry["values"].items()
        }
    mine = [d for d in ann.decisions() if d["by"] == user.name]
    return {"ann": ann, "queue": queue, "decisions": ann.decisions(), "mine": mine}


def _display(ann: Annotation, field: str, value: Any, item: dict[str, Any]) -> str:
    """A label value as an expert reads it: span texts, code names, lists joined; empty as ∅."""
    spec = ann.task.spec(field)
    if _empty(value):
        return "∅"
    if spec.kind == "spans":
        text = str(item["fields"].get(spec.field, ""))
        return ", ".join(f"{lab}「{text[int(s) : int(e)]}」" for s, e, lab in value)
    if spec.kind == "multi":
        return ", ".join(value)
    if spec.kind == "term":
        return f"{value} {ann.codes.get(field, {}).get(value, '')}".strip()
    return str(value)


def _distinct(values: list[Any]) -> list[tuple[str, Any]]:
    seen: dict[str, Any] = {}
    for v in values:
        seen.setdefault(json.dumps(v, ensure_ascii=False, sort_keys=True), v)
    return list(seen.items())


# ---- overview ----------------------------------------------------------------------------------------------
def overview(ann: Annotation) -> dict[str, Any]:
    final = ann.folder / "annotations.jsonl"
    ls_dir = ann.folder / "labelstudio"
    return {
        "ann": ann,
        "state": ann.status(),
        "agreement": ann.agreement(),
        "decisions": ann.decisions(),
        "finalized": sum(1 for _ in final.open(encoding="utf-8")) if final.is_file() else None,
        "ls_files": sorted(p.name for p in ls_dir.iterdir() if _LS_FILE.match(p.name)) if ls_dir.is_dir() else [],
    }


def finalize(ann: Annotation, force: bool) -> dict[str, Any]:
    """`annotate finalize [--force]`: refused below the kappa gate unless forced; the report is rewritten."""
    summary = ann.finalize(force=force)
    build_report(ann)
    return summary


def register(app: FastAPI, studio: Studio) -> None:
    @app.get("/annotate")
    async def annotate_home(request: Request) -> Response:
        user = studio.user(request)
        rows = []
        for project in list_projects(studio.workspace):
            for ann in annotations_of(project):
                roles = roles_in(ann, user)
                if any(roles.values()):
                    rows.append((project, ann, roles))
        return studio.render(request, "annotate_home.html", user, rows=rows)

    _staff_routes(app, studio)
    _label_routes(app, studio)
    _arbitration_routes(app, studio)


def _staff_routes(app: FastAPI, studio: Studio) -> None:
    @app.get("/p/{slug}/annotate")
    async def annotate_list(request: Request, slug: str) -> Response:
        user = studio.staff(request)
        project = studio.project(slug)
        return studio.render(
            request, "annotate_list.html", user, project=project, anns=annotations_of(project),
            tasks=[p.name for p in task_files(project)],
        )  # fmt: skip

    @app.post("/p/{slug}/annotate")
    async def annotate_create(request: Request, slug: str) -> Response:
        user = studio.staff(request)
        data = await studio.form(request, user)
        project = studio.project(slug)
        text, chosen = first(data, "task_text").strip(), first(data, "task_file")
        if text:
            path = save_task_text(project, text)
        elif chosen in {p.name for p in task_files(project)}:
            path = project.path.parent / "tasks" / chosen
        else:
            raise UserError("choose a task file or paste / upload one")
        ann = create_annotation(project, path)
        return RedirectResponse(f"/p/{slug}/annotate/{ann.folder.name}", status_code=303)

    @app.get("/p/{slug}/annotate/{name}")
    async def annotate_overview(request: Request, slug: str, name: str) -> Response:
        user = studio.staff(request)
        project = studio.project(slug)
        view = overview(open_annotation(project, name))
        return studio.render(request, "annotate_overview.html", user, project=project, message=None, **view)

    @app.post("/p/{slug}/annotate/{name}")
    async def annotate_action(request: Request, slug: str, name: str) -> Response:
        user = studio.staff(request)
        data = await studio.form(request, user)
        project = studio.project(slug)
        ann = open_annotation(project, name)
        message: dict[str, Any] = {}
        action = first(data, "action")
        if action == "finalize":
            try:
                message = {"ok": True, "finalize": finalize(ann, first(data, "force") == "on")}
            except UserError as exc:
                message = {"ok": False, "error": str(exc)}
        elif action == "labelstudio":
            write_labelstudio(ann, ann.folder / "labelstudio")
            message = {"ok": True, "labelstudio": True}
        view = overview(Annotation(ann.folder))
        return studio.render(request, "annotate_overview.html", user, project=project, message=message, **view)

    @app.get("/p/{slug}/annotate/{name}/labelstudio/{file}")
    async def annotate_download(request: Request, slug: str, name: str, file: str) -> Response:
        studio.staff(request)
        ann = open_annotation(studio.project(slug), name)
        path = ann.folder / "labelstudio" / file
        if not _LS_FILE.match(file) or not path.is_file():
            raise UserError(f"{file!r} not found (export the Label Studio files first)")
        return FileResponse(path, filename=file)


def _label_routes(app: FastAPI, studio: Studio) -> None:
    @app.get("/p/{slug}/annotate/{name}/label")
    async def label_page(request: Request, slug: str, name: str) -> Response:
        user = studio.user(request)
        project = studio.project(slug)
        ann = open_annotation(project, name)
        if user.name not in ann.task.annotators:
            raise ForbiddenError()
        view = label_view(ann, user.name)
        return studio.render(request, "annotate_label.html", user, project=project, saved=None, problems=[], **view)

    @app.post("/p/{slug}/annotate/{name}/label")
    async def label_save(request: Request, slug: str, name: str) -> Response:
        user = studio.user(request)
        data = await studio.form(request, user)
        project = studio.project(slug)
        ann = open_annotation(project, name)
        if user.name not in ann.task.annotators:
            raise ForbiddenError()
        parsed = parse_labels(ann, user.name, data)
        saved = ann.add_labels(user.name, parsed["entries"], via="studio") if parsed["entries"] else 0
        refused = {p["item"] for p in parsed["problems"]}
        view = label_view(ann, user.name, {k: v for k, v in parsed["values"].items() if k in refused})
        return studio.render(
            request, "annotate_label.html", user, project=project, saved=saved, problems=parsed["problems"], **view
        )


def _arbitration_routes(app: FastAPI, studio: Studio) -> None:
    @app.get("/p/{slug}/annotate/{name}/arbitrate")
    async def arbitrate_page(request: Request, slug: str, name: str) -> Response:
        user = studio.user(request)
        project = studio.project(slug)
        ann = open_annotation(project, name)
        if not is_expert(ann, user):
            raise ForbiddenError()
        view = arbitration_view(ann, user)
        return studio.render(request, "annotate_arbitrate.html", user, project=project, saved=None, **view)

    @app.post("/p/{slug}/annotate/{name}/arbitrate")
    async def arbitrate_save(request: Request, slug: str, name: str) -> Response:
        user = studio.user(request)
        data = await studio.form(request, user)
        project = studio.project(slug)
        ann = open_annotation(project, name)
        if not is_expert(ann, user):
            raise ForbiddenError()
        saved = sum(ann.decide(user.name, entries, note) for entries, note in parse_decisions(ann, data))
        view = arbitration_view(ann, user)
        return studio.render(request, "annotate_arbitrate.html", user, project=project, saved=saved, **view)

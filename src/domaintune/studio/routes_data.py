"""The Data screen (upload, mapping, preview, data stage report) and the Configure screen (form + YAML + estimate)."""

from __future__ import annotations

from typing import Any

import yaml
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, RedirectResponse, Response

from domaintune.errors import UserError
from domaintune.studio import configform, datafiles, jobs
from domaintune.studio.core import Studio, first
from domaintune.studio.workspace import Project, read_json, read_yaml, write_yaml
from domaintune.utils.io import read_jsonl


def _data_report(project: Project) -> dict[str, Any] | None:
    if project.layout is None:
        return None
    report = read_json(project.layout.data_report)
    if report is None:
        return None
    quarantine = project.layout.quarantine_file
    report["quarantine_rows"] = list(read_jsonl(quarantine))[:200] if quarantine.is_file() else []
    return report


def register(app: FastAPI, studio: Studio) -> None:
    @app.get("/p/{slug}/data")
    async def data_page(request: Request, slug: str, file: str = "", record_path: str = "") -> Response:
        user = studio.staff(request)
        project = studio.project(slug)
        info = datafiles.inspect(datafiles.upload_path(project.path, file), record_path) if file else None
        sources = (read_yaml(project.path).get("data") or {}).get("sources") or []
        return studio.render(
            request,
            "data.html",
            user,
            project=project,
            uploads=[p.name for p in datafiles.list_uploads(project.path)],
            info=info,
            record_path=record_path,
            sources=sources,
            report=_data_report(project),
            job=jobs.running_job(project.layout) if project.layout else None,
            preview=None,
            mapping={},
        )

    @app.post("/api/p/{slug}/upload")
    async def upload(request: Request, slug: str, filename: str) -> Response:
        user = studio.staff(request)
        studio.check_csrf_header(request, user)
        project = studio.project(slug)
        body = await request.body()
        path = datafiles.save_upload(project.path, filename, body)
        return JSONResponse({"file": path.name})

    @app.post("/p/{slug}/data/mapping")
    async def mapping(request: Request, slug: str) -> Response:
        user = studio.staff(request)
        data = await studio.form(request, user)
        project = studio.project(slug)
        path = datafiles.upload_path(project.path, first(data, "file"))
        record_path = first(data, "record_path")
        chosen = {k: first(data, k) for k in datafiles.MAPPED}
        keep = [k for k in data.get("keep", []) if k]
        entry = datafiles.source_entry(path, project.path, chosen, keep, record_path)
        raw = read_yaml(project.path)
        section = raw.setdefault("data", {}) or {}
        raw["data"] = section
        sources = [s for s in section.get("sources") or [] if s.get("path") != entry["path"]]
        section["sources"] = [*sources, entry]
        stratify = first(data, "stratify")
        if stratify:
            section["split"] = {**(section.get("split") or {}), "by": "stratified", "stratify_field": stratify}
            if stratify not in keep:
                entry.setdefault("keep", []).append(stratify)
        _, errors = configform.validate(raw, project.path)
        if errors:
            raise UserError("; ".join(f"{k}: {v}" for k, v in errors.items()))
        write_yaml(project.path, raw)
        if first(data, "run") == "1":
            fresh = studio.project(slug)
            if fresh.layout is not None:
                jobs.start_job(fresh.path, fresh.layout, ["data"], user=user.name)
            return RedirectResponse(f"/p/{slug}/runs", status_code=303)
        return RedirectResponse(f"/p/{slug}/data?file={path.name}&record_path={record_path}", status_code=303)

    _config_routes(app, studio)


def _config_page(studio: Studio, request: Request, project: Project, **extra: Any) -> Response:
    user = studio.staff(request)
    yaml_text = extra.pop("yaml_text", None) or project.path.read_text(encoding="utf-8")
    fields = configform.fields_with_values(project.cfg)
    submitted = extra.pop("submitted", None) or {}
    for f in fields:
        if f.key in submitted:
            f.value = submitted[f.key]
    sections: dict[str, list] = {}
    for f in fields:
        sections.setdefault(f.key.split(".")[0] if "." in f.key else "project", []).append(f)
    errors = extra.pop("errors", None)
    if errors is None and project.error:
        errors = configform.parse_errors(UserError(project.error))
    return studio.render(
        request,
        "config.html",
        user,
        project=project,
        sections=sections,
        yaml_text=yaml_text,
        errors=errors or {},
        open_sections={"project", "model", "train"} | {k.split(".")[0] for k in errors or {}},
        saved=extra.pop("saved", False),
    )


def _config_routes(app: FastAPI, studio: Studio) -> None:
    @app.get("/p/{slug}/config")
    async def config_page(request: Request, slug: str) -> Response:
        return _config_page(studio, request, studio.project(slug))

    @app.post("/p/{slug}/config")
    async def config_save(request: Request, slug: str) -> Response:
        user = studio.staff(request)
        data = await studio.form(request, user)
        project = studio.project(slug)
        if first(data, "mode") == "yaml":
            text = first(data, "yaml")
            try:
                raw = yaml.safe_load(text) or {}
            except yaml.YAMLError as exc:
                return _config_page(studio, request, project, yaml_text=text, errors={"(yaml)": str(exc)})
            if not isinstance(raw, dict):
                return _config_page(studio, request, project, yaml_text=text, errors={"(yaml)": "not a mapping"})
        else:
            submitted = {k: v[0] for k, v in data.items() if k not in ("csrf", "mode")}
            raw = configform.apply_form(read_yaml(project.path), submitted, project.cfg)
            text = yaml.safe_dump(raw, allow_unicode=True, sort_keys=False)
        _, errors = configform.validate(raw, project.path)
        if errors:
            extra = {"submitted": submitted} if first(data, "mode") != "yaml" else {}
            return _config_page(studio, request, project, yaml_text=text, errors=errors, **extra)
        write_yaml(project.path, raw)
        return _config_page(studio, request, studio.project(slug), saved=True)

    @app.get("/api/p/{slug}/estimate")
    async def estimate(request: Request, slug: str) -> Response:
        studio.staff(request)
        project = studio.project(slug)
        if project.cfg is None:
            raise UserError(project.error or "invalid config")
        from domaintune.hardware.plan import plan_estimates

        plan = plan_estimates(project.cfg, gpus=["A100-80G"])
        targets = [
            {
                "name": t.name,
                "memory_gib": t.memory_gib,
                "rows": [
                    {
                        "method": e.method,
                        "trainable_m": e.trainable_params / 1e6,
                        "memory_gib": e.total_gib,
                        "fits": e.total_gib <= t.memory_gib * 0.95,
                        "tokens_per_s": e.tokens_per_s,
                        "run_seconds": e.run_seconds,
                        "chosen": e.method == project.cfg.train.method,
                    }
                    for e in t.estimates
                ],
            }
            for t in plan.targets
        ]
        return JSONResponse({"header": plan.header, "targets": targets, "footer": plan.footer})

"""The Runs screen (background jobs, live charts, logs, stage table), the Evaluate screen and the chat arena."""

from __future__ import annotations

import json
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, RedirectResponse, Response, StreamingResponse

from domaintune.errors import UserError
from domaintune.studio import arena, jobs
from domaintune.studio.core import Studio, first
from domaintune.studio.workspace import Project, read_json
from domaintune.utils.io import read_jsonl


def _layout(project: Project):
    if project.layout is None:
        raise UserError(f"the project file is invalid; fix it on the Configure screen: {project.error}")
    return project.layout


def _stage_table(project: Project) -> list[dict[str, Any]]:
    state = read_json(_layout(project).state_file) or {"stages": {}}
    rows = []
    for name in jobs.STAGE_NAMES:
        s = state["stages"].get(name, {})
        rows.append({"name": name, **{k: s.get(k) for k in ("status", "seconds", "started_at", "finished_at")}})
    return rows


def register(app: FastAPI, studio: Studio) -> None:
    @app.get("/p/{slug}/runs")
    async def runs_page(request: Request, slug: str) -> Response:
        user = studio.staff(request)
        project = studio.project(slug)
        layout = _layout(project)
        all_jobs = jobs.list_jobs(layout)
        return studio.render(
            request, "runs.html", user, project=project, jobs=all_jobs, stages=_stage_table(project),
            stage_names=jobs.STAGE_NAMES, current=all_jobs[0] if all_jobs else None,
        )  # fmt: skip

    @app.post("/p/{slug}/runs")
    async def runs_action(request: Request, slug: str) -> Response:
        user = studio.staff(request)
        data = await studio.form(request, user)
        project = studio.project(slug)
        layout = _layout(project)
        action = first(data, "action")
        if action == "stop":
            jobs.stop_job(layout, first(data, "job"))
        else:
            stages = [s for s in data.get("stages", []) if s] or None
            jobs.start_job(project.path, layout, stages, first(data, "from") or None, user=user.name)
        return RedirectResponse(f"/p/{slug}/runs", status_code=303)

    @app.get("/api/p/{slug}/jobs/{job_id}")
    async def job_status(request: Request, slug: str, job_id: str) -> Response:
        studio.staff(request)
        project = studio.project(slug)
        layout = _layout(project)
        job = next((j for j in jobs.list_jobs(layout) if j["id"] == job_id), None)
        if job is None:
            raise UserError(f"job {job_id!r} not found")
        return JSONResponse(
            {
                "job": job,
                "log": jobs.read_log(layout, job_id),
                "metrics": jobs.live_metrics(layout, job_id),
                "stages": _stage_table(project),
            }
        )

    _eval_routes(app, studio)
    _arena_routes(app, studio)


def _eval_routes(app: FastAPI, studio: Studio) -> None:
    @app.get("/p/{slug}/eval")
    async def eval_page(request: Request, slug: str) -> Response:
        user = studio.staff(request)
        project = studio.project(slug)
        layout = _layout(project)
        report = read_json(layout.eval_report)
        items = list(read_jsonl(layout.eval_items))[:100] if layout.eval_items.is_file() else []
        return studio.render(request, "eval.html", user, project=project, report=report, items=items)


def _arena_routes(app: FastAPI, studio: Studio) -> None:
    @app.get("/p/{slug}/arena")
    async def arena_page(request: Request, slug: str) -> Response:
        user = studio.user(request)
        project = studio.project(slug)
        if project.cfg is None:
            raise UserError(project.error or "invalid config")
        choices = arena.model_choices(project.cfg)
        return studio.render(request, "arena.html", user, project=project, choices=choices)

    @app.post("/api/p/{slug}/arena/stream")
    async def arena_stream(request: Request, slug: str) -> Response:
        user = studio.user(request)
        studio.check_csrf_header(request, user)
        body = json.loads(await request.body() or b"{}")
        project = studio.project(slug)
        if project.cfg is None:
            raise UserError(project.error or "invalid config")
        model, prompt = str(body.get("model", "")), str(body.get("prompt", "")).strip()
        if model not in arena.model_choices(project.cfg):
            raise UserError(f"unknown model {model!r}")
        if not prompt:
            raise UserError("the prompt is empty")
        tokens = min(int(body.get("max_new_tokens") or 64), 512)
        stream = arena.stream_answer(project.cfg, model, prompt, tokens)
        return StreamingResponse(stream, media_type="text/plain; charset=utf-8")

    @app.post("/api/p/{slug}/arena/correction")
    async def arena_correction(request: Request, slug: str) -> Response:
        user = studio.user(request)
        studio.check_csrf_header(request, user)
        body = json.loads(await request.body() or b"{}")
        project = studio.project(slug)
        if project.cfg is None:
            raise UserError(project.error or "invalid config")
        request_id = arena.save_correction(
            project.cfg,
            str(body.get("model", "")),
            str(body.get("prompt", "")),
            str(body.get("answer", "")),
            str(body.get("correction", "")),
            str(body.get("comment", "")),
            user.name,
        )
        return JSONResponse({"request_id": request_id})

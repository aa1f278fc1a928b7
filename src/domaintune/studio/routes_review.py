"""Expert review, Registry, Serving (keys, usage, canary) and the Feedback inbox."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import RedirectResponse, Response

from domaintune.errors import UserError
from domaintune.studio import feedback, reviews
from domaintune.studio.core import Studio, first
from domaintune.studio.jobs import start_job
from domaintune.studio.workspace import Project, list_projects


def _layout(project: Project):
    if project.layout is None:
        raise UserError(f"the project file is invalid: {project.error}")
    return project.layout


def register(app: FastAPI, studio: Studio) -> None:
    @app.get("/review")
    async def review_home(request: Request) -> Response:
        user = studio.user(request)
        rows = [(p, reviews.reviews(p.layout) if p.layout else []) for p in list_projects(studio.workspace)]
        return studio.render(request, "review_home.html", user, rows=rows)

    @app.post("/p/{slug}/review")
    async def review_start(request: Request, slug: str) -> Response:
        user = studio.staff(request)
        data = await studio.form(request, user)
        project = studio.project(slug)
        layout = _layout(project)
        rc = project.cfg.eval.review if project.cfg else None
        n = int(first(data, "n") or (rc.n_items if rc else 30))
        folder = reviews.start_review(
            layout, n, first(data, "a", "base"), first(data, "b", "tuned"),
            project.cfg.seed if project.cfg else 0, bool(rc and rc.show_reference),
        )  # fmt: skip
        return RedirectResponse(f"/p/{slug}/review/{folder}/results", status_code=303)

    @app.get("/p/{slug}/review/{folder}")
    async def review_form(request: Request, slug: str, folder: str) -> Response:
        user = studio.user(request)
        project = studio.project(slug)
        layout = _layout(project)
        items = reviews.blinded_items(layout, folder)
        mine = reviews.my_choices(layout, folder, user.name)
        return studio.render(
            request, "review.html", user, project=project, folder=folder, items=items, mine=mine, saved=None
        )

    @app.post("/p/{slug}/review/{folder}")
    async def review_save(request: Request, slug: str, folder: str) -> Response:
        user = studio.user(request)
        data = await studio.form(request, user)
        project = studio.project(slug)
        layout = _layout(project)
        items = reviews.blinded_items(layout, folder)
        choices = {
            i["item_id"]: (first(data, f"choice-{i['item_id']}"), first(data, f"comment-{i['item_id']}")) for i in items
        }
        answered = reviews.save_choices(layout, folder, user.name, choices)
        mine = reviews.my_choices(layout, folder, user.name)
        return studio.render(
            request, "review.html", user, project=project, folder=folder, items=items, mine=mine, saved=answered
        )

    @app.get("/p/{slug}/review/{folder}/results")
    async def review_results(request: Request, slug: str, folder: str) -> Response:
        user = studio.staff(request)
        project = studio.project(slug)
        layout = _layout(project)
        info = next((r for r in reviews.reviews(layout) if r["folder"] == folder), None)
        if info is None:
            raise UserError(f"review {folder!r} not found")
        result: dict[str, Any] | None = None
        error = None
        try:
            result = reviews.results(layout, folder)
        except UserError as exc:
            error = str(exc)
        return studio.render(
            request, "review_results.html", user, project=project, info=info, result=result, error=error
        )

    _registry_routes(app, studio)
    _serving_routes(app, studio)
    _feedback_routes(app, studio)


def _registry_routes(app: FastAPI, studio: Studio) -> None:
    @app.get("/p/{slug}/registry")
    async def registry_page(request: Request, slug: str, a: str = "", b: str = "") -> Response:
        user = studio.staff(request)
        project = studio.project(slug)
        view = feedback.registry_view(project, a, b)
        return studio.render(request, "registry.html", user, project=project, **view)

    @app.post("/p/{slug}/registry")
    async def registry_action(request: Request, slug: str) -> Response:
        user = studio.staff(request)
        data = await studio.form(request, user)
        project = studio.project(slug)
        feedback.registry_action(
            project, first(data, "action"), first(data, "version"), first(data, "alias", "production"), user.name
        )
        return RedirectResponse(f"/p/{slug}/registry", status_code=303)


def _serving_routes(app: FastAPI, studio: Studio) -> None:
    @app.get("/p/{slug}/serving")
    async def serving_page(request: Request, slug: str) -> Response:
        user = studio.staff(request)
        project = studio.project(slug)
        view = feedback.serving_view(project)
        return studio.render(request, "serving.html", user, project=project, created=None, **view)

    @app.post("/p/{slug}/serving")
    async def serving_action(request: Request, slug: str) -> Response:
        user = studio.staff(request)
        data = await studio.form(request, user)
        project = studio.project(slug)
        created = None
        if first(data, "action") == "revoke":
            feedback.revoke_key(project, first(data, "key"))
        else:
            created = feedback.create_key(
                project, {k: first(data, k) for k in ("name", "rpm", "tpm", "daily", "models")}
            )
        view = feedback.serving_view(project)
        return studio.render(request, "serving.html", user, project=project, created=created, **view)


def _feedback_routes(app: FastAPI, studio: Studio) -> None:
    @app.get("/p/{slug}/feedback")
    async def feedback_page(request: Request, slug: str) -> Response:
        user = studio.staff(request)
        project = studio.project(slug)
        view = feedback.inbox(project)
        return studio.render(request, "feedback.html", user, project=project, exported=None, **view)

    @app.post("/p/{slug}/feedback")
    async def feedback_action(request: Request, slug: str) -> Response:
        user = studio.staff(request)
        data = await studio.form(request, user)
        project = studio.project(slug)
        action = first(data, "action")
        exported = None
        if action == "approve":
            exported = feedback.approve(project, [i for i in data.get("ids", []) if i])
        elif action == "next-round":
            args = feedback.next_round_args(project, first(data, "parent", "candidate"))
            start_job(project.path, _layout(project), extra=args, user=user.name)
            return RedirectResponse(f"/p/{slug}/runs", status_code=303)
        view = feedback.inbox(project)
        return studio.render(request, "feedback.html", user, project=project, exported=exported, **view)

"""Login, language, the Projects screen and user management."""

from __future__ import annotations

import secrets

from fastapi import FastAPI, Request
from fastapi.responses import RedirectResponse, Response

from domaintune.studio.auth import ROLES
from domaintune.studio.core import LANG_COOKIE, SESSION_COOKIE, Studio, first
from domaintune.studio.i18n import LANGUAGES
from domaintune.studio.workspace import TEMPLATES, create_project, list_projects, run_overview

PRE_CSRF = "dt_studio_login_csrf"


def _safe_next(target: str) -> str:
    return target if target.startswith("/") and not target.startswith("//") else "/"


def register(app: FastAPI, studio: Studio) -> None:
    @app.get("/login")
    async def login_page(request: Request, next: str = "/") -> Response:
        token = secrets.token_urlsafe(16)
        response = studio.render(request, "login.html", None, next=_safe_next(next), csrf=token, error=None)
        response.set_cookie(PRE_CSRF, token, httponly=True, samesite="strict")
        return response

    @app.post("/login")
    async def login(request: Request) -> Response:
        data = await studio.form(request, None)
        target = _safe_next(first(data, "next", "/"))
        pre = request.cookies.get(PRE_CSRF)
        result = None
        if pre and secrets.compare_digest(pre, first(data, "csrf")):
            result = studio.auth.login(first(data, "username").strip(), first(data, "password"))
        if result is None:
            token = secrets.token_urlsafe(16)
            response = studio.render(
                request, "login.html", None, status=401, next=target, csrf=token, error="Wrong user name or password"
            )
            response.set_cookie(PRE_CSRF, token, httponly=True, samesite="strict")
            return response
        session, _user = result
        redirect = RedirectResponse(target, status_code=303)
        redirect.set_cookie(SESSION_COOKIE, session, httponly=True, samesite="lax", max_age=12 * 3600)
        redirect.delete_cookie(PRE_CSRF)
        return redirect

    @app.post("/logout")
    async def logout(request: Request) -> Response:
        user = studio.user(request)
        await studio.form(request, user)
        studio.auth.logout(request.cookies.get(SESSION_COOKIE))
        response = RedirectResponse("/login", status_code=303)
        response.delete_cookie(SESSION_COOKIE)
        return response

    @app.get("/lang/{code}")
    async def set_lang(request: Request, code: str) -> Response:
        back = request.headers.get("referer", "/")
        response = RedirectResponse(back if back.startswith(str(request.base_url)) else "/", status_code=303)
        if code in LANGUAGES:
            response.set_cookie(LANG_COOKIE, code, samesite="lax", max_age=365 * 86400)
        return response

    @app.get("/")
    async def home(request: Request) -> Response:
        user = studio.user(request)
        return RedirectResponse("/projects" if user.is_staff else "/review", status_code=303)

    _project_routes(app, studio)
    _user_routes(app, studio)


def _project_routes(app: FastAPI, studio: Studio) -> None:
    @app.get("/projects")
    async def projects(request: Request) -> Response:
        user = studio.staff(request)
        rows = [(p, run_overview(p)) for p in list_projects(studio.workspace)]
        return studio.render(request, "projects.html", user, rows=rows, templates=list(TEMPLATES))

    @app.post("/projects")
    async def create(request: Request) -> Response:
        user = studio.staff(request)
        data = await studio.form(request, user)
        name = first(data, "name").strip()
        create_project(studio.workspace, name, first(data, "template"))
        return RedirectResponse(f"/p/{name}/data", status_code=303)


def _user_routes(app: FastAPI, studio: Studio) -> None:
    @app.get("/users")
    async def users(request: Request) -> Response:
        user = studio.admin(request)
        return studio.render(request, "users.html", user, users=studio.auth.users(), roles=ROLES, created=None)

    @app.post("/users")
    async def add_user(request: Request) -> Response:
        user = studio.admin(request)
        data = await studio.form(request, user)
        if first(data, "action") == "remove":
            if first(data, "name") != user.name:
                studio.auth.remove_user(first(data, "name"))
            return RedirectResponse("/users", status_code=303)
        name = first(data, "name").strip()
        password = studio.auth.add_user(name, first(data, "role"), first(data, "password") or None)
        return studio.render(
            request, "users.html", user, users=studio.auth.users(), roles=ROLES, created=(name, password)
        )

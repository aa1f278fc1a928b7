"""The studio's FastAPI app: error handling and security headers; screens live in `routes_*`, shared parts in `core`."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles

from domaintune.errors import UserError
from domaintune.studio import routes_annotate, routes_core, routes_data, routes_review, routes_runs
from domaintune.studio.auth import Auth
from domaintune.studio.core import HERE, SESSION_COOKIE, ForbiddenError, RedirectError, Studio, environment


def create_app(workspace: Path, state_dir: Path | None = None, password_iterations: int | None = None) -> FastAPI:
    """The studio over the project YAMLs in `workspace`; users and sessions in `state_dir` (default .studio/)."""
    workspace = Path(workspace).resolve()
    auth = Auth(
        state_dir or workspace / ".studio", **({"iterations": password_iterations} if password_iterations else {})
    )
    studio = Studio(workspace, auth, environment())
    app = FastAPI(title="domaintune studio", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.studio = studio
    app.mount("/static", StaticFiles(directory=HERE / "static"), name="static")
    _error_handlers(app, studio)
    for module in (routes_core, routes_data, routes_runs, routes_review, routes_annotate):
        module.register(app, studio)

    @app.middleware("http")
    async def _headers(request: Request, call_next: Callable) -> Response:
        response = await call_next(request)
        response.headers.setdefault("X-Frame-Options", "DENY")
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        response.headers.setdefault("Referrer-Policy", "same-origin")
        return response

    return app


def _error_handlers(app: FastAPI, studio: Studio) -> None:
    @app.exception_handler(RedirectError)
    async def _redirect(request: Request, exc: RedirectError) -> Response:
        if request.url.path.startswith("/api/"):
            return JSONResponse({"error": "login required"}, status_code=401)
        return RedirectResponse(exc.url, status_code=303)

    @app.exception_handler(ForbiddenError)
    async def _forbidden(request: Request, exc: ForbiddenError) -> Response:
        if request.url.path.startswith("/api/"):
            return JSONResponse({"error": "forbidden"}, status_code=403)
        user = studio.auth.session_user(request.cookies.get(SESSION_COOKIE))
        return studio.render(request, "error.html", user, status=403, message="forbidden")

    @app.exception_handler(UserError)
    async def _user_error(request: Request, exc: UserError) -> Response:
        if request.url.path.startswith("/api/"):
            return JSONResponse({"error": str(exc)}, status_code=400)
        user = studio.auth.session_user(request.cookies.get(SESSION_COOKIE))
        return studio.render(request, "error.html", user, status=400, message=str(exc))

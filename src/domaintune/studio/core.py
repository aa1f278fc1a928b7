"""What every studio screen shares: the `Studio` context (workspace, users, templates), login and role checks,
CSRF-checked form parsing and page rendering."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote

from fastapi import Request
from fastapi.responses import HTMLResponse
from jinja2 import Environment, FileSystemLoader, select_autoescape

from domaintune.errors import UserError
from domaintune.studio.auth import Auth, User, csrf_ok
from domaintune.studio.i18n import LANGUAGES, translator
from domaintune.studio.workspace import Project, open_project

HERE = Path(__file__).parent
SESSION_COOKIE = "dt_studio_session"
LANG_COOKIE = "dt_studio_lang"
MAX_BODY = 200 * 1024 * 1024


class RedirectError(Exception):
    def __init__(self, url: str):
        self.url = url


class ForbiddenError(Exception):
    pass


@dataclass
class Studio:
    workspace: Path
    auth: Auth
    env: Environment

    def user(self, request: Request) -> User:
        user = self.auth.session_user(request.cookies.get(SESSION_COOKIE))
        if user is None:
            raise RedirectError("/login?next=" + quote(request.url.path))
        return user

    def staff(self, request: Request) -> User:
        user = self.user(request)
        if not user.is_staff:
            raise ForbiddenError()
        return user

    def admin(self, request: Request) -> User:
        user = self.user(request)
        if user.role != "admin":
            raise ForbiddenError()
        return user

    def project(self, slug: str) -> Project:
        return open_project(self.workspace, slug)

    async def form(self, request: Request, user: User | None) -> dict[str, list[str]]:
        """The urlencoded body (CSRF-checked for a logged-in user)."""
        body = await request.body()
        if len(body) > MAX_BODY:
            raise UserError("request too large")
        data = parse_qs(body.decode("utf-8", "replace"), keep_blank_values=True)
        if user is not None and not csrf_ok(user, (data.get("csrf") or [""])[0]):
            raise ForbiddenError()
        return data

    def check_csrf_header(self, request: Request, user: User) -> None:
        if not csrf_ok(user, request.headers.get("x-csrf-token")):
            raise ForbiddenError()

    def lang(self, request: Request) -> str:
        lang = request.cookies.get(LANG_COOKIE, "en")
        return lang if lang in LANGUAGES else "en"

    def render(self, request: Request, name: str, user: User | None, status: int = 200, **ctx: Any) -> HTMLResponse:
        lang = self.lang(request)
        html = self.env.get_template(name).render(
            t=translator(lang), lang=lang, user=user, path=request.url.path, request=request, **ctx
        )
        return HTMLResponse(html, status_code=status)


def first(data: dict[str, list[str]], key: str, default: str = "") -> str:
    return (data.get(key) or [default])[0]


def environment() -> Environment:
    env = Environment(loader=FileSystemLoader(HERE / "templates"), autoescape=select_autoescape(["html"]))
    env.filters["tojson_pretty"] = lambda v: json.dumps(v, ensure_ascii=False, indent=2, default=str)
    env.filters["num"] = _num
    return env


def _num(value: Any, digits: int = 4) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, (int, float)):
        return f"{value:.{digits}g}" if abs(value) < 10**digits else f"{value:,.0f}"
    return str(value)

"""Studio without a browser: login, CSRF, roles, hashing at rest, translations, config form, jobs on disk."""

from __future__ import annotations

import json
import re
import sqlite3
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from domaintune.studio.app import create_app
from domaintune.studio.i18n import DYNAMIC, ZH
from domaintune.studio.jobs import jobs_dir, list_jobs
from domaintune.studio.workspace import create_project, open_project

FORM = {"content-type": "application/x-www-form-urlencoded"}


def _client(tmp_path: Path) -> tuple[TestClient, object]:
    app = create_app(tmp_path, password_iterations=1000)
    app.state.studio.auth.add_user("boss", "admin", "boss-password")
    app.state.studio.auth.add_user("rita", "reviewer", "rita-password")
    return TestClient(app), app


def _login(client: TestClient, name: str, password: str) -> str:
    token = re.search(r'name="csrf" value="([^"]+)"', client.get("/login").text).group(1)
    r = client.post(
        "/login",
        content=f"csrf={token}&username={name}&password={password}&next=/",
        headers=FORM,
        follow_redirects=False,
    )
    assert r.status_code == 303, r.text
    page = client.get("/review").text
    return re.search(r'meta name="csrf" content="([^"]+)"', page).group(1)


def test_nothing_without_login_and_wrong_password_fails(tmp_path):
    client, _ = _client(tmp_path)
    assert client.get("/projects", follow_redirects=False).headers["location"].startswith("/login")
    assert client.get("/api/p/x/jobs/y").status_code == 401
    token = re.search(r'name="csrf" value="([^"]+)"', client.get("/login").text).group(1)
    r = client.post("/login", content=f"csrf={token}&username=boss&password=nope", headers=FORM)
    assert r.status_code == 401


def test_passwords_and_sessions_are_hashed_at_rest(tmp_path):
    client, _ = _client(tmp_path)
    _login(client, "boss", "boss-password")
    raw = (tmp_path / ".studio" / "studio.db").read_bytes()
    assert b"boss-password" not in raw
    cookie = client.cookies.get("dt_studio_session")
    db = sqlite3.connect(tmp_path / ".studio" / "studio.db")
    assert cookie and not db.execute("select 1 from sessions where token_hash = ?", (cookie,)).fetchone()


def test_csrf_is_required_on_forms(tmp_path):
    client, _ = _client(tmp_path)
    csrf = _login(client, "boss", "boss-password")
    assert client.post("/projects", content="name=a&template=medical", headers=FORM).status_code == 403
    r = client.post("/projects", content=f"csrf={csrf}&name=a&template=medical", headers=FORM, follow_redirects=False)
    assert r.status_code == 303
    assert client.post("/api/p/a/upload?filename=x.csv", content=b"a,b\n1,2\n").status_code == 403


def test_reviewers_see_only_review_and_arena(tmp_path):
    client, _ = _client(tmp_path)
    create_project(tmp_path, "clinic", "legal")
    _login(client, "rita", "rita-password")
    for path in ("/projects", "/users", "/p/clinic/data", "/p/clinic/config", "/p/clinic/runs", "/p/clinic/serving"):
        assert client.get(path).status_code == 403, path
    assert client.get("/review").status_code == 200
    assert client.get("/p/clinic/arena").status_code == 200


def test_every_label_has_a_chinese_translation():
    templates = Path(__file__).parents[2] / "src" / "domaintune" / "studio" / "templates"
    keys = set(DYNAMIC)
    for path in templates.glob("*.html"):
        keys |= set(re.findall(r"""\bt\(["']([^"']+)["']\)""", path.read_text(encoding="utf-8")))
    missing = sorted(k for k in keys if k not in ZH)
    assert not missing, missing


def test_config_form_shows_validate_messages_and_keeps_the_yaml(tmp_path):
    client, _ = _client(tmp_path)
    create_project(tmp_path, "clinic", "finance")
    csrf = _login(client, "boss", "boss-password")
    r = client.post("/p/clinic/config", content=f"csrf={csrf}&mode=form&seed=abc", headers=FORM)
    assert "seed" in r.text and "Input should be a valid integer" in r.text
    r = client.post("/p/clinic/config", content=f"csrf={csrf}&mode=form&train.epochs=2", headers=FORM)
    assert 'id="saved"' in r.text
    assert open_project(tmp_path, "clinic").cfg.train.epochs == 2


def test_jobs_are_found_on_disk_after_a_restart(tmp_path):
    create_project(tmp_path, "clinic", "medical")
    layout = open_project(tmp_path, "clinic").layout
    folder = jobs_dir(layout)
    folder.mkdir(parents=True)
    (folder / "1.json").write_text(json.dumps({"id": "1", "pid": 999_999_999, "args": ["run"], "started": 0}))
    (folder / "1.rc").write_text("0\n")
    (folder / "2.json").write_text(json.dumps({"id": "2", "pid": 999_999_999, "args": ["run"], "started": 1}))
    states = {j["id"]: j["state"] for j in list_jobs(layout)}
    assert states == {"1": "succeeded", "2": "lost"}


@pytest.mark.parametrize("name", ["../evil", "a/b", ""])
def test_project_names_cannot_escape_the_workspace(tmp_path, name):
    from domaintune.errors import UserError

    with pytest.raises(UserError):
        create_project(tmp_path, name, "medical")

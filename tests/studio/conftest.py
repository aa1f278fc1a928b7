"""A real studio server on a free port (uvicorn in a thread) and Debian's Chromium through Playwright."""

from __future__ import annotations

import os
import shutil
import socket
import threading
import time
from pathlib import Path

import pytest

CHROMIUM_CANDIDATES = ("chromium", "chromium-browser", "google-chrome")


def chromium_path() -> str | None:
    explicit = os.environ.get("DOMAINTUNE_CHROMIUM")
    if explicit and Path(explicit).is_file():
        return explicit
    return next((p for p in map(shutil.which, CHROMIUM_CANDIDATES) if p), None)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def studio_server(tmp_path):
    """(base URL, app) of a studio over an empty workspace; users: boss (admin)."""
    import uvicorn

    from domaintune.studio.app import create_app

    workspace = tmp_path / "workspace"
    workspace.mkdir()
    app = create_app(workspace, password_iterations=1000)
    app.state.studio.auth.add_user("boss", "admin", "boss-password")
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started and time.time() < deadline:
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}", app, workspace
    server.should_exit = True
    thread.join(timeout=10)


@pytest.fixture
def browser():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("playwright is not installed (pip install playwright==1.65.2)")
    path = chromium_path()
    if path is None:
        pytest.skip("no Chromium found (apt-get install chromium, or set DOMAINTUNE_CHROMIUM)")
    with sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=path, args=["--no-sandbox", "--disable-gpu"])
        try:
            yield chromium
        finally:
            chromium.close()

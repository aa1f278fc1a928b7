"""Running the API: in the foreground (`domaintune serve`) or in a background thread (tests, bench)."""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

import uvicorn

from domaintune.serve.app import create_app
from domaintune.serve.observability import configure_json_logging
from domaintune.serve.state import ServeState, build_state


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def run_server(
    cfg,
    output_dir: Path | None = None,
    host: str | None = None,
    port: int | None = None,
    engine: str | None = None,
    log_level: str = "info",
) -> None:
    """Load the models, then serve until interrupted (JSON logs on stderr)."""
    configure_json_logging(log_level.upper())
    state = build_state(cfg, output_dir, engine)
    app = create_app(state)
    config = uvicorn.Config(
        app,
        host=host or cfg.serve.host,
        port=port if port is not None else cfg.serve.port,
        log_level=log_level,
        access_log=False,
        log_config=None,
    )
    try:
        uvicorn.Server(config).run()
    finally:
        state.close()


class BackgroundServer:
    """A real uvicorn server on 127.0.0.1:<free port> in a daemon thread."""

    def __init__(self, state: ServeState, host: str = "127.0.0.1", port: int | None = None):
        self.state = state
        self.app = create_app(state)
        self.host = host
        self.port = port or free_port(host)
        config = uvicorn.Config(
            self.app,
            host=host,
            port=self.port,
            log_level="warning",
            access_log=False,
            log_config=None,
            timeout_graceful_shutdown=5,
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name="domaintune-uvicorn", daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def __enter__(self) -> BackgroundServer:
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if not self.thread.is_alive():
                raise RuntimeError("the server thread died during start-up")
            if time.monotonic() > deadline:
                raise RuntimeError("the server did not start within 60 s")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=15)
        self.state.close()

"""`domaintune studio`: the browser UI over the project YAMLs of a folder."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from domaintune.cli.common import console, friendly_errors


def register(app: typer.Typer) -> None:
    @app.command("studio")
    @friendly_errors
    def studio(
        workspace: Annotated[
            Path, typer.Option("--workspace", help="Folder with the project YAMLs (and the studio's .studio/ state).")
        ] = Path("."),
        host: Annotated[
            str, typer.Option("--host", help="Bind address; 127.0.0.1 keeps it on this machine.")
        ] = "127.0.0.1",
        port: Annotated[int, typer.Option("--port", help="Port.")] = 7860,
        add_user: Annotated[
            str | None, typer.Option("--add-user", help="Create (or reset) this user, print a one-time password, exit.")
        ] = None,
        role: Annotated[
            str, typer.Option("--role", help="Role of --add-user: admin | engineer | reviewer.")
        ] = "reviewer",
    ) -> None:
        """Serve the studio: projects, data, config, runs, eval, arena, blind review, registry, serving, feedback.

        Example: domaintune studio --workspace examples --port 7860
        Example: domaintune studio --workspace examples --add-user alice --role reviewer
        """
        from domaintune.studio.auth import Auth

        workspace = workspace.resolve()
        auth = Auth(workspace / ".studio")
        if add_user:
            password = auth.add_user(add_user, role)
            console.print(f"user {add_user} ({role}); password (shown once):", highlight=False)
            typer.echo(password)
            return
        if not auth.users():
            password = auth.add_user("admin", "admin")
            console.print("first start: created user admin; password (shown once):", highlight=False)
            typer.echo(password)
        import uvicorn

        from domaintune.studio.app import create_app

        if host not in ("127.0.0.1", "localhost", "::1"):
            console.print(f"[yellow]warning:[/] listening on {host}: put it behind HTTPS", highlight=False)
        console.print(f"studio: http://{host}:{port}/  (workspace {workspace})", highlight=False)
        uvicorn.run(create_app(workspace), host=host, port=port, log_level="warning")

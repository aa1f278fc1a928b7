"""domaintune studio: the whole loop in a browser (projects, data, config, runs, eval, arena, review,
registry, serving, feedback), server-rendered on FastAPI over the same run folders, registry and stores
the CLI uses. `create_app(workspace)` builds the app; `domaintune studio` serves it."""

from __future__ import annotations

__all__ = ["create_app"]


def __getattr__(name: str):
    if name == "create_app":
        from domaintune.studio.app import create_app

        return create_app
    raise AttributeError(name)

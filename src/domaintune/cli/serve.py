"""Commands of the serve stage: `serve`, `keys create|list|revoke`, `feedback export`."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from domaintune.cli.common import ConfigArg, OutputDirOpt, SetOpt, friendly_errors, load
from domaintune.errors import UserError

if TYPE_CHECKING:
    from domaintune.serve.store import ApiKey, Store


OptionalConfigArg = Annotated[
    Path | None,
    typer.Argument(help="Project YAML (its serve.store_url / output_dir locate the key store).", show_default=False),
]
StoreOpt = Annotated[
    str | None,
    typer.Option(
        "--store", help="SQLAlchemy URL of the store (instead of a project file; or $DOMAINTUNE_SERVE_STORE)."
    ),
]
ENGINES = ("auto", "transformers", "vllm")


def _out() -> Console:
    """The console for results: piped or captured output keeps a fixed width, so tables do not wrap."""
    return Console(width=None if sys.stdout.isatty() else 160)


def register(app: typer.Typer) -> None:
    app.command("serve")(friendly_errors(serve))
    keys_app = typer.Typer(help="API keys of the server: create, list, revoke.", no_args_is_help=True)
    keys_app.command("create")(friendly_errors(keys_create))
    keys_app.command("list")(friendly_errors(keys_list))
    keys_app.command("revoke")(friendly_errors(keys_revoke))
    app.add_typer(keys_app, name="keys")
    feedback_app = typer.Typer(help="The feedback loop: export logged feedback as training data.", no_args_is_help=True)
    feedback_app.command("export")(friendly_errors(feedback_export))
    app.add_typer(feedback_app, name="feedback")


def _open_store(config: Path | None, store_url: str | None, set_: list[str] | None, output_dir: Path | None) -> Store:
    from domaintune.serve.store import Store, default_store_url

    url = store_url or os.environ.get("DOMAINTUNE_SERVE_STORE")
    iterations = 100_000
    if url is None:
        if config is None:
            raise UserError("give the project file (keys create CONFIG ...) or --store URL to find the key store")
        cfg = load(config, set_, output_dir)
        url = cfg.serve.store_url or default_store_url(cfg.layout.root)
        iterations = cfg.serve.key_hash_iterations
    return Store(url, key_hash_iterations=iterations)


def serve(
    config: ConfigArg,
    set_: SetOpt = None,
    output_dir: OutputDirOpt = None,
    host: Annotated[str | None, typer.Option(help="Bind address (default serve.host).")] = None,
    port: Annotated[int | None, typer.Option(help="Port (default serve.port).")] = None,
    engine: Annotated[str | None, typer.Option(help="auto | transformers | vllm (default serve.engine).")] = None,
    log_level: Annotated[str, typer.Option(help="debug | info | warning.")] = "info",
) -> None:
    """Serve the base model, adapters and registry versions over an OpenAI-compatible API.

    Example: domaintune serve examples/medical-zh.yaml --port 8000
    """
    from domaintune.serve.server import run_server

    cfg = load(config, set_, output_dir)
    if engine is not None and engine not in ENGINES:
        raise UserError(f"--engine {engine!r}: use auto, transformers or vllm")
    run_server(cfg, output_dir, host, port, engine, log_level)


def keys_create(
    config: OptionalConfigArg = None,
    *,
    name: Annotated[str, typer.Option("--name", help="Who the key is for.")],
    rpm: Annotated[int | None, typer.Option("--rpm", help="Requests per minute.")] = None,
    tpm: Annotated[int | None, typer.Option("--tpm", help="Tokens (prompt + completion) per minute.")] = None,
    daily_tokens: Annotated[int | None, typer.Option("--daily-tokens", help="Tokens per UTC day.")] = None,
    models: Annotated[str | None, typer.Option("--models", help="Comma-separated models it may use.")] = None,
    admin: Annotated[bool, typer.Option("--admin", help="May call /admin endpoints (and use every model).")] = False,
    store: StoreOpt = None,
    set_: SetOpt = None,
    output_dir: OutputDirOpt = None,
) -> None:
    """Create an API key; the key is printed once and only its salted hash is stored.

    Example: domaintune keys create examples/medical-zh.yaml --name alice --rpm 60 --daily-tokens 200000
    """
    st = _open_store(config, store, set_, output_dir)
    allowed = [m.strip() for m in models.split(",") if m.strip()] if models else None
    key, plaintext = st.create_key(name, rpm=rpm, tpm=tpm, daily_tokens=daily_tokens, models=allowed, is_admin=admin)
    Console(stderr=True).print(
        f"[green]created key[/] {key.id} for {key.name!r}"
        f"{' (admin)' if key.is_admin else ''}; store it now, it is not shown again:"
    )
    typer.echo(plaintext)


def keys_list(
    config: OptionalConfigArg = None,
    store: StoreOpt = None,
    set_: SetOpt = None,
    output_dir: OutputDirOpt = None,
) -> None:
    """List keys (ids, names, limits, state); secrets are never shown.

    Example: domaintune keys list examples/medical-zh.yaml
    """
    st = _open_store(config, store, set_, output_dir)
    table = Table("id", "name", "admin", "rpm", "tpm", "daily tokens", "used today", "models", "created", "state")
    for key in st.list_keys():
        table.add_row(*_key_row(key, st.tokens_used_today(key.id)))
    _out().print(table)


def _key_row(key: ApiKey, used_today: int) -> list[str]:
    return [
        key.id,
        key.name,
        "yes" if key.is_admin else "",
        str(key.rpm or "-"),
        str(key.tpm or "-"),
        str(key.daily_tokens or "-"),
        str(used_today),
        ",".join(key.models) if key.models else "all",
        key.created_at.strftime("%Y-%m-%d %H:%M"),
        "revoked" if key.revoked_at else "active",
    ]


def keys_revoke(
    config: OptionalConfigArg = None,
    *,
    key: Annotated[str, typer.Option("--key", help="Key id (the 8 hex after `dt-`) or key name.")],
    store: StoreOpt = None,
    set_: SetOpt = None,
    output_dir: OutputDirOpt = None,
) -> None:
    """Revoke a key (by id, or every active key with that name); takes effect on the next request.

    Example: domaintune keys revoke examples/medical-zh.yaml --key alice
    """
    st = _open_store(config, store, set_, output_dir)
    for revoked in st.revoke_key(key):
        _out().print(f"revoked {revoked.id} ({revoked.name})")


def feedback_export(
    config: ConfigArg,
    set_: SetOpt = None,
    output_dir: OutputDirOpt = None,
    out_dir: Annotated[Path | None, typer.Option("--out", help="Folder (default serve.feedback_dir).")] = None,
) -> None:
    """Write corrected answers as SFT rows and (correction, original) pairs as DPO rows, deduplicated.

    Example: domaintune feedback export examples/medical-zh.yaml
    """
    from domaintune.serve.feedback import export_feedback

    cfg = load(config, set_, output_dir)
    _out().print(_export_table(export_feedback(cfg, output_dir, out_dir)))


def _export_table(report: dict[str, Any]) -> Table:
    dropped = report["dropped"]
    table = Table("item", "value")
    table.add_row("feedback rows", str(report["feedback_rows"]))
    table.add_row("ratings +/-", f"{report['ratings']['positive']} / {report['ratings']['negative']}")
    table.add_row("SFT rows", str(report["sft_rows"]))
    table.add_row("preference rows", str(report["preference_rows"]))
    table.add_row(
        "dropped (exact / near / unchanged)", f"{dropped['exact']} / {dropped['near']} / {dropped['same_as_original']}"
    )
    table.add_row("compared with", str(report["deduplicated_against"] or "(no data/train.jsonl)"))
    table.add_row("written to", str(Path(report["files"]["sft"]).parent))
    return table

"""Commands of the registry stage: `domaintune registry register|list|show|diff|promote|rollback|archive|...`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.table import Table

from domaintune.cli.common import ConfigArg, OutputDirOpt, SetOpt, friendly_errors, load, result_console
from domaintune.errors import UserError
from domaintune.registry.training_record import describe as describe_training

if TYPE_CHECKING:
    from domaintune.registry.store import ModelRegistry

out = result_console()

registry_app = typer.Typer(
    help="Versioned models: register, list, show, diff, promote, roll back, archive.", no_args_is_help=True
)

ConfigOpt = Annotated[
    Path | None, typer.Option("--config", "-c", help="Project YAML (gives registry.url, store and name).")
]
UrlOpt = Annotated[str | None, typer.Option("--url", help="SQLAlchemy URL of the registry (instead of --config).")]
NameOpt = Annotated[
    str | None, typer.Option("--name", help="Registered model name (default: registry.name or project name).")
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]


def _open(config: Path | None, url: str | None, name: str | None) -> tuple[ModelRegistry, str]:
    """The registry and the one model a command is about (the only one in a registry given by URL alone)."""
    registry, model = _open_registry(config, url, name)
    if model is None:
        names = registry.names()
        if len(names) != 1:
            raise UserError(f"--name is needed: the registry holds {len(names)} models ({', '.join(names) or 'none'})")
        model = names[0]
    return registry, model


def _open_registry(config: Path | None, url: str | None, name: str | None) -> tuple[ModelRegistry, str | None]:
    """The registry (from the project file or a URL) and the model name given or configured, if any."""
    from domaintune.registry import ModelRegistry, registry_from_config

    if config is not None:
        cfg = load(config, None, None)
        registry = ModelRegistry(url) if url else registry_from_config(cfg)
        return registry, name or cfg.registry.name or cfg.name
    if url is None:
        raise UserError("give the project file (--config examples/x.yaml) or the registry URL (--url sqlite:///...)")
    return ModelRegistry(url), name


def _print_json(data: Any) -> None:
    out.print_json(json.dumps(data, ensure_ascii=False, default=str))


def _metric_summary(metrics: dict[str, Any]) -> str:
    gates = metrics.get("gates") or {}
    parts = []
    if "passed" in gates:
        parts.append("gates passed" if gates["passed"] else f"gates failed ({len(gates.get('failures', []))})")
    primary = metrics.get("primary_metric")
    tuned = ((metrics.get("eval") or {}).get("test") or {}).get("tuned") or {}
    if primary and isinstance(tuned.get(primary), (int, float)):
        parts.append(f"{primary} {tuned[primary]:.2f}")
    train = metrics.get("train") or {}
    if train.get("final_val_loss") is not None:
        parts.append(f"val loss {train['final_val_loss']:.3f}")
    for key, value in metrics.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            parts.append(f"{key} {value:.4g}")
    return ", ".join(parts[:4])


def register(app: typer.Typer) -> None:
    """Adds the registry stage's commands to the root app."""
    app.add_typer(registry_app, name="registry")


@registry_app.command("register")
@friendly_errors
def register_cmd(
    config: ConfigArg,
    set_: SetOpt = None,
    output_dir: OutputDirOpt = None,
    bump: Annotated[str, typer.Option("--bump", help="major | minor | patch")] = "patch",
    status: Annotated[
        str | None,
        typer.Option("--status", help="registered | candidate | rejected | archived (default: from the eval gates)"),
    ] = None,
    reason: Annotated[list[str] | None, typer.Option("--reason", help="Reason recorded with the status.")] = None,
    parent: Annotated[str | None, typer.Option("--parent", help="Parent version (default: the latest).")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Register the run folder as a new version, copying its artefacts into the store with sha256 checksums.

    Example: domaintune registry register examples/medical-zh.yaml --bump minor
    """
    from domaintune.registry import register_run, registry_from_config

    cfg = load(config, set_, output_dir)
    version = register_run(cfg, cfg.layout, bump=bump, status=status, reasons=reason, parent=parent)
    info = registry_from_config(cfg).show(cfg.registry.name or cfg.name, version)
    if as_json:
        _print_json(info)
        return
    out.print(
        f"registered [bold]{info['name']}@{version}[/] status={info['status']}"
        + (f" ({'; '.join(info['reasons'])})" if info["reasons"] else "")
    )
    out.print(f"{len(info['artifacts'])} files in {info['store_path']}")


@registry_app.command("list")
@friendly_errors
def list_cmd(
    config: ConfigOpt = None,
    url: UrlOpt = None,
    name: NameOpt = None,
    as_json: JsonOpt = False,
    all_names: Annotated[bool, typer.Option("--all", help="Every model in the registry.")] = False,
) -> None:
    """List registered versions with status, aliases and headline metrics.

    Example: domaintune registry list -c examples/medical-zh.yaml
    """
    registry, model = _open_registry(config, url, name)
    rows = registry.list(None if all_names else model)
    if as_json:
        _print_json(rows)
        return
    table = Table(title=f"registry {registry.url}")
    for col in ("name", "version", "parent", "status", "aliases", "created", "metrics", "last event"):
        table.add_column(col)
    for row in rows:
        status = row["status"] + (f" ({'; '.join(row['reasons'])[:40]})" if row["reasons"] else "")
        notable = [e for e in row["events"] if e["kind"] != "registered"]
        table.add_row(
            row["name"],
            row["version"],
            _semver(row["parent"]),
            status,
            ", ".join(row["aliases"]),
            row["created_at"],
            _metric_summary(row["metrics"]),
            notable[-1]["kind"] if notable else "",
        )
    out.print(table)
    _print_events(rows)


def _print_events(rows: list[dict[str, Any]]) -> None:
    """Every promotion, rollback, canary decision and round, one line each, oldest first."""
    events = sorted(
        ((e["at"], row["name"], row["version"], e) for row in rows for e in row["events"] if e["kind"] != "registered"),
        key=lambda item: item[0],
    )
    if events:
        out.print("events:")
    for at, name, version, event in events:
        out.print(f"  {at} {name}@{_semver(version)} {_event_summary(event)}", highlight=False, soft_wrap=True)


def _semver(version: str | None) -> str:
    """`v0.0.2` of `v0.0.2_<data hash>_<time>`, `-` for none."""
    return version.split("_")[0] if version else "-"


def _event_summary(event: dict[str, Any]) -> str:
    """One event in a few words: what happened, to which alias, and why."""
    kind, d = event["kind"], event.get("details") or {}
    if kind == "promoted":
        return f"promoted to {d.get('alias')}"
    if kind == "rolled_back":
        return f"rolled back from {d.get('alias')} to {_semver(d.get('to'))}"
    if kind == "round":
        return f"round from {_semver(d.get('parent'))}: {d.get('feedback_rows', 0)} feedback rows"
    if kind == "canary_candidate":
        return f"canary candidate ({d.get('alias')}) against {d.get('stable')}, {d.get('share', 0):.0%} of users"
    if kind.startswith("canary_"):
        return f"{kind.replace('_', ' ')}: {str(d.get('reason', ''))[:80]}"
    return kind


@registry_app.command("show")
@friendly_errors
def show_cmd(
    version: Annotated[str, typer.Argument(help="Version, vX.Y.Z prefix, alias or `latest`.")],
    config: ConfigOpt = None,
    url: UrlOpt = None,
    name: NameOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Show one version: metadata, lineage, artefacts with checksums, aliases and events.

    Example: domaintune registry show production -c examples/medical-zh.yaml --json
    """
    registry, model = _open(config, url, name)
    info = registry.show(model, version)
    if as_json:
        _print_json(info)
        return
    _print_version(info)


@registry_app.command("diff")
@friendly_errors
def diff_cmd(
    v1: Annotated[str, typer.Argument(help="First version (or alias).")],
    v2: Annotated[str, typer.Argument(help="Second version (or alias).")],
    config: ConfigOpt = None,
    url: UrlOpt = None,
    name: NameOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Config, data and metric differences between two versions.

    Example: domaintune registry diff v0.1.0 production -c examples/medical-zh.yaml
    """
    registry, model = _open(config, url, name)
    result = registry.diff(model, v1, v2)
    if as_json:
        _print_json(result)
        return
    _print_diff(result)


@registry_app.command("promote")
@friendly_errors
def promote_cmd(
    version: Annotated[str, typer.Argument(help="Version (or vX.Y.Z prefix) to promote.")],
    alias: Annotated[str, typer.Option("--alias", help="production, candidate, staging, ...")] = "production",
    force: Annotated[bool, typer.Option("--force", help="Allow a rejected/archived version.")] = False,
    note: Annotated[str | None, typer.Option("--note", help="Recorded in the alias history.")] = None,
    config: ConfigOpt = None,
    url: UrlOpt = None,
    name: NameOpt = None,
) -> None:
    """Point an alias at a version (the previous holder is kept for `rollback`).

    Example: domaintune registry promote v0.0.2 --alias production -c examples/medical-zh.yaml
    """
    registry, model = _open(config, url, name)
    before = registry.aliases(model).get(alias)
    full = registry.promote(model, version, alias=alias, force=force, note=note)
    out.print(f"{model}@{alias}: {before or '(unset)'} -> [bold]{full}[/]")


@registry_app.command("rollback")
@friendly_errors
def rollback_cmd(
    alias: Annotated[str, typer.Argument(help="Alias to move back to its previous holder.")],
    note: Annotated[str | None, typer.Option("--note", help="Recorded in the alias history.")] = None,
    config: ConfigOpt = None,
    url: UrlOpt = None,
    name: NameOpt = None,
) -> None:
    """Move an alias back to the version that held it before (alias history is kept).

    Example: domaintune registry rollback production -c examples/medical-zh.yaml
    """
    registry, model = _open(config, url, name)
    old, new = registry.rollback(model, alias, note=note)
    out.print(f"{model}@{alias}: {old} -> [bold]{new}[/] (rolled back)")


@registry_app.command("archive")
@friendly_errors
def archive_cmd(
    version: Annotated[str, typer.Argument(help="Version to archive.")],
    reason: Annotated[str | None, typer.Option("--reason", help="Why (recorded).")] = None,
    config: ConfigOpt = None,
    url: UrlOpt = None,
    name: NameOpt = None,
) -> None:
    """Mark a version archived (kept, but never promoted again without --force).

    Example: domaintune registry archive v0.0.1 --reason "superseded" -c examples/medical-zh.yaml
    """
    registry, model = _open(config, url, name)
    full = registry.archive(model, version, reason=reason)
    out.print(f"{model}@{full}: archived")


@registry_app.command("aliases")
@friendly_errors
def aliases_cmd(config: ConfigOpt = None, url: UrlOpt = None, name: NameOpt = None, as_json: JsonOpt = False) -> None:
    """Current aliases and their full promote/rollback history.

    Example: domaintune registry aliases -c examples/medical-zh.yaml
    """
    registry, model = _open(config, url, name)
    current, history = registry.aliases(model), registry.alias_history(model)
    if as_json:
        _print_json({"aliases": current, "history": history})
        return
    for alias, version in sorted(current.items()):
        out.print(f"{alias:12} -> {version}")
    table = Table(title="alias history")
    for col in ("at", "alias", "action", "from", "to", "note"):
        table.add_column(col)
    for h in history:
        table.add_row(h["at"], h["alias"], h["action"], h["previous"] or "-", h["version"], h["note"] or "")
    out.print(table)


@registry_app.command("verify")
@friendly_errors
def verify_cmd(
    version: Annotated[str, typer.Argument(help="Version or alias to check.")],
    config: ConfigOpt = None,
    url: UrlOpt = None,
    name: NameOpt = None,
) -> None:
    """Recompute the sha256 of every stored file of a version; exit 1 if any differ.

    Example: domaintune registry verify production -c examples/medical-zh.yaml
    """
    registry, model = _open(config, url, name)
    problems = registry.verify(model, version)
    if problems:
        for p in problems:
            out.print(f"[red]tampered:[/] {p}")
        raise typer.Exit(1)
    out.print(f"{model}@{version}: all files match their recorded sha256")


# ---------------------------------------------------------------------- printing


def _print_version(info: dict[str, Any]) -> None:
    """One version as text: status and aliases, lineage, hyperparameters, metrics, artefacts, events."""
    meta = info["metadata"] or {}
    out.print(
        f"[bold]{info['name']}@{info['version']}[/]  status={info['status']}  "
        f"aliases={', '.join(info['aliases']) or '-'}"
    )
    if info["reasons"]:
        out.print(f"reasons: {'; '.join(info['reasons'])}")
    lineage = meta.get("lineage", {})
    data = meta.get("data", {})
    for label, value in [
        ("created", info["created_at"]),
        ("parent", info["parent"]),
        ("data kept", data.get("kept")),
        ("data sha256", {k: v[:12] for k, v in (data.get("files") or {}).items()}),
        ("base model", meta.get("base_model")),
        ("method", meta.get("method")),
        *describe_training(meta.get("training")),
        ("data fingerprint", data.get("fingerprint")),
        ("data rows", data.get("rows")),
        ("run folder", meta.get("run_dir")),
        ("train run", (lineage.get("train_run") or {}).get("path")),
        ("eval report sha256", (lineage.get("eval_run") or {}).get("report_sha256")),
        ("libraries", meta.get("libraries")),
        ("store", info["store_path"]),
    ]:
        out.print(f"  {label:20} {value}", highlight=False)
    hp = meta.get("hyperparameters") or {}
    if hp:
        out.print(
            "  hyperparameters      "
            + ", ".join(f"{k}={v}" for k, v in list(hp.items())[:12] if not isinstance(v, (dict, list))),
            highlight=False,
        )
    for item in lineage.get("merged") or []:
        out.print(
            f"  merged               {item.get('role', 'input')}: {item.get('rows')} rows sha256 "
            f"{str(item.get('sha256'))[:12]} from {item.get('from') or item.get('path')}",
            highlight=False,
        )
    _print_round(meta.get("round"))
    _print_metrics(meta.get("metrics", {}))
    out.print(
        f"  artefacts: {len(info['artifacts'])} files, "
        f"{sum(f['bytes'] for f in info['artifacts']) / 1e6:,.1f} MB (sha256 recorded)"
    )
    for event in info["events"]:
        out.print(f"  event {event['at']} {_event_summary(event)}", highlight=False, soft_wrap=True)
        out.print(f"        {json.dumps(event['details'], ensure_ascii=False, default=str)}", highlight=False)


def _print_round(round_meta: dict[str, Any] | None) -> None:
    """A round's window, what it took from feedback, and the child-vs-parent comparison."""
    if not round_meta:
        return
    window = round_meta.get("window") or {}
    feedback = round_meta.get("feedback") or {}
    out.print(
        f"  round                from {window.get('start') or 'the start'} to {window.get('end')}: "
        f"{feedback.get('train_rows', 0)} feedback rows trained, {feedback.get('holdout_rows', 0)} held out, "
        f"{feedback.get('dropped_total', 0)} dropped",
        highlight=False,
    )
    for set_name, comparison in (round_meta.get("comparison") or {}).items():
        primary = comparison.get("primary") or {}
        if primary:
            out.print(
                f"  child vs parent      {set_name}: {primary.get('metric')} {primary.get('parent', 0):.2f} -> "
                f"{primary.get('child', 0):.2f} (delta {primary.get('delta', 0):+.2f}, 95% CI "
                f"[{primary.get('ci_low', float('nan')):+.2f}, {primary.get('ci_high', float('nan')):+.2f}])",
                highlight=False,
            )


def _print_metrics(metrics: dict[str, Any]) -> None:
    from domaintune.registry.store import flatten_keys

    flat = {k: v for k, v in flatten_keys(metrics).items() if isinstance(v, (int, float))}
    if flat:
        table = Table(title="metrics")
        table.add_column("metric")
        table.add_column("value", justify="right")
        for key, value in list(flat.items())[:40]:
            table.add_row(key, f"{value:.4g}")
        out.print(table)


def _print_diff(result: dict[str, Any]) -> None:
    out.print(f"a = {result['a']}\nb = {result['b']}")
    for section in ("config", "data", "metrics"):
        table = Table(title=f"{section} differences ({len(result[section])})")
        for col in ("key", "a", "b") + (("delta",) if section == "metrics" else ()):
            table.add_column(col)
        for key, entry in result[section].items():
            row = [key, str(entry["a"])[:60], str(entry["b"])[:60]]
            if section == "metrics":
                row.append(f"{entry['delta']:+.4g}" if "delta" in entry else "")
            table.add_row(*row)
        out.print(table)
    for key in ("base_model", "status"):
        if result[key]:
            out.print(f"{key}: {result[key]['a']} -> {result[key]['b']}")

"""Adapters of the Registry, Serving and Feedback screens over the registry and the serve store.

Nothing here keeps its own copy of the truth: versions, aliases and events come from the registry;
keys, usage, canary events and feedback from the serve store; approved feedback is written where
`domaintune feedback export` writes (serve.feedback_dir or <run>/feedback), which is what the next
round's `--continue-from` run and DPO read.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from domaintune.errors import UserError
from domaintune.studio.workspace import Project, read_yaml
from domaintune.utils.io import read_jsonl, write_json, write_jsonl


def _cfg(project: Project):
    if project.cfg is None:
        raise UserError(f"the project file is invalid: {project.error}")
    return project.cfg


def _registry(project: Project):
    from domaintune.registry import registry_from_config

    cfg = _cfg(project)
    return registry_from_config(cfg), cfg.registry.name or cfg.name


def lineage(versions: list[dict[str, Any]]) -> dict[str, Any]:
    """Node positions (x by creation order, y by generation) and parent edges for an SVG graph."""
    ordered = sorted(versions, key=lambda v: v["created_at"])
    depth: dict[str, int] = {}
    for v in ordered:
        depth[v["version"]] = depth.get(v.get("parent") or "", -1) + 1
    nodes = [
        {"version": v["version"], "status": v["status"], "x": 30 + i * 170, "y": 30 + depth[v["version"]] * 70}
        for i, v in enumerate(ordered)
    ]
    where = {n["version"]: n for n in nodes}
    edges = [{"from": where[v["parent"]], "to": where[v["version"]]} for v in ordered if v.get("parent") in where]
    width = 60 + 170 * max(len(nodes), 1)
    height = 80 + 70 * (max(depth.values()) if depth else 0)
    return {"nodes": nodes, "edges": edges, "width": width, "height": height}


def registry_view(project: Project, a: str, b: str) -> dict[str, Any]:
    registry, name = _registry(project)
    try:
        versions = registry.list(name)
    except UserError:
        versions = []
    diff = registry.diff(name, a, b) if a and b else None
    events = registry.events(name)[-30:] if versions else []
    aliases = registry.aliases(name) if versions else {}
    return {"versions": versions, "aliases": aliases, "diff": diff, "events": events, "graph": lineage(versions)}


def registry_action(project: Project, action: str, version: str, alias: str, user: str) -> None:
    registry, name = _registry(project)
    note = f"by {user} in the studio"
    if action == "promote":
        registry.promote(name, version, alias=alias or "production")
    elif action == "rollback":
        registry.rollback(name, alias=alias or "production", note=note)
    elif action == "archive":
        registry.archive(name, version, reason=note)
    else:
        raise UserError(f"unknown registry action {action!r}")


def _store(project: Project):
    from domaintune.serve.store import Store, default_store_url

    cfg = _cfg(project)
    return Store(cfg.serve.store_url or default_store_url(cfg.layout.root), cfg.serve.key_hash_iterations)


def serving_view(project: Project) -> dict[str, Any]:
    cfg = _cfg(project)
    store = _store(project)
    try:
        keys = [(k, store.tokens_used_today(k.id)) for k in store.list_keys()]
        events = [
            {"id": e.id, "at": e.created_at, "kind": e.kind, "details": e.details}
            for e in store.events()
            if "canary" in e.kind
        ][-20:]
        requests = store.count_requests()
    finally:
        store.engine.dispose()
    base = f"http://{cfg.serve.host}:{cfg.serve.port}"
    canary = cfg.serve.canary.model_dump(mode="json") if getattr(cfg.serve, "canary", None) else None
    return {"keys": keys, "events": events, "requests": requests, "metrics_url": f"{base}/metrics", "canary": canary}


def _limit(value: str, label: str) -> int | None:
    if not value.strip():
        return None
    if not value.strip().isdigit():
        raise UserError(f"{label} must be a whole number (got {value!r})")
    return int(value)


def create_key(project: Project, form: dict[str, str]) -> dict[str, str]:
    store = _store(project)
    try:
        models = [m.strip() for m in form.get("models", "").split(",") if m.strip()] or None
        key, secret = store.create_key(
            form.get("name", ""),
            rpm=_limit(form.get("rpm", ""), "rpm"),
            tpm=_limit(form.get("tpm", ""), "tpm"),
            daily_tokens=_limit(form.get("daily", ""), "daily tokens"),
            models=models,
        )
    finally:
        store.engine.dispose()
    return {"id": key.id, "name": key.name, "secret": secret}


def revoke_key(project: Project, key_id: str) -> None:
    store = _store(project)
    try:
        store.revoke_key(key_id)
    finally:
        store.engine.dispose()


def _approved_file(project: Project) -> Path:
    return _cfg(project).layout.root / "studio" / "feedback_approved.json"


def inbox(project: Project) -> dict[str, Any]:
    store = _store(project)
    try:
        pairs = store.feedback_with_requests()
    finally:
        store.engine.dispose()
    approved = set(json.loads(_approved_file(project).read_text()) if _approved_file(project).is_file() else [])
    rows = [
        {
            "id": fb.id,
            "request_id": req.id,
            "at": fb.created_at,
            "rating": fb.rating,
            "prompt": next((m.get("content", "") for m in reversed(req.prompt or []) if m.get("role") == "user"), "")
            if isinstance(req.prompt, list)
            else str(req.prompt),
            "answer": req.response or "",
            "correction": fb.correction or "",
            "comment": fb.comment or "",
            "model": req.model,
            "approved": req.id in approved,
        }
        for fb, req in pairs
    ]
    return {"rows": rows, "n_approved": len(approved)}


def approve(project: Project, request_ids: list[str]) -> dict[str, Any]:
    """Export every correction (deduplicated by `export_feedback`), keep the approved requests' rows."""
    from domaintune.serve.feedback import (
        PREFERENCE_FILE,
        SFT_FILE,
        UNPAIRED_FILE,
        export_feedback,
        feedback_export_dir,
    )

    cfg = _cfg(project)
    path = _approved_file(project)
    approved = set(json.loads(path.read_text()) if path.is_file() else []) | set(request_ids)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, sorted(approved))
    staging = cfg.layout.root / "studio" / "feedback-all"
    report = export_feedback(cfg, out_dir=staging)
    target = feedback_export_dir(cfg, cfg.layout.root)
    written = {}
    for name in (SFT_FILE, PREFERENCE_FILE, UNPAIRED_FILE):
        rows = [r for r in read_jsonl(staging / name) if r.get("request_id") in approved]
        written[name] = write_jsonl(target / name, rows)
    return {"approved": len(approved), "written": written, "folder": str(target), "dropped": report["dropped"]}


def next_round_args(project: Project, parent_alias: str) -> list[str]:
    """`run` options of the next round: the approved corrections as a new source, on top of the parent."""
    from domaintune.serve.feedback import feedback_export_dir

    cfg = _cfg(project)
    sft = feedback_export_dir(cfg, cfg.layout.root) / "sft.jsonl"
    if not sft.is_file() or not sft.stat().st_size:
        raise UserError("no approved corrections yet: approve some first")
    sources = list((read_yaml(project.path).get("data") or {}).get("sources") or [])
    sources.append({"path": str(sft), "reader": "messages", "name": "feedback"})
    name = cfg.registry.name or cfg.name
    return [
        "--continue-from",
        f"registry://{name}@{parent_alias}",
        "--set",
        "data.sources=" + json.dumps(sources, ensure_ascii=False),
    ]

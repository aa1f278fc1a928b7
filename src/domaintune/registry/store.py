"""`ModelRegistry`: versioned models with metadata, checksummed artefacts, aliases and events.

The database (SQLAlchemy; SQLite by default, any URL such as PostgreSQL) is the source of truth:
a version exists when its row is committed. Artefacts are copied into a staging folder of the
store first, checksummed, then renamed into `<store>/<name>/<version>/` inside the same
transaction that inserts the row, so an interrupted register leaves no half-registered version
(at worst an orphan folder that no row points to; `register` removes such leftovers).

Concurrent writers: every write transaction runs under `BEGIN IMMEDIATE` on SQLite (writers
queue on the database lock with a busy timeout) and is retried on unique-constraint or "database
is locked" errors, so two processes registering at once both succeed with distinct versions.
"""

from __future__ import annotations

import builtins
import json
import os
import random
import re
import shutil
import time
import uuid
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import (
    JSON,
    Column,
    ForeignKey,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    create_engine,
    event,
    func,
    select,
)
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import IntegrityError, OperationalError

from domaintune.errors import UserError
from domaintune.registry.uri import parse_registry_uri
from domaintune.utils.io import sha256_file
from domaintune.utils.names import model_name_problem
from domaintune.utils.process import pid_alive

STATUSES = ("registered", "candidate", "rejected", "archived")
BUMPS = ("major", "minor", "patch")
_VERSION_RE = re.compile(r"^v(\d+)\.(\d+)\.(\d+)(?:_|$)")
_ALIAS_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_-]*$")

metadata_obj = MetaData()

versions_table = Table(
    "model_versions",
    metadata_obj,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("name", String(200), nullable=False, index=True),
    Column("version", String(200), nullable=False, unique=True),
    Column("major", Integer, nullable=False),
    Column("minor", Integer, nullable=False),
    Column("patch", Integer, nullable=False),
    Column("data_hash", String(64), nullable=False),
    Column("created_at", String(32), nullable=False),
    Column("status", String(32), nullable=False),
    Column("reasons", JSON, nullable=False),
    Column("parent", String(200), nullable=True),
    Column("store_path", Text, nullable=False),
    Column("meta", JSON, nullable=False),
    UniqueConstraint("name", "major", "minor", "patch", name="uq_name_semver"),
)

artifacts_table = Table(
    "model_artifacts",
    metadata_obj,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("version_id", Integer, ForeignKey("model_versions.id"), nullable=False, index=True),
    Column("path", Text, nullable=False),
    Column("sha256", String(64), nullable=False),
    Column("bytes", Integer, nullable=False),
)

aliases_table = Table(
    "model_aliases",
    metadata_obj,
    Column("name", String(200), primary_key=True),
    Column("alias", String(100), primary_key=True),
    Column("version", String(200), nullable=False),
    Column("updated_at", String(32), nullable=False),
)

alias_history_table = Table(
    "model_alias_history",
    metadata_obj,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("name", String(200), nullable=False, index=True),
    Column("alias", String(100), nullable=False),
    Column("action", String(16), nullable=False),  # promote | rollback
    Column("version", String(200), nullable=False),  # holder after the action
    Column("previous", String(200), nullable=True),  # holder before the action
    Column("at", String(32), nullable=False),
    Column("note", Text, nullable=True),
)

events_table = Table(
    "model_events",
    metadata_obj,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("name", String(200), nullable=False, index=True),
    Column("version", String(200), nullable=True),
    Column("kind", String(64), nullable=False),
    Column("details", JSON, nullable=False),
    Column("at", String(32), nullable=False),
)

T = TypeVar("T")


def utc_now() -> datetime:
    return datetime.now(timezone.utc)


def _iso(when: datetime | None = None) -> str:
    return (when or utc_now()).strftime("%Y-%m-%dT%H:%M:%SZ")


def _check_register_args(name: str, bump: str, status: str, artifacts: dict[str, str | Path]) -> None:
    problem = model_name_problem(name, segments=1)
    if problem is not None:
        raise UserError(f"registry name: {problem}")
    if bump not in BUMPS:
        raise UserError(f"--bump {bump!r}: choose one of {', '.join(BUMPS)}")
    if status not in STATUSES:
        raise UserError(f"status {status!r}: choose one of {', '.join(STATUSES)}")
    if not artifacts:
        raise UserError("nothing to register: no artefacts given")


def _remove_killed_staging(model_root: Path) -> None:
    """Staging folders of registers that were killed mid-copy (their process is gone)."""
    for leftover in model_root.glob(".staging-*"):
        pid = leftover.name.split("-")[1]
        if not pid.isdigit() or not pid_alive(int(pid)):
            shutil.rmtree(leftover, ignore_errors=True)


def _bumped(latest: tuple[int, ...], bump: str) -> tuple[int, int, int]:
    major, minor, patch = latest
    if bump == "major":
        return major + 1, 0, 0
    if bump == "minor":
        return major, minor + 1, 0
    return major, minor, patch + 1


def _is_retryable(exc: Exception) -> bool:
    if isinstance(exc, IntegrityError):
        return True
    text = str(exc).lower()
    return isinstance(exc, OperationalError) and any(
        word in text for word in ("locked", "busy", "deadlock", "already exists")
    )


class ModelRegistry:
    """A model registry at a SQLAlchemy `url`, with artefacts kept under `store`."""

    def __init__(self, url: str, store: str | Path | None = None, max_retries: int = 60):
        self.url = url
        self.max_retries = max_retries
        self.engine = self._make_engine(url)
        if store is None:
            if self.engine.dialect.name != "sqlite" or not self.engine.url.database:
                raise UserError(f"registry at {url}: give the artefact store folder (registry.store)")
            store = Path(self.engine.url.database).parent / "artifacts"
        self.store = Path(store)
        self._with_retry(lambda: metadata_obj.create_all(self.engine))

    # ------------------------------------------------------------------ engine and transactions
    @staticmethod
    def _make_engine(url: str) -> Engine:
        if url.startswith("sqlite"):
            engine = create_engine(url, connect_args={"timeout": 60})
            if engine.url.database and engine.url.database != ":memory:":
                Path(engine.url.database).parent.mkdir(parents=True, exist_ok=True)

            @event.listens_for(engine, "connect")
            def _connect(dbapi_connection, _record):  # pragma: no cover - driver hook
                # Let SQLAlchemy's begin emit the BEGIN (the documented pysqlite recipe).
                dbapi_connection.isolation_level = None
                dbapi_connection.execute("PRAGMA busy_timeout = 60000")

            @event.listens_for(engine, "begin")
            def _begin(connection):  # pragma: no cover - driver hook
                # Take the write lock at the start: concurrent writers queue instead of deadlocking.
                connection.exec_driver_sql("BEGIN IMMEDIATE")

            return engine
        try:
            return create_engine(url, pool_pre_ping=True)
        except Exception as exc:  # bad URL or missing driver
            raise UserError(f"registry.url {url!r}: {exc}") from None

    def _with_retry(self, fn: Callable[[], T]) -> T:
        for attempt in range(self.max_retries):
            try:
                return fn()
            except (IntegrityError, OperationalError) as exc:
                if not _is_retryable(exc) or attempt == self.max_retries - 1:
                    raise
                time.sleep(min(0.05 * (1.5**attempt), 1.0) * (0.5 + random.random()))
        raise AssertionError("unreachable")

    def _transaction(self, fn: Callable[[Connection], T]) -> T:
        def run() -> T:
            with self.engine.connect() as conn, conn.begin():
                return fn(conn)

        return self._with_retry(run)

    # ------------------------------------------------------------------ register
    def register(
        self,
        name: str,
        *,
        artifacts: dict[str, str | Path],
        metadata: dict[str, Any] | None = None,
        data_hash: str = "nodata",
        bump: str = "patch",
        status: str = "registered",
        reasons: list[str] | None = None,
        parent: str | None = None,
    ) -> str:
        """Copy `artifacts` ({name in the version: source file or folder}) in and record a new version."""
        _check_register_args(name, bump, status, artifacts)
        if parent is not None:
            parent = self._version_row(name, parent)["version"]
        model_root = self.store / name
        model_root.mkdir(parents=True, exist_ok=True)
        _remove_killed_staging(model_root)
        staging = model_root / f".staging-{os.getpid()}-{uuid.uuid4().hex}"
        staging.mkdir()
        try:
            files = self._copy_in(artifacts, staging)
            row = {
                "data_hash": data_hash,
                "status": status,
                "reasons": list(reasons or []),
                "parent": parent,
                "meta": dict(metadata or {}),
            }

            def insert(conn: Connection) -> tuple[str, Path]:
                return self._insert_version(conn, name, bump, row, files)

            return self._with_retry(lambda: self._publish(staging, insert))
        finally:
            if staging.exists():
                shutil.rmtree(staging, ignore_errors=True)

    def _insert_version(
        self, conn: Connection, name: str, bump: str, row: dict[str, Any], files: list[dict]
    ) -> tuple[str, Path]:
        """Insert the next version's row, its files and a `registered` event; returns (version, its store folder)."""
        latest = conn.execute(
            select(versions_table.c.major, versions_table.c.minor, versions_table.c.patch)
            .where(versions_table.c.name == name)
            .order_by(versions_table.c.major.desc(), versions_table.c.minor.desc(), versions_table.c.patch.desc())
            .limit(1)
        ).first()
        major, minor, patch = _bumped(tuple(latest) if latest else (0, 0, 0), bump)
        now = utc_now()
        short_hash = re.sub(r"[^0-9a-zA-Z]", "", row["data_hash"])[:8] or "nodata"
        version = f"v{major}.{minor}.{patch}_{short_hash}_{now.strftime('%Y%m%dT%H%M%SZ')}"
        final = self.store / name / version
        result = conn.execute(
            versions_table.insert().values(
                name=name,
                version=version,
                major=major,
                minor=minor,
                patch=patch,
                created_at=_iso(now),
                store_path=str(final),
                **row,
            )
        )
        if result.inserted_primary_key is None:
            raise RuntimeError(f"{name}@{version}: the database returned no id for the new version")
        version_id = result.inserted_primary_key[0]
        if files:
            conn.execute(artifacts_table.insert(), [{"version_id": version_id, **item} for item in files])
        conn.execute(
            events_table.insert().values(
                name=name,
                version=version,
                kind="registered",
                details={"status": row["status"], "reasons": row["reasons"], "bump": bump},
                at=_iso(now),
            )
        )
        return version, final

    def _publish(self, staging: Path, insert: Callable[[Connection], tuple[str, Path]]) -> str:
        """Insert the version and rename `staging` into its folder in one transaction: both happen, or neither."""
        with self.engine.connect() as conn:
            transaction = conn.begin()
            try:
                version, final = insert(conn)
                if final.exists():  # an orphan left by a process killed between rename and commit
                    shutil.rmtree(final)
                os.rename(staging, final)
                try:
                    transaction.commit()
                except BaseException:
                    os.rename(final, staging)
                    raise
            except BaseException:
                if transaction.is_active:
                    transaction.rollback()
                raise
        return version

    @staticmethod
    def _copy_in(artifacts: dict[str, str | Path], staging: Path) -> list[dict]:
        files: list[dict] = []
        for rel, source in artifacts.items():
            source = Path(source)
            rel_path = Path(rel)
            if rel_path.is_absolute() or ".." in rel_path.parts:
                raise UserError(f"artefact name {rel!r} must be a relative path inside the version")
            target = staging / rel_path
            target.parent.mkdir(parents=True, exist_ok=True)
            if source.is_dir():
                shutil.copytree(source, target, ignore=shutil.ignore_patterns(".*"))
            elif source.is_file():
                shutil.copy2(source, target)
            else:
                raise UserError(f"artefact {rel}: {source} does not exist")
        for file in sorted(p for p in staging.rglob("*") if p.is_file()):
            files.append(
                {
                    "path": file.relative_to(staging).as_posix(),
                    "sha256": sha256_file(file),
                    "bytes": file.stat().st_size,
                }
            )
        return files

    # ------------------------------------------------------------------ lookups
    def _version_row(self, name: str, ref: str, conn: Connection | None = None) -> dict:
        """A version by full name, by `vX.Y.Z` prefix, by alias, or `latest`."""

        def lookup(c: Connection) -> dict:
            table = versions_table
            row = c.execute(select(table).where(table.c.name == name, table.c.version == ref)).mappings().first()
            if row is None:
                alias = c.execute(
                    select(aliases_table.c.version).where(aliases_table.c.name == name, aliases_table.c.alias == ref)
                ).scalar()
                if alias is not None:
                    row = c.execute(select(table).where(table.c.version == alias)).mappings().first()
            if row is None and ref == "latest":
                row = (
                    c.execute(
                        select(table)
                        .where(table.c.name == name)
                        .order_by(table.c.major.desc(), table.c.minor.desc(), table.c.patch.desc())
                        .limit(1)
                    )
                    .mappings()
                    .first()
                )
            if row is None and (m := _VERSION_RE.match(ref)):
                major, minor, patch = map(int, m.groups())
                rows = (
                    c.execute(
                        select(table).where(
                            table.c.name == name, table.c.major == major, table.c.minor == minor, table.c.patch == patch
                        )
                    )
                    .mappings()
                    .all()
                )
                matching = [r for r in rows if r["version"].startswith(ref)]
                if len(matching) == 1:
                    row = matching[0]
            if row is None:
                known = c.execute(select(func.count()).select_from(table).where(table.c.name == name)).scalar()
                if not known:
                    raise UserError(f"registry has no model named {name!r}")
                raise UserError(f"{name}@{ref}: no such version or alias (see `domaintune registry list`)")
            return dict(row)

        if conn is not None:
            return lookup(conn)
        with self.engine.connect() as c:
            return lookup(c)

    def names(self) -> list[str]:
        with self.engine.connect() as conn:
            return list(
                conn.execute(select(versions_table.c.name).distinct().order_by(versions_table.c.name)).scalars()
            )

    def list(self, name: str | None = None, include_archived: bool = True) -> list[dict]:
        with self.engine.connect() as conn:
            query = select(versions_table).order_by(
                versions_table.c.name, versions_table.c.major, versions_table.c.minor, versions_table.c.patch
            )
            if name is not None:
                query = query.where(versions_table.c.name == name)
            rows = [dict(r) for r in conn.execute(query).mappings()]
            aliases = [dict(r) for r in conn.execute(select(aliases_table)).mappings()]
            events = self._events_by_version(conn, name)
        out = []
        for row in rows:
            if not include_archived and row["status"] == "archived":
                continue
            held = sorted(a["alias"] for a in aliases if a["name"] == row["name"] and a["version"] == row["version"])
            out.append(
                {
                    "name": row["name"],
                    "version": row["version"],
                    "status": row["status"],
                    "created_at": row["created_at"],
                    "aliases": held,
                    "parent": row["parent"],
                    "reasons": row["reasons"],
                    "metrics": (row["meta"] or {}).get("metrics", {}),
                    "events": events.get((row["name"], row["version"]), []),
                }
            )
        return out

    @staticmethod
    def _events_by_version(conn: Connection, name: str | None) -> dict[tuple[str, str], builtins.list[dict]]:
        """Every event (kind, details, at) of every version, oldest first, by (name, version)."""
        query = select(
            events_table.c.name, events_table.c.version, events_table.c.kind, events_table.c.details, events_table.c.at
        ).order_by(events_table.c.id)
        if name is not None:
            query = query.where(events_table.c.name == name)
        found: dict[tuple[str, str], builtins.list[dict]] = {}
        for r in conn.execute(query).mappings():
            if r["version"] is not None:
                found.setdefault((r["name"], r["version"]), []).append(
                    {"kind": r["kind"], "details": r["details"], "at": r["at"]}
                )
        return found

    def find_by_metadata(self, name: str, dotted_key: str, value: Any) -> builtins.list[dict]:
        """Versions of `name` whose metadata holds `value` at `dotted_key` (e.g. `round.fingerprint`), oldest first."""
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(
                    versions_table.c.version,
                    versions_table.c.status,
                    versions_table.c.created_at,
                    versions_table.c.meta,
                )
                .where(versions_table.c.name == name)
                .order_by(versions_table.c.id)
            ).mappings()
            found = []
            for row in rows:
                node: Any = row["meta"] or {}
                for part in dotted_key.split("."):
                    node = node.get(part) if isinstance(node, dict) else None
                if node is not None and node == value:
                    found.append({"version": row["version"], "status": row["status"], "created_at": row["created_at"]})
            return found

    def show(self, name: str, ref: str) -> dict:
        with self.engine.connect() as conn:
            row = self._version_row(name, ref, conn)
            files = [
                dict(r)
                for r in conn.execute(
                    select(artifacts_table.c.path, artifacts_table.c.sha256, artifacts_table.c.bytes)
                    .where(artifacts_table.c.version_id == row["id"])
                    .order_by(artifacts_table.c.path)
                ).mappings()
            ]
            aliases = list(
                conn.execute(
                    select(aliases_table.c.alias).where(
                        aliases_table.c.name == name, aliases_table.c.version == row["version"]
                    )
                ).scalars()
            )
            events = [
                dict(r)
                for r in conn.execute(
                    select(events_table.c.kind, events_table.c.details, events_table.c.at)
                    .where(events_table.c.name == name, events_table.c.version == row["version"])
                    .order_by(events_table.c.id)
                ).mappings()
            ]
        return {
            "name": row["name"],
            "version": row["version"],
            "semver": f"{row['major']}.{row['minor']}.{row['patch']}",
            "data_hash": row["data_hash"],
            "created_at": row["created_at"],
            "status": row["status"],
            "reasons": row["reasons"],
            "parent": row["parent"],
            "aliases": sorted(aliases),
            "store_path": row["store_path"],
            "metadata": row["meta"],
            "artifacts": files,
            "events": events,
        }

    def version_of(self, uri: str) -> str:
        ref = parse_registry_uri(uri)
        return self._version_row(ref.name, ref.ref)["version"]

    # ------------------------------------------------------------------ resolve and verify
    def verify(self, name: str, ref: str, under: str | None = None) -> builtins.list[str]:
        """Problems with a version's stored files (missing, changed, or unexpected); empty when intact."""
        info = self.show(name, ref)
        root = Path(info["store_path"])
        sub = under.strip("/") if under else ""
        problems = []
        expected = {
            f["path"]: f
            for f in info["artifacts"]
            if not sub or f["path"] == sub or f["path"].startswith(sub + "/")  # a folder, or one file
        }
        for path, item in expected.items():
            file = root / path
            if not file.is_file():
                problems.append(f"{path}: missing")
            elif file.stat().st_size != item["bytes"] or sha256_file(file) != item["sha256"]:
                problems.append(f"{path}: sha256 mismatch (file changed after registration)")
        base = root / under if under else root
        if base.is_dir():
            for file in base.rglob("*"):
                rel = file.relative_to(root).as_posix()
                if file.is_file() and rel not in expected:
                    problems.append(f"{rel}: not part of the registered version")
        return problems

    def resolve(self, uri: str) -> Path:
        """The local folder a registry URI stands for, after verifying its files' sha256 checksums.

        `registry://name@alias` and `registry://name@v1.2.3` resolve to the version's `model/`
        (the trained adapter or full model, loadable with `load_trained`); if the version has no
        `model/`, to `export/merged/`. `registry://name@ref/export/gguf` names a sub-path.
        """
        ref = parse_registry_uri(uri)
        info = self.show(ref.name, ref.ref)
        root = Path(info["store_path"])
        stored = {f["path"] for f in info["artifacts"]}
        if ref.subpath:
            sub = ref.subpath.strip("/")
        else:
            found = next((c for c in ("model", "export/merged") if any(p.startswith(c + "/") for p in stored)), None)
            if found is None:
                raise UserError(f"{uri}: version {info['version']} holds no model/ or export/merged/ to load")
            sub = found
        if sub not in stored and not any(p.startswith(sub + "/") for p in stored):
            raise UserError(f"{uri}: version {info['version']} has no artefact {sub!r}")
        problems = self.verify(ref.name, info["version"], under=sub)
        if problems:
            shown = "; ".join(problems[:3]) + (f"; and {len(problems) - 3} more" if len(problems) > 3 else "")
            raise UserError(f"{uri} -> {info['version']}: refusing a tampered artefact in {root / sub}: {shown}")
        return root / sub

    # ------------------------------------------------------------------ status, aliases, events
    def set_status(self, name: str, ref: str, status: str, reasons: builtins.list[str] | None = None) -> str:
        if status not in STATUSES:
            raise UserError(f"status {status!r}: choose one of {', '.join(STATUSES)}")

        def update(conn: Connection) -> str:
            row = self._version_row(name, ref, conn)
            values: dict[str, Any] = {"status": status}
            if reasons is not None:
                values["reasons"] = list(reasons)
            conn.execute(versions_table.update().where(versions_table.c.id == row["id"]).values(**values))
            conn.execute(
                events_table.insert().values(
                    name=name,
                    version=row["version"],
                    kind=f"status:{status}",
                    details={"from": row["status"], "reasons": list(reasons or [])},
                    at=_iso(),
                )
            )
            return row["version"]

        return self._transaction(update)

    def archive(self, name: str, ref: str, reason: str | None = None) -> str:
        def update(conn: Connection) -> str:
            row = self._version_row(name, ref, conn)
            held = list(
                conn.execute(
                    select(aliases_table.c.alias).where(
                        aliases_table.c.name == name, aliases_table.c.version == row["version"]
                    )
                ).scalars()
            )
            if held:
                raise UserError(
                    f"{name}@{row['version']} still holds alias(es) {', '.join(sorted(held))}: "
                    "promote another version or roll the alias back first"
                )
            conn.execute(
                versions_table.update()
                .where(versions_table.c.id == row["id"])
                .values(status="archived", reasons=list(row["reasons"] or []) + ([reason] if reason else []))
            )
            conn.execute(
                events_table.insert().values(
                    name=name,
                    version=row["version"],
                    kind="archived",
                    details={"reason": reason, "from": row["status"]},
                    at=_iso(),
                )
            )
            return row["version"]

        return self._transaction(update)

    def promote(
        self, name: str, ref: str, alias: str = "production", force: bool = False, note: str | None = None
    ) -> str:
        """Point `alias` at a version (recording the previous holder for rollback)."""
        if not _ALIAS_RE.match(alias) or _VERSION_RE.match(alias) or alias == "latest":
            raise UserError(f"alias {alias!r}: use a word such as production, candidate or staging")

        def update(conn: Connection) -> str:
            row = self._version_row(name, ref, conn)
            if row["status"] in ("rejected", "archived") and not force:
                why = f" ({'; '.join(row['reasons'])})" if row["reasons"] else ""
                raise UserError(
                    f"{name}@{row['version']} is {row['status']}{why}; it cannot be promoted (use --force to override)"
                )
            current = conn.execute(
                select(aliases_table.c.version).where(aliases_table.c.name == name, aliases_table.c.alias == alias)
            ).scalar()
            if current == row["version"]:
                return row["version"]
            now = _iso()
            if current is None:
                conn.execute(
                    aliases_table.insert().values(name=name, alias=alias, version=row["version"], updated_at=now)
                )
            else:
                conn.execute(
                    aliases_table.update()
                    .where(aliases_table.c.name == name, aliases_table.c.alias == alias)
                    .values(version=row["version"], updated_at=now)
                )
            conn.execute(
                alias_history_table.insert().values(
                    name=name,
                    alias=alias,
                    action="promote",
                    version=row["version"],
                    previous=current,
                    at=now,
                    note=note,
                )
            )
            details = {"alias": alias, "previous": current, "note": note, "forced": bool(force)}
            conn.execute(
                events_table.insert().values(
                    name=name, version=row["version"], kind="promoted", details=details, at=now
                )
            )
            return row["version"]

        return self._transaction(update)

    def _alias_stack(self, conn: Connection, name: str, alias: str) -> builtins.list[str]:
        stack: builtins.list[str] = []
        for action, version in conn.execute(
            select(alias_history_table.c.action, alias_history_table.c.version)
            .where(alias_history_table.c.name == name, alias_history_table.c.alias == alias)
            .order_by(alias_history_table.c.id)
        ):
            if action == "promote":
                stack.append(version)
            elif action == "rollback" and stack:
                stack.pop()
        return stack

    def rollback(self, name: str, alias: str = "production", note: str | None = None) -> tuple[str, str]:
        """Point `alias` back at the version that held it before the current one; returns (from, to)."""

        def update(conn: Connection) -> tuple[str, str]:
            current = conn.execute(
                select(aliases_table.c.version).where(aliases_table.c.name == name, aliases_table.c.alias == alias)
            ).scalar()
            if current is None:
                raise UserError(f"{name}: alias {alias!r} is not set; nothing to roll back")
            stack = self._alias_stack(conn, name, alias)
            if not stack or stack[-1] != current:
                stack.append(current)
            stack.pop()
            statuses = dict(
                conn.execute(
                    select(versions_table.c.version, versions_table.c.status).where(versions_table.c.name == name)
                ).all()
            )
            while stack and statuses.get(stack[-1]) == "archived":
                stack.pop()
            if not stack:
                raise UserError(f"{name}@{alias}: no previous holder to roll back to (it has only held {current})")
            target = stack[-1]
            now = _iso()
            conn.execute(
                aliases_table.update()
                .where(aliases_table.c.name == name, aliases_table.c.alias == alias)
                .values(version=target, updated_at=now)
            )
            conn.execute(
                alias_history_table.insert().values(
                    name=name, alias=alias, action="rollback", version=target, previous=current, at=now, note=note
                )
            )
            conn.execute(
                events_table.insert().values(
                    name=name,
                    version=current,
                    kind="rolled_back",
                    details={"alias": alias, "to": target, "note": note},
                    at=now,
                )
            )
            return current, target

        return self._transaction(update)

    def alias_history(self, name: str, alias: str | None = None) -> builtins.list[dict]:
        with self.engine.connect() as conn:
            query = select(alias_history_table).where(alias_history_table.c.name == name)
            if alias is not None:
                query = query.where(alias_history_table.c.alias == alias)
            return [dict(r) for r in conn.execute(query.order_by(alias_history_table.c.id)).mappings()]

    def aliases(self, name: str) -> dict[str, str]:
        with self.engine.connect() as conn:
            return dict(
                conn.execute(
                    select(aliases_table.c.alias, aliases_table.c.version).where(aliases_table.c.name == name)
                ).all()
            )

    def record_event(self, name: str, version: str | None, kind: str, details: dict | None = None) -> None:
        """Record something that happened to a version (e.g. a canary rollback while serving)."""

        def insert(conn: Connection) -> None:
            full = self._version_row(name, version, conn)["version"] if version else None
            conn.execute(
                events_table.insert().values(
                    name=name,
                    version=full,
                    kind=kind,
                    details=json.loads(json.dumps(details or {}, default=str)),
                    at=_iso(),
                )
            )

        self._transaction(insert)

    def events(self, name: str, version: str | None = None) -> builtins.list[dict]:
        with self.engine.connect() as conn:
            query = select(events_table).where(events_table.c.name == name)
            if version is not None:
                query = query.where(events_table.c.version == self._version_row(name, version, conn)["version"])
            return [dict(r) for r in conn.execute(query.order_by(events_table.c.id)).mappings()]

    # ------------------------------------------------------------------ diff
    def diff(self, name: str, ref_a: str, ref_b: str) -> dict:
        """Config, metric and data differences between two versions."""
        a, b = self.show(name, ref_a), self.show(name, ref_b)
        ma, mb = a["metadata"] or {}, b["metadata"] or {}

        def changed(x: dict, y: dict) -> dict:
            fx, fy = flatten_keys(x), flatten_keys(y)
            return {k: {"a": fx.get(k), "b": fy.get(k)} for k in sorted(set(fx) | set(fy)) if fx.get(k) != fy.get(k)}

        metrics: dict[str, dict] = {}
        fa, fb = flatten_keys(ma.get("metrics", {})), flatten_keys(mb.get("metrics", {}))
        for key in sorted(set(fa) | set(fb)):
            va, vb = fa.get(key), fb.get(key)
            if va == vb:
                continue
            entry: dict[str, Any] = {"a": va, "b": vb}
            if isinstance(va, (int, float)) and isinstance(vb, (int, float)) and not isinstance(va, bool):
                entry["delta"] = vb - va
            metrics[key] = entry
        return {
            "a": a["version"],
            "b": b["version"],
            "config": changed(ma.get("config", {}), mb.get("config", {})),
            "metrics": metrics,
            "data": changed(ma.get("data", {}), mb.get("data", {})),
            "base_model": {"a": ma.get("base_model"), "b": mb.get("base_model")}
            if ma.get("base_model") != mb.get("base_model")
            else {},
            "status": {"a": a["status"], "b": b["status"]} if a["status"] != b["status"] else {},
        }


def flatten_keys(value: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts as one level with dotted keys (`eval.test.tuned.chrf`)."""
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for key, item in value.items():
            out.update(flatten_keys(item, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: value}

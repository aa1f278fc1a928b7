"""The serving store (SQLAlchemy; SQLite by default, PostgreSQL for several replicas): API keys, daily
usage, request log, feedback, events (canary decisions).

API keys are stored only as salted PBKDF2-SHA256 hashes; the plaintext is shown once at creation.
A key looks like `dt-<key id>-<secret>`: the id finds the row, the secret is checked against the hash.
Checking a key costs the same PBKDF2 work whether its id exists or not (a dummy hash for unknown
ids), so timing does not tell which ids exist. A SQLite store file is readable by its owner only.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import os
import secrets
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from sqlalchemy import (
    JSON,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Integer,
    String,
    Text,
    create_engine,
    event,
    func,
    insert,
    inspect,
    select,
    text,
    update,
)
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

from domaintune.errors import UserError
from domaintune.layout import RunLayout

KEY_PREFIX = "dt"


def utcnow() -> datetime:
    return datetime.now(timezone.utc).replace(tzinfo=None)


def utc_day(when: datetime | None = None) -> str:
    return (when or utcnow()).strftime("%Y-%m-%d")


class Base(DeclarativeBase):
    pass


class ApiKeyRow(Base):
    __tablename__ = "api_keys"
    id: Mapped[str] = mapped_column(String(16), primary_key=True)
    name: Mapped[str] = mapped_column(String(200), index=True)
    salt: Mapped[str] = mapped_column(String(64))
    hash: Mapped[str] = mapped_column(String(128))
    iterations: Mapped[int] = mapped_column(Integer)
    rpm: Mapped[int | None] = mapped_column(Integer, nullable=True)
    tpm: Mapped[int | None] = mapped_column(Integer, nullable=True)
    daily_tokens: Mapped[int | None] = mapped_column(Integer, nullable=True)
    models: Mapped[list[str] | None] = mapped_column(JSON, nullable=True)
    is_admin: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)


class DailyUsageRow(Base):
    __tablename__ = "daily_usage"
    key_id: Mapped[str] = mapped_column(String(16), ForeignKey("api_keys.id"), primary_key=True)
    day: Mapped[str] = mapped_column(String(10), primary_key=True)
    tokens: Mapped[int] = mapped_column(Integer, default=0)
    requests: Mapped[int] = mapped_column(Integer, default=0)


class RequestRow(Base):
    __tablename__ = "requests"
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow, index=True)
    key_id: Mapped[str | None] = mapped_column(String(16), nullable=True, index=True)
    endpoint: Mapped[str] = mapped_column(String(40))
    model: Mapped[str] = mapped_column(String(200), index=True)  # public name asked for
    served: Mapped[str] = mapped_column(String(200))  # internal served model (adapter / canary arm)
    version: Mapped[str] = mapped_column(String(100))
    canary_arm: Mapped[str | None] = mapped_column(String(20), nullable=True)
    prompt: Mapped[Any] = mapped_column(JSON)  # messages list (chat) or text (completions), redacted
    response: Mapped[str | None] = mapped_column(Text, nullable=True)  # redacted
    status: Mapped[int] = mapped_column(Integer)
    outcome: Mapped[str] = mapped_column(String(20))  # ok | error | timeout | empty | malformed
    finish_reason: Mapped[str | None] = mapped_column(String(20), nullable=True)
    prompt_tokens: Mapped[int] = mapped_column(Integer, default=0)
    completion_tokens: Mapped[int] = mapped_column(Integer, default=0)
    latency_s: Mapped[float] = mapped_column(Float, default=0.0)
    pii_counts: Mapped[dict[str, int] | None] = mapped_column(JSON, nullable=True)
    # added later (stores made before get the columns on open, old rows hold NULL): the tool definitions the
    # prompt rendered (chat with active `tools`) and the calls the answer was read back as (OpenAI's shape, redacted)
    tools: Mapped[list[dict[str, Any]] | None] = mapped_column(JSON, nullable=True)
    tool_calls: Mapped[list[dict[str, Any]] | None] = mapped_column(JSON, nullable=True)


class FeedbackRow(Base):
    __tablename__ = "feedback"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    request_id: Mapped[str] = mapped_column(String(64), ForeignKey("requests.id"), index=True)
    key_id: Mapped[str | None] = mapped_column(String(16), nullable=True)
    rating: Mapped[int] = mapped_column(Integer)
    correction: Mapped[str | None] = mapped_column(Text, nullable=True)  # redacted
    comment: Mapped[str | None] = mapped_column(Text, nullable=True)  # redacted
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)


class EventRow(Base):
    __tablename__ = "events"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    kind: Mapped[str] = mapped_column(String(40))
    details: Mapped[dict[str, Any]] = mapped_column(JSON)


@dataclass(frozen=True)
class ApiKey:
    id: str
    name: str
    rpm: int | None
    tpm: int | None
    daily_tokens: int | None
    models: tuple[str, ...] | None
    is_admin: bool
    created_at: datetime
    revoked_at: datetime | None

    def allows(self, model: str) -> bool:
        return self.is_admin or self.models is None or model in self.models


def _public(row: ApiKeyRow) -> ApiKey:
    return ApiKey(
        id=row.id,
        name=row.name,
        rpm=row.rpm,
        tpm=row.tpm,
        daily_tokens=row.daily_tokens,
        models=tuple(row.models) if row.models else None,
        is_admin=bool(row.is_admin),
        created_at=row.created_at,
        revoked_at=row.revoked_at,
    )


def _hash_secret(secret: str, salt: bytes, iterations: int) -> str:
    return hashlib.pbkdf2_hmac("sha256", secret.encode("utf-8", "replace"), salt, iterations).hex()


_DUMMY_SALT = bytes(16)


def default_store_url(output_dir: Path) -> str:
    path = RunLayout.of(output_dir).serve_store
    path.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{path}"


def _owner_only(path: str) -> None:
    """Create the SQLite file (and chmod it and its WAL/SHM files) readable and writable by its owner only."""
    os.close(os.open(path, os.O_CREAT | os.O_RDWR, 0o600))
    for suffix in ("", "-wal", "-shm", "-journal"):
        with contextlib.suppress(FileNotFoundError):
            os.chmod(path + suffix, 0o600)


class Store:
    """Thread-safe access to the serving tables; every method is a short transaction."""

    def __init__(self, url: str, key_hash_iterations: int = 100_000):
        self.url = url
        self.iterations = key_hash_iterations
        kwargs: dict[str, Any] = {}
        if url.startswith("sqlite"):
            kwargs["connect_args"] = {"check_same_thread": False, "timeout": 30}
        else:
            kwargs["pool_pre_ping"] = True
        try:
            self.engine = create_engine(url, **kwargs)
        except Exception as exc:  # bad URL / missing driver: the user's setting
            raise UserError(f"serve.store_url {_safe_url(url)}: cannot open ({exc})") from None
        if url.startswith("sqlite"):
            database = self.engine.url.database
            if database and database != ":memory:" and not database.startswith("file:"):
                _owner_only(database)

            @event.listens_for(self.engine, "connect")
            def _pragmas(dbapi_conn, _record):
                cur = dbapi_conn.cursor()
                cur.execute("PRAGMA journal_mode=WAL")
                cur.execute("PRAGMA synchronous=NORMAL")
                cur.close()

        self._create_tables()
        if url.startswith("sqlite") and database and database != ":memory:" and not database.startswith("file:"):
            _owner_only(database)  # the WAL and SHM files exist now
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        self._write_lock = threading.Lock()
        # (key id, sha256 of the presented secret) pairs already checked against the PBKDF2 hash.
        self._verified: set[tuple[str, str]] = set()

    def _create_tables(self) -> None:
        """Create missing tables; replicas starting together may race on it, so a failed try is retried."""
        for attempt in range(5):
            try:
                Base.metadata.create_all(self.engine)
                self._add_missing_columns()
                return
            except Exception as exc:
                if attempt == 4:
                    raise UserError(f"serve.store_url {_safe_url(self.url)}: cannot create tables ({exc})") from None
                time.sleep(0.2 * (attempt + 1))

    def _add_missing_columns(self) -> None:
        """A store made by an older version lacks the nullable columns added since: add them (its rows read NULL).
        A replica that adds one first makes this one's ALTER fail; the retry in _create_tables then finds it."""
        existing = inspect(self.engine)
        for table in Base.metadata.sorted_tables:
            have = {c["name"] for c in existing.get_columns(table.name)}
            for column in table.columns:
                if column.name in have:
                    continue
                if not column.nullable:
                    raise UserError(
                        f"serve.store_url {_safe_url(self.url)}: table {table.name} lacks column {column.name}, "
                        "which cannot be added to existing rows; use a new store"
                    )
                kind = column.type.compile(dialect=self.engine.dialect)
                with self.engine.begin() as conn:
                    conn.execute(text(f'ALTER TABLE {table.name} ADD COLUMN "{column.name}" {kind}'))

    def session(self) -> Session:
        return self._sessions()

    # ---- keys ---------------------------------------------------------------------------------
    def create_key(
        self,
        name: str,
        rpm: int | None = None,
        tpm: int | None = None,
        daily_tokens: int | None = None,
        models: list[str] | None = None,
        is_admin: bool = False,
    ) -> tuple[ApiKey, str]:
        """Create a key; returns (record, plaintext). The plaintext is not stored anywhere."""
        if not name.strip():
            raise UserError("keys create: --name must not be empty")
        for label, value in (("rpm", rpm), ("tpm", tpm), ("daily-tokens", daily_tokens)):
            if value is not None and value < 1:
                raise UserError(f"keys create: --{label} must be a positive integer (got {value})")
        key_id = secrets.token_hex(4)
        secret = secrets.token_urlsafe(24)
        salt = secrets.token_bytes(16)
        row = ApiKeyRow(
            id=key_id,
            name=name,
            salt=salt.hex(),
            hash=_hash_secret(secret, salt, self.iterations),
            iterations=self.iterations,
            rpm=rpm,
            tpm=tpm,
            daily_tokens=daily_tokens,
            models=sorted(set(models)) if models else None,
            is_admin=is_admin,
        )
        with self._write_lock, self.session() as s, s.begin():
            s.add(row)
        return _public(row), f"{KEY_PREFIX}-{key_id}-{secret}"

    def list_keys(self, include_revoked: bool = True) -> list[ApiKey]:
        with self.session() as s:
            stmt = select(ApiKeyRow).order_by(ApiKeyRow.created_at)
            if not include_revoked:
                stmt = stmt.where(ApiKeyRow.revoked_at.is_(None))
            return [_public(r) for r in s.scalars(stmt)]

    def revoke_key(self, key_id_or_name: str) -> list[ApiKey]:
        """Revoke by key id (the part after `dt-`) or by name (every active key of that name)."""
        with self._write_lock, self.session() as s, s.begin():
            rows = list(
                s.scalars(
                    select(ApiKeyRow).where(
                        (ApiKeyRow.id == key_id_or_name) | (ApiKeyRow.name == key_id_or_name),
                        ApiKeyRow.revoked_at.is_(None),
                    )
                )
            )
            if not rows:
                raise UserError(f"keys revoke: no active key with id or name {key_id_or_name!r}")
            for row in rows:
                row.revoked_at = utcnow()
            return [_public(r) for r in rows]

    def verify(self, presented: str) -> ApiKey | None:
        """The key record for a presented plaintext key, or None when unknown, wrong or revoked."""
        return self.check_key(presented)[0]

    def check_key(self, presented: str) -> tuple[ApiKey | None, str]:
        """(key record or None, outcome): ok | malformed | unknown_key | revoked | wrong_secret.

        The PBKDF2 hash runs in every case but a cached success, with a dummy salt when the id is
        unknown or the key malformed, so the time taken does not tell which key ids exist.
        """
        key_id, secret = split_key(presented)
        with self.session() as s:
            row = s.get(ApiKeyRow, key_id) if key_id else None
            if row is None:
                _hash_secret(secret or presented, _DUMMY_SALT, self.iterations)
                return None, "unknown_key" if key_id else "malformed"
            fingerprint = (row.id, hashlib.sha256(secret.encode("utf-8", "replace")).hexdigest())
            if fingerprint not in self._verified:
                expected = _hash_secret(secret, bytes.fromhex(row.salt), row.iterations)
                if not hmac.compare_digest(expected, row.hash):
                    return None, "wrong_secret"
                self._verified.add(fingerprint)
            if row.revoked_at is not None:
                return None, "revoked"
            return _public(row), "ok"

    def verified_before(self, presented: str) -> bool:
        """Was this exact key verified before by this process? (memory only: no database, no hashing)"""
        key_id, secret = split_key(presented)
        return (
            bool(key_id) and (key_id, hashlib.sha256(secret.encode("utf-8", "replace")).hexdigest()) in self._verified
        )

    def cached_key(self, presented: str) -> ApiKey | None:
        """The key record when this exact key was verified before and is still active; no hashing."""
        if not self.verified_before(presented):
            return None
        key_id, _secret = split_key(presented)
        with self.session() as s:
            row = s.get(ApiKeyRow, key_id)
            return None if row is None or row.revoked_at is not None else _public(row)

    # ---- usage ---------------------------------------------------------------------------------
    def tokens_used_today(self, key_id: str) -> int:
        return self.tokens_used_on(key_id, utc_day())

    def tokens_used_on(self, key_id: str, day: str) -> int:
        with self.session() as s:
            row = s.get(DailyUsageRow, (key_id, day))
            return row.tokens if row else 0

    def add_usage(self, key_id: str, tokens: int, day: str | None = None) -> None:
        """Add one request's tokens to the key's day, atomically (replicas may write the same row at once)."""
        day = day or utc_day()
        for attempt in range(3):
            try:
                with self._write_lock, self.session() as s, s.begin():
                    done = s.execute(
                        update(DailyUsageRow)
                        .where(DailyUsageRow.key_id == key_id, DailyUsageRow.day == day)
                        .values(tokens=DailyUsageRow.tokens + tokens, requests=DailyUsageRow.requests + 1)
                    )
                    if not getattr(done, "rowcount", 0):
                        s.execute(insert(DailyUsageRow).values(key_id=key_id, day=day, tokens=tokens, requests=1))
                return
            except IntegrityError:  # another replica inserted the day's row first: add to it
                if attempt == 2:
                    raise

    # ---- request log and feedback ---------------------------------------------------------------
    def log_request(self, **fields: Any) -> None:
        with self._write_lock, self.session() as s, s.begin():
            s.merge(RequestRow(**fields))

    def get_request(self, request_id: str) -> RequestRow | None:
        with self.session() as s:
            return s.get(RequestRow, request_id)

    def count_feedback(self, request_id: str) -> int:
        with self.session() as s:
            stmt = select(func.count()).select_from(FeedbackRow).where(FeedbackRow.request_id == request_id)
            return s.scalar(stmt) or 0

    def add_feedback(
        self, request_id: str, key_id: str | None, rating: int, correction: str | None, comment: str | None
    ) -> int:
        with self._write_lock, self.session() as s, s.begin():
            row = FeedbackRow(
                request_id=request_id, key_id=key_id, rating=rating, correction=correction, comment=comment
            )
            s.add(row)
            s.flush()
            return row.id

    def feedback_with_requests(self) -> list[tuple[FeedbackRow, RequestRow]]:
        """Every feedback row with its request, oldest first."""
        with self.session() as s:
            stmt = (
                select(FeedbackRow, RequestRow)
                .join(RequestRow, FeedbackRow.request_id == RequestRow.id)
                .order_by(FeedbackRow.created_at, FeedbackRow.id)
            )
            return [(f, r) for f, r in s.execute(stmt)]

    def count_requests(self) -> int:
        with self.session() as s:
            return s.scalar(select(func.count()).select_from(RequestRow)) or 0

    def add_event(self, kind: str, details: dict[str, Any]) -> None:
        with self._write_lock, self.session() as s, s.begin():
            s.add(EventRow(kind=kind, details=json.loads(json.dumps(details, default=str))))

    def events(self, kind: str | None = None, after_id: int = 0) -> list[EventRow]:
        with self.session() as s:
            stmt = select(EventRow).where(EventRow.id > after_id).order_by(EventRow.id)
            if kind:
                stmt = stmt.where(EventRow.kind == kind)
            return list(s.scalars(stmt))


def split_key(presented: str) -> tuple[str | None, str]:
    """(key id, secret) of `dt-<id>-<secret>`; (None, "") when it does not look like a key."""
    parts = presented.strip().split("-", 2)
    if len(parts) != 3 or parts[0] != KEY_PREFIX or not parts[1] or len(parts[1]) > 16 or not parts[2]:
        return None, ""
    return parts[1], parts[2]


def _safe_url(url: str) -> str:
    """A database URL without its password, for messages."""
    from sqlalchemy.engine import make_url

    try:
        return repr(make_url(url).render_as_string(hide_password=True))
    except Exception:
        return "(unparsable URL)"

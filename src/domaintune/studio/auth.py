"""Studio users, sessions and CSRF tokens in `<workspace>/.studio/studio.db` (SQLite, owner-only).

Passwords and session tokens are stored as salted PBKDF2 / sha256 hashes; a session's CSRF token is
checked on every form post and every fetch that changes something. Roles: admin (everything, users),
engineer (everything but users), reviewer (review and arena only).
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import os
import secrets
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

from domaintune.errors import UserError

ROLES = ("admin", "engineer", "reviewer")
SESSION_SECONDS = 12 * 3600
_ITERATIONS = 200_000

_SCHEMA = """
create table if not exists users (name text primary key, role text not null, salt text not null,
  hash text not null, iterations integer not null, created real not null);
create table if not exists sessions (token_hash text primary key, user text not null, csrf text not null,
  expires real not null);
"""


@dataclass(frozen=True)
class User:
    name: str
    role: str
    csrf: str = ""

    @property
    def is_staff(self) -> bool:
        """Admins and engineers: every screen but user management (admins only)."""
        return self.role in ("admin", "engineer")


def _hash_password(password: str, salt: bytes, iterations: int) -> str:
    return hashlib.pbkdf2_hmac("sha256", password.encode(), salt, iterations).hex()


def _token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class Auth:
    def __init__(self, state_dir: Path, iterations: int = _ITERATIONS):
        state_dir.mkdir(parents=True, exist_ok=True)
        self.path = state_dir / "studio.db"
        self.iterations = iterations
        os.close(os.open(self.path, os.O_CREAT | os.O_RDWR, 0o600))
        with contextlib.suppress(OSError):
            os.chmod(self.path, 0o600)
        with self._db() as db:
            db.executescript(_SCHEMA)

    @contextlib.contextmanager
    def _db(self):
        db = sqlite3.connect(self.path, timeout=30)
        try:
            with db:
                yield db
        finally:
            db.close()

    def users(self) -> list[User]:
        with self._db() as db:
            return [User(n, r) for n, r in db.execute("select name, role from users order by name")]

    def add_user(self, name: str, role: str, password: str | None = None) -> str:
        """Create or reset a user; returns the password (generated when none is given; shown once)."""
        name = name.strip()
        if not name or len(name) > 64:
            raise UserError("user name must be 1-64 characters")
        if role not in ROLES:
            raise UserError(f"role {role!r}: choose one of {', '.join(ROLES)}")
        password = password or secrets.token_urlsafe(12)
        if len(password) < 8:
            raise UserError("password must have at least 8 characters")
        salt = secrets.token_bytes(16)
        digest = _hash_password(password, salt, self.iterations)
        with self._db() as db:
            db.execute(
                "insert or replace into users values (?, ?, ?, ?, ?, ?)",
                (name, role, salt.hex(), digest, self.iterations, time.time()),
            )
            db.execute("delete from sessions where user = ?", (name,))
        return password

    def remove_user(self, name: str) -> None:
        with self._db() as db:
            db.execute("delete from users where name = ?", (name,))
            db.execute("delete from sessions where user = ?", (name,))

    def check_password(self, name: str, password: str) -> User | None:
        with self._db() as db:
            row = db.execute("select role, salt, hash, iterations from users where name = ?", (name,)).fetchone()
        if row is None:
            _hash_password(password, bytes(16), self.iterations)  # same time for unknown users
            return None
        role, salt, digest, iterations = row
        if not hmac.compare_digest(_hash_password(password, bytes.fromhex(salt), iterations), digest):
            return None
        return User(name, role)

    def login(self, name: str, password: str) -> tuple[str, User] | None:
        """A new session token (the cookie value) for a right password, else None."""
        user = self.check_password(name, password)
        if user is None:
            return None
        token, csrf = secrets.token_urlsafe(32), secrets.token_urlsafe(24)
        with self._db() as db:
            db.execute("delete from sessions where expires < ?", (time.time(),))
            db.execute(
                "insert into sessions values (?, ?, ?, ?)",
                (_token_hash(token), name, csrf, time.time() + SESSION_SECONDS),
            )
        return token, User(user.name, user.role, csrf)

    def session_user(self, token: str | None) -> User | None:
        if not token:
            return None
        with self._db() as db:
            row = db.execute(
                "select s.user, u.role, s.csrf from sessions s join users u on u.name = s.user "
                "where s.token_hash = ? and s.expires > ?",
                (_token_hash(token), time.time()),
            ).fetchone()
        return User(*row) if row else None

    def logout(self, token: str | None) -> None:
        if token:
            with self._db() as db:
                db.execute("delete from sessions where token_hash = ?", (_token_hash(token),))


def csrf_ok(user: User, presented: str | None) -> bool:
    return bool(presented) and hmac.compare_digest(user.csrf, presented or "")

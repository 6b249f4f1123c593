"""People who use the web UI: sign-in sessions, password changes and user management by admins.

A session cookie carries a random token; the database keeps only its hash (like API tokens), the user and the
session's CSRF token. Disabling a user or changing a password ends their other sessions.
"""

from __future__ import annotations

import secrets
import sqlite3
import time
from dataclasses import dataclass
from typing import Any

from gateway import passwords
from gateway.errors import Conflict, NotFound, RegistryError
from gateway.models import ROLES, User
from gateway.store.records import audit

__all__ = [
    "WebSession",
    "check_password",
    "end_session",
    "list_users",
    "lookup_session",
    "set_password",
    "start_session",
    "update_user",
]

MIN_PASSWORD = 10


@dataclass(frozen=True)
class WebSession:
    user: User
    csrf: str
    expires_at: float


def check_password(conn: sqlite3.Connection, username: str, password: str) -> User | None:
    """The user if the password is right and the account enabled (argon2: run it off the event loop)."""
    row = conn.execute("SELECT role, password_hash, disabled FROM users WHERE username = ?", (username,)).fetchone()
    if row is None:
        passwords.verify(_DUMMY_HASH, password)  # same cost for unknown names: no user enumeration by timing
        return None
    role, stored, disabled = row
    if disabled or not passwords.verify(stored, password):
        return None
    return User(username, role)


_DUMMY_HASH = passwords.hash_password(secrets.token_urlsafe(16))


def start_session(conn: sqlite3.Connection, username: str, hours: float, address: str | None) -> tuple[str, str]:
    """A new sign-in: returns (cookie token, csrf token)."""
    token, csrf = secrets.token_urlsafe(32), secrets.token_urlsafe(24)
    now = time.time()
    conn.execute("DELETE FROM web_sessions WHERE expires_at < ?", (now,))
    conn.execute(
        "INSERT INTO web_sessions(token_hash, username, csrf, created_at, expires_at, address) VALUES (?,?,?,?,?,?)",
        (passwords.token_hash(token), username, csrf, now, now + hours * 3600, address),
    )
    audit(conn, username, "user.login", username, {"address": address})
    return token, csrf


def lookup_session(conn: sqlite3.Connection, token: str) -> WebSession | None:
    row = conn.execute(
        "SELECT u.username, u.role, u.disabled, s.csrf, s.expires_at FROM web_sessions s "
        "JOIN users u ON u.username = s.username WHERE s.token_hash = ?",
        (passwords.token_hash(token),),
    ).fetchone()
    if row is None or row[2] or row[4] < time.time():
        return None
    return WebSession(User(row[0], row[1]), row[3], row[4])


def end_session(conn: sqlite3.Connection, token: str) -> None:
    row = conn.execute(
        "DELETE FROM web_sessions WHERE token_hash = ? RETURNING username", (passwords.token_hash(token),)
    ).fetchone()
    if row is not None:
        audit(conn, row[0], "user.logout", row[0], {})


def set_password(conn: sqlite3.Connection, username: str, new: str, actor: str, keep_token: str | None = None) -> None:
    """Change a password (the caller has checked the old one, or is an admin) and end the other sessions."""
    if len(new) < MIN_PASSWORD:
        raise RegistryError(f"passwords need at least {MIN_PASSWORD} characters")
    cur = conn.execute(
        "UPDATE users SET password_hash = ? WHERE username = ?", (passwords.hash_password(new), username)
    )
    if cur.rowcount == 0:
        raise NotFound(f"user {username} does not exist")
    keep = passwords.token_hash(keep_token) if keep_token else ""
    conn.execute("DELETE FROM web_sessions WHERE username = ? AND token_hash != ?", (username, keep))
    audit(conn, actor, "user.password", username, {})


def list_users(conn: sqlite3.Connection) -> list[dict[str, Any]]:
    rows = conn.execute(
        "SELECT u.username, u.role, u.disabled, u.created_at, "
        "(SELECT max(created_at) FROM web_sessions s WHERE s.username = u.username) "
        "FROM users u ORDER BY u.username"
    ).fetchall()
    return [
        {"username": n, "role": r, "disabled": bool(d), "created_at": c, "last_login": last}
        for n, r, d, c, last in rows
    ]


def update_user(conn: sqlite3.Connection, username: str, changes: dict[str, Any], actor: str) -> dict[str, Any]:
    """An admin changes a role or disables/enables an account; the last enabled admin cannot be demoted."""
    current = conn.execute("SELECT role, disabled FROM users WHERE username = ?", (username,)).fetchone()
    if current is None:
        raise NotFound(f"user {username} does not exist")
    role = changes.get("role", current[0])
    disabled = bool(changes.get("disabled", current[1]))
    if role not in ROLES:
        raise RegistryError(f"role {role!r} must be one of {', '.join(ROLES)}")
    if current[0] == "admin" and not current[1] and (role != "admin" or disabled):
        admins = conn.execute("SELECT count(*) FROM users WHERE role = 'admin' AND disabled = 0").fetchone()[0]
        if admins <= 1:
            raise Conflict(f"{username} is the last enabled admin: make another admin first")
    conn.execute("UPDATE users SET role = ?, disabled = ? WHERE username = ?", (role, int(disabled), username))
    if disabled or role != current[0]:
        conn.execute("DELETE FROM web_sessions WHERE username = ?", (username,))
    audit(conn, actor, "user.update", username, {"role": role, "disabled": disabled})
    return next(u for u in list_users(conn) if u["username"] == username)

"""One-time enrollment tokens: created by an admin, consumed by a sensor's first enrollment.

A token reads ``<id>.<secret>``: the 8-hex-digit id names it in listings and revocations, the
secret (``secrets.token_urlsafe(32)``, 256 random bits) is shown once and never stored. The
database keeps only SHA-256 of the whole token; with 256 bits of entropy a slow password hash
adds nothing. Hashes are compared in constant time.

The functions here run on a connection inside the caller's write transaction
(``PKIStore.transaction``), so consuming a token and recording the certificate it paid for
commit together or not at all.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import sqlite3
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

MAX_TTL = timedelta(days=30)
MAX_USES = 10_000
MAX_TOKEN_CHARS = 128

_TOKEN_RE = re.compile(r"([0-9a-f]{8})\.([A-Za-z0-9_-]{43})")
_ID_RE = re.compile(r"[0-9a-f]{8}")

# What a remote client is told for every refusal: which check failed (unknown, expired,
# used up, revoked) would help someone guessing or replaying tokens, so only the local log
# and the admin CLI see the precise reason.
PUBLIC_MESSAGE = "invalid or expired token"


class TokenError(ValueError):
    """A token was refused. ``str()`` is the precise reason; ``public_message`` the generic one."""

    public_message = PUBLIC_MESSAGE


class TokenMalformed(TokenError):
    pass


class TokenUnknown(TokenError):
    pass


class TokenExpired(TokenError):
    pass


class TokenUsedUp(TokenError):
    pass


class TokenRevoked(TokenError):
    pass


@dataclass(frozen=True)
class TokenInfo:
    """A token as listed: everything but the secret, which is never stored."""

    id: str
    created_at: datetime
    expires_at: datetime
    uses_allowed: int
    uses_count: int
    revoked_at: datetime | None
    last_used_at: datetime | None
    comment: str

    def status(self, now: datetime | None = None) -> str:
        """``active``, ``revoked``, ``used`` or ``expired``."""
        now = now or datetime.now(UTC)
        if self.revoked_at is not None:
            return "revoked"
        if self.uses_count >= self.uses_allowed:
            return "used"
        if now >= self.expires_at:
            return "expired"
        return "active"


SCHEMA = """
CREATE TABLE IF NOT EXISTS tokens (
    id            TEXT PRIMARY KEY,
    hash          TEXT NOT NULL,
    created_at    TEXT NOT NULL,
    expires_at    TEXT NOT NULL,
    uses_allowed  INTEGER NOT NULL,
    uses_count    INTEGER NOT NULL DEFAULT 0,
    revoked_at    TEXT,
    last_used_at  TEXT,
    comment       TEXT NOT NULL DEFAULT ''
);
"""


def _hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def _ts(dt: datetime) -> str:
    return dt.astimezone(UTC).isoformat()


def _dt(value: str | None) -> datetime | None:
    return None if value is None else datetime.fromisoformat(value)


def create(
    conn: sqlite3.Connection,
    ttl: timedelta,
    uses: int = 1,
    *,
    comment: str = "",
    now: datetime | None = None,
) -> str:
    """Store a new token and return it; the caller shows it once, it cannot be recovered."""
    if ttl <= timedelta(0) or ttl > MAX_TTL:
        raise ValueError(f"token TTL must be more than 0 and at most {MAX_TTL.days} days")
    if not 1 <= uses <= MAX_USES:
        raise ValueError(f"token uses must be between 1 and {MAX_USES}")
    if len(comment) > 200 or not comment.isprintable():
        raise ValueError("token comment must be printable and at most 200 characters")
    now = now or datetime.now(UTC)
    while True:
        token_id = secrets.token_hex(4)
        token = f"{token_id}.{secrets.token_urlsafe(32)}"
        try:
            conn.execute(
                "INSERT INTO tokens (id, hash, created_at, expires_at, uses_allowed, comment)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                (token_id, _hash(token), _ts(now), _ts(now + ttl), uses, comment),
            )
        except sqlite3.IntegrityError:
            continue  # id collision (1 in 4 billion): draw again
        return token


def consume(conn: sqlite3.Connection, token: str, *, now: datetime | None = None) -> str:
    """Check ``token`` and count one use; return its id.

    Must run inside a write transaction (BEGIN IMMEDIATE) so two concurrent enrollments
    cannot both take the last use.

    Raises:
        TokenError: a subclass naming the precise reason.
    """
    if not isinstance(token, str) or len(token) > MAX_TOKEN_CHARS:
        raise TokenMalformed("token malformed: not a string of sensible length")
    match = _TOKEN_RE.fullmatch(token.strip())
    if match is None:
        raise TokenMalformed("token malformed: expected <8 hex id>.<43-character secret>")
    token_id = match.group(1)
    row = conn.execute(
        "SELECT hash, expires_at, uses_allowed, uses_count, revoked_at FROM tokens WHERE id = ?",
        (token_id,),
    ).fetchone()
    # Hash the candidate even for an unknown id so both paths cost the same.
    candidate = _hash(token.strip())
    stored = row[0] if row else "0" * 64
    if not hmac.compare_digest(candidate, stored) or row is None:
        raise TokenUnknown(f"token {token_id} unknown (no such id, or wrong secret)")
    now = now or datetime.now(UTC)
    if row[4] is not None:
        raise TokenRevoked(f"token {token_id} was revoked")
    if now >= datetime.fromisoformat(row[1]):
        raise TokenExpired(f"token {token_id} expired at {row[1]}")
    if row[3] >= row[2]:
        raise TokenUsedUp(f"token {token_id} already used {row[3]} of {row[2]} times")
    cur = conn.execute(
        "UPDATE tokens SET uses_count = uses_count + 1, last_used_at = ?"
        " WHERE id = ? AND uses_count < uses_allowed",
        (_ts(now), token_id),
    )
    if cur.rowcount != 1:  # only reachable without the write lock the docstring asks for
        raise TokenUsedUp(f"token {token_id} was used up concurrently")
    return token_id


def list_all(conn: sqlite3.Connection) -> list[TokenInfo]:
    """All tokens, oldest first."""
    rows = conn.execute(
        "SELECT id, created_at, expires_at, uses_allowed, uses_count, revoked_at, last_used_at,"
        " comment FROM tokens ORDER BY created_at, id"
    ).fetchall()
    return [
        TokenInfo(
            id=r[0],
            created_at=datetime.fromisoformat(r[1]),
            expires_at=datetime.fromisoformat(r[2]),
            uses_allowed=r[3],
            uses_count=r[4],
            revoked_at=_dt(r[5]),
            last_used_at=_dt(r[6]),
            comment=r[7],
        )
        for r in rows
    ]


def revoke(conn: sqlite3.Connection, token_id: str, *, now: datetime | None = None) -> None:
    """Revoke a token by id so it can no longer be used.

    Raises:
        ValueError: malformed id. TokenUnknown: no such token.
    """
    if not isinstance(token_id, str) or not _ID_RE.fullmatch(token_id):
        raise ValueError(f"invalid token id {token_id!r}: expected 8 hex digits")
    cur = conn.execute(
        "UPDATE tokens SET revoked_at = COALESCE(revoked_at, ?) WHERE id = ?",
        (_ts(now or datetime.now(UTC)), token_id),
    )
    if cur.rowcount != 1:
        raise TokenUnknown(f"no token with id {token_id}")

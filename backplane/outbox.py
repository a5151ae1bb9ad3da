"""The sensor's durable outbox: batches of events waiting for the controller's ack.

SQLite in WAL mode. ``append`` groups events into batches (by count, and by age through
``flush_due``); each sealed batch gets a sequence number and is durable before ``append`` or
``flush`` returns. Batches are deleted only by ``ack``. The outbox is bounded in bytes: when it
overflows it drops the OLDEST batches and adds the exact number of events dropped to the next
batch's ``dropped`` count, which travels with that batch in its EVENTS message (a dropped
batch's own pending count rolls forward too, so nothing is counted twice or lost).

Sequence numbers start at the creation time in microseconds, so an outbox that is wiped and
recreated keeps numbering above the old one and the controller, which drops duplicates by
(host, seq), does not mistake new batches for old ones.
"""

from __future__ import annotations

import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack

DEFAULT_MAX_BYTES = 1024 * 1024 * 1024
DEFAULT_BATCH_EVENTS = 500
DEFAULT_BATCH_AGE = 0.2  # seconds an unsealed batch may wait


@dataclass(frozen=True)
class Batch:
    seq: int
    events: list[dict[str, Any]]
    dropped: int


class Outbox:
    """Thread-safe: capture threads append, the backplane client thread peeks and acks."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        max_bytes: int = DEFAULT_MAX_BYTES,
        batch_events: int = DEFAULT_BATCH_EVENTS,
        batch_age: float = DEFAULT_BATCH_AGE,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_bytes <= 0 or batch_events <= 0:
            raise ValueError("max_bytes and batch_events must be positive")
        self.path = Path(path)
        self.max_bytes = max_bytes
        self.batch_events = batch_events
        self.batch_age = batch_age
        self._clock = clock
        self._lock = threading.Lock()
        self._pending: list[dict[str, Any]] = []
        self._pending_since = 0.0
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # Events may carry command lines: owner-only files. Created 0600 here (SQLite gives its
        # -wal and -shm files the database's mode); not via the umask, which is process-wide.
        os.close(os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600))
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")  # an appended batch survives power loss
        self._db.executescript(
            """
            CREATE TABLE IF NOT EXISTS batches (
                seq INTEGER PRIMARY KEY AUTOINCREMENT,
                n_events INTEGER NOT NULL,
                dropped INTEGER NOT NULL DEFAULT 0,
                body BLOB NOT NULL
            );
            CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
            """
        )
        with self._tx():
            row = self._db.execute(
                "SELECT seq FROM sqlite_sequence WHERE name='batches'"
            ).fetchone()
            if row is None:
                start = time.time_ns() // 1000
                self._db.execute(
                    "INSERT INTO sqlite_sequence(name, seq) VALUES ('batches', ?)", (start,)
                )
            # Drops not yet attached to a batch (possible only if every batch was dropped).
            self._db.execute("INSERT OR IGNORE INTO meta(key, value) VALUES ('carry', 0)")
        self._bytes, self._count = self._db.execute(
            "SELECT COALESCE(SUM(LENGTH(body)), 0), COUNT(*) FROM batches"
        ).fetchone()

    # -- writing ---------------------------------------------------------------------------
    def append(self, events: Iterable[dict[str, Any]]) -> None:
        """Queue events; every full batch is sealed and durable before this returns."""
        with self._lock:
            for ev in events:
                if not self._pending:
                    self._pending_since = self._clock()
                self._pending.append(ev)
                if len(self._pending) >= self.batch_events:
                    self._seal()

    def flush(self) -> None:
        """Seal the partial batch now (at shutdown, or when the caller must be durable)."""
        with self._lock:
            if self._pending:
                self._seal()

    def flush_due(self) -> bool:
        """Seal the partial batch if it is older than ``batch_age``; True if it sealed one."""
        with self._lock:
            if self._pending and self._clock() - self._pending_since >= self.batch_age:
                self._seal()
                return True
            return False

    def _seal(self) -> None:
        events, self._pending = self._pending, []
        try:
            body = msgpack.packb(events, use_bin_type=True)
        except (TypeError, ValueError, OverflowError) as exc:
            # A poison event must not block the outbox: refuse it loudly, keep the others.
            good = [e for e in events if _encodable(e)]
            self._pending = good + self._pending
            raise ValueError(
                f"{len(events) - len(good)} event(s) cannot be encoded and were refused: {exc}"
            ) from None
        try:
            with self._tx():
                carry = self._db.execute("SELECT value FROM meta WHERE key='carry'").fetchone()[0]
                self._db.execute(
                    "INSERT INTO batches(n_events, dropped, body) VALUES (?, ?, ?)",
                    (len(events), carry, body),
                )
                self._db.execute("UPDATE meta SET value=0 WHERE key='carry'")
                self._bytes += len(body)
                self._count += 1
                self._trim()
        except Exception:
            # Nothing is lost: the events go back to the partial batch and the counters are
            # re-read from the rolled-back database.
            self._pending = events + self._pending
            self._bytes, self._count = self._db.execute(
                "SELECT COALESCE(SUM(LENGTH(body)), 0), COUNT(*) FROM batches"
            ).fetchone()
            raise

    def _trim(self) -> None:
        """Drop oldest batches until under the bound; runs inside the sealing transaction."""
        dropped = 0
        while self._bytes > self.max_bytes and self._count > 1:
            seq, n, carried, size = self._db.execute(
                "SELECT seq, n_events, dropped, LENGTH(body) FROM batches ORDER BY seq LIMIT 1"
            ).fetchone()
            self._db.execute("DELETE FROM batches WHERE seq=?", (seq,))
            dropped += n + carried
            self._bytes -= size
            self._count -= 1
        if dropped:
            # The newest batch is never dropped here, so it carries the count.
            self._db.execute(
                "UPDATE batches SET dropped = dropped + ?"
                " WHERE seq = (SELECT MAX(seq) FROM batches)",
                (dropped,),
            )

    # -- reading ---------------------------------------------------------------------------
    def peek(self, after: int = -1, limit: int = 1) -> list[Batch]:
        """Up to ``limit`` sealed batches with ``seq > after``, oldest first."""
        with self._lock:
            rows = self._db.execute(
                "SELECT seq, dropped, body FROM batches WHERE seq > ? ORDER BY seq LIMIT ?",
                (after, limit),
            ).fetchall()
        return [Batch(seq, msgpack.unpackb(body, raw=False), drop) for seq, drop, body in rows]

    def ack(self, seq: int) -> bool:
        """Delete an acknowledged batch. False if it was not there (already acked or dropped)."""
        with self._lock, self._tx():
            row = self._db.execute(
                "SELECT LENGTH(body) FROM batches WHERE seq=?", (seq,)
            ).fetchone()
            if row is None:
                return False
            self._db.execute("DELETE FROM batches WHERE seq=?", (seq,))
            self._bytes -= row[0]
            self._count -= 1
            return True

    @property
    def depth(self) -> int:
        """Sealed batches waiting for an ack."""
        return self._count

    @property
    def size_bytes(self) -> int:
        return self._bytes

    def pending_events(self) -> int:
        """Events waiting: in sealed batches plus the partial batch."""
        with self._lock:
            (n,) = self._db.execute("SELECT COALESCE(SUM(n_events), 0) FROM batches").fetchone()
            return int(n) + len(self._pending)

    def close(self) -> None:
        """Seal the partial batch and close the database."""
        self.flush()
        with self._lock:
            self._db.close()

    # -- helpers ---------------------------------------------------------------------------
    def _tx(self) -> _Tx:
        return _Tx(self._db)


def _encodable(event: Any) -> bool:
    try:
        msgpack.packb(event, use_bin_type=True)
    except (TypeError, ValueError, OverflowError):
        return False
    return True


class _Tx:
    """BEGIN IMMEDIATE … COMMIT, or ROLLBACK on error (the connection is in autocommit mode)."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db

    def __enter__(self) -> None:
        self._db.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        self._db.execute("COMMIT" if exc_type is None else "ROLLBACK")

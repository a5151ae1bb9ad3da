"""A small real SQLite implementation of ControllerHooks, for tests and the benchmark.

The controller's store replaces it; it exists so the backplane is tested against a durable
store: a batch and its (host, seq) mark commit in one transaction before the ACK goes out.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from pathlib import Path
from typing import Any

import msgpack

from backplane.messages import Command, CommandResult, Heartbeat, Hello, Policy
from certs.pki import CertificateAuthority


class SqliteHooks:
    def __init__(
        self, path: Path, ca: CertificateAuthority | None = None, synchronous: str = "FULL"
    ) -> None:
        self.path = path
        self.ca = ca
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute(f"PRAGMA synchronous={synchronous}")
        self._db.executescript(
            """
            CREATE TABLE IF NOT EXISTS batches (host TEXT, seq INTEGER, n INTEGER,
                dropped INTEGER, PRIMARY KEY (host, seq));
            CREATE TABLE IF NOT EXISTS events (host TEXT, seq INTEGER, idx INTEGER, body BLOB);
            CREATE TABLE IF NOT EXISTS commands (id TEXT PRIMARY KEY, host TEXT, action TEXT,
                args TEXT, status TEXT, output TEXT);
            CREATE TABLE IF NOT EXISTS hosts (host TEXT PRIMARY KEY, hostname TEXT,
                policy_applied INTEGER, heartbeats INTEGER DEFAULT 0, last_heartbeat TEXT);
            CREATE TABLE IF NOT EXISTS policy (host TEXT PRIMARY KEY, version INTEGER, doc TEXT);
            """
        )
        self._lock = threading.Lock()
        self.disconnects: list[tuple[str, str]] = []

    # -- ControllerHooks ---------------------------------------------------------------------
    async def on_hello(self, host_id: str, hello: Hello, peer: str) -> None:
        with self._lock:
            self._db.execute(
                "INSERT INTO hosts(host, hostname) VALUES (?, ?) "
                "ON CONFLICT(host) DO UPDATE SET hostname=excluded.hostname",
                (host_id, hello.hostname),
            )

    async def commit_batch(
        self, host_id: str, seq: int, events: list[dict[str, Any]], dropped: int
    ) -> bool:
        with self._lock:
            db = self._db
            db.execute("BEGIN IMMEDIATE")
            try:
                cur = db.execute(
                    "INSERT OR IGNORE INTO batches VALUES (?, ?, ?, ?)",
                    (host_id, seq, len(events), dropped),
                )
                if cur.rowcount == 0:
                    db.execute("ROLLBACK")
                    return False
                db.executemany(
                    "INSERT INTO events VALUES (?, ?, ?, ?)",
                    [(host_id, seq, i, msgpack.packb(ev)) for i, ev in enumerate(events)],
                )
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
            return True

    async def on_heartbeat(self, host_id: str, heartbeat: Heartbeat) -> None:
        with self._lock:
            self._db.execute(
                "UPDATE hosts SET heartbeats = heartbeats + 1, last_heartbeat=? WHERE host=?",
                (json.dumps(heartbeat.metrics), host_id),
            )

    async def pending_commands(self, host_id: str) -> list[Command]:
        with self._lock:
            rows = self._db.execute(
                "SELECT id, action, args FROM commands WHERE host=? AND status IS NULL "
                "ORDER BY rowid",
                (host_id,),
            ).fetchall()
        return [Command(i, a, json.loads(args)) for i, a, args in rows]

    async def command_result(self, host_id: str, result: CommandResult) -> None:
        with self._lock:
            self._db.execute(
                "UPDATE commands SET status=?, output=? WHERE id=? AND host=?",
                (result.status, json.dumps(result.output), result.id, host_id),
            )

    async def current_policy(self, host_id: str) -> Policy | None:
        with self._lock:
            row = self._db.execute(
                "SELECT version, doc FROM policy WHERE host=?", (host_id,)
            ).fetchone()
        return None if row is None else Policy(row[0], json.loads(row[1]))

    async def policy_applied(self, host_id: str, version: int) -> None:
        with self._lock:
            self._db.execute("UPDATE hosts SET policy_applied=? WHERE host=?", (version, host_id))

    async def renew(self, host_id: str, csr_pem: bytes) -> bytes:
        if self.ca is None:
            raise ValueError("this controller cannot sign certificates")
        return self.ca.sign_csr(csr_pem, host_id)

    async def on_disconnect(self, host_id: str, reason: str) -> None:
        self.disconnects.append((host_id, reason))

    # -- test helpers ------------------------------------------------------------------------
    def queue_command(
        self, host_id: str, cmd_id: str, action: str, args: dict[str, Any] | None = None
    ) -> None:
        with self._lock:
            self._db.execute(
                "INSERT INTO commands(id, host, action, args) VALUES (?, ?, ?, ?)",
                (cmd_id, host_id, action, json.dumps(args or {})),
            )

    def set_policy(self, host_id: str, version: int, doc: dict[str, Any]) -> None:
        with self._lock:
            self._db.execute(
                "INSERT OR REPLACE INTO policy VALUES (?, ?, ?)",
                (host_id, version, json.dumps(doc)),
            )

    def query(self, sql: str, *args: Any) -> list[tuple[Any, ...]]:
        with self._lock:
            return self._db.execute(sql, args).fetchall()

    def close(self) -> None:
        with self._lock:
            self._db.close()

"""The SQLite implementation of ``Store``: one file in WAL mode, and the process ancestry
table in a second one next to it (``<file>-processes``).

Threading: one writer connection behind a lock (SQLite allows one writer at a time anyway),
and one read connection per calling thread, so readers never wait for the writer and see
only committed data (WAL snapshots). The process file has its own writer connection and lock,
used by ``fold_processes`` and retention only: its random-page upserts never hold the writer
that ingest waits for. That connection ATTACHes the store (as ``store``) to read new events;
read connections ATTACH the process file (as ``proc``).

Durability: ``synchronous=FULL`` by default. In WAL mode ``NORMAL`` already survives a
``kill -9`` of the controller (the committed WAL frames are in the OS page cache), but not a
power loss or kernel crash, and the backplane acks a batch as soon as ``ingest_batch``
returns; the sensor then deletes it from its outbox, so a commit that is lost after the ack
is an event lost for good. With 1,000-10,000 events per transaction the extra fsync per
commit costs little (see bench/store_ingest.py). ``NORMAL`` can be chosen explicitly where
losing the last moments before a power cut is acceptable.
"""

# SQL text in this module is assembled only from constant fragments defined here (column
# lists, fixed WHERE clauses); every value from a caller is a bound parameter.
# ruff: noqa: S608

from __future__ import annotations

import base64
import binascii
import calendar
import functools
import ipaddress
import json
import math
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any, TypeVar

import orjson

from controller.store.interface import (
    ALERT_TRANSITIONS,
    COMMAND_TRANSITIONS,
    Alert,
    AlertComment,
    AlertDraft,
    AlertStatus,
    ApiToken,
    AuditEntry,
    Command,
    CommandStatus,
    Conflict,
    EventPage,
    Host,
    HostHello,
    InvalidInput,
    InvalidTransition,
    MetricsSample,
    NotFound,
    PolicyVersion,
    ProcessNode,
    ProcessTree,
    RetentionResult,
    Role,
    SchemaTooNew,
    Session,
    Severity,
    StoredBatch,
    StoredEvent,
    StoreError,
    User,
)
from controller.store.migrations import (
    LATEST_VERSION,
    MIGRATIONS,
    PROCESS_FILE_SCHEMA,
    PROCESS_FILE_VERSION,
    check_order,
)

_MAX_INT = 2**63 - 1
_RETENTION_CHUNK = 20_000
_MAX_ANCESTORS = 64
_MAX_NAME = 256


# -- encoding helpers ---------------------------------------------------------------------


def _json_default(value: object) -> object:
    # msgpack hands raw bytes through; keep them losslessly as surrogate-escaped text
    # (json escapes the surrogates, and json.loads gives the same string back).
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value).decode("utf-8", "surrogateescape")
    if isinstance(value, tuple | set | frozenset):
        return list(value)
    raise TypeError(f"{type(value).__name__} is not JSON-serialisable")


# The stdlib encoder is the fallback for what orjson refuses: ensure_ascii keeps lone
# surrogates (undecodable argv bytes) storable, since SQLite text must be valid UTF-8, and the
# escaped form round-trips through json.loads unchanged; it also takes integers beyond 64 bits.
_encode_slow = json.JSONEncoder(
    ensure_ascii=True, allow_nan=False, separators=(",", ":"), default=_json_default
).encode
_ORJSON_OPTIONS = orjson.OPT_NON_STR_KEYS


def _dumps(value: object, what: str) -> str:
    """Compact JSON text. orjson on the hot path (4x faster than the stdlib here)."""
    try:
        return orjson.dumps(value, default=_json_default, option=_ORJSON_OPTIONS).decode()
    except (TypeError, orjson.JSONEncodeError):
        pass
    try:
        return _encode_slow(value)
    except (TypeError, ValueError, RecursionError) as e:
        raise InvalidInput(f"{what}: {e}") from None


def _loads(text: str) -> Any:
    """A stored document decoded: orjson, or the stdlib decoder for the escaped lone
    surrogates (undecodable argv bytes) that orjson refuses."""
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError:
        return json.loads(text)


def _text(value: object) -> str | None:
    """A string safe to bind as SQLite TEXT (valid UTF-8), or ``None`` for non-strings."""
    if not isinstance(value, str):
        return None
    if value.isascii():
        return value
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        # Lone surrogates from undecodable bytes: show them as \xNN in the indexed column;
        # the event document keeps the exact original.
        return value.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    return value


def _int(value: object) -> int | None:
    if isinstance(value, int) and not isinstance(value, bool) and -_MAX_INT <= value <= _MAX_INT:
        return value
    return None


def _dict(value: object) -> Mapping[str, Any] | None:
    # ``type() is dict`` first: the ABC check behind isinstance(Mapping) costs ~0.5 µs.
    if type(value) is dict or isinstance(value, Mapping):
        return value
    return None


_second_cache: dict[str, int] = {}
_EMPTY: Mapping[str, Any] = {}


def _parse_ts_us(value: object) -> int | None:
    """``@timestamp`` as integer microseconds since the epoch, ``None`` if unparseable.

    The schema's own format (``2024-01-02T03:04:05.123456Z``) takes a fast path with the
    whole-second part cached, since a batch shares a handful of seconds.
    """
    if not isinstance(value, str):
        return None
    if len(value) == 27 and value[19] == "." and value[26] == "Z":
        head = value[:19]
        base = _second_cache.get(head)
        if base is None:
            try:
                base = calendar.timegm(time.strptime(head, "%Y-%m-%dT%H:%M:%S"))
            except ValueError:
                return None
            if len(_second_cache) > 4096:
                _second_cache.clear()
            _second_cache[head] = base
        frac = value[20:26]
        if not frac.isdigit():
            return None
        return base * 1_000_000 + int(frac)
    try:
        dt = datetime.fromisoformat(value)
    except ValueError:
        return None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)  # ECS timestamps are UTC
    return round(dt.timestamp() * 1_000_000)


def _check_name(value: object, what: str, max_len: int = _MAX_NAME) -> str:
    if not isinstance(value, str) or not value or len(value) > max_len:
        raise InvalidInput(f"{what} must be a non-empty string of at most {max_len} characters")
    if any(ord(ch) < 32 or ch == "\x7f" for ch in value):
        raise InvalidInput(f"{what} must not contain control characters")
    if _text(value) != value:
        raise InvalidInput(f"{what} must be valid UTF-8 text")
    return value


_MAX_SECONDS = 1e11  # about year 5138


def _check_time(value: object, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise InvalidInput(f"{what} must be a finite number of seconds")
    if not -_MAX_SECONDS <= value <= _MAX_SECONDS:
        # Finite but absurd (1e308): it would overflow the microsecond columns.
        raise InvalidInput(f"{what} must be within ±{_MAX_SECONDS:.0e} seconds of the epoch")
    return float(value)


def _check_limit(limit: object, maximum: int = 10_000) -> int:
    if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= maximum:
        raise InvalidInput(f"limit must be an integer from 1 to {maximum}")
    return limit


def _check_id(value: object, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= _MAX_INT:
        raise InvalidInput(f"{what} must be a non-negative integer")
    return value


_E = TypeVar("_E", CommandStatus, AlertStatus, Severity, Role)


def _enum(kind: type[_E], value: object) -> _E:
    try:
        return kind(value)  # type: ignore[arg-type]
    except ValueError:
        allowed = ", ".join(m.value for m in kind)
        raise InvalidInput(f"{value!r} is not a valid {kind.__name__} ({allowed})") from None


def _cursor_encode(ts_us: int, event_id: int) -> str:
    return base64.urlsafe_b64encode(f"{ts_us}:{event_id}".encode()).decode().rstrip("=")


def _cursor_decode(cursor: str) -> tuple[int, int]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        ts_s, id_s = raw.split(":")
        ts_us, event_id = int(ts_s), int(id_s)
    except (ValueError, binascii.Error, UnicodeDecodeError):
        raise InvalidInput("cursor is not one this store returned") from None
    if abs(ts_us) > _MAX_INT or not 0 <= event_id <= _MAX_INT:
        raise InvalidInput("cursor is not one this store returned")
    return ts_us, event_id


# -- row → record -------------------------------------------------------------------------

_HOST_COLS = (
    "host_id, hostname, os, kernel, sensor_version, tiers, first_seen, last_seen, metrics, drops,"
    " outbox_depth, events_dropped, isolated, isolation_changed_at, policy_version,"
    " policy_applied_at"
)
_COMMAND_COLS = (
    "id, host_id, action, args, requested_by, idempotency_key, status, created_at, expires_at,"
    " sent_at, acknowledged_at, finished_at, output"
)
_ALERT_COLS = (
    "id, created_at, updated_at, rule_id, rule_name, severity, host_id, event_id, event,"
    " ancestry, status, assignee"
)
_PROCESS_ALL = (
    "host_id, entity_id, pid, parent_entity_id, ppid, executable, command_line, user_name,"
    " start_ts, exit_ts, exit_code, last_ts"
)
_PROCESS_COLS = (
    "entity_id, pid, parent_entity_id, ppid, executable, command_line, user_name, start_ts,"
    " exit_ts, exit_code"
)
_USER_COLS = "username, password_hash, role, disabled, created_at, updated_at"
_TOKEN_COLS = "id, name, token_hash, role, owner, created_at, last_used, revoked"  # noqa: S105
_AUDIT_COLS = "id, ts, actor, action, target, detail, source"
_SESSION_COLS = "id_hash, username, csrf_token, created_at, last_seen, expires_at, source"


def _us_to_s(us: int | None) -> float | None:
    return None if us is None else us / 1_000_000


def _command(row: sqlite3.Row) -> Command:
    return Command(
        id=row[0],
        host_id=row[1],
        action=row[2],
        args=json.loads(row[3]),
        requested_by=row[4],
        idempotency_key=row[5],
        status=CommandStatus(row[6]),
        created_at=row[7],
        expires_at=row[8],
        sent_at=row[9],
        acknowledged_at=row[10],
        finished_at=row[11],
        output=None if row[12] is None else json.loads(row[12]),
    )


def _alert(row: sqlite3.Row, comments: list[AlertComment] | None = None) -> Alert:
    return Alert(
        id=row[0],
        created_at=row[1],
        updated_at=row[2],
        rule_id=row[3],
        rule_name=row[4],
        severity=Severity(row[5]),
        host_id=row[6],
        event_id=row[7],
        event=json.loads(row[8]),
        ancestry=json.loads(row[9]),
        status=AlertStatus(row[10]),
        assignee=row[11],
        comments=comments or [],
    )


def _process(row: sqlite3.Row) -> ProcessNode:
    return ProcessNode(
        entity_id=row[0],
        pid=row[1],
        parent_entity_id=row[2],
        ppid=row[3],
        executable=row[4],
        command_line=row[5],
        user=row[6],
        start=_us_to_s(row[7]),
        exit=_us_to_s(row[8]),
        exit_code=row[9],
    )


def _user(row: sqlite3.Row) -> User:
    return User(
        username=row[0],
        password_hash=row[1],
        role=Role(row[2]),
        disabled=bool(row[3]),
        created_at=row[4],
        updated_at=row[5],
    )


def _token(row: sqlite3.Row) -> ApiToken:
    return ApiToken(
        id=row[0],
        name=row[1],
        token_hash=row[2],
        role=Role(row[3]),
        owner=row[4],
        created_at=row[5],
        last_used=row[6],
        revoked=bool(row[7]),
    )


def _audit(row: sqlite3.Row) -> AuditEntry:
    return AuditEntry(
        id=row[0],
        ts=row[1],
        actor=row[2],
        action=row[3],
        target=row[4],
        detail=json.loads(row[5]),
        source=row[6],
    )


# -- SQL for the hot path -----------------------------------------------------------------

_INSERT_EVENT = (
    "INSERT INTO events (batch_id, host_id, ts, category, action, pid, entity_id, executable,"
    " command_line, file_path, src_ip, src_port, dst_ip, dst_port, user_name, size, doc,"
    " parent_entity_id, ppid, parent_executable, parent_command_line, exit_code)"
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
_EVENT_COLUMNS = 22
# Events whose process facts (parent, exit code) go to columns for the process table.
_PROCESS_ACTIONS = frozenset(("exec", "fork", "exit"))
# Rows per INSERT statement. ``executemany`` steps once per row and the sqlite3 module drops
# and retakes the GIL around every step; with detection running Python in another thread each
# retake can wait, so one multi-row statement per chunk (one step, one GIL hand-off) keeps the
# writer moving. 256 rows x 22 columns stays far below SQLite's 32766 bound parameters.
_ROWS_PER_INSERT = 256


@functools.cache
def _insert_many(n: int) -> str:
    row = "(" + ", ".join("?" * _EVENT_COLUMNS) + ")"
    return _INSERT_EVENT.split(" VALUES ")[0] + " VALUES " + ", ".join([row] * n)


def _insert_events(c: sqlite3.Connection, batch_id: int, rows: list[tuple[Any, ...]]) -> None:
    """Insert ``rows`` (without the batch id) in order, so their ids stay consecutive.

    Chunks are 256 rows and then powers of two, so a handful of statement texts covers every
    batch size and stays in the connection's statement cache.
    """
    start = 0
    n = _ROWS_PER_INSERT
    while start < len(rows):
        while n > len(rows) - start:
            n //= 2
        params: list[Any] = []
        for r in rows[start : start + n]:
            params.append(batch_id)
            params.extend(r)
        c.execute(_insert_many(n), params)
        start += n


# Process ancestry is derived from stored exec/fork/exit events by ``index_pending``, in SQL:
# its random-key index (host, entity id) stays off the ingest path. The parent and exit code
# come from columns ``store_batch`` fills for these events only (migration 4), never from
# the document: json_extract re-parses the JSON text on every call. NOT INDEXED keeps SQLite
# on the id range: left to itself it read ``events_action_ts`` (every exec, fork and exit ever
# stored, then a sort), so each call cost more as the table grew.
_PROCESS_ROWS = (
    "FROM events NOT INDEXED WHERE id > ? AND id <= ? AND action IN ('exec', 'fork', 'exit')"
    " AND entity_id IS NOT NULL"
)
# What a child event says about its parent only fills gaps; the parent's own events win.
_STUB_PROCESSES = f"""
INSERT INTO processes (host_id, entity_id, pid, executable, command_line, last_ts)
SELECT host_id, parent_entity_id, ppid, parent_executable, parent_command_line, ts
{_PROCESS_ROWS} AND parent_entity_id IS NOT NULL
ORDER BY id
ON CONFLICT (host_id, entity_id) DO UPDATE SET last_ts = max(last_ts, excluded.last_ts)
"""
_UPSERT_PROCESSES = f"""
INSERT INTO processes (host_id, entity_id, pid, parent_entity_id, ppid, executable,
                       command_line, user_name, start_ts, exit_ts, exit_code, last_ts)
SELECT host_id, entity_id, pid, parent_entity_id, ppid, executable, command_line, user_name,
       CASE WHEN action = 'exit' THEN NULL ELSE ts END,
       CASE WHEN action = 'exit' THEN ts END,
       CASE WHEN action = 'exit' THEN exit_code END,
       ts
{_PROCESS_ROWS}
ORDER BY id
ON CONFLICT (host_id, entity_id) DO UPDATE SET
    pid = coalesce(excluded.pid, pid),
    parent_entity_id = coalesce(excluded.parent_entity_id, parent_entity_id),
    ppid = coalesce(excluded.ppid, ppid),
    executable = coalesce(excluded.executable, executable),
    command_line = coalesce(excluded.command_line, command_line),
    user_name = coalesce(excluded.user_name, user_name),
    start_ts = CASE WHEN start_ts IS NULL OR excluded.start_ts < start_ts
                    THEN excluded.start_ts ELSE start_ts END,
    exit_ts = coalesce(excluded.exit_ts, exit_ts),
    exit_code = coalesce(excluded.exit_code, exit_code),
    last_ts = max(last_ts, excluded.last_ts)
"""
# What full text indexes, per event: command line and executable of exec events (and of
# events of unknown kind), file paths of file events. A file or network event's process
# fields repeat its exec event's, so indexing them again would triple the indexer's work for
# no new matches: search finds the exec, and ``entity_id`` pivots to everything it did.
# Deletion from a contentless index must repeat exactly these values.
_FTS_PROC = (
    "(coalesce({p}category, '') NOT IN ('file', 'network')"
    " AND coalesce({p}action, '') NOT IN ('fork', 'exit'))"
)
_FTS_VALUES = (
    f"CASE WHEN {_FTS_PROC} THEN {{p}}command_line END, {{p}}file_path,"
    f" CASE WHEN {_FTS_PROC} THEN {{p}}executable END"
)
_FTS_WANTED = (
    f"({{p}}file_path IS NOT NULL OR ({_FTS_PROC}"
    " AND ({p}command_line IS NOT NULL OR {p}executable IS NOT NULL)))"
)

_FTS_INSERT = (
    "INSERT INTO events_fts (rowid, command_line, file_path, executable)"
    f" SELECT id, {_FTS_VALUES.format(p='')} FROM events"
    f" WHERE id > ? AND id <= ? AND {_FTS_WANTED.format(p='')}"
)


def _newest_first(
    select: str,
    where: list[str],
    params: list[Any],
    time_column: str,
    since: float | None,
    before_id: int | None,
) -> str:
    """``select`` filtered by ``where`` plus the shared ``since``/``before_id`` paging
    filters (appended to ``params``), newest first; the caller binds the limit last."""
    if since is not None:
        where.append(f"{time_column} >= ?")
        params.append(_check_time(since, "since"))
    if before_id is not None:
        where.append("id < ?")
        params.append(_check_id(before_id, "before_id"))
    if where:
        select += " WHERE " + " AND ".join(where)
    return select + " ORDER BY id DESC LIMIT ?"


class SQLiteStore:
    """``Store`` on one SQLite file. See the module docstring for threading and durability."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        synchronous: str = "FULL",
        offline_after: float = 90.0,
        metrics_history: int = 2880,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """Open (creating if needed, mode 0600) and migrate the database at ``path``.

        Raises:
            SchemaTooNew: the file was migrated by newer code.
            StoreError: the file is not a database this store can use.
        """
        if synchronous.upper() not in ("NORMAL", "FULL", "EXTRA"):
            raise InvalidInput("synchronous must be NORMAL, FULL or EXTRA")
        check_order()
        self.path = os.fspath(path)
        self._synchronous = synchronous.upper()
        self._offline_after = _check_time(offline_after, "offline_after")
        self._metrics_history = _check_limit(metrics_history, 1_000_000)
        self._clock = clock
        self._lock = threading.Lock()
        self._local = threading.local()
        self._readers: list[sqlite3.Connection] = []
        self._readers_lock = threading.Lock()
        self._closed = False
        self._checkpoint_lock = threading.Lock()
        self._checkpointer: sqlite3.Connection | None = None
        self.process_path = self.path + "-processes"
        self._proc_lock = threading.Lock()
        self._proc: sqlite3.Connection | None = None
        # The database holds password and token hashes, the process file command lines:
        # owner-only from the first byte.
        for path in (self.path, self.process_path):
            if not os.path.exists(path):
                os.close(os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600))
        try:
            self._writer = self._connect()
            # Only takes effect on a new file. Measured here: 16 KiB pages ingest ~10-20%
            # faster than 4 KiB with ~1 KiB event documents (fewer page splits).
            self._writer.execute("PRAGMA page_size = 16384")
            self._writer.execute("PRAGMA journal_mode = WAL")
            # Checkpoints belong to ``checkpoint()`` on a background thread; this is only the
            # backstop that bounds the WAL (64 MiB) if nobody calls it.
            self._writer.execute("PRAGMA wal_autocheckpoint = 4096")
            self._migrate(until=PROCESS_FILE_VERSION - 1)
            self._proc = self._open_process_file()
            self._move_processes()
            self._migrate()
            self._writer.execute(
                "CREATE TEMP TABLE IF NOT EXISTS doomed (id INTEGER PRIMARY KEY, size INTEGER)"
            )
        except sqlite3.DatabaseError as e:
            raise StoreError(f"{self.path}: cannot open as an EDR store: {e}") from None

    # -- connections ----------------------------------------------------------------------

    def _connect(self, path: str | None = None) -> sqlite3.Connection:
        conn = sqlite3.connect(
            path or self.path, isolation_level=None, check_same_thread=False, timeout=30.0
        )
        conn.execute(f"PRAGMA synchronous = {self._synchronous}")
        conn.execute("PRAGMA foreign_keys = ON")
        conn.execute("PRAGMA temp_store = MEMORY")
        conn.execute("PRAGMA cache_size = -65536")  # 64 MiB of page cache per connection
        return conn

    def _open_process_file(self) -> sqlite3.Connection:
        conn = self._connect(self.process_path)
        conn.execute("PRAGMA page_size = 16384")
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("BEGIN IMMEDIATE")
        try:
            for statement in PROCESS_FILE_SCHEMA:
                conn.execute(statement)
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            conn.close()
            raise
        conn.execute("ATTACH DATABASE ? AS store", (self.path,))
        return conn

    def _move_processes(self) -> None:
        """Copy a store's own process table (schema < 6) and its watermark into the process
        file; migration 6 then drops it. Redone in full if the drop never commits."""
        c = self._proc
        assert c is not None
        if (
            c.execute(
                "SELECT 1 FROM store.sqlite_master WHERE type = 'table' AND name = 'processes'"
            ).fetchone()
            is None
        ):
            return
        c.execute("BEGIN")  # deferred: writes lock the process file only, never the store
        try:
            c.execute(
                f"INSERT OR REPLACE INTO main.processes ({_PROCESS_ALL})"
                f" SELECT {_PROCESS_ALL} FROM store.processes"
            )
            c.execute(
                "UPDATE main.process_state SET value = (SELECT value FROM store.store_state"
                " WHERE key = 'process_watermark') WHERE key = 'process_watermark'"
            )
            c.execute("COMMIT")
        except BaseException:
            c.execute("ROLLBACK")
            raise

    def _migrate(self, until: int = LATEST_VERSION) -> None:
        c = self._writer
        c.execute("BEGIN IMMEDIATE")
        try:
            c.execute(
                "CREATE TABLE IF NOT EXISTS schema_version ("
                " version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at REAL NOT NULL)"
            )
            current = c.execute("SELECT max(version) FROM schema_version").fetchone()[0] or 0
            if current > LATEST_VERSION:
                raise SchemaTooNew(
                    f"{self.path} has schema version {current}, this code knows up to "
                    f"{LATEST_VERSION}: upgrade the controller"
                )
            for migration in MIGRATIONS:
                if migration.version <= current or migration.version > until:
                    continue
                for statement in migration.statements:
                    c.execute(statement)
                c.execute(
                    "INSERT INTO schema_version (version, name, applied_at) VALUES (?, ?, ?)",
                    (migration.version, migration.name, self._clock()),
                )
            c.execute("COMMIT")
        except BaseException:
            c.execute("ROLLBACK")
            raise

    def checkpoint(self) -> tuple[int, int]:
        """Copy committed WAL frames into the database file without blocking the writer
        (a PASSIVE checkpoint on its own connection). The controller calls this from its
        background maintenance loop so ingest does not pay for checkpoints.

        Returns ``(frames in the WAL, frames checkpointed)``.
        """
        with self._checkpoint_lock:
            if self._closed:
                raise StoreError("store is closed")
            if self._checkpointer is None:
                self._checkpointer = self._connect()
            _busy, frames, done = self._checkpointer.execute(
                "PRAGMA wal_checkpoint(PASSIVE)"
            ).fetchone()
            return frames, done

    def schema_version(self) -> int:
        with self._reading() as c:
            return c.execute("SELECT max(version) FROM schema_version").fetchone()[0]

    @staticmethod
    @contextmanager
    def _transaction(c: sqlite3.Connection, begin: str) -> Iterator[sqlite3.Connection]:
        """``c`` inside one transaction: committed, or rolled back on any exception."""
        c.execute(begin)
        try:
            yield c
        except BaseException:
            c.execute("ROLLBACK")
            raise
        c.execute("COMMIT")

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """The writer connection inside one IMMEDIATE transaction, under the writer lock."""
        with self._lock:
            if self._closed:
                raise StoreError("store is closed")
            with self._transaction(self._writer, "BEGIN IMMEDIATE") as c:
                yield c

    @contextmanager
    def _write_processes(self) -> Iterator[sqlite3.Connection]:
        """The process file's writer inside one transaction, under its own lock. Deferred,
        not IMMEDIATE: IMMEDIATE would take the attached store's write lock too."""
        with self._proc_lock:
            if self._closed or self._proc is None:
                raise StoreError("store is closed")
            with self._transaction(self._proc, "BEGIN") as c:
                yield c

    @contextmanager
    def _reading(self) -> Iterator[sqlite3.Connection]:
        """This thread's read connection inside one read transaction (a consistent snapshot)."""
        if self._closed:
            raise StoreError("store is closed")
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._connect()
            conn.execute("ATTACH DATABASE ? AS proc", (self.process_path,))
            conn.execute("PRAGMA query_only = ON")
            with self._readers_lock:
                self._readers.append(conn)
            self._local.conn = conn
        conn.execute("BEGIN")
        try:
            yield conn
        finally:
            conn.execute("COMMIT")

    def close(self) -> None:
        """Close every connection; later calls raise ``StoreError``. Safe to call twice."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._writer.close()
        with self._proc_lock:
            if self._proc is not None:
                self._proc.close()
        with self._checkpoint_lock:
            if self._checkpointer is not None:
                self._checkpointer.close()
        with self._readers_lock:
            for conn in self._readers:
                conn.close()
            self._readers.clear()

    def __enter__(self) -> SQLiteStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _now(self, now: float | None) -> float:
        return self._clock() if now is None else _check_time(now, "now")

    # -- events: ingest -------------------------------------------------------------------

    def ingest_batch(
        self, host_id: str, seq: int, events: Sequence[Mapping[str, Any]], dropped: int = 0
    ) -> bool:
        """Store one batch; see ``store_batch``. ``True`` when stored, ``False`` for a
        duplicate."""
        return self.store_batch(host_id, seq, events, dropped) is not None

    def store_batch(
        self, host_id: str, seq: int, events: Sequence[Mapping[str, Any]], dropped: int = 0
    ) -> StoredBatch | None:
        """Store one batch from ``host_id`` in one transaction.

        Returns where the batch landed, or ``None`` when ``(host_id, seq)`` was already stored
        (then nothing is written: each batch is in the store exactly once). The call returns only
        after the commit, so the caller may ack as soon as it returns.

        Events keep their full document. Field-level oddities never lose an event: a missing or
        unparseable ``@timestamp`` is replaced by the receive time for indexing (counted in the
        batch's ``untimed``), and indexed columns of the wrong type are left empty. Structural
        problems (not a list of mappings, values JSON cannot hold) raise ``InvalidInput``
        and write nothing.
        """
        _check_name(host_id, "host_id")
        _check_id(seq, "seq")
        _check_id(dropped, "dropped")
        if isinstance(events, str | bytes | Mapping) or not isinstance(events, Sequence):
            raise InvalidInput("events must be a list of event mappings")
        received = self._clock()
        received_us = int(received * 1_000_000)
        rows: list[tuple[Any, ...]] = []
        docs: list[str] = []
        total = 0
        untimed = 0
        dumps, parse_ts, empty = _dumps, _parse_ts_us, _EMPTY
        process_actions = _PROCESS_ACTIONS
        for i, ev in enumerate(events):
            if type(ev) is not dict and not isinstance(ev, Mapping):
                raise InvalidInput(f"event {i} is a {type(ev).__name__}, not a mapping")
            doc = dumps(ev, f"event {i}")
            ts = parse_ts(ev.get("@timestamp"))
            if ts is None:
                ts, untimed = received_us, untimed + 1
            # Every event pays for this loop while holding the GIL that detection also needs,
            # so the common shapes (plain dicts, ASCII text, small ints) are tested inline and
            # only the rest goes through the general helpers.
            v = ev.get("event")
            meta = v if v.__class__ is dict else (_dict(v) or empty)
            v = ev.get("process")
            proc = v if v.__class__ is dict else (_dict(v) or empty)
            v = ev.get("file")
            fil = v if v.__class__ is dict else (_dict(v) or empty)
            v = ev.get("source")
            src = v if v.__class__ is dict else (_dict(v) or empty)
            v = ev.get("destination")
            dst = v if v.__class__ is dict else (_dict(v) or empty)
            v = ev.get("user")
            user = v if v.__class__ is dict else (_dict(v) or empty)
            v = meta.get("action")
            action = v if v.__class__ is str and v.isascii() else _text(v)
            v = meta.get("category")
            if isinstance(v, list):
                v = v[0] if v else None
            category = v if v.__class__ is str and v.isascii() else _text(v)
            v = proc.get("entity_id")
            entity_id = v if v.__class__ is str and v.isascii() else _text(v)
            v = proc.get("pid")
            pid = v if v.__class__ is int and -_MAX_INT <= v <= _MAX_INT else _int(v)
            v = proc.get("executable")
            executable = v if v.__class__ is str and v.isascii() else _text(v)
            v = proc.get("command_line")
            command_line = v if v.__class__ is str and v.isascii() else _text(v)
            v = fil.get("path")
            path = v if v.__class__ is str and v.isascii() else _text(v)
            v = user.get("name")
            user_name = (v if v.__class__ is str and v.isascii() else _text(v)) or _text(
                user.get("id")
            )
            if action in process_actions and entity_id is not None:
                v = proc.get("parent")
                parent = v if v.__class__ is dict else (_dict(v) or empty)
                v = parent.get("entity_id")
                parent_id = v if v.__class__ is str and v.isascii() else _text(v)
                v = parent.get("pid")
                ppid = v if v.__class__ is int and -_MAX_INT <= v <= _MAX_INT else _int(v)
                if parent_id is None:
                    parent_exe = parent_cmd = None
                else:
                    v = parent.get("executable")
                    parent_exe = v if v.__class__ is str and v.isascii() else _text(v)
                    v = parent.get("command_line")
                    parent_cmd = v if v.__class__ is str and v.isascii() else _text(v)
                v = proc.get("exit_code")
                exit_code = v if v.__class__ is int and -_MAX_INT <= v <= _MAX_INT else _int(v)
            else:
                parent_id = ppid = parent_exe = parent_cmd = exit_code = None
            size = len(doc)
            total += size
            docs.append(doc)
            rows.append(
                (
                    host_id,
                    ts,
                    category,
                    action,
                    pid,
                    entity_id,
                    executable,
                    command_line,
                    path,
                    _text(src.get("ip")) if src else None,
                    _int(src.get("port")) if src else None,
                    _text(dst.get("ip")) if dst else None,
                    _int(dst.get("port")) if dst else None,
                    user_name,
                    size,
                    doc,
                    parent_id,
                    ppid,
                    parent_exe,
                    parent_cmd,
                    exit_code,
                )
            )
        with self._write() as c:
            cur = c.execute(
                "INSERT INTO batches (host_id, seq, received, event_count, dropped, untimed)"
                " VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (host_id, seq) DO NOTHING",
                (host_id, seq, received, len(rows), dropped, untimed),
            )
            if cur.rowcount == 0:
                return None
            batch_id = cur.lastrowid
            assert batch_id is not None
            _insert_events(c, batch_id, rows)
            # One writer inserting in one transaction: the AUTOINCREMENT ids are consecutive.
            last = c.execute("SELECT last_insert_rowid()").fetchone()[0] if rows else 0
            c.execute(
                "UPDATE store_state SET value = value + ? WHERE key = 'event_bytes'", (total,)
            )
            if dropped:
                c.execute(
                    "UPDATE hosts SET events_dropped = events_dropped + ? WHERE host_id = ?",
                    (dropped, host_id),
                )
        return StoredBatch(batch_id, last - len(rows) + 1 if rows else 0, len(rows), docs)

    def detection_watermark(self) -> int:
        with self._reading() as c:
            row = c.execute(
                "SELECT value FROM store_state WHERE key = 'detect_watermark'"
            ).fetchone()
        return int(row[0])

    def events_after(
        self, event_id: int, limit: int = 10_000
    ) -> list[tuple[int, str, dict[str, Any]]]:
        return [(i, h, _loads(doc)) for i, h, doc in self.event_docs_after(event_id, limit)]

    def event_docs_after(self, event_id: int, limit: int = 10_000) -> list[tuple[int, str, str]]:
        _check_id(event_id, "event_id")
        limit = _check_limit(limit, 1_000_000)
        with self._reading() as c:
            rows = c.execute(
                "SELECT id, host_id, doc FROM events WHERE id > ? ORDER BY id LIMIT ?",
                (event_id, limit),
            ).fetchall()
        return [(int(i), str(h), str(doc)) for i, h, doc in rows]

    def last_event_id(self) -> int:
        with self._reading() as c:
            return int(c.execute("SELECT coalesce(max(id), 0) FROM events").fetchone()[0])

    def index_pending(self, max_rows: int = 20_000, *, processes: bool = True) -> int:
        """Make up to ``max_rows`` newly ingested events searchable by full text and (unless
        ``processes`` is false) fold up to ``max_rows`` exec/fork/exit events into the process
        ancestry table (a transaction on each file).

        Runs off the ingest path (the controller calls it from a background thread until it
        returns 0); each call is one short write transaction, so ingest interleaves with it.
        Returns how many events it looked at for either job (0 when both are caught up).
        """
        _check_limit(max_rows, 1_000_000)
        with self._write() as c:
            count = self._advance(c, "store_state", "fts_watermark", max_rows, (_FTS_INSERT,))
        if processes:
            count = max(count, self.fold_processes(max_rows))
        return count

    def fold_processes(self, max_rows: int = 50_000) -> int:
        """Fold up to ``max_rows`` events into the process ancestry table (the part of
        ``index_pending`` that can wait). Its upserts land on random pages of a table keyed by
        entity id, so each commit rewrites most of the pages it touches whatever the row
        count: the maintenance loop calls this for large batches, not every few thousand
        events. It writes the process file only (reading new events from the store), so
        ingest never waits for it. Returns how many events it looked at."""
        _check_limit(max_rows, 1_000_000)
        with self._write_processes() as c:
            return self._advance(
                c,
                "process_state",
                "process_watermark",
                max_rows,
                (_STUB_PROCESSES, _UPSERT_PROCESSES),
            )

    @staticmethod
    def _advance(
        c: sqlite3.Connection,
        state: str,
        watermark: str,
        max_rows: int,
        statements: tuple[str, ...],
    ) -> int:
        """Run ``statements`` over the next ``max_rows`` event ids above ``watermark`` (a key
        of the ``state`` table) and move it past them."""
        low = c.execute(f"SELECT value FROM {state} WHERE key = ?", (watermark,)).fetchone()[0]
        high, count = c.execute(
            "SELECT max(id), count(*) FROM"
            " (SELECT id FROM events WHERE id > ? ORDER BY id LIMIT ?)",
            (low, max_rows),
        ).fetchone()
        if not count:
            return 0
        for sql in statements:
            c.execute(sql, (low, high))
        c.execute(f"UPDATE {state} SET value = ? WHERE key = ?", (high, watermark))
        return int(count)

    def pending_index_rows(self) -> int:
        """How many stored events full-text search or the process table cannot see yet."""
        with self._reading() as c:
            return c.execute(
                "SELECT count(*) FROM events WHERE id > min("
                "(SELECT value FROM store_state WHERE key = 'fts_watermark'),"
                " (SELECT value FROM proc.process_state WHERE key = 'process_watermark'))"
            ).fetchone()[0]

    # -- events: reading ------------------------------------------------------------------

    def search_events(
        self,
        *,
        since: float | None = None,
        until: float | None = None,
        host_id: str | None = None,
        action: str | None = None,
        category: str | None = None,
        pid: int | None = None,
        entity_id: str | None = None,
        executable: str | None = None,
        path: str | None = None,
        ip: str | None = None,
        port: int | None = None,
        text: str | None = None,
        limit: int = 100,
        cursor: str | None = None,
    ) -> EventPage:
        """Events matching every given filter, newest first, ``limit`` per page.

        ``since``/``until`` are inclusive bounds in seconds; ``executable`` and ``path`` match
        exactly; ``ip`` and ``port`` match source or destination; ``text`` is an FTS5 query
        over command lines, file paths and executables (events become visible to it once
        ``index_pending`` has run).
        """
        _check_limit(limit)
        where: list[str] = []
        params: list[Any] = []
        if since is not None:
            where.append("ts >= ?")
            params.append(math.ceil(_check_time(since, "since") * 1_000_000))
        if until is not None:
            where.append("ts <= ?")
            params.append(math.floor(_check_time(until, "until") * 1_000_000))
        for column, value, what in (
            ("host_id", host_id, "host_id"),
            ("action", action, "action"),
            ("category", category, "category"),
            ("entity_id", entity_id, "entity_id"),
            ("executable", executable, "executable"),
            ("file_path", path, "path"),
        ):
            if value is not None:
                if not isinstance(value, str) or not value or len(value) > 4096:
                    raise InvalidInput(f"{what} must be a non-empty string")
                where.append(f"{column} = ?")
                params.append(value)
        if pid is not None:
            where.append("pid = ?")
            params.append(_check_id(pid, "pid"))
        if ip is not None:
            try:
                canonical = str(ipaddress.ip_address(ip))
            except ValueError:
                raise InvalidInput(f"ip {ip!r} is not an IP address") from None
            where.append("(src_ip = ? OR dst_ip = ?)")
            params += [canonical, canonical]
        if port is not None:
            if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
                raise InvalidInput("port must be an integer from 0 to 65535")
            where.append("(src_port = ? OR dst_port = ?)")
            params += [port, port]
        if text is not None:
            if not isinstance(text, str) or not text.strip() or len(text) > 1024:
                raise InvalidInput("text must be a non-empty query of at most 1024 characters")
            where.append("id IN (SELECT rowid FROM events_fts WHERE events_fts MATCH ?)")
            params.append(text)
        if cursor is not None:
            ts_us, last_id = _cursor_decode(cursor)
            where.append("(ts < ? OR (ts = ? AND id < ?))")
            params += [ts_us, ts_us, last_id]
        sql = "SELECT id, host_id, ts, doc FROM events"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY ts DESC, id DESC LIMIT ?"
        params.append(limit + 1)
        with self._reading() as c:
            if text is not None:
                # FTS5 reports query syntax errors with assorted messages: check the query
                # alone first, so any error here is the query's fault.
                try:
                    c.execute(
                        "SELECT 1 FROM events_fts WHERE events_fts MATCH ? LIMIT 1", (text,)
                    ).fetchall()
                except sqlite3.OperationalError as e:
                    raise InvalidInput(f"bad full-text query {text!r}: {e}") from None
            rows = c.execute(sql, params).fetchall()
        more = len(rows) > limit
        rows = rows[:limit]
        events = [StoredEvent(r[0], r[1], r[2] / 1_000_000, json.loads(r[3])) for r in rows]
        next_cursor = _cursor_encode(rows[-1][2], rows[-1][0]) if more else None
        return EventPage(events, next_cursor)

    def get_event(self, event_id: int) -> StoredEvent:
        _check_id(event_id, "event_id")
        with self._reading() as c:
            row = c.execute(
                "SELECT id, host_id, ts, doc FROM events WHERE id = ?", (event_id,)
            ).fetchone()
        if row is None:
            raise NotFound("event", event_id)
        return StoredEvent(row[0], row[1], row[2] / 1_000_000, json.loads(row[3]))

    def process_tree(self, host_id: str, entity_id: str, *, children: bool = True) -> ProcessTree:
        """A process with its ancestors (nearest first) and direct children, from the
        exec/fork/exit events stored for ``host_id``.

        ``children=False`` leaves the children out (an empty list): a long-lived session's
        children are thousands of rows, which alert ancestry, the caller that needs only the
        chain upwards, fetched and sorted for every alert.
        """
        _check_name(host_id, "host_id")
        _check_name(entity_id, "entity_id")
        one = f"SELECT {_PROCESS_COLS} FROM proc.processes WHERE host_id = ? AND entity_id = ?"
        with self._reading() as c:
            row = c.execute(one, (host_id, entity_id)).fetchone()
            if row is None:
                raise NotFound("process", f"{host_id}/{entity_id}")
            node = _process(row)
            ancestors: list[ProcessNode] = []
            seen = {node.entity_id}
            parent_id = node.parent_entity_id
            while parent_id and parent_id not in seen and len(ancestors) < _MAX_ANCESTORS:
                seen.add(parent_id)
                row = c.execute(one, (host_id, parent_id)).fetchone()
                if row is None:
                    break
                ancestors.append(_process(row))
                parent_id = ancestors[-1].parent_entity_id
            kids = (
                []
                if not children
                else [
                    _process(r)
                    for r in c.execute(
                        f"SELECT {_PROCESS_COLS} FROM proc.processes"
                        " WHERE host_id = ? AND parent_entity_id = ? ORDER BY start_ts, entity_id",
                        (host_id, entity_id),
                    )
                ]
            )
        return ProcessTree(node, ancestors, kids)

    def event_bytes(self) -> int:
        """Total size of the stored event documents (what ``max_bytes`` retention bounds)."""
        with self._reading() as c:
            return c.execute("SELECT value FROM store_state WHERE key = 'event_bytes'").fetchone()[
                0
            ]

    def apply_retention(
        self,
        max_age: float | None = None,
        max_bytes: int | None = None,
        *,
        now: float | None = None,
    ) -> RetentionResult:
        """Delete the oldest events (by ``@timestamp``) older than ``max_age`` seconds, then
        more until the stored documents total at most ``max_bytes``.

        Works in chunks of short transactions so ingest is never blocked for long. Process
        ancestry rows last seen before the oldest remaining event go too; batch ids are kept
        (they are what makes redelivery exactly-once).
        """
        now = self._now(now)
        cutoff: int | None = None
        if max_age is not None:
            if _check_time(max_age, "max_age") < 0:
                raise InvalidInput("max_age must not be negative")
            cutoff = int((now - max_age) * 1_000_000)
        if max_bytes is not None:
            _check_id(max_bytes, "max_bytes")
        deleted = deleted_bytes = 0
        while cutoff is not None:
            n, size = self._delete_chunk(cutoff=cutoff, max_bytes=None)
            deleted, deleted_bytes = deleted + n, deleted_bytes + size
            if n < _RETENTION_CHUNK:
                break
        while max_bytes is not None:
            n, size = self._delete_chunk(cutoff=None, max_bytes=max_bytes)
            deleted, deleted_bytes = deleted + n, deleted_bytes + size
            if n == 0:
                break
        with self._reading() as c:
            oldest = c.execute("SELECT min(ts) FROM events").fetchone()[0]
        with self._write_processes() as c:
            if oldest is None:
                processes = c.execute("DELETE FROM processes").rowcount
            else:
                processes = c.execute("DELETE FROM processes WHERE last_ts < ?", (oldest,)).rowcount
        return RetentionResult(deleted, deleted_bytes, _us_to_s(oldest), processes)

    def _delete_chunk(self, *, cutoff: int | None, max_bytes: int | None) -> tuple[int, int]:
        with self._write() as c:
            if max_bytes is not None:
                stored = c.execute(
                    "SELECT value FROM store_state WHERE key = 'event_bytes'"
                ).fetchone()[0]
                excess = stored - max_bytes
                if excess <= 0:
                    return 0, 0
            sql = "SELECT id, size FROM events"
            params: list[int] = []
            if cutoff is not None:
                sql += " WHERE ts < ?"
                params.append(cutoff)
            sql += " ORDER BY ts, id LIMIT ?"
            params.append(_RETENTION_CHUNK)
            rows = c.execute(sql, params).fetchall()
            if max_bytes is not None:
                taken, running = [], 0
                for row in rows:
                    taken.append(row)
                    running += row[1]
                    if running >= excess:
                        break
                rows = taken
            if not rows:
                return 0, 0
            c.execute("DELETE FROM temp.doomed")
            c.executemany("INSERT INTO temp.doomed (id, size) VALUES (?, ?)", rows)
            # A contentless FTS index needs the indexed values to delete an entry: remove
            # the entries of indexed rows before the rows themselves.
            c.execute(
                "INSERT INTO events_fts (events_fts, rowid, command_line, file_path, executable)"
                f" SELECT 'delete', e.id, {_FTS_VALUES.format(p='e.')}"
                " FROM events e JOIN temp.doomed d ON d.id = e.id"
                " WHERE e.id <= (SELECT value FROM store_state WHERE key = 'fts_watermark')"
                f" AND {_FTS_WANTED.format(p='e.')}"
            )
            c.execute("DELETE FROM events WHERE id IN (SELECT id FROM temp.doomed)")
            size = sum(r[1] for r in rows)
            c.execute("UPDATE store_state SET value = value - ? WHERE key = 'event_bytes'", (size,))
            c.execute("DELETE FROM temp.doomed")
            return len(rows), size

    # -- hosts ----------------------------------------------------------------------------

    def upsert_host(self, host_id: str, hello: HostHello, *, now: float | None = None) -> Host:
        """Create or refresh a host from its certificate identity and HELLO."""
        _check_name(host_id, "host_id")
        if not isinstance(hello, HostHello):
            raise InvalidInput("hello must be a HostHello")
        for what in ("hostname", "os", "kernel", "sensor_version"):
            _check_name(getattr(hello, what), f"hello.{what}", 1024)
        if not isinstance(hello.tiers, Mapping) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in hello.tiers.items()
        ):
            raise InvalidInput("hello.tiers must map family names to tier names")
        now = self._now(now)
        with self._write() as c:
            c.execute(
                "INSERT INTO hosts (host_id, hostname, os, kernel, sensor_version, tiers,"
                " first_seen, last_seen) VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
                " ON CONFLICT (host_id) DO UPDATE SET hostname = excluded.hostname,"
                " os = excluded.os, kernel = excluded.kernel,"
                " sensor_version = excluded.sensor_version, tiers = excluded.tiers,"
                " last_seen = excluded.last_seen",
                (
                    host_id,
                    hello.hostname,
                    hello.os,
                    hello.kernel,
                    hello.sensor_version,
                    _dumps(dict(hello.tiers), "hello.tiers"),
                    now,
                    now,
                ),
            )
            return self._host(c, host_id, now)

    def _host(self, c: sqlite3.Connection, host_id: str, now: float) -> Host:
        row = c.execute(f"SELECT {_HOST_COLS} FROM hosts WHERE host_id = ?", (host_id,)).fetchone()
        if row is None:
            raise NotFound("host", host_id)
        return self._host_record(row, now)

    def _host_record(self, row: sqlite3.Row, now: float) -> Host:
        return Host(
            host_id=row[0],
            hostname=row[1],
            os=row[2],
            kernel=row[3],
            sensor_version=row[4],
            tiers=json.loads(row[5]),
            first_seen=row[6],
            last_seen=row[7],
            online=now - row[7] <= self._offline_after,
            metrics=json.loads(row[8]),
            drops=json.loads(row[9]),
            outbox_depth=row[10],
            events_dropped=row[11],
            isolated=bool(row[12]),
            isolation_changed_at=row[13],
            policy_version=row[14],
            policy_applied_at=row[15],
        )

    def record_heartbeat(
        self,
        host_id: str,
        metrics: Mapping[str, Any],
        drops: Mapping[str, int],
        outbox_depth: int,
        *,
        now: float | None = None,
    ) -> None:
        """Latest metrics on the host, plus one history sample (the oldest beyond
        ``metrics_history`` per host are dropped)."""
        _check_name(host_id, "host_id")
        if not isinstance(metrics, Mapping):
            raise InvalidInput("metrics must be a mapping")
        if not isinstance(drops, Mapping) or not all(
            isinstance(k, str) and _int(v) is not None and v >= 0 for k, v in drops.items()
        ):
            raise InvalidInput("drops must map counter names to non-negative integers")
        _check_id(outbox_depth, "outbox_depth")
        metrics_doc = _dumps(dict(metrics), "metrics")
        drops_doc = _dumps(dict(drops), "drops")
        now = self._now(now)
        with self._write() as c:
            cur = c.execute(
                "UPDATE hosts SET last_seen = ?, metrics = ?, drops = ?, outbox_depth = ?"
                " WHERE host_id = ?",
                (now, metrics_doc, drops_doc, outbox_depth, host_id),
            )
            if cur.rowcount == 0:
                raise NotFound("host", host_id)
            c.execute(
                "INSERT INTO host_metrics (host_id, ts, metrics, drops, outbox_depth)"
                " VALUES (?, ?, ?, ?, ?)",
                (host_id, now, metrics_doc, drops_doc, outbox_depth),
            )
            c.execute(
                "DELETE FROM host_metrics WHERE host_id = ? AND id <= (SELECT id FROM"
                " host_metrics WHERE host_id = ? ORDER BY id DESC LIMIT 1 OFFSET ?)",
                (host_id, host_id, self._metrics_history),
            )

    def get_host(self, host_id: str, *, now: float | None = None) -> Host:
        _check_name(host_id, "host_id")
        now = self._now(now)
        with self._reading() as c:
            return self._host(c, host_id, now)

    def list_hosts(self, *, now: float | None = None) -> list[Host]:
        now = self._now(now)
        with self._reading() as c:
            rows = c.execute(f"SELECT {_HOST_COLS} FROM hosts ORDER BY hostname, host_id")
            return [self._host_record(r, now) for r in rows]

    def metrics_history(
        self, host_id: str, *, since: float | None = None, limit: int = 1000
    ) -> list[MetricsSample]:
        """Heartbeat samples for charts, oldest first."""
        _check_name(host_id, "host_id")
        _check_limit(limit, 1_000_000)
        since_v = -math.inf if since is None else _check_time(since, "since")
        with self._reading() as c:
            if c.execute("SELECT 1 FROM hosts WHERE host_id = ?", (host_id,)).fetchone() is None:
                raise NotFound("host", host_id)
            rows = c.execute(
                "SELECT ts, metrics, drops, outbox_depth FROM (SELECT id, ts, metrics, drops,"
                " outbox_depth FROM host_metrics WHERE host_id = ? AND ts >= ?"
                " ORDER BY id DESC LIMIT ?) ORDER BY id",
                (host_id, since_v, limit),
            ).fetchall()
        return [MetricsSample(r[0], json.loads(r[1]), json.loads(r[2]), r[3]) for r in rows]

    def set_isolation(self, host_id: str, isolated: bool, *, now: float | None = None) -> Host:
        """Record the host's isolation state (as confirmed by the sensor)."""
        _check_name(host_id, "host_id")
        if not isinstance(isolated, bool):
            raise InvalidInput("isolated must be a bool")
        now = self._now(now)
        with self._write() as c:
            cur = c.execute(
                "UPDATE hosts SET isolated = ?, isolation_changed_at = ? WHERE host_id = ?",
                (int(isolated), now, host_id),
            )
            if cur.rowcount == 0:
                raise NotFound("host", host_id)
            return self._host(c, host_id, now)

    # -- commands -------------------------------------------------------------------------

    def queue_command(
        self,
        host_id: str,
        action: str,
        args: Mapping[str, Any],
        requested_by: str,
        idempotency_key: str,
        ttl: float,
        *,
        now: float | None = None,
    ) -> Command:
        """Queue a response action for a host, once per ``idempotency_key``.

        The same key with the same host, action and args returns the command already
        queued; the same key for anything else raises ``Conflict``.
        """
        _check_name(host_id, "host_id")
        _check_name(action, "action", 64)
        _check_name(requested_by, "requested_by")
        _check_name(idempotency_key, "idempotency_key")
        if not isinstance(args, Mapping):
            raise InvalidInput("args must be a mapping")
        args_doc = _dumps(dict(args), "args")
        if _check_time(ttl, "ttl") <= 0:
            raise InvalidInput("ttl must be positive")
        now = self._now(now)
        with self._write() as c:
            row = c.execute(
                f"SELECT {_COMMAND_COLS} FROM commands WHERE idempotency_key = ?",
                (idempotency_key,),
            ).fetchone()
            if row is not None:
                existing = _command(row)
                if (existing.host_id, existing.action, existing.args) != (
                    host_id,
                    action,
                    json.loads(args_doc),
                ):
                    raise Conflict(
                        f"idempotency key {idempotency_key!r} was used for command "
                        f"{existing.id} ({existing.action} on {existing.host_id})"
                    )
                return existing
            if c.execute("SELECT 1 FROM hosts WHERE host_id = ?", (host_id,)).fetchone() is None:
                raise NotFound("host", host_id)
            cur = c.execute(
                "INSERT INTO commands (host_id, action, args, requested_by, idempotency_key,"
                " status, created_at, expires_at) VALUES (?, ?, ?, ?, ?, 'queued', ?, ?)",
                (host_id, action, args_doc, requested_by, idempotency_key, now, now + ttl),
            )
            return self._command(c, cur.lastrowid)

    def _command(self, c: sqlite3.Connection, command_id: int | None) -> Command:
        row = c.execute(
            f"SELECT {_COMMAND_COLS} FROM commands WHERE id = ?", (command_id,)
        ).fetchone()
        if row is None:
            raise NotFound("command", command_id)
        return _command(row)

    def get_command(self, command_id: int) -> Command:
        _check_id(command_id, "command_id")
        with self._reading() as c:
            return self._command(c, command_id)

    def pending_commands(self, host_id: str, *, now: float | None = None) -> list[Command]:
        """Queued, unexpired commands for a host, oldest first (what to send it now)."""
        _check_name(host_id, "host_id")
        now = self._now(now)
        with self._reading() as c:
            rows = c.execute(
                f"SELECT {_COMMAND_COLS} FROM commands WHERE host_id = ? AND status = 'queued'"
                " AND expires_at > ? ORDER BY id",
                (host_id, now),
            ).fetchall()
        return [_command(r) for r in rows]

    def _transition(
        self,
        command_id: int,
        wanted: CommandStatus,
        sets: str = "",
        params: tuple[Any, ...] = (),
    ) -> Command:
        _check_id(command_id, "command_id")
        with self._write() as c:
            current = self._command(c, command_id)
            if wanted not in COMMAND_TRANSITIONS[current.status]:
                raise InvalidTransition("command", command_id, current.status, wanted)
            c.execute(
                f"UPDATE commands SET status = ?{sets} WHERE id = ?",
                (wanted.value, *params, command_id),
            )
            return self._command(c, command_id)

    def mark_sent(self, command_id: int, *, now: float | None = None) -> Command:
        return self._transition(command_id, CommandStatus.SENT, ", sent_at = ?", (self._now(now),))

    def mark_acknowledged(self, command_id: int, *, now: float | None = None) -> Command:
        return self._transition(
            command_id, CommandStatus.ACKNOWLEDGED, ", acknowledged_at = ?", (self._now(now),)
        )

    def requeue_unacknowledged(self, host_id: str) -> int:
        """Put commands sent but never acknowledged back in the queue (the connection
        they went out on is gone); returns how many."""
        _check_name(host_id, "host_id")
        with self._write() as c:
            return c.execute(
                "UPDATE commands SET status = 'queued', sent_at = NULL"
                " WHERE host_id = ? AND status = 'sent'",
                (host_id,),
            ).rowcount

    def record_result(
        self,
        command_id: int,
        succeeded: bool,
        output: Mapping[str, Any],
        *,
        now: float | None = None,
    ) -> Command:
        if not isinstance(succeeded, bool):
            raise InvalidInput("succeeded must be a bool")
        if not isinstance(output, Mapping):
            raise InvalidInput("output must be a mapping")
        doc = _dumps(dict(output), "output")
        wanted = CommandStatus.SUCCEEDED if succeeded else CommandStatus.FAILED
        return self._transition(
            command_id, wanted, ", finished_at = ?, output = ?", (self._now(now), doc)
        )

    def expire_commands(self, now: float | None = None) -> list[Command]:
        """Expire queued or sent commands whose TTL has passed; returns them."""
        now = self._now(now)
        with self._write() as c:
            rows = c.execute(
                "UPDATE commands SET status = 'expired', finished_at = ?"
                " WHERE status IN ('queued', 'sent') AND expires_at <= ?"
                f" RETURNING {_COMMAND_COLS}",
                (now, now),
            ).fetchall()
        return sorted((_command(r) for r in rows), key=lambda cmd: cmd.id)

    def command_history(self, host_id: str, *, limit: int = 100) -> list[Command]:
        """A host's commands, newest first."""
        _check_name(host_id, "host_id")
        _check_limit(limit)
        with self._reading() as c:
            rows = c.execute(
                f"SELECT {_COMMAND_COLS} FROM commands WHERE host_id = ? ORDER BY id DESC LIMIT ?",
                (host_id, limit),
            ).fetchall()
        return [_command(r) for r in rows]

    # -- policy ---------------------------------------------------------------------------

    def put_policy(
        self,
        document: Mapping[str, Any],
        author: str,
        comment: str = "",
        *,
        now: float | None = None,
    ) -> PolicyVersion:
        """Store a new policy version; earlier versions stay readable."""
        if not isinstance(document, Mapping):
            raise InvalidInput("policy document must be a mapping")
        doc = _dumps(dict(document), "policy document")
        _check_name(author, "author")
        if not isinstance(comment, str) or len(comment) > 4096:
            raise InvalidInput("comment must be a string of at most 4096 characters")
        now = self._now(now)
        with self._write() as c:
            cur = c.execute(
                "INSERT INTO policies (document, author, created_at, comment) VALUES (?, ?, ?, ?)",
                (doc, author, now, _text(comment)),
            )
            return PolicyVersion(cur.lastrowid or 0, json.loads(doc), author, now, comment)

    _POLICY_SQL = "SELECT version, document, author, created_at, comment FROM policies"

    @staticmethod
    def _policy(row: sqlite3.Row) -> PolicyVersion:
        return PolicyVersion(row[0], json.loads(row[1]), row[2], row[3], row[4])

    def current_policy(self) -> PolicyVersion | None:
        with self._reading() as c:
            row = c.execute(f"{self._POLICY_SQL} ORDER BY version DESC LIMIT 1").fetchone()
        return None if row is None else self._policy(row)

    def get_policy(self, version: int) -> PolicyVersion:
        _check_id(version, "version")
        with self._reading() as c:
            row = c.execute(f"{self._POLICY_SQL} WHERE version = ?", (version,)).fetchone()
        if row is None:
            raise NotFound("policy version", version)
        return self._policy(row)

    def policy_history(self, *, limit: int = 100) -> list[PolicyVersion]:
        _check_limit(limit)
        with self._reading() as c:
            rows = c.execute(f"{self._POLICY_SQL} ORDER BY version DESC LIMIT ?", (limit,))
            return [self._policy(r) for r in rows]

    def policy_applied(self, host_id: str, version: int, *, now: float | None = None) -> None:
        """Record that a host reported running policy ``version``."""
        _check_name(host_id, "host_id")
        _check_id(version, "version")
        now = self._now(now)
        with self._write() as c:
            if c.execute("SELECT 1 FROM policies WHERE version = ?", (version,)).fetchone() is None:
                raise NotFound("policy version", version)
            cur = c.execute(
                "UPDATE hosts SET policy_version = ?, policy_applied_at = ? WHERE host_id = ?",
                (version, now, host_id),
            )
            if cur.rowcount == 0:
                raise NotFound("host", host_id)

    # -- alerts ---------------------------------------------------------------------------

    def create_alert(
        self,
        *,
        rule_id: str,
        rule_name: str,
        severity: Severity | str,
        host_id: str,
        event: Mapping[str, Any],
        event_id: int | None = None,
        ancestry: Sequence[Mapping[str, Any]] = (),
        now: float | None = None,
    ) -> Alert:
        draft = AlertDraft(rule_id, rule_name, severity, host_id, event, event_id, ancestry)
        return self.create_alerts([draft], now=now)[0]

    @staticmethod
    def _alert_row(d: AlertDraft, now: float) -> tuple[Any, ...]:
        if not isinstance(d, AlertDraft):
            raise InvalidInput("alerts must be AlertDraft records")
        _check_name(d.rule_id, "rule_id")
        _check_name(d.rule_name, "rule_name", 1024)
        sev = _enum(Severity, d.severity)
        _check_name(d.host_id, "host_id")
        if not isinstance(d.event, Mapping):
            raise InvalidInput("event must be a mapping")
        if d.event_id is not None:
            _check_id(d.event_id, "event_id")
        ancestry = d.ancestry
        if isinstance(ancestry, str | bytes) or not all(isinstance(a, Mapping) for a in ancestry):
            raise InvalidInput("ancestry must be a list of mappings")
        return (
            now,
            now,
            d.rule_id,
            d.rule_name,
            sev.value,
            d.host_id,
            d.event_id,
            _dumps(dict(d.event), "event"),
            _dumps([dict(a) for a in ancestry], "ancestry"),
        )

    def create_alerts(
        self,
        drafts: Sequence[AlertDraft],
        *,
        evaluated_through: int | None = None,
        now: float | None = None,
    ) -> list[Alert]:
        if isinstance(drafts, str | bytes | Mapping) or not isinstance(drafts, Sequence):
            raise InvalidInput("alerts must be a list of AlertDraft records")
        if evaluated_through is not None:
            _check_id(evaluated_through, "evaluated_through")
        now = self._now(now)
        rows = [self._alert_row(d, now) for d in drafts]  # validate all before writing any
        if not rows and evaluated_through is None:
            return []
        with self._write() as c:
            first = None
            for row in rows:
                cur = c.execute(
                    "INSERT INTO alerts (created_at, updated_at, rule_id, rule_name, severity,"
                    " host_id, event_id, event, ancestry, status)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, 'new')",
                    row,
                )
                first = cur.lastrowid if first is None else first
            if evaluated_through is not None:
                c.execute(
                    "UPDATE store_state SET value = max(value, ?) WHERE key = 'detect_watermark'",
                    (evaluated_through,),
                )
            if first is None:
                return []
            # New alerts have no comments yet: one query reads them all back.
            return [
                _alert(r, [])
                for r in c.execute(
                    f"SELECT {_ALERT_COLS} FROM alerts WHERE id >= ? ORDER BY id", (first,)
                )
            ]

    def _alert(self, c: sqlite3.Connection, alert_id: int | None) -> Alert:
        row = c.execute(f"SELECT {_ALERT_COLS} FROM alerts WHERE id = ?", (alert_id,)).fetchone()
        if row is None:
            raise NotFound("alert", alert_id)
        comments = [
            AlertComment(*r)
            for r in c.execute(
                "SELECT id, alert_id, author, ts, text FROM alert_comments WHERE alert_id = ?"
                " ORDER BY id",
                (alert_id,),
            )
        ]
        return _alert(row, comments)

    def get_alert(self, alert_id: int) -> Alert:
        """One alert with its comments."""
        _check_id(alert_id, "alert_id")
        with self._reading() as c:
            return self._alert(c, alert_id)

    def list_alerts(
        self,
        *,
        status: AlertStatus | str | None = None,
        severity: Severity | str | None = None,
        host_id: str | None = None,
        rule_id: str | None = None,
        assignee: str | None = None,
        since: float | None = None,
        limit: int = 100,
        before_id: int | None = None,
    ) -> list[Alert]:
        """Alerts newest first (without comments; ``get_alert`` has them). Page with
        ``before_id`` = the last id of the previous page."""
        _check_limit(limit)
        where: list[str] = []
        params: list[Any] = []
        if status is not None:
            where.append("status = ?")
            params.append(_enum(AlertStatus, status).value)
        if severity is not None:
            where.append("severity = ?")
            params.append(_enum(Severity, severity).value)
        for column, value in (("host_id", host_id), ("rule_id", rule_id), ("assignee", assignee)):
            if value is not None:
                where.append(f"{column} = ?")
                params.append(_check_name(value, column))
        sql = _newest_first(
            f"SELECT {_ALERT_COLS} FROM alerts", where, params, "created_at", since, before_id
        )
        with self._reading() as c:
            return [_alert(r) for r in c.execute(sql, [*params, limit])]

    def triage_alert(
        self,
        alert_id: int,
        *,
        status: AlertStatus | str | None = None,
        assignee: str | None = None,
        unassign: bool = False,
        now: float | None = None,
    ) -> Alert:
        """Change an alert's triage state and/or assignee.

        Raises:
            InvalidTransition: the status cannot follow the current one (see
                ``ALERT_TRANSITIONS``); setting the current status again is a no-op.
        """
        _check_id(alert_id, "alert_id")
        wanted = None if status is None else _enum(AlertStatus, status)
        if assignee is not None:
            _check_name(assignee, "assignee")
            if unassign:
                raise InvalidInput("give an assignee or unassign, not both")
        now = self._now(now)
        with self._write() as c:
            current = self._alert(c, alert_id)
            sets: list[str] = ["updated_at = ?"]
            params: list[Any] = [now]
            if wanted is not None and wanted != current.status:
                if wanted not in ALERT_TRANSITIONS[current.status]:
                    raise InvalidTransition("alert", alert_id, current.status, wanted)
                sets.append("status = ?")
                params.append(wanted.value)
            if assignee is not None or unassign:
                sets.append("assignee = ?")
                params.append(assignee)
            c.execute(f"UPDATE alerts SET {', '.join(sets)} WHERE id = ?", (*params, alert_id))
            return self._alert(c, alert_id)

    def add_alert_comment(
        self, alert_id: int, author: str, text: str, *, now: float | None = None
    ) -> AlertComment:
        _check_id(alert_id, "alert_id")
        _check_name(author, "author")
        if not isinstance(text, str) or not text.strip() or len(text) > 65536:
            raise InvalidInput("comment text must be non-empty and at most 65536 characters")
        if _text(text) != text:
            raise InvalidInput("comment text must be valid UTF-8 text")
        now = self._now(now)
        with self._write() as c:
            if c.execute("SELECT 1 FROM alerts WHERE id = ?", (alert_id,)).fetchone() is None:
                raise NotFound("alert", alert_id)
            cur = c.execute(
                "INSERT INTO alert_comments (alert_id, author, ts, text) VALUES (?, ?, ?, ?)",
                (alert_id, author, now, text),
            )
            c.execute("UPDATE alerts SET updated_at = ? WHERE id = ?", (now, alert_id))
            return AlertComment(cur.lastrowid or 0, alert_id, author, now, text)

    # -- users and API tokens -------------------------------------------------------------

    @staticmethod
    def _check_hash(value: object, what: str) -> str:
        if not isinstance(value, str) or not value or len(value) > 1024 or not value.isascii():
            raise InvalidInput(f"{what} must be a non-empty ASCII string (an encoded hash)")
        return value

    def create_user(
        self, username: str, password_hash: str, role: Role | str, *, now: float | None = None
    ) -> User:
        _check_name(username, "username", 64)
        self._check_hash(password_hash, "password_hash")
        r = _enum(Role, role)
        now = self._now(now)
        with self._write() as c:
            try:
                c.execute(
                    "INSERT INTO users (username, password_hash, role, created_at, updated_at)"
                    " VALUES (?, ?, ?, ?, ?)",
                    (username, password_hash, r.value, now, now),
                )
            except sqlite3.IntegrityError:
                raise Conflict(f"user {username!r} already exists") from None
            return User(username, password_hash, r, False, now, now)

    def get_user(self, username: str) -> User:
        _check_name(username, "username", 64)
        with self._reading() as c:
            row = c.execute(
                f"SELECT {_USER_COLS} FROM users WHERE username = ?", (username,)
            ).fetchone()
        if row is None:
            raise NotFound("user", username)
        return _user(row)

    def list_users(self) -> list[User]:
        with self._reading() as c:
            return [_user(r) for r in c.execute(f"SELECT {_USER_COLS} FROM users ORDER BY 1")]

    def update_user(
        self,
        username: str,
        *,
        password_hash: str | None = None,
        role: Role | str | None = None,
        disabled: bool | None = None,
        now: float | None = None,
    ) -> User:
        _check_name(username, "username", 64)
        sets: list[str] = ["updated_at = ?"]
        params: list[Any] = [self._now(now)]
        if password_hash is not None:
            sets.append("password_hash = ?")
            params.append(self._check_hash(password_hash, "password_hash"))
        if role is not None:
            sets.append("role = ?")
            params.append(_enum(Role, role).value)
        if disabled is not None:
            if not isinstance(disabled, bool):
                raise InvalidInput("disabled must be a bool")
            sets.append("disabled = ?")
            params.append(int(disabled))
        with self._write() as c:
            cur = c.execute(
                f"UPDATE users SET {', '.join(sets)} WHERE username = ?", (*params, username)
            )
            if cur.rowcount == 0:
                raise NotFound("user", username)
            row = c.execute(
                f"SELECT {_USER_COLS} FROM users WHERE username = ?", (username,)
            ).fetchone()
            return _user(row)

    def create_api_token(
        self,
        name: str,
        token_hash: str,
        role: Role | str,
        owner: str | None = None,
        *,
        now: float | None = None,
    ) -> ApiToken:
        _check_name(name, "name")
        self._check_hash(token_hash, "token_hash")
        r = _enum(Role, role)
        if owner is not None:
            _check_name(owner, "owner", 64)
        now = self._now(now)
        with self._write() as c:
            if (
                owner is not None
                and c.execute("SELECT 1 FROM users WHERE username = ?", (owner,)).fetchone() is None
            ):
                raise NotFound("user", owner)
            try:
                cur = c.execute(
                    "INSERT INTO api_tokens (name, token_hash, role, owner, created_at)"
                    " VALUES (?, ?, ?, ?, ?)",
                    (name, token_hash, r.value, owner, now),
                )
            except sqlite3.IntegrityError:
                raise Conflict("a token with this hash already exists") from None
            return ApiToken(cur.lastrowid or 0, name, token_hash, r, owner, now, None, False)

    def find_api_token(self, token_hash: str) -> ApiToken:
        """The token row whose stored hash equals ``token_hash`` (revoked ones included:
        the caller decides). The lookup is an index probe on a hash of a high-entropy
        token, so its timing reveals nothing usable about the token."""
        self._check_hash(token_hash, "token_hash")
        with self._reading() as c:
            row = c.execute(
                f"SELECT {_TOKEN_COLS} FROM api_tokens WHERE token_hash = ?", (token_hash,)
            ).fetchone()
        if row is None:
            raise NotFound("api token", "<hash>")  # never echo credentials
        return _token(row)

    def list_api_tokens(self) -> list[ApiToken]:
        with self._reading() as c:
            return [
                _token(r) for r in c.execute(f"SELECT {_TOKEN_COLS} FROM api_tokens ORDER BY id")
            ]

    def touch_api_token(self, token_id: int, *, now: float | None = None) -> None:
        _check_id(token_id, "token_id")
        now = self._now(now)
        with self._write() as c:
            cur = c.execute("UPDATE api_tokens SET last_used = ? WHERE id = ?", (now, token_id))
            if cur.rowcount == 0:
                raise NotFound("api token", token_id)

    def revoke_api_token(self, token_id: int) -> ApiToken:
        _check_id(token_id, "token_id")
        with self._write() as c:
            row = c.execute(
                f"UPDATE api_tokens SET revoked = 1 WHERE id = ? RETURNING {_TOKEN_COLS}",
                (token_id,),
            ).fetchone()
            if row is None:
                raise NotFound("api token", token_id)
            return _token(row)

    # -- login sessions -------------------------------------------------------------------

    def create_session(
        self,
        id_hash: str,
        username: str,
        csrf_token: str,
        expires_at: float,
        source: str,
        *,
        now: float | None = None,
    ) -> Session:
        self._check_hash(id_hash, "id_hash")
        _check_name(username, "username", 64)
        self._check_hash(csrf_token, "csrf_token")
        expires_at = _check_time(expires_at, "expires_at")
        _check_name(source, "source")
        now = self._now(now)
        with self._write() as c:
            if c.execute("SELECT 1 FROM users WHERE username = ?", (username,)).fetchone() is None:
                raise NotFound("user", username)
            try:
                c.execute(
                    f"INSERT INTO sessions ({_SESSION_COLS}) VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (id_hash, username, csrf_token, now, now, expires_at, source),
                )
            except sqlite3.IntegrityError:
                raise Conflict("a session with this id already exists") from None
            return Session(id_hash, username, csrf_token, now, now, expires_at, source)

    def get_session(self, id_hash: str) -> Session:
        self._check_hash(id_hash, "id_hash")
        with self._reading() as c:
            row = c.execute(
                f"SELECT {_SESSION_COLS} FROM sessions WHERE id_hash = ?", (id_hash,)
            ).fetchone()
        if row is None:
            raise NotFound("session", "<hash>")  # never echo credentials
        return Session(*row)

    def touch_session(self, id_hash: str, *, now: float | None = None) -> None:
        self._check_hash(id_hash, "id_hash")
        now = self._now(now)
        with self._write() as c:
            cur = c.execute(
                "UPDATE sessions SET last_seen = max(last_seen, ?) WHERE id_hash = ?",
                (now, id_hash),
            )
            if cur.rowcount == 0:
                raise NotFound("session", "<hash>")

    def delete_session(self, id_hash: str) -> bool:
        self._check_hash(id_hash, "id_hash")
        with self._write() as c:
            return c.execute("DELETE FROM sessions WHERE id_hash = ?", (id_hash,)).rowcount > 0

    def delete_user_sessions(self, username: str, *, keep: str | None = None) -> int:
        """End every session of ``username`` except ``keep`` (an id hash); returns how many."""
        _check_name(username, "username", 64)
        with self._write() as c:
            return c.execute(
                "DELETE FROM sessions WHERE username = ? AND id_hash IS NOT ?", (username, keep)
            ).rowcount

    def purge_sessions(self, *, idle_before: float, now: float | None = None) -> int:
        """Delete sessions past their expiry or last used before ``idle_before``."""
        idle_before = _check_time(idle_before, "idle_before")
        now = self._now(now)
        with self._write() as c:
            return c.execute(
                "DELETE FROM sessions WHERE expires_at <= ? OR last_seen < ?", (now, idle_before)
            ).rowcount

    # -- audit ----------------------------------------------------------------------------

    def append_audit(
        self,
        actor: str,
        action: str,
        target: str,
        source: str,
        detail: Mapping[str, Any] | None = None,
        *,
        now: float | None = None,
    ) -> AuditEntry:
        """Append one entry: who (``actor``) did what (``action`` on ``target``) from where
        (``source``). Entries can never be changed or removed (database triggers refuse)."""
        _check_name(actor, "actor")
        _check_name(action, "action")
        if not isinstance(target, str) or len(target) > 4096 or _text(target) != target:
            raise InvalidInput("target must be a UTF-8 string of at most 4096 characters")
        _check_name(source, "source")
        if detail is not None and not isinstance(detail, Mapping):
            raise InvalidInput("detail must be a mapping")
        doc = _dumps(dict(detail or {}), "detail")
        now = self._now(now)
        with self._write() as c:
            cur = c.execute(
                "INSERT INTO audit_log (ts, actor, action, target, detail, source)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                (now, actor, action, target, doc, source),
            )
            return AuditEntry(
                cur.lastrowid or 0, now, actor, action, target, json.loads(doc), source
            )

    def list_audit(
        self,
        *,
        actor: str | None = None,
        action: str | None = None,
        since: float | None = None,
        limit: int = 100,
        before_id: int | None = None,
    ) -> list[AuditEntry]:
        """Audit entries newest first; page with ``before_id``."""
        _check_limit(limit)
        where: list[str] = []
        params: list[Any] = []
        if actor is not None:
            where.append("actor = ?")
            params.append(_check_name(actor, "actor"))
        if action is not None:
            where.append("action = ?")
            params.append(_check_name(action, "action"))
        sql = _newest_first(
            f"SELECT {_AUDIT_COLS} FROM audit_log", where, params, "ts", since, before_id
        )
        with self._reading() as c:
            return [_audit(r) for r in c.execute(sql, [*params, limit])]

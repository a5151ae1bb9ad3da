"""Ordered schema migrations for the SQLite store.

Each migration is a version number, a name and a list of single SQL statements; they run in
one transaction at open, and ``schema_version`` records each one applied. Never edit a
migration that has shipped: append a new one. Statements are kept as a list (not a script)
because ``sqlite3.executescript`` commits first, which would break the all-or-nothing open.

Index choices follow the measured ingest numbers in ARCHITECTURE.md: the ``events`` table only
has indexes whose keys grow with time (``ts`` leads, or a low-cardinality column then ``ts``),
so every insert appends to the right edge of each B-tree. Filters on pid, entity id,
executable, path, ip and port are evaluated on rows the time indexes select. Full text lives
in a contentless FTS5 table filled by ``index_pending`` off the ingest path.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    name: str
    statements: tuple[str, ...]


_INITIAL = (
    # -- events ---------------------------------------------------------------------------
    """CREATE TABLE batches (
        id INTEGER PRIMARY KEY,
        host_id TEXT NOT NULL,
        seq INTEGER NOT NULL,
        received REAL NOT NULL,
        event_count INTEGER NOT NULL,
        dropped INTEGER NOT NULL DEFAULT 0,
        untimed INTEGER NOT NULL DEFAULT 0,
        UNIQUE (host_id, seq)
    )""",
    # AUTOINCREMENT: ids are never reused after retention, so the full-text watermark
    # (the highest id indexed) stays meaningful.
    """CREATE TABLE events (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        batch_id INTEGER NOT NULL,
        host_id TEXT NOT NULL,
        ts INTEGER NOT NULL,
        category TEXT,
        action TEXT,
        pid INTEGER,
        entity_id TEXT,
        executable TEXT,
        command_line TEXT,
        file_path TEXT,
        src_ip TEXT,
        src_port INTEGER,
        dst_ip TEXT,
        dst_port INTEGER,
        user_name TEXT,
        size INTEGER NOT NULL,
        doc TEXT NOT NULL
    )""",
    "CREATE INDEX events_ts ON events (ts)",
    "CREATE INDEX events_host_ts ON events (host_id, ts)",
    "CREATE INDEX events_action_ts ON events (action, ts)",
    # Contentless: the index holds only tokens (the text is in ``events``), and it indexes
    # less than the columns hold (see ``sqlite._FTS_VALUES``).
    """CREATE VIRTUAL TABLE events_fts USING fts5 (
        command_line, file_path, executable, content = ''
    )""",
    # Process ancestry, maintained from exec/fork/exit events only.
    """CREATE TABLE processes (
        host_id TEXT NOT NULL,
        entity_id TEXT NOT NULL,
        pid INTEGER,
        parent_entity_id TEXT,
        ppid INTEGER,
        executable TEXT,
        command_line TEXT,
        user_name TEXT,
        start_ts INTEGER,
        exit_ts INTEGER,
        exit_code INTEGER,
        last_ts INTEGER NOT NULL,
        PRIMARY KEY (host_id, entity_id)
    ) WITHOUT ROWID""",
    "CREATE INDEX processes_parent ON processes (host_id, parent_entity_id)",
    "CREATE INDEX processes_last ON processes (last_ts)",
    # Single-row counters and watermarks.
    """CREATE TABLE store_state (
        key TEXT PRIMARY KEY,
        value INTEGER NOT NULL
    ) WITHOUT ROWID""",
    "INSERT INTO store_state (key, value) VALUES ('event_bytes', 0), ('fts_watermark', 0)",
    # -- hosts ----------------------------------------------------------------------------
    """CREATE TABLE hosts (
        host_id TEXT PRIMARY KEY,
        hostname TEXT NOT NULL,
        os TEXT NOT NULL,
        kernel TEXT NOT NULL,
        sensor_version TEXT NOT NULL,
        tiers TEXT NOT NULL,
        first_seen REAL NOT NULL,
        last_seen REAL NOT NULL,
        metrics TEXT NOT NULL DEFAULT '{}',
        drops TEXT NOT NULL DEFAULT '{}',
        outbox_depth INTEGER NOT NULL DEFAULT 0,
        events_dropped INTEGER NOT NULL DEFAULT 0,
        isolated INTEGER NOT NULL DEFAULT 0,
        isolation_changed_at REAL,
        policy_version INTEGER,
        policy_applied_at REAL
    )""",
    """CREATE TABLE host_metrics (
        id INTEGER PRIMARY KEY,
        host_id TEXT NOT NULL REFERENCES hosts (host_id) ON DELETE CASCADE,
        ts REAL NOT NULL,
        metrics TEXT NOT NULL,
        drops TEXT NOT NULL,
        outbox_depth INTEGER NOT NULL
    )""",
    "CREATE INDEX host_metrics_host ON host_metrics (host_id, id)",
    # -- commands -------------------------------------------------------------------------
    """CREATE TABLE commands (
        id INTEGER PRIMARY KEY,
        host_id TEXT NOT NULL REFERENCES hosts (host_id),
        action TEXT NOT NULL,
        args TEXT NOT NULL,
        requested_by TEXT NOT NULL,
        idempotency_key TEXT NOT NULL UNIQUE,
        status TEXT NOT NULL CHECK (status IN
            ('queued', 'sent', 'acknowledged', 'succeeded', 'failed', 'expired')),
        created_at REAL NOT NULL,
        expires_at REAL NOT NULL,
        sent_at REAL,
        acknowledged_at REAL,
        finished_at REAL,
        output TEXT
    )""",
    "CREATE INDEX commands_host ON commands (host_id, status, id)",
    "CREATE INDEX commands_open ON commands (status, expires_at)",
    # -- policy ---------------------------------------------------------------------------
    """CREATE TABLE policies (
        version INTEGER PRIMARY KEY AUTOINCREMENT,
        document TEXT NOT NULL,
        author TEXT NOT NULL,
        created_at REAL NOT NULL,
        comment TEXT NOT NULL DEFAULT ''
    )""",
    # -- alerts ---------------------------------------------------------------------------
    """CREATE TABLE alerts (
        id INTEGER PRIMARY KEY,
        created_at REAL NOT NULL,
        updated_at REAL NOT NULL,
        rule_id TEXT NOT NULL,
        rule_name TEXT NOT NULL,
        severity TEXT NOT NULL CHECK (severity IN
            ('informational', 'low', 'medium', 'high', 'critical')),
        host_id TEXT NOT NULL,
        event_id INTEGER,
        event TEXT NOT NULL,
        ancestry TEXT NOT NULL,
        status TEXT NOT NULL CHECK (status IN
            ('new', 'acknowledged', 'resolved', 'false_positive')),
        assignee TEXT
    )""",
    "CREATE INDEX alerts_status ON alerts (status, id)",
    "CREATE INDEX alerts_host ON alerts (host_id, id)",
    """CREATE TABLE alert_comments (
        id INTEGER PRIMARY KEY,
        alert_id INTEGER NOT NULL REFERENCES alerts (id) ON DELETE CASCADE,
        author TEXT NOT NULL,
        ts REAL NOT NULL,
        text TEXT NOT NULL
    )""",
    "CREATE INDEX alert_comments_alert ON alert_comments (alert_id, id)",
    # -- users, tokens, audit ---------------------------------------------------------------
    """CREATE TABLE users (
        username TEXT PRIMARY KEY,
        password_hash TEXT NOT NULL,
        role TEXT NOT NULL CHECK (role IN ('admin', 'responder', 'viewer')),
        disabled INTEGER NOT NULL DEFAULT 0,
        created_at REAL NOT NULL,
        updated_at REAL NOT NULL
    )""",
    """CREATE TABLE api_tokens (
        id INTEGER PRIMARY KEY,
        name TEXT NOT NULL,
        token_hash TEXT NOT NULL UNIQUE,
        role TEXT NOT NULL CHECK (role IN ('admin', 'responder', 'viewer')),
        owner TEXT REFERENCES users (username),
        created_at REAL NOT NULL,
        last_used REAL,
        revoked INTEGER NOT NULL DEFAULT 0
    )""",
    """CREATE TABLE audit_log (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        ts REAL NOT NULL,
        actor TEXT NOT NULL,
        action TEXT NOT NULL,
        target TEXT NOT NULL,
        detail TEXT NOT NULL,
        source TEXT NOT NULL
    )""",
    # Append-only is enforced by the database, not just by the absence of a method.
    """CREATE TRIGGER audit_log_no_update BEFORE UPDATE ON audit_log
       BEGIN SELECT RAISE(ABORT, 'audit_log is append-only'); END""",
    """CREATE TRIGGER audit_log_no_delete BEFORE DELETE ON audit_log
       BEGIN SELECT RAISE(ABORT, 'audit_log is append-only'); END""",
)

# Login sessions (controller.auth): only a SHA-256 of the random session id is kept, so a
# copy of the database does not hand out live sessions. Deleting a user's row is not
# possible through the store, but CASCADE keeps the table honest if an operator does it.
_SESSIONS = (
    """CREATE TABLE sessions (
        id_hash TEXT PRIMARY KEY,
        username TEXT NOT NULL REFERENCES users (username) ON DELETE CASCADE,
        csrf_token TEXT NOT NULL,
        created_at REAL NOT NULL,
        last_seen REAL NOT NULL,
        expires_at REAL NOT NULL,
        source TEXT NOT NULL
    ) WITHOUT ROWID""",
    "CREATE INDEX sessions_user ON sessions (username)",
    "CREATE INDEX sessions_expires ON sessions (expires_at)",
)

# Detection watermark: the highest event id that detection has evaluated. Alerts and the
# watermark move in one transaction, so after a crash the controller re-evaluates exactly the
# events above it. A store that predates it starts with everything counted as evaluated
# (re-alerting a whole history on upgrade would flood the analysts).
_DETECTION = (
    "INSERT INTO store_state (key, value)"
    " VALUES ('detect_watermark', (SELECT coalesce(max(id), 0) FROM events))",
)

# The process facts the indexer folds into ``processes`` (parent, exit code), as columns the
# store fills while it still holds each event as a dict: reading them back out of ``doc`` with
# json_extract cost the indexer ~8 µs per event (SQLite re-parses the JSON on every call), more
# than storing the event. Only exec, fork and exit events with an entity id carry them, and the
# parent's executable and command line only when the parent has an entity id (what the indexer
# reads). Rows the indexer has not reached yet at upgrade get them from their documents here.
_PROCESS_COLUMNS = (
    "ALTER TABLE events ADD COLUMN parent_entity_id TEXT",
    "ALTER TABLE events ADD COLUMN ppid INTEGER",
    "ALTER TABLE events ADD COLUMN parent_executable TEXT",
    "ALTER TABLE events ADD COLUMN parent_command_line TEXT",
    "ALTER TABLE events ADD COLUMN exit_code INTEGER",
    """UPDATE events SET
        parent_entity_id = CASE WHEN json_type(doc, '$.process.parent.entity_id') = 'text'
                           THEN json_extract(doc, '$.process.parent.entity_id') END,
        ppid = CASE WHEN json_type(doc, '$.process.parent.pid') = 'integer'
               THEN json_extract(doc, '$.process.parent.pid') END,
        parent_executable = CASE WHEN json_type(doc, '$.process.parent.entity_id') = 'text'
                                  AND json_type(doc, '$.process.parent.executable') = 'text'
                            THEN json_extract(doc, '$.process.parent.executable') END,
        parent_command_line = CASE WHEN json_type(doc, '$.process.parent.entity_id') = 'text'
                                    AND json_type(doc, '$.process.parent.command_line') = 'text'
                              THEN json_extract(doc, '$.process.parent.command_line') END,
        exit_code = CASE WHEN json_type(doc, '$.process.exit_code') = 'integer'
                    THEN json_extract(doc, '$.process.exit_code') END
    WHERE id > (SELECT value FROM store_state WHERE key = 'fts_watermark')
      AND action IN ('exec', 'fork', 'exit') AND entity_id IS NOT NULL""",
)

# The process table's own watermark: folding events into it is the indexer's costliest part
# per commit (random pages), so it may run in larger, rarer batches than full text.
_PROCESS_WATERMARK = (
    "INSERT INTO store_state (key, value)"
    " VALUES ('process_watermark', (SELECT value FROM store_state WHERE key = 'fts_watermark'))",
)

# The process table moves to its own file (``<store>-processes``, see PROCESS_FILE_SCHEMA):
# its upserts land on random pages, and as a table of the store they held the store's single
# writer that ingest waits for (bench/controller_ingest.py --indexer: 39.4k -> 47.4k events/s
# once moved). Before this migration runs, the store copies the rows and the watermark into
# the new file (a copy that is simply redone if the store crashes before the drop commits:
# the upserts are idempotent).
_PROCESS_FILE = (
    "DROP TABLE processes",
    "DELETE FROM store_state WHERE key = 'process_watermark'",
)
PROCESS_FILE_VERSION = 6

# The process file's schema, applied (idempotently) every time the store opens it. It holds
# only what ``fold_processes`` derives from stored events, and its own watermark: a missing
# file is rebuilt from the events still stored.
PROCESS_FILE_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS processes (
        host_id TEXT NOT NULL,
        entity_id TEXT NOT NULL,
        pid INTEGER,
        parent_entity_id TEXT,
        ppid INTEGER,
        executable TEXT,
        command_line TEXT,
        user_name TEXT,
        start_ts INTEGER,
        exit_ts INTEGER,
        exit_code INTEGER,
        last_ts INTEGER NOT NULL,
        PRIMARY KEY (host_id, entity_id)
    ) WITHOUT ROWID""",
    "CREATE INDEX IF NOT EXISTS processes_parent ON processes (host_id, parent_entity_id)",
    "CREATE INDEX IF NOT EXISTS processes_last ON processes (last_ts)",
    """CREATE TABLE IF NOT EXISTS process_state (
        key TEXT PRIMARY KEY,
        value INTEGER NOT NULL
    ) WITHOUT ROWID""",
    "INSERT OR IGNORE INTO process_state (key, value) VALUES ('process_watermark', 0)",
)

MIGRATIONS: tuple[Migration, ...] = (
    Migration(1, "initial schema", _INITIAL),
    Migration(2, "login sessions", _SESSIONS),
    Migration(3, "detection watermark", _DETECTION),
    Migration(4, "process columns on events", _PROCESS_COLUMNS),
    Migration(5, "process table watermark", _PROCESS_WATERMARK),
    Migration(PROCESS_FILE_VERSION, "process table in its own file", _PROCESS_FILE),
)

LATEST_VERSION = MIGRATIONS[-1].version


def check_order(migrations: tuple[Migration, ...] = MIGRATIONS) -> None:
    """Refuse a migration list that is not 1, 2, 3, ... (a merge mistake)."""
    for expected, m in enumerate(migrations, start=1):
        if m.version != expected:
            raise RuntimeError(f"migration {m.name!r} has version {m.version}, expected {expected}")

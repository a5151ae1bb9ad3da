"""Opening, migrating and refusing databases, on real files."""

from __future__ import annotations

import os
import sqlite3
import stat
from pathlib import Path

import pytest

from controller.store import SchemaTooNew, SQLiteStore, StoreError
from controller.store.migrations import LATEST_VERSION, MIGRATIONS, Migration, check_order


def _tables(path: Path) -> set[str]:
    with sqlite3.connect(path) as c:
        return {r[0] for r in c.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}


def test_migrates_an_empty_file_and_sets_wal(db_path: Path) -> None:
    with SQLiteStore(db_path) as s:
        assert s.schema_version() == LATEST_VERSION
        mode = s._writer.execute("PRAGMA journal_mode").fetchone()[0]
        sync = s._writer.execute("PRAGMA synchronous").fetchone()[0]
    assert mode == "wal"
    assert sync == 2  # FULL: a committed (acked) batch survives power loss too
    assert {"events", "batches", "hosts", "commands", "alerts", "audit_log", "users"} <= _tables(
        db_path
    )
    assert stat.S_IMODE(os.stat(db_path).st_mode) == 0o600


def test_reopen_is_idempotent_and_keeps_data(db_path: Path, make_ev, t0: float) -> None:
    from backplane.schema import Action

    with SQLiteStore(db_path) as s:
        assert s.ingest_batch("host-a", 1, [make_ev(Action.EXEC, t0)])
    with SQLiteStore(db_path) as s:
        assert s.schema_version() == LATEST_VERSION
        assert len(s.search_events().events) == 1
        # a second open applied nothing twice
        rows = s._writer.execute("SELECT version FROM schema_version").fetchall()
        assert [r[0] for r in rows] == [m.version for m in MIGRATIONS]
        assert not s.ingest_batch("host-a", 1, [make_ev(Action.EXEC, t0)])


def test_newer_schema_is_refused_and_left_untouched(db_path: Path) -> None:
    SQLiteStore(db_path).close()
    with sqlite3.connect(db_path) as c:
        c.execute(
            "INSERT INTO schema_version (version, name, applied_at) VALUES (?, 'future', 0)",
            (LATEST_VERSION + 1,),
        )
    before = db_path.read_bytes()
    with pytest.raises(SchemaTooNew, match="upgrade the controller"):
        SQLiteStore(db_path)
    with sqlite3.connect(db_path) as c:
        assert c.execute("SELECT max(version) FROM schema_version").fetchone()[0] == (
            LATEST_VERSION + 1
        )
    assert len(db_path.read_bytes()) == len(before)


def test_not_a_database_is_a_clear_error(tmp_path: Path) -> None:
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(StoreError, match="cannot open as an EDR store"):
        SQLiteStore(junk)
    assert junk.read_bytes() == b"this is not sqlite" * 100


def test_bad_synchronous_refused(db_path: Path) -> None:
    with pytest.raises(ValueError, match="synchronous"):
        SQLiteStore(db_path, synchronous="OFF")


def test_migration_order_is_checked() -> None:
    check_order()
    with pytest.raises(RuntimeError, match="expected 2"):
        check_order((Migration(1, "a", ()), Migration(3, "c", ())))


def test_closed_store_refuses_calls(db_path: Path) -> None:
    s = SQLiteStore(db_path)
    s.close()
    s.close()  # twice is fine
    with pytest.raises(StoreError, match="closed"):
        s.ingest_batch("h", 1, [])
    with pytest.raises(StoreError, match="closed"):
        s.list_hosts()

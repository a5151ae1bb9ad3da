"""Opening, migrating and refusing databases, on real files."""

from __future__ import annotations

import os
import sqlite3
import stat
from pathlib import Path

import pytest

from controller.store import NotFound, SchemaTooNew, SQLiteStore, StoreError
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


def _processes(s: SQLiteStore) -> list[tuple[object, ...]]:
    assert s._proc is not None  # the process file's connection: its main is that file
    return s._proc.execute("SELECT * FROM main.processes ORDER BY host_id, entity_id").fetchall()


def test_upgrade_to_process_columns_indexes_old_rows(
    tmp_path: Path, make_ev, t0: float, rolled_back
) -> None:
    """A schema 3 file with events the indexer has not reached: the upgrade copies their
    process facts out of the documents, so the process table ends up as if every event had
    been stored by this code."""
    from backplane.schema import Action

    def parent(
        pid: object, eid: object, exe: str | None = None, cmd: str | None = None
    ) -> dict[str, object]:
        p = {"pid": pid, "entity_id": eid, "executable": exe, "command_line": cmd}
        return {k: v for k, v in p.items() if v is not None}

    def ev(action: Action, at: float, par: dict[str, object] | None = None, **kw: object):
        e = make_ev(action, at, **kw)
        if par is not None:
            e["process"]["parent"] = par
        return e

    first = [
        ev(
            Action.EXEC,
            t0,
            pid=10,
            entity="sshd",
            exe="/usr/sbin/sshd",
            par=parent(1, "init", "/sbin/init", "init splash"),
        ),
        ev(
            Action.FILE_WRITE,
            t0 + 1,
            pid=10,
            entity="sshd",
            path="/etc/x",
            par=parent(1, "wrong", "/not/a/process/event"),
        ),
    ]
    later = [
        ev(
            Action.FORK, t0 + 2, pid=20, entity="bash", exe="/usr/sbin/sshd", par=parent(10, "sshd")
        ),
        ev(
            Action.EXEC,
            t0 + 3,
            pid=20,
            entity="bash",
            exe="/usr/bin/bash",
            par=parent(10, "sshd", "/usr/sbin/sshd", "sshd: alice [priv]"),
        ),
        ev(
            Action.EXEC,
            t0 + 4,
            pid=30,
            entity="curl",
            exe="/usr/bin/curl",
            cmd="curl -o /tmp/é http://x",
            par=parent(20, "bash", cmd="-bash é"),
        ),
        ev(
            Action.EXIT,
            t0 + 5,
            pid=30,
            entity="curl",
            exe="/usr/bin/curl",
            exit_code=7,
            par=parent(20, "bash"),
        ),
        # a parent without an entity id names no process; odd types are left empty
        ev(Action.EXEC, t0 + 6, pid=40, entity="orphan", par=parent(5, None, "/x")),
        ev(Action.EXEC, t0 + 7, pid=41, entity="odd", par=parent("5", 99, "/y")),
        ev(Action.EXIT, t0 + 8, pid=41, entity="odd", exit_code=1.5),
        ev(
            Action.EXEC,
            t0 + 9,
            pid=50,
            entity="ls",
            host="host-b",
            par=parent(2, "unseen", "/usr/bin/zsh", "zsh -l"),
        ),
    ]
    old, new = tmp_path / "old.db", tmp_path / "new.db"
    with SQLiteStore(old) as s:
        s.ingest_batch("host-a", 1, first)
        assert s.index_pending() == 2
        s.ingest_batch("host-a", 2, later[:-1])
        s.ingest_batch("host-b", 1, later[-1:])
    rolled_back(old, 3)
    assert "parent_entity_id" not in {
        r[1] for r in sqlite3.connect(old).execute("PRAGMA table_info(events)")
    }
    with SQLiteStore(new) as s:
        s.ingest_batch("host-a", 1, first)
        s.index_pending()
        s.ingest_batch("host-a", 2, later[:-1])
        s.ingest_batch("host-b", 1, later[-1:])
        assert s.index_pending() == len(later)
        expected = _processes(s)
    with SQLiteStore(old) as s:
        assert s.schema_version() == LATEST_VERSION
        # the process table's watermark starts where full text stood
        assert (
            s._proc is not None
            and s._proc.execute(
                "SELECT value FROM process_state WHERE key = 'process_watermark'"
            ).fetchone()[0]
            == 2
        )
        assert s.pending_index_rows() == len(later)
        assert s.index_pending() == len(later)
        assert _processes(s) == expected
        assert len(s.search_events(text="curl").events) == 1  # full text found the old row
        bash = s.process_tree("host-a", "bash")
        assert (bash.process.ppid, bash.process.parent_entity_id) == (10, "sshd")
        assert [a.entity_id for a in bash.ancestors] == ["sshd", "init"]
        assert bash.ancestors[1].executable == "/sbin/init"  # the stub, from batch 1
        assert bash.ancestors[1].command_line == "init splash"
        curl = s.process_tree("host-a", "curl").process
        assert (curl.exit_code, curl.exit) == (7, pytest.approx(t0 + 5))
        assert [c.entity_id for c in bash.children] == ["curl"]
        odd = s.process_tree("host-a", "odd").process
        assert (odd.ppid, odd.parent_entity_id, odd.exit_code) == (None, None, None)
        orphan = s.process_tree("host-a", "orphan").process
        assert (orphan.ppid, orphan.parent_entity_id) == (5, None)
        unseen = s.process_tree("host-b", "unseen").process
        assert (unseen.executable, unseen.command_line, unseen.pid) == ("/usr/bin/zsh", "zsh -l", 2)
        with pytest.raises(NotFound):
            s.process_tree("host-a", "wrong")  # named only by a file event
        # bash's own exec wins over what curl's event says about it
        assert bash.process.command_line == "/usr/bin/bash"


def test_upgrade_moves_the_process_table_to_its_own_file(
    tmp_path: Path, make_ev, t0: float, rolled_back
) -> None:
    """A schema 5 file keeps its process table and watermark in the store: the upgrade moves
    both into ``<file>-processes`` (owner-only) and drops them from the store, and ancestry,
    retention and the indexer read and write the new file from then on."""
    from backplane.schema import Action

    path = tmp_path / "old.db"
    proc = Path(f"{path}-processes")
    events = [
        make_ev(Action.EXEC, t0, pid=10, entity="sshd", exe="/usr/sbin/sshd", parent=(1, "init")),
        make_ev(
            Action.EXEC, t0 + 1, pid=20, entity="bash", exe="/usr/bin/bash", parent=(10, "sshd")
        ),
        make_ev(Action.EXIT, t0 + 2, pid=20, entity="bash", exit_code=3, parent=(10, "sshd")),
    ]
    with SQLiteStore(path) as s:
        s.ingest_batch("host-a", 1, events[:2])
        assert s.index_pending() == 2
        s.ingest_batch("host-a", 2, events[2:])  # not folded yet: the watermark must move too
        before = _processes(s)
    rolled_back(path, 5)
    assert not proc.exists() and "processes" in _tables(path)
    with SQLiteStore(path) as s:
        assert s.schema_version() == LATEST_VERSION
        assert "processes" not in _tables(path) and "processes" in _tables(proc)
        assert stat.S_IMODE(os.stat(proc).st_mode) == 0o600
        assert _processes(s) == before
        assert s.pending_index_rows() == 1
        assert s.index_pending() == 1
        bash = s.process_tree("host-a", "bash")
        assert bash.process.exit_code == 3
        assert [a.entity_id for a in bash.ancestors] == ["sshd", "init"]
        assert [c.entity_id for c in s.process_tree("host-a", "sshd").children] == ["bash"]
        assert s.apply_retention(max_age=0, now=t0 + 10).processes_deleted == 3


def test_process_move_is_redone_after_a_crash_before_the_drop(
    tmp_path: Path, make_ev, t0: float, rolled_back
) -> None:
    """Copied into the process file but the store's migration never committed: the next open
    copies again over whatever the file holds (the store's table is still the truth)."""
    from backplane.schema import Action

    path = tmp_path / "old.db"
    with SQLiteStore(path) as s:
        s.ingest_batch(
            "host-a",
            1,
            [
                make_ev(
                    Action.EXEC, t0, pid=10, entity="e10", exe="/usr/bin/true", parent=(1, "init")
                )
            ],
        )
        s.index_pending()
        before = _processes(s)
    rolled_back(path, 5)
    with sqlite3.connect(f"{path}-processes") as c:  # a half-done earlier attempt
        from controller.store.migrations import PROCESS_FILE_SCHEMA

        for statement in PROCESS_FILE_SCHEMA:
            c.execute(statement)
        c.execute(
            "INSERT INTO processes (host_id, entity_id, pid, last_ts)"
            " VALUES ('host-a', 'e10', 999, 0)"
        )
        c.execute("UPDATE process_state SET value = 77")
    with SQLiteStore(path) as s:
        assert _processes(s) == before
        assert s.pending_index_rows() == 0
        assert s.process_tree("host-a", "e10").process.pid == 10


def test_a_lost_process_file_is_rebuilt_from_stored_events(
    tmp_path: Path, make_ev, t0: float
) -> None:
    from backplane.schema import Action

    path = tmp_path / "edr.db"
    with SQLiteStore(path) as s:
        s.ingest_batch(
            "host-a", 1, [make_ev(Action.EXEC, t0, pid=10, entity="e10", parent=(1, "init"))]
        )
        s.index_pending()
        before = _processes(s)
    for suffix in ("", "-wal", "-shm"):
        Path(f"{path}-processes{suffix}").unlink(missing_ok=True)
    with SQLiteStore(path) as s:
        assert s.pending_index_rows() == 1
        assert s.index_pending() == 1
        assert _processes(s) == before

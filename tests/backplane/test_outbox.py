"""The durable outbox: batching, ack, bounded overflow with exact drop counts, restarts."""

from __future__ import annotations

from pathlib import Path

import pytest

from backplane.outbox import Outbox


def ev(i: int) -> dict:
    return {"n": i, "pad": "x" * 100}


def test_batches_by_count_and_age(tmp_path: Path) -> None:
    t = [0.0]
    ob = Outbox(tmp_path / "o.db", batch_events=10, batch_age=1.0, clock=lambda: t[0])
    ob.append(ev(i) for i in range(25))
    assert ob.depth == 2  # two full batches sealed, five events pending
    assert not ob.flush_due()
    t[0] = 1.5
    assert ob.flush_due()
    batches = ob.peek(limit=10)
    assert [len(b.events) for b in batches] == [10, 10, 5]
    seqs = [b.seq for b in batches]
    assert seqs == sorted(seqs) and len(set(seqs)) == 3
    assert [e["n"] for b in batches for e in b.events] == list(range(25))
    assert ob.peek(after=seqs[0], limit=1)[0].seq == seqs[1]
    assert ob.ack(seqs[1]) and not ob.ack(seqs[1])
    assert [b.seq for b in ob.peek(limit=10)] == [seqs[0], seqs[2]]
    ob.close()


def test_overflow_drops_oldest_and_counts_exactly(tmp_path: Path) -> None:
    ob = Outbox(tmp_path / "o.db", batch_events=10, max_bytes=20_000)
    total = 1000
    ob.append(ev(i) for i in range(total))
    ob.flush()
    batches = ob.peek(limit=1000)
    kept = sum(len(b.events) for b in batches)
    reported = sum(b.dropped for b in batches)
    assert ob.size_bytes <= 20_000
    assert kept + reported == total  # every event is either kept or counted as dropped
    assert reported > 0
    # The oldest were dropped: what is left is the newest, in order.
    ns = [e["n"] for b in batches for e in b.events]
    assert ns == list(range(total - kept, total))


def test_drop_count_survives_restart_and_rolls_forward(tmp_path: Path) -> None:
    path = tmp_path / "o.db"
    ob = Outbox(path, batch_events=10, max_bytes=5_000)
    ob.append(ev(i) for i in range(200))
    ob.close()
    ob = Outbox(path, batch_events=10, max_bytes=5_000)
    first = ob.peek(limit=1000)
    assert sum(len(b.events) + b.dropped for b in first) == 200
    # More overflow after the restart: the earlier counts are carried, never lost.
    ob.append(ev(i) for i in range(200, 400))
    ob.close()
    ob = Outbox(path, batch_events=10, max_bytes=5_000)
    batches = ob.peek(limit=1000)
    assert sum(len(b.events) + b.dropped for b in batches) == 400
    ob.close()


def test_survives_restart_and_sequence_keeps_growing(tmp_path: Path) -> None:
    path = tmp_path / "o.db"
    ob = Outbox(path, batch_events=5)
    ob.append(ev(i) for i in range(12))
    ob.close()  # seals the partial batch
    ob = Outbox(path, batch_events=5)
    batches = ob.peek(limit=10)
    assert [len(b.events) for b in batches] == [5, 5, 2]
    for b in batches:
        ob.ack(b.seq)
    last = batches[-1].seq
    ob.append(ev(i) for i in range(5))
    assert ob.peek(limit=1)[0].seq > last  # never reuses an acked sequence number
    ob.close()
    # A wiped and recreated outbox numbers above the old one (time-based start).
    path.unlink()
    ob = Outbox(path, batch_events=5)
    ob.append(ev(i) for i in range(5))
    assert ob.peek(limit=1)[0].seq > last
    ob.close()


def test_private_file_and_bad_config(tmp_path: Path) -> None:
    ob = Outbox(tmp_path / "s" / "o.db")
    assert (tmp_path / "s" / "o.db").stat().st_mode & 0o077 == 0
    ob.close()
    with pytest.raises(ValueError, match="positive"):
        Outbox(tmp_path / "x.db", max_bytes=0)


def test_failed_seal_loses_nothing(tmp_path: Path) -> None:
    ob = Outbox(tmp_path / "o.db", batch_events=3)
    with pytest.raises(ValueError, match="1 event\\(s\\) cannot be encoded"):
        ob.append([{"ok": 1}, {"bad": object()}, {"ok": 2}])  # msgpack cannot encode object()
    assert ob.pending_events() == 2  # the good ones are kept
    ob.append([{"ok": 3}])
    assert [e["ok"] for e in ob.peek(limit=1)[0].events] == [1, 2, 3]
    ob.close()

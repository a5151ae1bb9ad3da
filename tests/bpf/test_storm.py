"""An exec storm from two workers is captured completely, with nothing dropped (root)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time

import pytest

from sensor.ebpf import TracepointSource

from .conftest import start_source

pytestmark = [pytest.mark.root, pytest.mark.bpf, pytest.mark.timeout(180)]

PER_WORKER = 1500
TRUE = os.path.realpath("/bin/true")
WORKER = textwrap.dedent(
    f"""
    import os
    for _ in range({PER_WORKER}):
        pid = os.posix_spawn({TRUE!r}, [{TRUE!r}, "edr-storm"], {{}})
        os.waitpid(pid, 0)
    """
)


def storm() -> tuple[list[int], float]:
    t0 = time.monotonic()
    workers = [subprocess.Popen([sys.executable, "-c", WORKER]) for _ in range(2)]
    for w in workers:
        assert w.wait(timeout=120) == 0
    return [w.pid for w in workers], time.monotonic() - t0


def test_exec_storm_fully_captured(record_property) -> None:
    if TracepointSource.unavailable():
        pytest.skip(TracepointSource.unavailable() or "")
    _, baseline = storm()
    running = start_source()
    try:
        pids, took = storm()
        want = 2 * PER_WORKER

        def ours(action: str):
            return lambda e: (
                e["event"]["action"] == action
                and e["process"]["parent"]["pid"] in pids
                and e["process"].get("executable") == TRUE
            )

        execs = running.wait_for(ours("exec"), count=want, timeout=30)
        exits = running.wait_for(ours("exit"), count=want, timeout=10)
        counters = running.source.counters()
    finally:
        stop_latency = running.halt()
    print(
        f"\nexec storm: {want} execs from 2 workers, baseline {baseline:.2f}s, "
        f"with sensor {took:.2f}s ({took / baseline:.2f}x); captured {len(execs)} exec, "
        f"{len(exits)} exit; counters {counters}; run() returned {stop_latency * 1000:.0f} ms "
        "after stop"
    )
    record_property("storm_slowdown", round(took / baseline, 3))
    assert len(execs) == want
    assert len(exits) == want
    assert all(e["process"]["args"] == [TRUE, "edr-storm"] for e in execs)
    assert all(e["process"]["exit_code"] == 0 for e in exits)
    assert counters["dropped"] == 0
    assert counters["decode_errors"] == 0 and counters["handler_errors"] == 0
    assert stop_latency < 0.5

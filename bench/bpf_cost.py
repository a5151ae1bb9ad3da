#!/usr/bin/env python3
"""Where the sensor's in-kernel time goes: each BPF program's cost during an exec storm.

``exec_storm.py`` measures what a workload loses to tracing; this says which of the sensor's
programs it loses it to. With ``kernel.bpf_stats_enabled`` set, the kernel counts every
program's runs and the time spent in them (``run_cnt`` and ``run_time_ns`` in
``/proc/<pid>/fdinfo/<program fd>``). This script loads the sensor's BPF object in its own
process (``TracepointSource``, every family, its records drained and dropped), runs the same
``/bin/true`` storm as ``exec_storm.py``, and prints per program: calls per spawn, ns per call
and ns per spawn, as medians over the rounds.

Two things are outside ``run_time_ns`` and are not in the table: the tracepoint machinery that
calls each program (for syscall tracepoints that includes, on kernels from 6.18, copying the
user string or buffer of the syscall's first pointer argument before the program runs), and
the workload's cache misses caused by the programs. ``exec_storm.py``'s ``sensor-paused`` row
measures the whole in-kernel cost, machinery included.

The ``floor`` row, loaded in the same run, is an empty program on ``sys_enter_openat``: what a
call costs the statistics themselves (two clock reads) plus an empty program. Subtract it
from a row's ns per call for the program's own work.

Run as root from the repository root::

    .venv/bin/python bench/bpf_cost.py                 # 3 rounds x 5 s, two workers
    .venv/bin/python bench/bpf_cost.py --rounds 1 --duration 2
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(Path(__file__).resolve().parent)]

import exec_storm  # noqa: E402  (bench/ is a directory of scripts, not a package)

STATS_SYSCTL = Path("/proc/sys/kernel/bpf_stats_enabled")
FLOOR_TEXT = "TRACEPOINT_PROBE(syscalls, sys_enter_openat) { return 0; }"
FLOOR = "floor"


class CostError(Exception):
    """The measurement could not be made; the message says why."""


@dataclass(frozen=True, slots=True)
class Sample:
    calls: int
    ns: int


def parse_fdinfo(text: str) -> Sample:
    """``run_cnt`` and ``run_time_ns`` from a BPF program fd's fdinfo text."""
    fields: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            fields[key.strip()] = value.strip()
    try:
        return Sample(calls=int(fields["run_cnt"]), ns=int(fields["run_time_ns"]))
    except KeyError as exc:
        missing = exc.args[0]
        raise CostError(f"fdinfo has no {missing}: not a BPF program, or a kernel < 5.1") from None
    except ValueError:
        raise CostError(f"fdinfo run_cnt/run_time_ns are not integers: {text!r}") from None


def read_sample(fd: int) -> Sample:
    return parse_fdinfo(Path(f"/proc/self/fdinfo/{fd}").read_text())


def program_name(name: bytes | str) -> str:
    """``tracepoint__syscalls__sys_enter_openat`` -> ``syscalls:sys_enter_openat``."""
    text = name.decode() if isinstance(name, bytes) else name
    parts = text.split("__")
    if len(parts) == 3 and parts[0] == "tracepoint":
        return f"{parts[1]}:{parts[2]}"
    return text


@dataclass(frozen=True, slots=True)
class Row:
    name: str
    calls_per_spawn: float
    ns_per_call: float | None
    ns_per_spawn: float


def per_spawn(
    before: dict[str, Sample], after: dict[str, Sample], spawned: int
) -> dict[str, tuple[float, float | None, float]]:
    """Deltas per program as (calls per spawn, ns per call, ns per spawn)."""
    if spawned <= 0:
        raise CostError("the storm spawned nothing")
    out: dict[str, tuple[float, float | None, float]] = {}
    for name, end in after.items():
        start = before.get(name, Sample(0, 0))
        calls, ns = end.calls - start.calls, end.ns - start.ns
        if calls < 0 or ns < 0:
            raise CostError(f"{name}: counters went backwards ({start} -> {end})")
        out[name] = (calls / spawned, ns / calls if calls else None, ns / spawned)
    return out


def summarize(rounds: list[dict[str, tuple[float, float | None, float]]]) -> list[Row]:
    """Medians over rounds, the costliest program first; programs that never ran are left
    out (a file family hook the storm does not reach)."""
    rows = []
    for name in rounds[0]:
        got = [r[name] for r in rounds if name in r]
        calls = statistics.median(g[0] for g in got)
        if calls == 0:
            continue
        per_call = [g[1] for g in got if g[1] is not None]
        rows.append(
            Row(
                name=name,
                calls_per_spawn=calls,
                ns_per_call=statistics.median(per_call) if per_call else None,
                ns_per_spawn=statistics.median(g[2] for g in got),
            )
        )
    rows.sort(key=lambda r: (r.name == FLOOR, -r.ns_per_spawn))
    return rows


def format_table(rows: list[Row]) -> str:
    width = max([len("program"), *(len(r.name) for r in rows)])
    lines = [
        f"{'program':<{width}}  calls/spawn  ns/call  ns/spawn",
        f"{'-' * width}  -----------  -------  --------",
    ]
    total = 0.0
    for r in rows:
        if r.name != FLOOR:
            total += r.ns_per_spawn
        per_call = "-" if r.ns_per_call is None else f"{r.ns_per_call:7.1f}"
        lines.append(
            f"{r.name:<{width}}  {r.calls_per_spawn:11.2f}  {per_call:>7}  {r.ns_per_spawn:8.0f}"
        )
    lines.append(f"{'sensor total':<{width}}  {'':11}  {'':7}  {total:8.0f}")
    return "\n".join(lines)


@contextmanager
def bpf_stats() -> Iterator[None]:
    """Turn kernel.bpf_stats_enabled on for the block, then back to what it was."""
    try:
        before = STATS_SYSCTL.read_text().strip()
        STATS_SYSCTL.write_text("1\n")
    except OSError as exc:
        raise CostError(f"cannot enable {STATS_SYSCTL}: {exc}") from None
    try:
        yield
    finally:
        STATS_SYSCTL.write_text(before + "\n")


def _load_sensor() -> tuple[Any, threading.Event, threading.Thread]:
    """The sensor's BPF object, all families, in this process; its reader drops records."""
    from backplane.schema import Family
    from sensor.capture import CaptureContext
    from sensor.ebpf import TracepointSource
    from sensor.process_table import ProcessTable

    reason = TracepointSource.unavailable()
    if reason:
        raise CostError(f"the tracepoint tier is not available here: {reason}")
    table = ProcessTable("bpf-cost")
    table.seed_from_proc()
    ctx = CaptureContext(
        host={"id": "bpf-cost"}, table=table, emit=lambda event: None, ignored_pids={os.getpid()}
    )
    source = TracepointSource(ctx, frozenset(Family))
    source.open()
    stop = threading.Event()
    thread = threading.Thread(target=source.run, args=(stop,), name="bpf-cost", daemon=True)
    thread.start()
    return source, stop, thread


def _programs(source: Any, floor: Any) -> dict[str, int]:
    fds = {program_name(name): fn.fd for name, fn in source._bpf.funcs.items()}
    fds[FLOOR] = next(iter(floor.funcs.values())).fd
    return fds


def measure(duration: float, workers: int, rounds: int, log: Callable[[str], None]) -> list[Row]:
    from bcc import BPF

    os.environ.update(exec_storm._bcc_env())
    source, stop, thread = _load_sensor()
    floor = BPF(text=FLOOR_TEXT.encode())
    try:
        with tempfile.TemporaryDirectory(prefix="edr-bpf-cost-") as tmp:
            spawner = exec_storm.build_spawner(Path(tmp))
            fds = _programs(source, floor)
            results = []
            with bpf_stats():
                for n in range(1, rounds + 1):
                    before = {name: read_sample(fd) for name, fd in fds.items()}
                    spawn = exec_storm.run_spawner(spawner, workers, duration, f"bpf-cost-{n}")
                    after = {name: read_sample(fd) for name, fd in fds.items()}
                    results.append(per_spawn(before, after, spawn.spawned))
                    log(f"round {n}: {spawn.rate:,.0f} spawns/s")
    finally:
        floor.cleanup()
        stop.set()
        thread.join(10)
        source.close()
    return summarize(results)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--duration", type=exec_storm.positive_float, default=5.0)
    p.add_argument("--rounds", type=exec_storm.positive_int, default=3)
    p.add_argument("--workers", type=exec_storm.positive_int, default=2)
    args = p.parse_args(argv)
    if os.geteuid() != 0:
        print("bpf_cost: run as root: it loads BPF and sets a sysctl", file=sys.stderr)
        return 2

    def log(msg: str) -> None:
        print(f"bpf_cost: {msg}", file=sys.stderr, flush=True)

    try:
        rows = measure(args.duration, args.workers, args.rounds, log)
    except (CostError, exec_storm.BenchError) as exc:
        print(f"bpf_cost: {exc}", file=sys.stderr)
        return 1
    print(
        f"sensor BPF programs during a {args.workers}-worker /bin/true storm, "
        f"{args.duration:g} s, medians of {args.rounds} round(s)"
    )
    print(format_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())

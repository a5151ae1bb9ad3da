"""A real tracepoint source, loaded once per module, and a way to wait for its events."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from backplane.schema import Family
from sensor.capture import CaptureContext, FilterConfig
from sensor.ebpf import TracepointSource
from sensor.process_table import ProcessTable


@dataclass
class Running:
    source: TracepointSource
    stop: threading.Event
    thread: threading.Thread
    events: list[dict[str, Any]] = field(default_factory=list)

    def find(self, pred: Callable[[dict[str, Any]], bool]) -> list[dict[str, Any]]:
        return [e for e in list(self.events) if pred(e)]

    def wait_for(
        self, pred: Callable[[dict[str, Any]], bool], count: int = 1, timeout: float = 10.0
    ) -> list[dict[str, Any]]:
        """Events matching ``pred`` once at least ``count`` arrived; fails after ``timeout``."""
        deadline = time.monotonic() + timeout
        while True:
            found = self.find(pred)
            if len(found) >= count or time.monotonic() > deadline:
                return found
            time.sleep(0.05)

    def halt(self) -> float:
        """Stop the run thread and close; returns how long ``run`` took to return."""
        t0 = time.monotonic()
        self.stop.set()
        self.thread.join(timeout=5)
        took = time.monotonic() - t0
        self.source.close()
        return took


def start_source(
    families: frozenset[Family] = frozenset(Family), filters: FilterConfig | None = None
) -> Running:
    reason = TracepointSource.unavailable()
    if reason:
        pytest.skip(reason)
    table = ProcessTable("bpf-test-host")
    table.seed_from_proc()
    events: list[dict[str, Any]] = []
    ctx = CaptureContext(
        host={"id": "bpf-test-host", "name": "bpf-test"},
        table=table,
        emit=events.append,
        ignored_pids={os.getpid()},
        emit_forks=True,  # test_live looks for fork events
    )
    if filters is not None:
        ctx.filters = filters
    src = TracepointSource(ctx, families)
    src.open()
    stop = threading.Event()
    thread = threading.Thread(target=src.run, args=(stop,), name="bpf-test-run", daemon=True)
    thread.start()
    return Running(src, stop, thread, events)


@pytest.fixture(scope="module")
def sensor() -> Iterator[Running]:
    running = start_source()
    yield running
    running.halt()

"""The pipeline: hashing off the capture path, back-pressure instead of loss, NDJSON out."""

from __future__ import annotations

import hashlib
import io
import json
import os
import threading
import time
from pathlib import Path

from backplane.schema import Action, Tier, new_event
from sensor.hashing import ExecutableHasher
from sensor.pipeline import EventPipeline, NdjsonSink
from sensor.process_table import ProcessTable


def exec_event(path: str, pid: int = 4242) -> dict:
    ev = new_event(Action.EXEC, host={"id": "h"}, tier=Tier.FALLBACK)
    ev["process"] = {"pid": pid, "executable": path}
    return ev


def test_hasher_caches_by_identity_and_rehashes_on_change(tmp_path: Path) -> None:
    binary = tmp_path / "tool"
    binary.write_bytes(b"version 1")
    hasher = ExecutableHasher()
    assert hasher.sha256(str(binary)) == hashlib.sha256(b"version 1").hexdigest()
    assert hasher.sha256(str(binary)) == hashlib.sha256(b"version 1").hexdigest()
    assert (hasher.hits, hasher.misses) == (1, 1)
    binary.write_bytes(b"version 2!")
    assert hasher.sha256(str(binary)) == hashlib.sha256(b"version 2!").hexdigest()
    assert hasher.misses == 2


def test_hasher_skips_large_files_and_fifos(tmp_path: Path) -> None:
    big = tmp_path / "big"
    big.write_bytes(b"x" * 2048)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    hasher = ExecutableHasher(max_bytes=1024)
    assert hasher.sha256(str(big)) is None
    assert hasher.skipped == 1
    assert hasher.sha256(str(fifo)) is None  # must not block
    assert hasher.sha256(str(tmp_path / "missing")) is None


def test_exec_events_get_the_hash_and_the_table_keeps_it(tmp_path: Path) -> None:
    binary = tmp_path / "tool"
    binary.write_bytes(b"payload")
    out = io.StringIO()
    table = ProcessTable("h")
    info = table.lookup(4242)
    info.executable = str(binary)
    pipeline = EventPipeline(NdjsonSink(out), table)
    pipeline.start()
    pipeline.emit(exec_event(str(binary)))
    pipeline.close()
    (line,) = out.getvalue().splitlines()
    assert json.loads(line)["process"]["hash"]["sha256"] == hashlib.sha256(b"payload").hexdigest()
    assert info.sha256 == hashlib.sha256(b"payload").hexdigest()
    assert pipeline.counters()["events"] == {"exec": 1}


class SlowSink:
    def __init__(self) -> None:
        self.events: list[dict] = []
        self.release = threading.Event()

    def write(self, events: list[dict]) -> None:
        self.release.wait(10)
        self.events.extend(events)

    def close(self) -> None:
        pass


def test_full_queue_blocks_the_producer_and_loses_nothing() -> None:
    sink = SlowSink()
    pipeline = EventPipeline(sink, ProcessTable("h"), maxsize=10, batch=4)
    pipeline.start()
    done = threading.Event()

    def produce() -> None:
        for i in range(100):
            ev = new_event(Action.FILE_WRITE, host={"id": "h"}, tier=Tier.FALLBACK)
            ev["seq"] = i
            pipeline.emit(ev)
        done.set()

    producer = threading.Thread(target=produce)
    producer.start()
    time.sleep(0.3)
    assert not done.is_set()  # held back by the full queue, not dropping
    assert pipeline.blocked >= 1
    sink.release.set()
    producer.join(10)
    pipeline.close()
    assert [ev["seq"] for ev in sink.events] == list(range(100))


def test_broken_output_is_reported_not_swallowed() -> None:
    stream = io.StringIO()
    stream.close()
    pipeline = EventPipeline(NdjsonSink(stream), ProcessTable("h"))
    pipeline.start()
    pipeline.emit(new_event(Action.FILE_WRITE, host={"id": "h"}, tier=Tier.FALLBACK))
    deadline = time.monotonic() + 5
    while pipeline.failed is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert pipeline.failed is not None and "output failed" in pipeline.failed

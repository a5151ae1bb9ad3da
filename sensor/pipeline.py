"""From capture threads to the output: a bounded queue, enrichment, and a sink.

Capture threads only decode and build events; hashing and serialisation happen here, in one
writer thread, off the capture path. The queue is bounded and ``emit`` blocks when it is full:
back-pressure reaches the BPF ring buffer, whose overflows are counted in the kernel, instead of
memory growing or events vanishing here.
"""

from __future__ import annotations

import json
import queue
import threading
from collections import Counter
from typing import IO, Any, Protocol

from backplane.schema import Action, Event
from sensor.hashing import ExecutableHasher
from sensor.process_table import ProcessTable

_STOP = object()


class Sink(Protocol):
    def write(self, events: list[Event]) -> None: ...
    def close(self) -> None: ...


class NdjsonSink:
    """One JSON object per line; flushed per batch so a pipe sees events promptly."""

    def __init__(self, stream: IO[str], close_stream: bool = False) -> None:
        self._stream = stream
        self._close = close_stream
        self._encode = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode

    def write(self, events: list[Event]) -> None:
        self._stream.write("".join(self._encode(ev) + "\n" for ev in events))
        self._stream.flush()

    def close(self) -> None:
        if self._close:
            self._stream.close()


class EventPipeline:
    def __init__(
        self,
        sink: Sink,
        table: ProcessTable,
        *,
        hasher: ExecutableHasher | None = None,
        maxsize: int = 65536,
        batch: int = 512,
    ) -> None:
        self._sink = sink
        self._table = table
        self._hasher = hasher or ExecutableHasher()
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=maxsize)
        self._batch = batch
        self._thread = threading.Thread(target=self._run, name="edr-writer", daemon=True)
        self.by_action: Counter[str] = Counter()
        self.blocked = 0  # times a capture thread waited for room: back-pressure, not loss
        self.failed: str | None = None  # set when the sink broke; the runner stops on it

    def start(self) -> None:
        self._thread.start()

    def emit(self, event: Event) -> None:
        """Called by capture threads. Blocks while the queue is full."""
        try:
            self._queue.put_nowait(event)
        except queue.Full:
            self.blocked += 1
            self._queue.put(event)

    def close(self, timeout: float = 10.0) -> None:
        """Drain what was queued, then stop the writer and close the sink."""
        if self._thread.is_alive():
            self._queue.put(_STOP)
            self._thread.join(timeout)
        self._sink.close()

    def depth(self) -> int:
        return self._queue.qsize()

    def counters(self) -> dict[str, Any]:
        return {
            "events": dict(self.by_action),
            "queue_depth": self.depth(),
            "queue_blocked": self.blocked,
            **self._hasher.counters(),
        }

    def _enrich(self, event: Event) -> None:
        if event["event"]["action"] != Action.EXEC:
            return
        proc = event.get("process", {})
        path = proc.get("executable")
        if not path or "hash" in proc:
            return
        digest = self._hasher.sha256(path, proc.get("pid"))
        if digest is None:
            return
        proc["hash"] = {"sha256": digest}
        info = self._table.get(proc["pid"])
        if info is not None and info.executable == path:
            info.sha256 = digest

    def _run(self) -> None:
        get = self._queue.get
        while True:
            item = get()
            batch = [item]
            while len(batch) < self._batch:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            stop = False
            if _STOP in batch:
                stop = True
                batch = [ev for ev in batch if ev is not _STOP]
            for ev in batch:
                self._enrich(ev)
                self.by_action[ev["event"]["action"]] += 1
            if batch:
                try:
                    self._sink.write(batch)
                except (OSError, ValueError) as exc:
                    # e.g. stdout closed by `| head`: stop the sensor rather than drop quietly.
                    self.failed = f"output failed: {exc}"
                    return
            if stop:
                return

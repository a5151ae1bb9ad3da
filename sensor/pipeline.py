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

import orjson

from backplane.schema import Action, Event
from sensor.hashing import ExecutableHasher
from sensor.process_table import ProcessTable

_STOP = object()
_UNSEEN = object()
_PROCESS_ACTIONS = frozenset({Action.FORK, Action.EXEC, Action.EXIT})


# Events the compiled record path (sensor/_hotpath.c, emit_line) encoded itself, for a
# pipeline that takes lines: ``(lines, cuts, counts)``. ``lines`` is NDJSON, byte for byte
# what NdjsonSink.encode gives for each event's dict; ``cuts`` is ``[offset, executable, pid,
# ...]``, one triple per exec whose process.hash the writer inserts at ``offset``; ``counts``
# is ``{action: events}``. A tuple: a list in the queue is a batch.
Encoded = tuple[bytes, list[Any], dict[str, int]]
Item = Event | Encoded


class Sink(Protocol):
    def write(self, events: list[Event]) -> None: ...
    def close(self) -> None: ...


class Inspector(Protocol):
    """Local policy (sensor/enforce.py): the events it caused, for the actions it names."""

    actions: frozenset[str]

    def inspect(self, event: Event) -> list[Event]: ...


class NdjsonSink:
    """One JSON object per line, UTF-8; flushed per batch so a pipe sees events promptly.

    Encoded with orjson. An event orjson refuses (a lone surrogate: argv or path bytes that
    are not UTF-8 survive decoding as surrogate escapes) is encoded by the stdlib encoder with
    ``ensure_ascii``, so the line is still valid UTF-8 JSON and ``json.loads`` gives back the
    exact original string (``"\\udcff"``).
    """

    takes_lines = True  # also writes the compiled path's encoded events (Encoded)

    def __init__(self, stream: IO[str], close_stream: bool = False) -> None:
        self._stream = stream
        self._close = close_stream
        self._fallback = json.JSONEncoder(separators=(",", ":"), ensure_ascii=True).encode
        self.fallbacks = 0  # events the stdlib encoder wrote

    def encode(self, event: Event) -> bytes:
        """One event as a UTF-8 line, newline included."""
        try:
            return orjson.dumps(event, option=orjson.OPT_APPEND_NEWLINE)
        except TypeError:
            self.fallbacks += 1
            return (self._fallback(event) + "\n").encode("ascii")

    def write(self, events: list[Item]) -> None:  # type: ignore[override]
        # Each line goes into one growing buffer and its bytes object is freed at once; kept
        # in a list for a join, every line was a fresh allocation. Writer thread in an exec
        # storm: 4.75 -> 4.3 us per spawn (two events).
        data = bytearray()
        extend, dumps, option = data.extend, orjson.dumps, orjson.OPT_APPEND_NEWLINE
        for ev in events:
            if type(ev) is tuple:
                extend(ev[0])
            else:
                try:
                    extend(dumps(ev, option=option))
                except TypeError:
                    extend(self.encode(ev))  # type: ignore[arg-type]
        buffer = getattr(self._stream, "buffer", None)
        if buffer is not None:
            self._stream.flush()  # anything written as text earlier goes first
            buffer.write(data)
            buffer.flush()
        else:  # a text-only stream (io.StringIO)
            self._stream.write(data.decode("utf-8"))
            self._stream.flush()

    def close(self) -> None:
        if self._close:
            self._stream.close()


_HashForms = tuple[dict[str, str], bytes]


def _hash_forms(digest: str | None) -> _HashForms | None:
    """process.hash for a digest: the dict events share, and the bytes an encoded exec gets
    (what NdjsonSink.encode writes for that dict as the process's last key)."""
    if digest is None:
        return None
    return {"sha256": digest}, b',"hash":{"sha256":' + orjson.dumps(digest) + b"}"


class EventPipeline:
    def __init__(
        self,
        sink: Sink,
        table: ProcessTable,
        *,
        hasher: ExecutableHasher | None = None,
        inspector: Inspector | None = None,
        maxsize: int = 65536,
        batch: int = 512,
    ) -> None:
        self._sink = sink
        self._table = table
        self._hasher = hasher or ExecutableHasher()
        self._inspector = inspector
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=maxsize)
        self._batch = batch
        self._thread = threading.Thread(target=self._run, name="edr-writer", daemon=True)
        self.by_action: Counter[str] = Counter()
        self.blocked = 0  # times a capture thread waited for room: back-pressure, not loss
        self.failed: str | None = None  # set when the sink broke; the runner stops on it

    def takes_lines(self) -> bool:
        """Whether capture may hand over process events encoded (``Encoded``) now: the sink
        writes lines and the policy acts on no process event. Asked once per capture batch;
        an encoded event the policy came to want in between is decoded for it."""
        if getattr(self._sink, "takes_lines", False) is not True:
            return False
        inspector = self._inspector
        return inspector is None or not inspector.actions & _PROCESS_ACTIONS

    def start(self) -> None:
        self._thread.start()

    def emit(self, event: Event) -> None:
        """Called by capture threads. Blocks while the queue is full."""
        try:
            self._queue.put_nowait(event)
        except queue.Full:
            self.blocked += 1
            self._queue.put(event)

    def emit_many(self, events: list[Event]) -> None:
        """A capture thread's whole batch as one queue item (one lock round, one wake-up).

        The queue bound then counts items, events or batches: back-pressure is the same, the
        caller blocks while the queue is full and nothing is dropped. The list is the
        pipeline's from here on; the caller must not reuse it.
        """
        if not events:
            return
        try:
            self._queue.put_nowait(events)
        except queue.Full:
            self.blocked += 1
            self._queue.put(events)

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

    def _count_and_enrich(self, batch: list[Item]) -> None:
        """Count the batch by action and add each exec's executable SHA-256 to its event (and
        to its process in the table).

        The digest of a path is taken once per batch: every exec of a batch happened before
        the batch is hashed, so the digest taken for the first of them is as close to each
        exec as one taken a moment later (an exec storm's batch runs the same binary hundreds
        of times, and each lookup was a stat()). The events of one path share one ``hash``
        dict; nothing downstream changes it. A path that cannot be hashed falls back to
        /proc/<pid>/exe, per process. One loop for the whole batch. Encoded events cost it
        one step per chunk and one call per exec, whose digest goes in as bytes at its cut.
        """
        by_action, exec_action = self.by_action, Action.EXEC
        sha256, table_get = self._hasher.sha256, self._table.get
        seen: dict[str, _HashForms | None] = {}  # path -> its digest's shared forms

        def forms_of(path: str, pid: int | None) -> _HashForms | None:
            forms = seen.get(path, _UNSEEN)
            if forms is _UNSEEN:
                forms = seen[path] = _hash_forms(sha256(path))
            if forms is None:  # per process: the path's file is gone or unreadable
                forms = _hash_forms(sha256(f"/proc/{pid}/exe") if pid else None)
            if forms is not None:
                info = table_get(pid)
                if info is not None and info.executable == path:
                    info.sha256 = forms[0]["sha256"]
            return forms  # type: ignore[return-value]

        for i, ev in enumerate(batch):
            if type(ev) is tuple:  # encoded events
                lines, cuts, counts = ev
                for action, n in counts.items():
                    by_action[action] += n
                if cuts:
                    view, parts, start = memoryview(lines), [], 0
                    for j in range(0, len(cuts), 3):
                        offset, path, pid = cuts[j : j + 3]
                        forms = forms_of(path, pid) if path else None
                        if forms is not None:
                            parts += (view[start:offset], forms[1])
                            start = offset
                    if parts:
                        parts.append(view[start:])
                        batch[i] = (b"".join(parts), [], counts)
                continue
            action = ev["event"]["action"]  # type: ignore[call-overload]
            by_action[action] += 1
            if action != exec_action:
                continue
            proc = ev.get("process")  # type: ignore[union-attr]
            if not proc:
                continue
            path = proc.get("executable")
            if not path or "hash" in proc:
                continue
            forms = forms_of(path, proc.get("pid"))
            if forms is not None:
                proc["hash"] = forms[0]

    def _run(self) -> None:
        get, get_nowait = self._queue.get, self._queue.get_nowait
        while True:
            batch: list[Item] = []
            stop = False
            item = get()
            while True:
                if item is _STOP:
                    stop = True
                elif type(item) is list:
                    batch.extend(item)
                else:
                    batch.append(item)
                if len(batch) >= self._batch:
                    break
                try:
                    item = get_nowait()
                except queue.Empty:
                    break
            self._count_and_enrich(batch)
            inspector = self._inspector
            if inspector is not None:
                # Only the actions the policy can act on reach it: no call per event otherwise.
                wanted = inspector.actions
                caused: list[Event] = []
                for ev in batch:
                    if type(ev) is tuple:  # encoded before the policy came to want it
                        if not wanted.isdisjoint(ev[2]):  # type: ignore[arg-type]
                            for line in ev[0].splitlines():  # type: ignore[union-attr]
                                decoded = orjson.loads(line)
                                if decoded["event"]["action"] in wanted:
                                    caused.extend(inspector.inspect(decoded))
                    elif ev["event"]["action"] in wanted:  # type: ignore[call-overload]
                        caused.extend(inspector.inspect(ev))  # type: ignore[arg-type]
                batch.extend(caused)
            if batch:
                try:
                    self._sink.write(batch)
                except (OSError, ValueError) as exc:
                    # e.g. stdout closed by `| head`: stop the sensor rather than drop quietly.
                    self.failed = f"output failed: {exc}"
                    return
            if stop:
                return


class TeeSink:
    """Every batch to several sinks (for example the controller's outbox and a local file)."""

    def __init__(self, sinks: list[Sink]) -> None:
        self._sinks = sinks

    def write(self, events: list[Event]) -> None:
        for sink in self._sinks:
            sink.write(events)

    def close(self) -> None:
        for sink in self._sinks:
            sink.close()

"""The detection worker: Sigma matching in its own process, so ingest and detection use two cores.

    python -m controller.detection.worker [--log-level INFO]

The controller starts it (``controller.detection.process``) and talks to it over its stdin and
stdout in frames: a 4-byte big-endian length, then one msgpack array whose first item says
what it is. Requests are answered one at a time, in order:

``["rules", generation, dirs, include_builtin, disabled]``
    load this rule set (``DetectionEngine.config()`` of the controller's engine); answered
    ``["rules", generation, loaded, problems]``.
``["eval", round, [[host_id, first_event_id, [doc, ...]], ...]]``
    evaluate stored events, given as the store's JSON text; answered
    ``["done", round, alerts, errors, evaluations]``, each alert
    ``[rule_id, title, level, host_id, event_id, doc, chain, pending, seen, stub]``
    (``controller.ancestry.Walk`` flattened; the controller completes ``pending`` from its
    store). ``errors`` counts documents that were not JSON objects and rule predicates that
    raised.

A request it cannot read is answered ``["error", reason]``; a frame longer than
``MAX_FRAME`` leaves the stream unreadable, so the worker exits with status 2. End of input
is the order to stop (status 0). The worker keeps the process cache for alert ancestry (it
sees every event in order) and holds no database connection: everything durable stays with
the controller.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import logging
import os
import signal
import struct
import sys
from collections.abc import Sequence
from typing import Any, BinaryIO

import msgpack
import orjson

from controller.ancestry import ProcessCache
from controller.detection.engine import DetectionEngine

log = logging.getLogger("controller.detection.worker")

MAX_FRAME = 1 << 30
HEADER = struct.Struct(">I")
_PR_SET_PDEATHSIG = 1


class ProtocolError(Exception):
    """A frame or message that does not follow the protocol above."""


# Lone surrogates (undecodable argv bytes, kept as escapes in the stored JSON) must cross the
# pipe unchanged in both directions.
def pack(msg: Sequence[Any]) -> bytes:
    """One frame holding ``msg``."""
    body = msgpack.packb(msg, unicode_errors="surrogatepass")
    return HEADER.pack(len(body)) + body


def unpack(body: bytes) -> list[Any]:
    """The message in a frame's body; ``ProtocolError`` when it is not a tagged array."""
    try:
        msg = msgpack.unpackb(body, unicode_errors="surrogatepass", strict_map_key=True)
    except Exception as e:  # msgpack raises several types on garbage
        raise ProtocolError(f"not msgpack: {e}") from None
    if not isinstance(msg, list) or not msg or not isinstance(msg[0], str):
        raise ProtocolError("not a tagged message")
    return msg


def frame_length(header: bytes) -> int:
    (n,) = HEADER.unpack(header)
    if n > MAX_FRAME:
        raise ProtocolError(f"frame of {n} bytes (limit {MAX_FRAME})")
    return n


def loads(doc: str | bytes) -> Any:
    """A stored document: orjson, or the stdlib for escaped lone surrogates it refuses."""
    try:
        return orjson.loads(doc)
    except orjson.JSONDecodeError:
        return json.loads(doc)


def dumps(value: Any) -> str:
    """JSON text for ``value`` (as the store writes it: orjson, stdlib ASCII fallback)."""
    try:
        return orjson.dumps(value).decode()
    except TypeError:
        return json.dumps(value, ensure_ascii=True, separators=(",", ":"))


class Evaluator:
    """The worker's state: the engine and the process cache. Loop-agnostic and in-process
    testable; ``serve`` drives it from a pipe."""

    def __init__(self) -> None:
        self.engine = DetectionEngine()
        self.cache = ProcessCache()
        self.generation = -1

    def handle(self, msg: list[Any]) -> list[Any]:
        kind = msg[0]
        try:
            if kind == "eval":
                _, rnd, units = msg
                return self.evaluate(rnd, units)
            if kind == "rules":
                _, generation, dirs, include_builtin, disabled = msg
                return self.rules(generation, dirs, include_builtin, disabled)
        except (ValueError, TypeError) as e:
            raise ProtocolError(f"malformed {kind!r} message: {e}") from None
        raise ProtocolError(f"unknown message {kind!r}")

    def rules(
        self, generation: int, dirs: list[str], include_builtin: bool, disabled: list[str]
    ) -> list[Any]:
        if not isinstance(dirs, list) or not all(isinstance(d, str) for d in dirs):
            raise TypeError("dirs must be a list of paths")
        engine = DetectionEngine(include_builtin=bool(include_builtin))
        report = engine.load(dirs, disabled=[d for d in disabled if isinstance(d, str)])
        self.engine = engine  # one assignment: the next round sees the whole new set
        self.generation = generation
        return ["rules", generation, len(report.loaded), len(report.problems)]

    def evaluate(self, rnd: int, units: list[Any]) -> list[Any]:
        engine = self.engine
        match = engine.match
        remember = self.cache.remember
        walk = self.cache.walk
        errors0, evaluations0 = engine.errors, engine.evaluations
        bad = 0
        alerts: list[list[Any]] = []
        for host_id, first_id, docs in units:
            if not isinstance(host_id, str) or not isinstance(first_id, int):
                raise TypeError("a unit is [host_id, first_event_id, docs]")
            for i, doc in enumerate(docs):
                try:
                    ev = loads(doc)
                except (ValueError, TypeError, RecursionError):
                    ev = None
                if ev.__class__ is not dict:
                    bad += 1
                    log.warning(
                        "event %s of host %s is not a JSON object; not evaluated",
                        first_id + i if first_id else "?",
                        host_id,
                    )
                    continue
                meta = ev.get("event")
                action = meta.get("action") if meta.__class__ is dict else None
                if action == "exec" or action == "fork":
                    remember(host_id, ev)
                for m in match(ev):
                    w = walk(host_id, m.event)
                    alerts.append(
                        [
                            m.rule_id,
                            m.title,
                            m.level,
                            host_id,
                            first_id + i if first_id else None,
                            doc,
                            dumps(w.chain),
                            w.pending,
                            list(w.seen),
                            None if w.stub is None else dumps(w.stub),
                        ]
                    )
        return [
            "done",
            rnd,
            alerts,
            bad + engine.errors - errors0,
            engine.evaluations - evaluations0,
        ]


def _read_exactly(stream: BinaryIO, n: int) -> bytes | None:
    data = stream.read(n)
    if len(data) < n:
        return None
    return data


def serve(stdin: BinaryIO, stdout: BinaryIO, evaluator: Evaluator | None = None) -> int:
    """Answer requests from ``stdin`` until it ends; returns the exit status."""
    ev = evaluator or Evaluator()
    while True:
        header = _read_exactly(stdin, HEADER.size)
        if header is None:
            return 0
        try:
            n = frame_length(header)
        except ProtocolError as e:
            log.error("detection worker: %s; stopping", e)
            stdout.write(pack(["error", str(e)]))
            stdout.flush()
            return 2
        body = _read_exactly(stdin, n)
        if body is None:
            log.error("detection worker: input ended inside a frame")
            return 2
        try:
            reply = ev.handle(unpack(body))
        except ProtocolError as e:
            log.error("detection worker: %s", e)
            reply = ["error", str(e)]
        stdout.write(pack(reply))
        stdout.flush()


def _die_with_parent(parent: int) -> None:
    """SIGKILL this process when the controller dies, even by kill -9 (Linux only)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):  # pragma: no cover - not Linux
        return
    if os.getppid() != parent:  # the parent died before prctl: nobody will read our answers
        os._exit(1)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m controller.detection.worker", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("--log-level", default="WARNING")
    p.add_argument("--parent", type=int, default=None, help="exit when this process dies")
    args = p.parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        stream=sys.stderr,
        format="detection-worker[%(process)d] %(levelname)s %(name)s: %(message)s",
    )
    if args.parent is not None:
        _die_with_parent(args.parent)
    # Ctrl-C in a terminal reaches the whole process group: the controller decides when
    # detection stops (it drains first, then closes our stdin).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # The protocol gets its own copy of stdout; fd 1 becomes stderr, so a stray print from
    # any library lands in the log instead of corrupting a frame.
    out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    with out:
        return serve(sys.stdin.buffer, out)


if __name__ == "__main__":
    sys.exit(main())

"""The backplane's ``ControllerHooks`` on the real store, with detection and live fan-out.

Ack path (``commit_batch``): the batch is committed by ``store.ingest_batch`` in a worker
thread, every event is offered to the live hub (which never blocks), and the batch is put on
a bounded detection queue. Only then does the backplane send the ACK. Detection runs in its
own task, off the ack path, so a slow rule set delays alerts, not acks; but when the queue is
full ``commit_batch`` *waits*, so a stored event is never skipped by detection: a detection
backlog slows the sensors down (they keep a small window of unacked batches) instead.

The queue is in memory, but detection progress is durable: alerts are written in one
transaction per round together with the store's detection watermark (the highest event id
evaluated). On ``start()`` the worker first replays the stored events above the watermark, so
batches committed but not evaluated before a crash are evaluated after the restart, and
their alerts are raised once (a round's alerts and its watermark commit together).

Detection and storage overlap: ``commit_batch`` stores in one worker thread while detection
of earlier batches runs in another (sqlite3 and RE2 release the GIL).

Host identity always comes from the certificate (the ``host_id`` argument), never from a
message field. All methods run on the event loop; store calls go to threads because they block.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

from backplane.messages import Command, CommandResult, Heartbeat, Hello, Policy
from certs.enrollment import Enrollment
from certs.store import PKIStore
from controller.detection import DetectionEngine, Match
from controller.live import LiveHub
from controller.metrics import Metrics
from controller.store import (
    Alert,
    AlertDraft,
    CommandStatus,
    HostHello,
    InvalidTransition,
    NotFound,
    Store,
    StoreError,
)

log = logging.getLogger(__name__)

# Commands whose success changes the host's recorded isolation state.
ISOLATION_ACTIONS = {"isolate": True, "unisolate": False}

MAX_ANCESTRY = 32
PROCESS_CACHE = 200_000  # recent processes per controller, for alert ancestry
_MERGE_BATCHES = 32  # queued batches evaluated in one worker-thread call
_REPLAY_CHUNK = 5_000  # stored events read per step when replaying after a restart
_WATERMARK_EVERY = 1.0  # seconds between watermark-only commits (rounds without alerts)

# One unit of detection work: host, the stored id of the first event (ids are consecutive
# within a batch; 0 when unknown) and the events.
_Work = tuple[str, int, list[dict[str, Any]]]


def alert_item(alert: Alert) -> dict[str, Any]:
    """An alert record as the live stream and API show it (JSON-ready)."""
    # Shallow: the nested event and ancestry are fresh objects decoded from the store, so a
    # deep copy (dataclasses.asdict) would only cost time on the detection path.
    item = {f.name: getattr(alert, f.name) for f in _ALERT_FIELDS}
    item["comments"] = [dataclasses.asdict(c) for c in alert.comments]
    item["severity"] = alert.severity.value
    item["status"] = alert.status.value
    return item


_ALERT_FIELDS = dataclasses.fields(Alert)


def command_item(cmd: Any) -> dict[str, Any]:
    item = dataclasses.asdict(cmd)
    item["status"] = cmd.status.value
    return item


def _drop_counters(bpf: Mapping[str, Any], prefix: str = "") -> dict[str, int]:
    """Every non-negative integer counter whose name says "drop" in the heartbeat's ``bpf``
    block, flattened to dotted names (its exact shape belongs to the sensor)."""
    out: dict[str, int] = {}
    for key, value in bpf.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(_drop_counters(value, f"{name}."))
        elif (isinstance(value, int) and not isinstance(value, bool) and value >= 0
              and "drop" in str(key).lower()):
            out[name] = value
    return out


class StoreHooks:
    """``backplane.server.ControllerHooks`` backed by a ``Store``.

    Call ``start()`` on the loop before the backplane starts and ``stop()`` after it stops.
    """

    def __init__(
        self,
        store: Store,
        detection: DetectionEngine,
        live: LiveHub,
        *,
        pki: PKIStore | None = None,
        metrics: Metrics | None = None,
        detection_queue: int = 256,
    ) -> None:
        self.store = store
        self.detection = detection
        self.live = live
        self.pki = pki
        self.metrics = metrics or Metrics()
        self._queue_size = detection_queue
        self._queue: asyncio.Queue[_Work] | None = None
        self._pending_watermark = 0  # evaluated but not yet recorded in the store
        self._watermark_at = 0.0
        self.replayed = 0  # events re-evaluated from the store at start (after a crash)
        self._replay_done: asyncio.Event | None = None
        self._worker: asyncio.Task[None] | None = None
        # (host, entity_id) → process node; filled from exec/fork events by the detection
        # worker (one task: no lock needed), so an alert's ancestry does not wait for the
        # store's background indexer.
        self._procs: OrderedDict[tuple[str, str], dict[str, Any]] = OrderedDict()

    # -- lifecycle ---------------------------------------------------------------------------
    async def start(self) -> None:
        if self._worker is not None:
            return
        self._queue = asyncio.Queue(self._queue_size)
        self._replay_done = asyncio.Event()
        self._worker = asyncio.create_task(self._detect_loop(), name="edr-detection")

    async def stop(self, timeout: float = 30.0) -> None:
        """Evaluate what is queued (up to ``timeout`` seconds), then stop the worker."""
        if self._worker is None or self._queue is None:
            return
        try:
            await asyncio.wait_for(self._queue.join(), timeout)
        except TimeoutError:
            log.error("detection: %d batches not evaluated at shutdown (stored; evaluated "
                      "at the next start)", self._queue.qsize())
        if self._pending_watermark:
            try:
                await asyncio.to_thread(self.store.create_alerts, [],
                                        evaluated_through=self._pending_watermark)
                self._pending_watermark = 0
            except StoreError:
                log.exception("detection: watermark not saved (those events are evaluated "
                              "again at the next start)")
        self._worker.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._worker
        self._worker = None

    @property
    def detection_backlog(self) -> int:
        return 0 if self._queue is None else self._queue.qsize()

    async def drained(self) -> None:
        """Wait until every committed batch went through detection (tests, benchmark),
        including the replay of events left unevaluated by an earlier run."""
        if self._replay_done is not None:
            await self._replay_done.wait()
        if self._queue is not None:
            await self._queue.join()

    # -- ControllerHooks ---------------------------------------------------------------------
    async def on_hello(self, host_id: str, hello: Hello, peer: str) -> None:
        info = HostHello(hello.hostname, hello.os, hello.kernel, hello.sensor_version,
                         dict(hello.tiers))
        host = await asyncio.to_thread(self.store.upsert_host, host_id, info)
        self.metrics.hellos += 1
        log.info("host %s (%s) connected from %s, sensor %s", host_id, hello.hostname, peer,
                 hello.sensor_version)
        self.live.publish("host", {**dataclasses.asdict(host), "peer": peer})

    async def commit_batch(
        self, host_id: str, seq: int, events: list[dict[str, Any]], dropped: int
    ) -> bool:
        stored = await asyncio.to_thread(self.store.store_batch, host_id, seq, events, dropped)
        m = self.metrics
        m.batches += 1
        if stored is None:
            m.duplicates += 1
            return False
        m.events += len(events)
        if dropped:
            m.outbox_dropped[host_id] = m.outbox_dropped.get(host_id, 0) + dropped
        if self.live.subscribers:
            self.live.publish_many("event", [{**ev, "host_id": host_id} for ev in events])
        else:
            self.live.published["event"] += len(events)
        if self._queue is None:
            raise RuntimeError("StoreHooks.start() was not called")
        # Waits when detection is behind: the ack (and so the sensor) waits with it.
        await self._queue.put((host_id, stored.first_event_id, events))
        return True

    async def on_heartbeat(self, host_id: str, heartbeat: Heartbeat) -> None:
        drops = _drop_counters(heartbeat.bpf)
        await asyncio.to_thread(self.store.record_heartbeat, host_id, heartbeat.metrics, drops,
                                heartbeat.outbox_depth)
        self.metrics.capture_dropped[host_id] = drops

    async def pending_commands(self, host_id: str) -> list[Command]:
        """Queued commands, marked sent: the backplane sends what this returns at once, and a
        command whose connection drops before its result is re-queued by ``on_disconnect``."""
        return await asyncio.to_thread(self._take_pending, host_id)

    def _take_pending(self, host_id: str) -> list[Command]:
        out: list[Command] = []
        for cmd in self.store.pending_commands(host_id):
            try:
                self.store.mark_sent(cmd.id)
            except (InvalidTransition, NotFound):
                continue  # expired or answered in between
            out.append(Command(str(cmd.id), cmd.action, dict(cmd.args)))
        self.metrics.commands_sent += len(out)
        return out

    async def command_result(self, host_id: str, result: CommandResult) -> None:
        try:
            cmd = await asyncio.to_thread(self._record_result, host_id, result)
        except (StoreError, ValueError) as exc:
            # A result we cannot place is logged, not fatal: dropping the session would only
            # make the sensor resend it.
            log.warning("host %s: command result %r not recorded: %s", host_id,
                        result.id[:64], exc)
            return
        if cmd is not None:
            self.metrics.command_results += 1
            self.live.publish("command", command_item(cmd))
            if result.status == "ok" and cmd.action in ISOLATION_ACTIONS:
                host = await asyncio.to_thread(self.store.get_host, host_id)
                self.live.publish("host", dataclasses.asdict(host))

    def _record_result(self, host_id: str, result: CommandResult) -> Any:
        if not result.id.isdigit() or len(result.id) > 18:
            raise ValueError("not a command id of this controller")
        cmd = self.store.get_command(int(result.id))
        if cmd.host_id != host_id:
            # Never let one host answer for another's command.
            raise ValueError(f"command belongs to host {cmd.host_id}")
        if cmd.status in (CommandStatus.SUCCEEDED, CommandStatus.FAILED):
            log.debug("host %s: duplicate result for command %s", host_id, cmd.id)
            return None
        if cmd.status == CommandStatus.QUEUED:  # re-queued by a disconnect, then answered
            self.store.mark_sent(cmd.id)
        output = {**result.output, "status": result.status}
        recorded = self.store.record_result(cmd.id, result.status == "ok", output)
        if result.status == "ok" and cmd.action in ISOLATION_ACTIONS:
            # The host's isolation state is what the sensor confirmed, not what was asked.
            self.store.set_isolation(host_id, ISOLATION_ACTIONS[cmd.action])
        return recorded

    async def current_policy(self, host_id: str) -> Policy | None:
        pv = await asyncio.to_thread(self.store.current_policy)
        return None if pv is None else Policy(pv.version, dict(pv.document))

    async def policy_applied(self, host_id: str, version: int) -> None:
        try:
            await asyncio.to_thread(self.store.policy_applied, host_id, version)
        except StoreError as exc:
            log.warning("host %s reported policy version %d: %s", host_id, version, exc)
            return
        host = await asyncio.to_thread(self.store.get_host, host_id)
        self.live.publish("host", dataclasses.asdict(host))

    async def renew(self, host_id: str, csr_pem: bytes) -> bytes:
        if self.pki is None:
            raise ValueError("this controller has no CA to sign renewals")
        # EnrollmentError is a ValueError: the backplane turns it into a refusal.
        return await asyncio.to_thread(Enrollment(self.pki).renew, host_id, csr_pem)

    async def on_disconnect(self, host_id: str, reason: str) -> None:
        self.metrics.disconnects += 1
        n = await asyncio.to_thread(self.store.requeue_unacknowledged, host_id)
        if n:
            log.info("host %s: %d unacknowledged commands queued again", host_id, n)
        self.live.publish("host", {"host_id": host_id, "online": False, "reason": reason})

    # -- detection ---------------------------------------------------------------------------
    async def _detect_loop(self) -> None:
        assert self._queue is not None
        queue = self._queue
        await self._replay()
        while True:
            work = [await queue.get()]
            while len(work) < _MERGE_BATCHES:
                try:
                    work.append(queue.get_nowait())
                except asyncio.QueueEmpty:
                    break
            try:
                await self._run(work)
            finally:
                for _ in work:
                    queue.task_done()

    async def _run(self, work: list[_Work]) -> None:
        try:
            alerts = await asyncio.to_thread(self._evaluate, work)
        except Exception:  # a store hiccup must not stop detection for later batches
            self.metrics.detection_errors += 1
            log.exception("detection: failed on %d batches", len(work))
            return
        for alert in alerts:
            self.metrics.alerts += 1
            self.metrics.rule_hit(alert.rule_id, alert.rule_name)
            self.live.publish("alert", alert_item(alert))

    async def _replay(self) -> None:
        """Evaluate stored events above the detection watermark (committed, then a crash)."""
        try:
            mark = await asyncio.to_thread(self.store.detection_watermark)
            while True:
                rows = await asyncio.to_thread(self.store.events_after, mark, _REPLAY_CHUNK)
                if not rows:
                    break
                work: list[_Work] = []
                for event_id, host_id, doc in rows:
                    # Consecutive ids of one host form one unit, like a live batch.
                    last = work[-1] if work else None
                    if last is not None and last[0] == host_id and \
                            last[1] + len(last[2]) == event_id:
                        last[2].append(doc)
                    else:
                        work.append((host_id, event_id, [doc]))
                await self._run(work)
                self.replayed += len(rows)
                mark = rows[-1][0]
        except Exception:
            self.metrics.detection_errors += 1
            log.exception("detection: replay of unevaluated events failed")
        if self._replay_done is not None:
            self._replay_done.set()
        if self.replayed:
            log.warning("detection: re-evaluated %d stored events that were committed but not "
                        "evaluated before the last stop", self.replayed)

    def _evaluate(self, work: list[_Work]) -> list[Alert]:
        """Match every event, remember processes, store the round's alerts and the detection
        watermark in one transaction (worker thread)."""
        match = self.detection.match
        procs = self._procs
        drafts: list[AlertDraft] = []
        through = 0
        for host_id, first_id, events in work:
            for i, ev in enumerate(events):
                meta = ev.get("event")
                action = meta.get("action") if isinstance(meta, dict) else None
                if action == "exec" or action == "fork":
                    self._remember(procs, host_id, ev)
                for m in match(ev):
                    drafts.append(self._draft(host_id, m, first_id + i if first_id else None))
            if first_id and events:
                through = max(through, first_id + len(events) - 1)
        through = max(through, self._pending_watermark)
        now = time.monotonic()
        if not drafts and now - self._watermark_at < _WATERMARK_EVERY:
            # Rounds without alerts only need the watermark eventually: re-evaluating them
            # after a crash raises nothing, so it is written at most once a second.
            self._pending_watermark = through
            return []
        try:
            alerts = self.store.create_alerts(drafts, evaluated_through=through or None)
        except StoreError:
            if len(drafts) <= 1:
                raise
            # One bad alert (an event JSON cannot hold) must not take the others with it.
            alerts = []
            for d in drafts:
                try:
                    alerts += self.store.create_alerts([d])
                except StoreError:
                    self.metrics.detection_errors += 1
                    log.exception("detection: alert for rule %s on host %s not stored",
                                  d.rule_id, d.host_id)
            self.store.create_alerts([], evaluated_through=through or None)
        self._pending_watermark = 0
        self._watermark_at = now
        return alerts

    @staticmethod
    def _remember(procs: OrderedDict[tuple[str, str], dict[str, Any]], host_id: str,
                  ev: Mapping[str, Any]) -> None:
        # Runs for every exec and fork: plain dicts (as decoded from the wire) skip the
        # Mapping ABC checks, which cost more than the rest of this method.
        proc = ev.get("process")
        if proc.__class__ is not dict and not isinstance(proc, Mapping):
            return
        eid = proc.get("entity_id")
        if eid.__class__ is not str and not isinstance(eid, str):
            return
        parent = proc.get("parent")
        user = ev.get("user")
        key = (host_id, eid)
        procs[key] = {
            "entity_id": eid,
            "pid": proc.get("pid"),
            "executable": proc.get("executable"),
            "command_line": proc.get("command_line"),
            "user": (user.get("name") if user.__class__ is dict or isinstance(user, Mapping)
                     else None),
            "parent_entity_id": (parent.get("entity_id") if parent.__class__ is dict
                                 or isinstance(parent, Mapping) else None),
        }
        procs.move_to_end(key)
        if len(procs) > PROCESS_CACHE:
            procs.popitem(last=False)

    def _draft(self, host_id: str, m: Match, event_id: int | None) -> AlertDraft:
        return AlertDraft(
            rule_id=m.rule_id,
            rule_name=m.title,
            severity=m.level,
            host_id=host_id,
            event=m.event,
            event_id=event_id,
            ancestry=self.ancestry(host_id, m.event),
        )

    def ancestry(self, host_id: str, ev: Mapping[str, Any]) -> list[dict[str, Any]]:
        """The event's process ancestors, nearest first: recent processes seen by this
        controller, then the store's process table, then the parent the event names."""
        proc = ev.get("process")
        if not isinstance(proc, Mapping):
            return []
        parent = proc.get("parent")
        parent = parent if isinstance(parent, Mapping) else {}
        chain: list[dict[str, Any]] = []
        seen: set[str] = set()
        if isinstance(proc.get("entity_id"), str):
            seen.add(proc["entity_id"])
        eid = parent.get("entity_id")
        while isinstance(eid, str) and eid not in seen and len(chain) < MAX_ANCESTRY:
            seen.add(eid)
            node = self._procs.get((host_id, eid))
            if node is None:
                chain += self._stored_ancestry(host_id, eid, seen, MAX_ANCESTRY - len(chain))
                break
            chain.append({k: v for k, v in node.items() if k != "parent_entity_id"})
            eid = node["parent_entity_id"]
        if not chain and parent:
            chain.append({k: parent.get(k) for k in ("entity_id", "pid", "executable",
                                                     "command_line")})
        return chain

    def _stored_ancestry(self, host_id: str, eid: str, seen: set[str], room: int
                         ) -> list[dict[str, Any]]:
        try:
            tree = self.store.process_tree(host_id, eid)
        except StoreError:
            return []
        out = []
        for node in [tree.process, *tree.ancestors][:room]:
            if node.entity_id in seen and node is not tree.process:
                break
            seen.add(node.entity_id)
            out.append({"entity_id": node.entity_id, "pid": node.pid,
                        "executable": node.executable, "command_line": node.command_line,
                        "user": node.user})
        return out

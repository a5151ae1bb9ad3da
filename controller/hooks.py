"""The backplane's ``ControllerHooks`` on the real store, with detection and live fan-out.

Ack path (``commit_batch``): the batch is committed by ``store.ingest_batch`` in a worker
thread, every event is offered to the live hub (which never blocks), and the batch is put on
a bounded detection queue. Only then does the backplane send the ACK. Detection runs in its
own task, off the ack path, so a slow rule set delays alerts, not acks; but when the queue is
full ``commit_batch`` *waits*, so a stored event is never skipped by detection: a detection
backlog slows the sensors down (they keep a small window of unacked batches) instead.

Limitation: the detection queue is in memory. Batches committed but not yet evaluated when
the process dies are stored but never evaluated; ``stop()`` drains the queue on a clean
shutdown.

Host identity always comes from the certificate (the ``host_id`` argument), never from a
message field. All methods run on the event loop; store calls go to threads because they block.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from collections import OrderedDict
from collections.abc import Mapping
from datetime import datetime
from typing import Any

from backplane.messages import Command, CommandResult, Heartbeat, Hello, Policy
from certs.enrollment import Enrollment
from certs.store import PKIStore
from controller.detection import DetectionEngine, Match
from controller.live import LiveHub
from controller.metrics import Metrics
from controller.store import (
    Alert,
    CommandStatus,
    HostHello,
    InvalidTransition,
    NotFound,
    Store,
    StoreError,
)

log = logging.getLogger(__name__)

MAX_ANCESTRY = 32
PROCESS_CACHE = 200_000  # recent processes per controller, for alert ancestry
_MERGE_BATCHES = 32  # queued batches evaluated in one worker-thread call


def alert_item(alert: Alert) -> dict[str, Any]:
    """An alert record as the live stream and API show it (JSON-ready)."""
    item = dataclasses.asdict(alert)
    item["severity"] = alert.severity.value
    item["status"] = alert.status.value
    return item


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


def _ts(event: Mapping[str, Any]) -> float | None:
    raw = event.get("@timestamp")
    if not isinstance(raw, str):
        return None
    try:
        return datetime.fromisoformat(raw).timestamp()
    except ValueError:
        return None


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
        self._queue: asyncio.Queue[tuple[str, list[dict[str, Any]]]] | None = None
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
        self._worker = asyncio.create_task(self._detect_loop(), name="edr-detection")

    async def stop(self, timeout: float = 30.0) -> None:
        """Evaluate what is queued (up to ``timeout`` seconds), then stop the worker."""
        if self._worker is None or self._queue is None:
            return
        try:
            await asyncio.wait_for(self._queue.join(), timeout)
        except TimeoutError:
            log.error("detection: %d batches not evaluated at shutdown (stored, no alerts)",
                      self._queue.qsize())
        self._worker.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._worker
        self._worker = None

    @property
    def detection_backlog(self) -> int:
        return 0 if self._queue is None else self._queue.qsize()

    async def drained(self) -> None:
        """Wait until every committed batch went through detection (tests, benchmark)."""
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
        fresh = await asyncio.to_thread(self.store.ingest_batch, host_id, seq, events, dropped)
        m = self.metrics
        m.batches += 1
        if not fresh:
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
        await self._queue.put((host_id, events))
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
        return self.store.record_result(cmd.id, result.status == "ok", output)

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
        while True:
            work = [await queue.get()]
            while len(work) < _MERGE_BATCHES:
                try:
                    work.append(queue.get_nowait())
                except asyncio.QueueEmpty:
                    break
            try:
                alerts = await asyncio.to_thread(self._evaluate, work)
                for alert in alerts:
                    self.metrics.alerts += 1
                    self.metrics.rule_hit(alert.rule_id, alert.rule_name)
                    self.live.publish("alert", alert_item(alert))
            except Exception:  # a store hiccup must not stop detection for later batches
                self.metrics.detection_errors += 1
                log.exception("detection: failed on %d batches", len(work))
            finally:
                for _ in work:
                    queue.task_done()

    def _evaluate(self, work: list[tuple[str, list[dict[str, Any]]]]) -> list[Alert]:
        """Match every event, remember processes, store an alert per match (worker thread)."""
        match = self.detection.match
        procs = self._procs
        hits: list[tuple[str, Match]] = []
        for host_id, events in work:
            for ev in events:
                meta = ev.get("event")
                action = meta.get("action") if isinstance(meta, dict) else None
                if action == "exec" or action == "fork":
                    self._remember(procs, host_id, ev)
                for m in match(ev):
                    hits.append((host_id, m))
        alerts: list[Alert] = []
        for host_id, m in hits:
            try:
                alerts.append(self._store_alert(host_id, m))
            except StoreError:
                self.metrics.detection_errors += 1
                log.exception("detection: alert for rule %s on host %s not stored",
                              m.rule_id, host_id)
        return alerts

    @staticmethod
    def _remember(procs: OrderedDict[tuple[str, str], dict[str, Any]], host_id: str,
                  ev: Mapping[str, Any]) -> None:
        proc = ev.get("process")
        if not isinstance(proc, Mapping):
            return
        eid = proc.get("entity_id")
        if not isinstance(eid, str):
            return
        parent = proc.get("parent")
        user = ev.get("user")
        procs[(host_id, eid)] = {
            "entity_id": eid,
            "pid": proc.get("pid"),
            "executable": proc.get("executable"),
            "command_line": proc.get("command_line"),
            "user": user.get("name") if isinstance(user, Mapping) else None,
            "parent_entity_id": parent.get("entity_id") if isinstance(parent, Mapping) else None,
        }
        procs.move_to_end((host_id, eid))
        if len(procs) > PROCESS_CACHE:
            procs.popitem(last=False)

    def _store_alert(self, host_id: str, m: Match) -> Alert:
        ev = m.event
        return self.store.create_alert(
            rule_id=m.rule_id,
            rule_name=m.title,
            severity=m.level,
            host_id=host_id,
            event=ev,
            event_id=self._event_id(host_id, ev),
            ancestry=self.ancestry(host_id, ev),
        )

    def _event_id(self, host_id: str, ev: Mapping[str, Any]) -> int | None:
        """The stored id of a just-committed event (alerts are rare, so a lookup is fine)."""
        ts = _ts(ev)
        if ts is None:
            return None
        meta = ev.get("event")
        action = meta.get("action") if isinstance(meta, Mapping) else None
        try:
            page = self.store.search_events(
                host_id=host_id, since=ts - 0.001, until=ts + 0.001,
                action=action if isinstance(action, str) and action else None, limit=50,
            )
        except StoreError:
            return None
        for stored in page.events:
            if stored.event == ev:
                return stored.id
        return None

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

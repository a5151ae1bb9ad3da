"""The backplane's ``ControllerHooks`` on the real store, with detection and live fan-out.

Ack path (``commit_batch``): the batch is committed by ``store.store_batch`` in a worker
thread, every event is offered to the live hub (which never blocks), and the batch (as the
JSON text the store wrote) is put on a bounded detection queue. Only then does the backplane
send the ACK. Detection runs off the ack path, so a slow rule set delays alerts, not acks; but
when the queue is full ``commit_batch`` *waits*, so a stored event is never skipped by
detection: a detection backlog slows the sensors down (they keep a small window of unacked
batches) instead.

Sigma matching runs in a separate process (``controller.detection.worker``), so storing and
matching use two cores instead of taking turns on one GIL. The detection task here takes rounds
of queued batches, hands the worker their stored JSON text (no second serialisation), and
commits the alerts it answers together with the store's detection watermark (the highest
event id evaluated) in one transaction, then publishes them. The worker sees every event in
order and keeps the process cache for alert ancestry; where that cache ends, the store's
process table completes the chain here. Rule changes (``DetectionEngine.generation``) reach
the worker before the next round.

Exactly once: on ``start()`` the stored events above the watermark (committed but not
evaluated before a crash) are evaluated first, and a round's alerts commit with its
watermark. A worker that dies or answers garbage is logged, counted and replaced, and the
round it had not answered (everything before it is committed: exactly the events above the
watermark) goes to the new worker. A round that fails two workers in a row is split until
the one event that does it is found; that event is logged and left unevaluated, so one
poisonous event cannot stop detection (and through backpressure, ingest).

Host identity always comes from the certificate (the ``host_id`` argument), never from a
message field. All methods run on the event loop; store calls go to threads because they block.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import json
import logging
import time
from collections.abc import Mapping, Sequence
from typing import Any

from backplane.messages import Command, CommandResult, Heartbeat, Hello, Policy
from certs.enrollment import Enrollment
from certs.store import PKIStore
from controller import ancestry
from controller.detection import DetectionEngine
from controller.detection.process import (
    AlertHit,
    DetectionProcess,
    WorkerFailed,
    describe_exit,
)
from controller.detection.worker import dumps
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

_MERGE_BATCHES = 32  # queued batches evaluated in one round
_MERGE_EVENTS = 50_000  # ... unless they hold more events than this
_REPLAY_CHUNK = 5_000  # stored events read per step when replaying after a restart
_WATERMARK_EVERY = 1.0  # seconds between watermark-only commits (rounds without alerts)
_RESTART_DELAY = (0.1, 5.0)  # back-off while a new worker cannot even load its rules

# One unit of detection work: host, the stored id of the first event (ids are consecutive
# within a batch; 0 when unknown) and the events as stored (JSON text).
_Work = tuple[str, int, Sequence[str]]


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
        elif (
            isinstance(value, int)
            and not isinstance(value, bool)
            and value >= 0
            and "drop" in str(key).lower()
        ):
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
        worker_argv: Sequence[str] | None = None,
    ) -> None:
        """``detection`` is the engine the API manages (rules, enable, disable, reload); the
        worker process loads the same rule set from its ``config()``. ``worker_argv``
        replaces the worker command (tests)."""
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
        self._replay_through = 0
        self._task: asyncio.Task[None] | None = None
        self._worker_argv = worker_argv
        self._worker: DetectionProcess | None = None
        self._worker_lock = asyncio.Lock()
        # commit + enqueue as one step, so the queue holds batches in event-id order (below)
        self._commit_lock = asyncio.Lock()
        self._watchers: set[asyncio.Task[None]] = set()
        self._rounds = itertools.count(1)
        self._stopping = False

    # -- lifecycle ---------------------------------------------------------------------------
    async def start(self) -> None:
        """Start the detection worker (raises if it cannot load the rules) and the task that
        feeds it, which first evaluates what an earlier run left unevaluated."""
        if self._task is not None:
            return
        self._stopping = False
        self._queue = asyncio.Queue(self._queue_size)
        self._replay_done = asyncio.Event()
        # Replay covers what is stored now; batches committed from here on are queued.
        self._replay_through = await asyncio.to_thread(self.store.last_event_id)
        try:
            await self._ensure_worker(retry=False)
        except BaseException:
            self._stopping = True  # its watcher must not start another one
            if self._worker is not None:
                await self._worker.close(timeout=1.0)
                self._worker = None
            raise
        self._task = asyncio.create_task(self._detect_loop(), name="edr-detection")

    async def stop(self, timeout: float = 30.0) -> None:
        """Evaluate what is queued (up to ``timeout`` seconds), then stop the task and the
        worker process."""
        if self._task is None or self._queue is None:
            return
        try:
            await asyncio.wait_for(self._queue.join(), timeout)
        except TimeoutError:
            log.error(
                "detection: %d batches not evaluated at shutdown (stored; evaluated "
                "at the next start)",
                self._queue.qsize(),
            )
        if self._pending_watermark:
            try:
                await asyncio.to_thread(
                    self.store.create_alerts, [], evaluated_through=self._pending_watermark
                )
                self._pending_watermark = 0
            except StoreError:
                log.exception(
                    "detection: watermark not saved (those events are evaluated "
                    "again at the next start)"
                )
        self._stopping = True
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        self._task = None
        async with self._worker_lock:
            worker, self._worker = self._worker, None
        if worker is not None:
            code = await worker.close()
            log.info("detection worker %d stopped (%s)", worker.pid, describe_exit(code))
        for task in list(self._watchers):
            task.cancel()
        await asyncio.gather(*self._watchers, return_exceptions=True)

    @property
    def detection_backlog(self) -> int:
        return 0 if self._queue is None else self._queue.qsize()

    @property
    def worker_pid(self) -> int | None:
        """The detection worker's process id (``None`` when none is running)."""
        w = self._worker
        return w.pid if w is not None and w.alive else None

    async def drained(self) -> None:
        """Wait until every committed batch went through detection (tests, benchmark),
        including the replay of events left unevaluated by an earlier run."""
        if self._replay_done is not None:
            await self._replay_done.wait()
        if self._queue is not None:
            await self._queue.join()

    # -- ControllerHooks ---------------------------------------------------------------------
    async def on_hello(self, host_id: str, hello: Hello, peer: str) -> None:
        info = HostHello(
            hello.hostname, hello.os, hello.kernel, hello.sensor_version, dict(hello.tiers)
        )
        host = await asyncio.to_thread(self.store.upsert_host, host_id, info)
        self.metrics.hellos += 1
        log.info(
            "host %s (%s) connected from %s, sensor %s",
            host_id,
            hello.hostname,
            peer,
            hello.sensor_version,
        )
        self.live.publish("host", {**dataclasses.asdict(host), "peer": peer})

    async def commit_batch(
        self, host_id: str, seq: int, events: list[dict[str, Any]], dropped: int
    ) -> bool:
        # Serialised from commit to enqueue: the detection watermark says "every event up to
        # here was evaluated", which holds only if batches reach detection in the order the
        # store gave them ids. Two sessions committing at once could otherwise enqueue the
        # later ids first, a round could set the watermark past the earlier batch, and a
        # crash before that batch's round would leave it below the watermark, never evaluated.
        # (SQLite takes one writer at a time anyway; the wait for a full queue is shared too.)
        async with self._commit_lock:
            return await self._commit_in_order(host_id, seq, events, dropped)

    async def _commit_in_order(
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
        docs = stored.docs
        if len(docs) != len(events):  # a store that does not hand its documents back
            docs = [dumps(ev) for ev in events]
        # Waits when detection is behind: the ack (and so the sensor) waits with it.
        await self._queue.put((host_id, stored.first_event_id, docs))
        return True

    async def on_heartbeat(self, host_id: str, heartbeat: Heartbeat) -> None:
        drops = _drop_counters(heartbeat.bpf)
        await asyncio.to_thread(
            self.store.record_heartbeat, host_id, heartbeat.metrics, drops, heartbeat.outbox_depth
        )
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
            log.warning("host %s: command result %r not recorded: %s", host_id, result.id[:64], exc)
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
    async def _ensure_worker(self, *, retry: bool = True) -> DetectionProcess:
        """A running worker with the engine's current rule set: the one there is, or a new
        one. While new ones fail before answering (they cannot load the rules, cannot start)
        this keeps trying with a growing delay, unless ``retry`` is false (start-up)."""
        async with self._worker_lock:
            delay = 0.0
            while True:
                if self._stopping:
                    raise WorkerFailed("detection is stopping")
                w = self._worker
                try:
                    if w is None or not w.alive:
                        if w is not None:
                            w.kill()  # broken but maybe running; its watcher reaps it
                            self.metrics.detection_worker_restarts += 1
                        self._worker = None
                        w = await DetectionProcess.start(self._worker_argv)
                        self._worker = w
                        watcher = asyncio.create_task(self._watch(w), name="edr-detection-watch")
                        self._watchers.add(watcher)
                        watcher.add_done_callback(self._watchers.discard)
                    config = self.detection.config()
                    if w.generation != config.generation:
                        await w.configure(config)
                        loaded = len(self.detection.rules)
                        if w.rules_loaded != loaded:
                            log.warning(
                                "detection worker %d loaded %d rules, the controller "
                                "%d (rule files changed in between?)",
                                w.pid,
                                w.rules_loaded,
                                loaded,
                            )
                    return w
                except (WorkerFailed, OSError) as e:
                    if not retry:
                        raise RuntimeError(f"detection worker did not start: {e}") from e
                    delay = min(_RESTART_DELAY[1], max(_RESTART_DELAY[0], delay * 2))
                    log.error(
                        "detection worker did not start: %s; trying again in %.1f s", e, delay
                    )
                    await asyncio.sleep(delay)

    async def _watch(self, worker: DetectionProcess) -> None:
        """Log a worker's death and start the next one (without waiting for work)."""
        code = await worker.wait()
        if self._stopping or worker.broken == "closed":
            return
        log.error(
            "detection worker %d %s; starting another one (what it had not answered "
            "is evaluated again)",
            worker.pid,
            worker.broken or describe_exit(code),
        )
        if worker is self._worker:
            try:
                await self._ensure_worker()
            except Exception:
                if not self._stopping:
                    log.exception(
                        "detection worker: restart failed (tried again with the next round)"
                    )

    async def _detect_loop(self) -> None:
        assert self._queue is not None
        queue = self._queue
        await self._replay()
        while True:
            work = [await queue.get()]
            events = len(work[0][2])
            while len(work) < _MERGE_BATCHES and events < _MERGE_EVENTS:
                try:
                    item = queue.get_nowait()
                except asyncio.QueueEmpty:
                    break
                work.append(item)
                events += len(item[2])
            try:
                await self._run(work)
            finally:
                for _ in work:
                    queue.task_done()

    async def _run(self, work: list[_Work]) -> None:
        try:
            hits, errors = await self._evaluate(work)
            alerts = await asyncio.to_thread(self._commit, work, hits)
        except Exception:  # a store hiccup must not stop detection for later batches
            self.metrics.detection_errors += 1
            log.exception("detection: failed on %d batches", len(work))
            return
        self.metrics.detection_errors += errors
        for alert in alerts:
            self.metrics.alerts += 1
            self.metrics.rule_hit(alert.rule_id, alert.rule_name)
            self.live.publish("alert", alert_item(alert))

    async def _evaluate(self, work: list[_Work]) -> tuple[list[AlertHit], int]:
        """The worker's matches for ``work`` and its error count. A failed worker is
        replaced and the round sent again; a round that fails two workers is split."""
        for attempt in (1, 2):
            worker = await self._ensure_worker()
            try:
                result = await worker.evaluate(next(self._rounds), work)
            except WorkerFailed as e:
                log.error(
                    "detection: %s; %s",
                    e,
                    "evaluating its round again"
                    if attempt == 1
                    else "splitting its round to find the event that does it",
                )
                continue
            self.detection.evaluations += result.evaluations
            return result.alerts, result.errors
        events = sum(len(docs) for _, _, docs in work)
        if events <= 1:
            host_id, first_id, _ = work[0]
            log.error(
                "detection: event %s of host %s failed two detection workers; it stays "
                "stored but is not evaluated",
                first_id or "(unknown id)",
                host_id,
            )
            return [], 1
        hits: list[AlertHit] = []
        errors = 0
        for half in _halves(work):
            h, e = await self._evaluate(half)
            hits += h
            errors += e
        return hits, errors

    async def _replay(self) -> None:
        """Evaluate stored events above the detection watermark (committed, then a crash)."""
        try:
            mark = await asyncio.to_thread(self.store.detection_watermark)
            while mark < self._replay_through:
                rows = await asyncio.to_thread(
                    self.store.event_docs_after,
                    mark,
                    min(_REPLAY_CHUNK, self._replay_through - mark),
                )
                rows = [r for r in rows if r[0] <= self._replay_through]
                if not rows:
                    break
                work: list[tuple[str, int, list[str]]] = []
                for event_id, host_id, doc in rows:
                    # Consecutive ids of one host form one unit, like a live batch.
                    last = work[-1] if work else None
                    if (
                        last is not None
                        and last[0] == host_id
                        and last[1] + len(last[2]) == event_id
                    ):
                        last[2].append(doc)
                    else:
                        work.append((host_id, event_id, [doc]))
                await self._run(list(work))
                self.replayed += len(rows)
                mark = rows[-1][0]
        except Exception:
            self.metrics.detection_errors += 1
            log.exception("detection: replay of unevaluated events failed")
        if self._replay_done is not None:
            self._replay_done.set()
        if self.replayed:
            log.warning(
                "detection: re-evaluated %d stored events that were committed but not "
                "evaluated before the last stop",
                self.replayed,
            )

    def _commit(self, work: list[_Work], hits: list[AlertHit]) -> list[Alert]:
        """Store a round's alerts and the detection watermark in one transaction (worker
        thread)."""
        through = self._pending_watermark
        for _, first_id, docs in work:
            if first_id and docs:
                through = max(through, first_id + len(docs) - 1)
        drafts = [self._draft(h) for h in hits]
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
                    log.exception(
                        "detection: alert for rule %s on host %s not stored", d.rule_id, d.host_id
                    )
            self.store.create_alerts([], evaluated_through=through or None)
        self._pending_watermark = 0
        self._watermark_at = now
        return alerts

    def _draft(self, hit: AlertHit) -> AlertDraft:
        # The stdlib decoder: exact for what orjson rounds or refuses (alerts are rare).
        walk = ancestry.Walk(
            json.loads(hit.chain),
            hit.pending,
            hit.seen,
            None if hit.stub is None else json.loads(hit.stub),
        )
        return AlertDraft(
            rule_id=hit.rule_id,
            rule_name=hit.title,
            severity=hit.level,
            host_id=hit.host_id,
            event=json.loads(hit.doc),
            event_id=hit.event_id,
            ancestry=ancestry.finish(walk, hit.host_id, self.store),
        )


def _halves(work: list[_Work]) -> tuple[list[_Work], list[_Work]]:
    if len(work) > 1:
        k = len(work) // 2
        return work[:k], work[k:]
    host_id, first_id, docs = work[0]
    k = len(docs) // 2
    return [(host_id, first_id, docs[:k])], [(host_id, first_id + k if first_id else 0, docs[k:])]

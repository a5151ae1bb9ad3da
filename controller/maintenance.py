"""The controller's background jobs, as asyncio tasks whose work runs in threads.

* indexer: ``store.index_pending()`` for full text until it returns 0, then a short sleep;
  the process table catches up in larger batches (``fold_processes``), both off the ingest
  path;
* checkpoint: copy the WAL into the database file (so ingest never pays for it);
* commands: expire queued commands past their TTL (published on the live stream);
* retention: delete events beyond the configured age and size;
* CRL: rewrite the CRL when half its validity has passed and tell the backplane.

A job that fails is logged and retried on its next turn; it never stops the others.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from certs.store import PKIStore
from controller.hooks import command_item
from controller.live import LiveHub

log = logging.getLogger(__name__)
# Events indexed per transaction. The indexer shares the store's single writer with ingest:
# a 20,000-row FTS transaction held it for long enough to show in the exec-to-alert p99, while
# 5,000 rows still keep up with ingest several times over.
INDEX_CHUNK = 5_000
# The process table is keyed by entity id (random), so each commit rewrites most of the pages
# its upserts touch however few rows it holds: folding 5,000 events per commit wrote ~8 MiB of
# WAL per commit in bench/controller_ingest.py, 50,000 per commit a tenth of that per event.
# So it folds when this many events wait, when full text has found nothing new on two turns
# in a row (quiet times: one idle interval later), or at the latest PROCESS_EVERY seconds after
# the previous fold. One empty turn is not quiet: full text catches up between the batches of
# a steady stream, and folding each time it did made folds of a few thousand events (35 folds
# for 200,000 events in bench/controller_ingest.py with sensor-like process lineage).
PROCESS_CHUNK = 50_000
PROCESS_EVERY = 1.0


@dataclass(frozen=True)
class Intervals:
    """Seconds between runs of each job (tests shorten them)."""

    index_idle: float = 1.0
    checkpoint: float = 10.0
    commands: float = 5.0
    retention: float = 300.0
    crl: float = 3600.0


class Maintenance:
    """Owns the background tasks; ``start()`` on the loop, ``await stop()`` at shutdown."""

    def __init__(
        self,
        store: Any,
        *,
        live: LiveHub | None = None,
        pki: PKIStore | None = None,
        backplane: Any = None,
        retention_max_age: float | None = None,
        retention_max_bytes: int | None = None,
        intervals: Intervals | None = None,
    ) -> None:
        self.store = store
        self.live = live
        self.pki = pki
        self.backplane = backplane
        self.max_age = retention_max_age
        self.max_bytes = retention_max_bytes
        self.intervals = intervals or Intervals()
        self._tasks: list[asyncio.Task[None]] = []
        self.runs: dict[str, int] = {}
        self.failures: dict[str, int] = {}
        self.indexed = 0
        self.folds = 0
        self._unfolded = 0  # events full-text indexed since the last process fold
        self._folded_at = 0.0
        self._idle_turns = 0  # full-text turns in a row that found nothing new
        self.expired = 0
        self.retention_deleted = 0

    def start(self) -> None:
        iv = self.intervals
        jobs: list[tuple[str, Callable[[], Awaitable[float]], float]] = [
            ("index", self._index, iv.index_idle),
            ("checkpoint", self._checkpoint, iv.checkpoint),
            ("commands", self._expire, iv.commands),
        ]
        if self.max_age is not None or self.max_bytes is not None:
            jobs.append(("retention", self._retention, iv.retention))
        if self.pki is not None:
            jobs.append(("crl", self._crl, iv.crl))
        self._tasks = [
            asyncio.create_task(self._loop(name, job, wait), name=f"edr-{name}")
            for name, job, wait in jobs
        ]

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        self._tasks = []

    async def _loop(self, name: str, job: Callable[[], Awaitable[float]], wait: float) -> None:
        while True:
            try:
                delay = await job()
                self.runs[name] = self.runs.get(name, 0) + 1
            except asyncio.CancelledError:
                raise
            except Exception:
                self.failures[name] = self.failures.get(name, 0) + 1
                log.exception("maintenance: %s failed; retrying in %.0f s", name, wait)
                delay = wait
            await asyncio.sleep(wait if delay < 0 else delay)

    # Each job returns how long to sleep before its next run (-1: the default interval).
    async def _index(self) -> float:
        n = await asyncio.to_thread(self.store.index_pending, INDEX_CHUNK, processes=False)
        self.indexed += n
        self._unfolded += n
        self._idle_turns = 0 if n else self._idle_turns + 1
        now = time.monotonic()
        if (
            self._idle_turns >= 2
            or self._unfolded >= PROCESS_CHUNK
            or now - self._folded_at >= PROCESS_EVERY
        ):
            folded = await asyncio.to_thread(self.store.fold_processes, PROCESS_CHUNK)
            self._unfolded = max(0, self._unfolded - folded)
            self._folded_at = now
            if folded:
                self.folds += 1
            n += folded
        return 0.0 if n else -1  # keep going while there is a backlog

    async def _checkpoint(self) -> float:
        await asyncio.to_thread(self.store.checkpoint)
        return -1

    async def _expire(self) -> float:
        expired = await asyncio.to_thread(self.store.expire_commands)
        self.expired += len(expired)
        for cmd in expired:
            log.info(
                "command %d (%s on host %s) expired without a result",
                cmd.id,
                cmd.action,
                cmd.host_id,
            )
            if self.live is not None:
                self.live.publish("command", command_item(cmd))
        return -1

    async def _retention(self) -> float:
        res = await asyncio.to_thread(self.store.apply_retention, self.max_age, self.max_bytes)
        self.retention_deleted += res.events_deleted
        if res.events_deleted:
            log.info(
                "retention: deleted %d events (%d bytes)", res.events_deleted, res.bytes_deleted
            )
        return -1

    async def _crl(self) -> float:
        assert self.pki is not None
        rewritten = await asyncio.to_thread(self.pki.refresh_crl)
        if rewritten:
            log.info("PKI: CRL refreshed")
            if self.backplane is not None:
                self.backplane.reload_crl()
        return -1

"""Process events by polling /proc: works for any user, with known blind spots.

Every ``interval`` seconds (default 0.25) the set of pids in /proc is compared with the last
one. A new pid becomes an ``exec`` event flagged ``edr.discovered = "poll"``; a vanished pid
becomes an ``exit`` event without an exit code (the poller cannot know it).

Blind spots, stated plainly:

* A process that lives shorter than the interval is never seen at all.
* A process that execs a new image without forking is seen again only if its ``comm``
  changed between two polls (reported as ``discovered = "poll-comm-change"``).
* Unprivileged, /proc hides executable and cwd of other users' processes (and with
  ``hidepid`` mounts, the processes themselves); events carry what /proc shows.
"""

from __future__ import annotations

import logging
import threading
from typing import ClassVar

from backplane.schema import Action, Family, Tier
from sensor import procfs
from sensor.capture import CaptureContext, Source

log = logging.getLogger(__name__)

DEFAULT_INTERVAL_S = 0.25
KTHREADD_PID = 2


class ProcPollSource(Source):
    """exec/exit by diffing /proc every ``interval`` seconds; misses shorter-lived processes."""

    tier: ClassVar[Tier] = Tier.FALLBACK
    families: ClassVar[frozenset[Family]] = frozenset({Family.PROCESS})

    def __init__(
        self,
        ctx: CaptureContext,
        families: frozenset[Family],
        *,
        interval: float | None = None,
    ) -> None:
        super().__init__(ctx, families)
        if interval is None:
            interval = ctx.poll_interval
        if not interval > 0:
            raise ValueError(f"poll interval must be positive, got {interval!r}")
        self.interval = interval
        # pid -> (start_ticks, comm): start ticks tell pid reuse apart from the same process.
        self._known: dict[int, tuple[int, str]] = {}
        self._opened = False
        self.polls = 0
        self.reused_pids = 0
        self.vanished = 0

    @classmethod
    def unavailable(cls) -> str | None:
        try:
            procfs.pids()
        except OSError as exc:
            return f"/proc cannot be listed: {exc}"
        return None

    def open(self) -> None:
        """Take the baseline: processes already running are not reported as new."""
        self._known = self._snapshot()
        self._opened = True

    def _snapshot(self) -> dict[int, tuple[int, str]]:
        snap: dict[int, tuple[int, str]] = {}
        for pid in procfs.pids():
            st = procfs.stat(pid)
            if st is None:
                continue  # exited between listdir and read
            comm, ppid, start = st
            if pid == KTHREADD_PID or ppid == KTHREADD_PID:
                continue  # kernel threads are not processes an analyst can act on
            snap[pid] = (start, comm)
        return snap

    def poll_once(self) -> None:
        """One diff against the previous snapshot; emits the events it finds."""
        now = self._snapshot()
        self.polls += 1
        ignored = self.ctx.ignored_pids
        before = self._known
        for pid, (start, _comm) in before.items():
            cur = now.get(pid)
            if cur is None or cur[0] != start:
                if cur is not None:
                    self.reused_pids += 1
                if pid not in ignored:
                    self._exit(pid)
        for pid, (start, comm) in now.items():
            if pid in ignored:
                continue
            old = before.get(pid)
            if old is None or old[0] != start:
                self._exec(pid, "poll")
            elif old[1] != comm:
                self._exec(pid, "poll-comm-change")
        self._known = now

    def _exec(self, pid: int, how: str) -> None:
        st = procfs.stat(pid)
        if st is None:
            self.vanished += 1  # gone between the listing and now: nothing true to report
            return
        _comm, ppid, start = st
        known = self.ctx.table.get(pid)
        if known is None or known.start_ticks != start:
            # A process the table has not seen (or a reused pid): a fresh record with a fresh
            # entity id, linked to its parent, before the exec reads the image.
            self.ctx.table.fork(ppid, pid, start_ticks=start)
        creds = procfs.ids(pid) or (None, None)
        info = self.ctx.table.exec(pid, executable=None, uid=creds[0], gid=creds[1])
        ev = self.event(Action.EXEC, info)
        ev["edr"]["discovered"] = how
        self.ctx.emit(ev)
        self.submitted += 1

    def _exit(self, pid: int) -> None:
        info = self.ctx.table.exit(pid, None)
        ev = self.event(Action.EXIT, info)
        ev["edr"]["discovered"] = "poll"
        self.ctx.emit(ev)
        self.submitted += 1

    def run(self, stop: threading.Event) -> None:
        if not self._opened:
            raise RuntimeError("ProcPollSource.run called before open")
        # Event.wait returns as soon as stop is set, so shutdown never waits a full interval.
        while not stop.wait(self.interval):
            self.poll_once()

    def close(self) -> None:
        self._opened = False

    def counters(self) -> dict[str, int]:
        return {
            **super().counters(),
            "polls": self.polls,
            "reused_pids": self.reused_pids,
            "vanished": self.vanished,
        }

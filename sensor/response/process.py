"""Process actions: kill, kill-tree, suspend, resume; race-free against pid reuse.

Every target is pinned with a pidfd before it is checked: a signal sent through the pidfd goes
to the process that was checked or to nobody (``ESRCH``), never to a newcomer that got the
same pid in between. The ``entity_id`` the controller sends is recomputed from the pinned
process's start time, so a stale id is refused rather than hitting the wrong process.
"""

from __future__ import annotations

import errno
import os
import signal
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from sensor.response.errors import ActionFailed, ActionRefused

PF_KTHREAD = 0x00200000  # include/linux/sched.h: the task is a kernel thread
KTHREADD_PID = 2


@dataclass(frozen=True)
class ProcStat:
    """The fields of /proc/<pid>/stat the safety checks need."""

    pid: int
    comm: str
    state: str
    ppid: int
    flags: int
    start_ticks: int


def read_stat(pid: int) -> ProcStat | None:
    """Parse /proc/<pid>/stat; ``None`` when the process is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read()
    except OSError:
        return None
    # comm may hold spaces and ')': the fields start after the last ')'.
    lpar, rpar = raw.find(b"("), raw.rfind(b")")
    rest = raw[rpar + 2 :].split()
    try:
        return ProcStat(
            pid=pid,
            comm=raw[lpar + 1 : rpar].decode("utf-8", "replace"),
            state=rest[0].decode(),
            ppid=int(rest[1]),
            flags=int(rest[6]),
            start_ticks=int(rest[19]),
        )
    except (IndexError, ValueError):
        return None


def children(pid: int) -> list[int]:
    """Direct children of every thread of ``pid`` (``/proc/<pid>/task/*/children``)."""
    out: list[int] = []
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/children", "rb") as f:
                out.extend(int(x) for x in f.read().split())
        except (OSError, ValueError):
            continue
    return out


def protected_pids() -> set[int]:
    """The sensor itself and every ancestor up to pid 1: never a target."""
    pids = {1, os.getpid()}
    pid = os.getpid()
    for _ in range(64):
        st = read_stat(pid)
        if st is None or st.ppid <= 0:
            break
        pids.add(st.ppid)
        pid = st.ppid
    return pids


class ProcessActions:
    """Signals processes after the safety checks.

    Args:
        entity_of: the sensor's entity id for ``(pid, start_ticks)``, the same function the
            process table uses, so ids from events can be checked here.
    """

    def __init__(self, entity_of: Callable[[int, int], str]) -> None:
        self._entity_of = entity_of

    # -- checks ------------------------------------------------------------------------------

    @staticmethod
    def check_pid(pid: Any) -> None:
        """Checks that need no process: the type, pid 1, the sensor and its ancestors."""
        if isinstance(pid, bool) or not isinstance(pid, int) or pid < 1:
            raise ActionRefused(f"pid must be a positive integer, not {pid!r}")
        if pid == 1:
            raise ActionRefused("pid 1 (init) is never a target", pid=pid)
        if pid in protected_pids():
            raise ActionRefused(f"pid {pid} is the sensor or one of its ancestors", pid=pid)

    def check_target(self, pid: int, entity_id: str | None) -> ProcStat:
        """Refuse pid 0/1, kernel threads, the sensor and its ancestors, a reused pid."""
        self.check_pid(pid)
        st = read_stat(pid)
        if st is None:
            raise ActionFailed(f"no process with pid {pid}", pid=pid)
        if pid == KTHREADD_PID or st.flags & PF_KTHREAD or st.ppid == KTHREADD_PID:
            raise ActionRefused(f"pid {pid} ({st.comm}) is a kernel thread", pid=pid)
        if entity_id is not None and self._entity_of(pid, st.start_ticks) != entity_id:
            raise ActionRefused(
                f"pid {pid} now belongs to another process (entity_id does not match)",
                pid=pid,
                entity_id=entity_id,
            )
        return st

    @contextmanager
    def pinned(self, pid: int, entity_id: str | None) -> Iterator[tuple[int, ProcStat]]:
        """A pidfd for ``pid``, opened before the checks so the checked process is the one hit."""
        self.check_pid(pid)
        try:
            fd = os.pidfd_open(pid)
        except ProcessLookupError:
            raise ActionFailed(f"no process with pid {pid}", pid=pid) from None
        except OSError as exc:
            raise ActionFailed(f"cannot open pid {pid}: {exc.strerror}", pid=pid) from None
        try:
            yield fd, self.check_target(pid, entity_id)
        finally:
            os.close(fd)

    # -- actions -----------------------------------------------------------------------------

    def signal(self, pid: int, entity_id: str | None, signum: int) -> dict[str, Any]:
        with self.pinned(pid, entity_id) as (fd, st):
            _send(fd, signum, pid)
            return {"pid": pid, "name": st.comm, "entity_id": self._entity_of(pid, st.start_ticks),
                    "signal": signal.Signals(signum).name}  # fmt: skip

    def kill(self, pid: int, entity_id: str | None = None) -> dict[str, Any]:
        out = self.signal(pid, entity_id, signal.SIGKILL)
        out["exited"] = wait_gone([pid], 2.0) == []
        return out

    def suspend(self, pid: int, entity_id: str | None = None) -> dict[str, Any]:
        out = self.signal(pid, entity_id, signal.SIGSTOP)
        out["state"] = wait_state(pid, "T", 1.0)
        return out

    def resume(self, pid: int, entity_id: str | None = None) -> dict[str, Any]:
        out = self.signal(pid, entity_id, signal.SIGCONT)
        st = read_stat(pid)
        out["state"] = st.state if st else None
        return out

    def kill_tree(self, pid: int, entity_id: str | None = None) -> dict[str, Any]:
        """Stop the whole tree (so nobody can fork away), then kill it leaves first."""
        protected = protected_pids()
        with self.pinned(pid, entity_id) as (root_fd, root_st):
            _send(root_fd, signal.SIGSTOP, pid)
            fds: dict[int, int] = {}
            order: list[int] = [pid]  # breadth-first: parents before children
            try:
                # Stopping a parent freezes its forks, but a child forked just before the stop
                # may itself be forking: keep sweeping until a pass finds nobody new.
                for _ in range(1000):
                    new = False
                    for parent in list(order):
                        for child in children(parent):
                            if child in fds or child == pid:
                                continue
                            if child in protected:
                                raise ActionRefused(
                                    f"the tree of pid {pid} contains the sensor", pid=pid
                                )
                            try:
                                fds[child] = os.pidfd_open(child)
                            except OSError:
                                continue  # already gone
                            order.append(child)
                            new = True
                            _send(fds[child], signal.SIGSTOP, child, missing_ok=True)
                    if not new:
                        break
                for child in reversed(order[1:]):
                    _send(fds[child], signal.SIGKILL, child, missing_ok=True)
                _send(root_fd, signal.SIGKILL, pid, missing_ok=True)
            except ActionRefused:
                # Leave the tree as it was found.
                for child_fd in fds.values():
                    _send(child_fd, signal.SIGCONT, 0, missing_ok=True)
                _send(root_fd, signal.SIGCONT, pid, missing_ok=True)
                raise
            finally:
                for child_fd in fds.values():
                    os.close(child_fd)
        survivors = wait_gone(order, 3.0)
        return {
            "pid": pid,
            "name": root_st.comm,
            "killed": order,
            "count": len(order),
            "survivors": survivors,
        }


def _send(fd: int, signum: int, pid: int, missing_ok: bool = False) -> None:
    try:
        signal.pidfd_send_signal(fd, signum)
    except ProcessLookupError:
        if not missing_ok:
            raise ActionFailed(f"pid {pid} exited before it could be signalled", pid=pid) from None
    except OSError as exc:
        if exc.errno == errno.ESRCH and missing_ok:
            return
        raise ActionFailed(f"cannot signal pid {pid}: {exc.strerror}", pid=pid) from None


def wait_gone(pids: list[int], timeout: float) -> list[int]:
    """Pids still running (not exited, not zombie) after up to ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        alive = [p for p in pids if (st := read_stat(p)) is not None and st.state not in "ZX"]
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.01)


def wait_state(pid: int, state: str, timeout: float) -> str | None:
    """Poll until /proc/<pid>/stat shows ``state``; returns the last state seen."""
    deadline = time.monotonic() + timeout
    while True:
        st = read_stat(pid)
        if st is None or st.state == state or time.monotonic() > deadline:
            return st.state if st else None
        time.sleep(0.002)

"""The sensor's view of every process: the context every event carries.

Each capture tier feeds it (fork, exec, exit, chdir) and reads it to enrich file and network
events. It is seeded from /proc at start-up so processes older than the sensor have context
too, and it keeps recently exited processes for a while so late events still resolve.

The parent comes from the fork events the tier reports (and /proc at start-up), never from
kernel structs: with mismatched headers ``task->real_parent->tgid`` reads 0.
"""

from __future__ import annotations

import base64
import hashlib
import pwd
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from backplane.schema import iso_timestamp
from sensor import procfs

EXITED_KEPT = 8192
CGROUPS_KEPT = 4096


class _Unknown:
    """Marks an argument the tier did not supply (``None`` is a real value: unset)."""

    def __repr__(self) -> str:
        return "UNKNOWN"


UNKNOWN: Any = _Unknown()


@dataclass(slots=True)
class ProcessInfo:
    pid: int
    ppid: int = 0
    start_ticks: int = 0
    entity_id: str = ""
    comm: str = ""
    executable: str | None = None
    args: list[str] = field(default_factory=list)
    args_truncated: bool = False
    cwd: str | None = None
    uid: int | None = None
    gid: int | None = None
    loginuid: int | None = None
    container_id: str | None = None
    sha256: str | None = None
    exit_code: int | None = None
    # ECS fragment built by ProcessTable.ecs and the state it was built from; see there
    ecs_cache: tuple[tuple[Any, ...], dict[str, Any]] | None = field(
        default=None, repr=False, compare=False
    )
    # The compiled path's encoding of that fragment (sensor/_hotpath.c, fragment_parts)
    ecs_line: tuple[Any, ...] | None = field(default=None, repr=False, compare=False)

    @property
    def name(self) -> str:
        if self.executable:
            return self.executable.rsplit("/", 1)[-1]
        return self.comm

    @property
    def command_line(self) -> str:
        return " ".join(self.args)


_user_names: dict[int, str | None] = {}


def user_name(uid: int) -> str | None:
    if uid not in _user_names:
        try:
            _user_names[uid] = pwd.getpwuid(uid).pw_name
        except KeyError:
            _user_names[uid] = None
    return _user_names[uid]


class ProcessTable:
    """Thread-safe map of live (and recently exited) processes keyed by pid.

    Reads take no lock: a single ``dict.get`` is atomic in CPython and entries are only ever
    replaced whole, never left half-built in the map. The lock serialises the composite
    updates (fork, exec, exit) against each other.
    """

    def __init__(self, host_id: str, boot_ns_to_epoch_ns: int | None = None) -> None:
        self._host_id = host_id
        self._boot_id = procfs.boot_id()
        self._id_prefix = f"{host_id}:{self._boot_id}:".encode()
        self._live: dict[int, ProcessInfo] = {}
        self._exited: OrderedDict[int, ProcessInfo] = OrderedDict()
        self._lock = threading.Lock()
        # cgroup v2 id -> container id (None: not in a container), read from /proc once per id
        self._containers: dict[int, str | None] = {}
        self._cgroup_ids_usable = procfs.cgroup_v2_only()
        # Epoch time at boot: turns start ticks into an ECS process.start timestamp.
        if boot_ns_to_epoch_ns is None:
            boot_ns_to_epoch_ns = time.time_ns() - time.clock_gettime_ns(time.CLOCK_BOOTTIME)
        self.boot_epoch_ns = boot_ns_to_epoch_ns

    # -- identity ---------------------------------------------------------------------------

    def entity_id(self, pid: int, start_ticks: int) -> str:
        """Stable across the process's life, unique across pid reuse, reboots and hosts."""
        # sha256("<host>:<boot id>:<pid>:<start ticks>"): the prefix is encoded once
        digest = hashlib.sha256(b"%s%d:%d" % (self._id_prefix, pid, start_ticks)).digest()
        return base64.urlsafe_b64encode(digest[:18]).decode()

    # -- feeding ----------------------------------------------------------------------------

    def seed_from_proc(self) -> int:
        """Load every process visible in /proc; returns how many."""
        count = 0
        for pid in procfs.pids():
            info = self._read_proc(pid)
            if info is not None:
                with self._lock:
                    self._live.setdefault(pid, info)
                count += 1
        return count

    def fork(self, ppid: int, pid: int, start_ticks: int | None = None) -> ProcessInfo:
        """A new process: inherits its parent's image, credentials and cwd until it execs."""
        with self._lock:
            parent = self._live.get(ppid)
            if start_ticks is None:
                st = procfs.stat(pid)
                start_ticks = st[2] if st else 0
            child = ProcessInfo(
                pid=pid,
                ppid=ppid,
                start_ticks=start_ticks,
                entity_id=self.entity_id(pid, start_ticks),
            )
            if parent is not None:
                child.comm = parent.comm
                child.executable = parent.executable
                child.args = parent.args
                child.args_truncated = parent.args_truncated
                child.cwd = parent.cwd
                child.uid, child.gid, child.loginuid = parent.uid, parent.gid, parent.loginuid
                child.container_id = parent.container_id
                child.sha256 = parent.sha256
            self._live[pid] = child
            return child

    def exec(
        self,
        pid: int,
        *,
        executable: str | None,
        args: list[str] | None = None,
        args_truncated: bool = False,
        uid: int | None = None,
        gid: int | None = None,
        comm: str | None = None,
        ppid: int | None = None,
        refresh: bool = True,
        cgroup_id: int | None = None,
        loginuid: int | None = UNKNOWN,
        cgroups_tracked: bool = False,
    ) -> ProcessInfo:
        """A new image in an existing process: entity id is kept, image fields replaced.

        Whatever the tier did not pass is read from /proc if the process is still alive.
        ``refresh=False`` is for a tier that tracks cwd itself (inherited at fork, kept by
        chdir events): cwd is then read from /proc only when unknown, and the container comes
        from ``cgroup_id`` through a cache when the host is cgroup v2 only, or is kept as
        inherited at fork when ``cgroups_tracked`` says the tier reports every cgroup move
        (:meth:`refresh_container`). ``loginuid`` is what the kernel had at exec (``None``:
        unset); without it the login uid is read from /proc when the inherited one is unset
        (pam_loginuid sets it between fork and exec).
        """
        info = self.lookup(pid)
        with self._lock:
            if ppid:
                info.ppid = ppid
            info.executable = executable or procfs.link(pid, "exe") or info.executable
            if args is None:
                argv = procfs.cmdline(pid)
                if argv is not None:
                    args, args_truncated = argv
            if args is not None:
                info.args, info.args_truncated = args, args_truncated
            info.comm = comm or info.comm or info.name
            if uid is not None:
                info.uid = uid
            if gid is not None:
                info.gid = gid
            info.sha256 = None
            info.ecs_cache = None  # args, ids and credentials change without the key seeing it
            if refresh or info.cwd is None:
                cwd = procfs.link(pid, "cwd")
                if cwd is not None:
                    info.cwd = cwd
            alive = True
            if not refresh and cgroup_id and self._cgroup_ids_usable:
                info.container_id = self._container_for(cgroup_id, pid, info.container_id)
            elif refresh or not cgroups_tracked:
                text = procfs.cgroups(pid)
                # root can always read /proc/<pid>/cgroup: no text means the process is gone
                # (an exec storm's children mostly are by now), so skip the loginuid read too
                alive = text is not None
                cid = procfs.container_id_in(text) if text is not None else None
                if cid is not None:
                    info.container_id = cid
            if loginuid is not UNKNOWN:
                info.loginuid = loginuid
            elif info.loginuid is None and alive:
                info.loginuid = procfs.loginuid(pid)
            self._live[pid] = info
            return info

    def _container_for(self, cgroup_id: int, pid: int, current: str | None) -> str | None:
        """Container id of a cgroup v2 id, from /proc/<pid>/cgroup the first time it is seen."""
        try:
            return self._containers[cgroup_id]
        except KeyError:
            pass
        text = procfs.cgroups(pid)
        if text is None:
            return current  # gone before we looked: keep the inherited one, cache nothing
        cid = procfs.container_id_in(text)
        if len(self._containers) >= CGROUPS_KEPT:
            self._containers.clear()
        self._containers[cgroup_id] = cid
        return cid

    def refresh_container(self, pid: int, moved_to: str | None = None) -> None:
        """The process moved to another cgroup (or was born in one): its container changed.

        ``moved_to`` is the destination cgroup's path when the tier knows it: a container id
        in it is the answer even if the process is gone by now (an exec storm's children
        are). Otherwise /proc says where the process is; gone, it keeps what it had.
        """
        info = self._live.get(pid)
        if info is None:
            return
        cid = procfs.container_id_in(moved_to) if moved_to else None
        if cid is None:
            text = procfs.cgroups(pid)
            if text is None:
                return
            cid = procfs.container_id_in(text)
        with self._lock:
            if cid != info.container_id:
                info.container_id = cid
                info.ecs_cache = None

    def exit(self, pid: int, exit_code: int | None = None) -> ProcessInfo:
        info = self.lookup(pid)
        with self._lock:
            info.exit_code = exit_code
            self._live.pop(pid, None)
            self._exited[pid] = info
            self._exited.move_to_end(pid)
            while len(self._exited) > EXITED_KEPT:
                self._exited.popitem(last=False)
            return info

    def chdir(self, pid: int, cwd: str) -> None:
        with self._lock:
            info = self._live.get(pid)
            if info is not None:
                info.cwd = cwd

    # -- reading ----------------------------------------------------------------------------

    def get(self, pid: int) -> ProcessInfo | None:
        return self._live.get(pid) or self._exited.get(pid)

    def lookup(self, pid: int) -> ProcessInfo:
        """The known process, else what /proc says now, else a bare record (never fails)."""
        info = self._live.get(pid) or self._exited.get(pid)
        if info is not None:
            return info
        info = self._read_proc(pid) or ProcessInfo(pid=pid, entity_id=self.entity_id(pid, 0))
        with self._lock:
            return self._live.setdefault(pid, info)

    def live_pids(self) -> list[int]:
        with self._lock:
            return list(self._live)

    def __iter__(self) -> Iterator[ProcessInfo]:
        with self._lock:
            return iter(list(self._live.values()))

    def __len__(self) -> int:
        return len(self._live)

    def ancestors(self, pid: int, limit: int = 16) -> Iterator[ProcessInfo]:
        seen = {pid}
        info = self.get(pid)
        while info is not None and limit > 0 and info.ppid and info.ppid not in seen:
            seen.add(info.ppid)
            info = self.get(info.ppid)
            if info is not None:
                yield info
            limit -= 1

    def _read_proc(self, pid: int) -> ProcessInfo | None:
        st = procfs.stat(pid)
        if st is None:
            return None
        comm, ppid, start_ticks = st
        argv = procfs.cmdline(pid) or ([], False)
        creds = procfs.ids(pid) or (None, None)
        return ProcessInfo(
            pid=pid,
            ppid=ppid,
            start_ticks=start_ticks,
            entity_id=self.entity_id(pid, start_ticks),
            comm=comm,
            executable=procfs.link(pid, "exe"),
            args=argv[0],
            args_truncated=argv[1],
            cwd=procfs.link(pid, "cwd"),
            uid=creds[0],
            gid=creds[1],
            loginuid=procfs.loginuid(pid),
            container_id=procfs.container_id(pid),
        )

    # -- ECS --------------------------------------------------------------------------------

    def ecs(self, info: ProcessInfo) -> dict[str, Any]:
        """``process``, ``user``, ``group`` and ``container`` fields for an event.

        The fragment is built once per process state and reused (an exec storm's exit event
        repeats its exec event's fields): it is cached on the ``ProcessInfo`` under a key of
        the fields that change outside ``exec`` (which clears the cache) and the parent's.
        Each call returns a fresh ``process`` dict, which consumers extend (``hash``,
        ``thread``, ``exit_code``); ``process.parent``, ``user``, ``group`` and ``container``
        are shared between the events of one process and must be treated as read-only.
        """
        parent = self.get(info.ppid) if info.ppid else None
        key = (
            info.executable,
            info.comm,
            info.cwd,
            info.ppid,
            info.container_id,
            parent,
            None if parent is None else parent.executable,
            None if parent is None else parent.args,
            None if parent is None else parent.comm,
        )
        # tuple == checks identity first, so an unchanged state costs no field comparisons
        cached = info.ecs_cache
        if cached is None or cached[0] != key:
            cached = (key, self._build_ecs(info, parent))
            info.ecs_cache = cached
        fields = dict(cached[1])
        proc = fields["process"] = dict(fields["process"])
        # these two change after the fragment is built (the writer learns the hash, exit
        # sets the code) and are added per call instead of invalidating it
        if info.sha256:
            proc["hash"] = {"sha256": info.sha256}
        if info.exit_code is not None:
            proc["exit_code"] = info.exit_code
        return fields

    def _build_ecs(self, info: ProcessInfo, parent: ProcessInfo | None) -> dict[str, Any]:
        proc: dict[str, Any] = {"pid": info.pid, "entity_id": info.entity_id, "name": info.name}
        if info.executable:
            proc["executable"] = info.executable
        if info.args:
            proc["args"] = info.args
            proc["args_count"] = len(info.args)
            proc["command_line"] = info.command_line
            if info.args_truncated:
                proc["args_truncated"] = True
        if info.cwd:
            proc["working_directory"] = info.cwd
        if info.start_ticks:
            start_ns = self.boot_epoch_ns + info.start_ticks * 1_000_000_000 // procfs.CLK_TCK
            proc["start"] = iso_timestamp(start_ns)
        pfields: dict[str, Any] = {"pid": info.ppid}
        if parent is not None:
            pfields["entity_id"] = parent.entity_id
            pfields["name"] = parent.name
            if parent.executable:
                pfields["executable"] = parent.executable
            if parent.args:
                pfields["command_line"] = parent.command_line
        proc["parent"] = pfields
        fields: dict[str, Any] = {"process": proc}
        if info.uid is not None:
            user: dict[str, Any] = {"id": str(info.uid)}
            name = user_name(info.uid)
            if name:
                user["name"] = name
            if info.loginuid is not None:
                user["audit"] = {"id": str(info.loginuid)}
            fields["user"] = user
        if info.gid is not None:
            fields["group"] = {"id": str(info.gid)}
        if info.container_id:
            fields["container"] = {"id": info.container_id}
        return fields

"""The BCC capture tiers: tracepoints (and a small kprobe variant).

One BPF object, built from ``sensor/bpf/edr.bpf.c`` with the families chosen by ``-D`` cflags,
feeds one ring buffer. The reader is woken every N events or polls on a ~50 ms timer, copies
the raw records and decodes them in batches with :mod:`struct`; each record's type tag picks
its handler from one table. Handlers update the shared process table and emit ECS events
built by the ``Source`` helpers, so the shape is the same as every other tier's.

BCC rewrites only the main file it compiles (tracepoint argument structs, map method calls,
program sections), so :func:`bpf_source_text` expands ``#include "<family>.bpf.c"`` lines in
place, with ``#line`` markers so compiler messages name the real file. That is the only
change to the C: configuration is by ``-D`` cflags.
"""

from __future__ import annotations

import ctypes
import ipaddress
import logging
import os
import re
import struct
import subprocess
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from enum import IntEnum
from pathlib import Path
from typing import Any, ClassVar

import orjson

from backplane.schema import SCHEMA_VERSION, Action, Event, Family, Tier, event_skeleton
from sensor import process_table, procfs
from sensor.btf import task_offsets
from sensor.capture import CaptureContext, Source, TierUnavailable, resolve_path
from sensor.process_table import UNKNOWN, ProcessInfo
from sensor.ringbuf import RingReader

try:  # the compiled fork/exec/exit path (python -m sensor.build_hotpath); optional
    from sensor import _hotpath
except ImportError:
    _hotpath = None

log = logging.getLogger(__name__)

BPF_DIR = Path(__file__).resolve().parent / "bpf"
TRACEFS = Path("/sys/kernel/tracing")
GENERIC_HEADERS = Path("/usr/src/edr-bcc-headers")

RINGBUF_BYTES = 16 * 1024 * 1024
WAKE_EVERY = 512
POLL_MS = 50
COUNTER_REFRESH_S = 1.0

AT_FDCWD = -100
O_CREAT, O_TRUNC, O_CLOEXEC = 0o100, 0o1000, 0o2000000
NO_ID = 0xFFFFFFFF  # chown's "leave unchanged"

# Kept in step with events.h; the layout test compares them with what BCC compiles.
COMM_LEN, PATH_LEN = 16, 256
ARGS_MAX_BYTES, ARGS_MAX_COUNT = 4096, 128
ARGS_BUF = 2 * ARGS_MAX_BYTES

EXEC_ARGS_TRUNCATED, EXEC_NO_ARGS, EXEC_HAVE_LOGINUID, EXEC_ARGS_BLOCK = 1, 2, 4, 8
FORK_INTO_CGROUP = 1
NO_LOGINUID = 0xFFFFFFFF  # the kernel's "unset"
EXIT_HAVE_CODE, EXIT_HAVE_SIGNAL = 1, 2
NET_HAVE_LOCAL, NET_HAVE_PEER = 1, 2
FILE_REPORT, FILE_WATCH = 1, 2
# user-space side of the kernel's write_watch map (EDR_WRITE_WATCH_ENTRIES): same bound
WRITE_WATCH_ENTRIES = 16384

# Resolved exec paths are cached briefly: realpath() is a few syscalls per exec, and an exec
# storm runs the same few binaries. The trade-off: for up to REALPATH_TTL_S after a symlink on
# the path is swapped, execs through it are reported with the old target. The hash is taken
# of the reported path, and /proc/<pid>/exe stays the ground truth the hasher falls back to.
REALPATH_TTL_S = 2.0
REALPATH_ENTRIES = 4096

_INCLUDE = re.compile(r'^#include "([a-z0-9_]+\.bpf\.c)"[ \t]*$', re.MULTILINE)


class EventType(IntEnum):
    """Mirror of ``enum edr_event_type``."""

    FORK = 1
    EXEC = 2
    EXIT = 3
    CHDIR = 4
    FILE = 5
    CONNECT = 6
    LISTEN = 7
    ACCEPT = 8
    FILE_WRITE = 9
    CGROUP = 10


EVENT_TYPE_MAX = 11


class FileOp(IntEnum):
    """Mirror of ``enum edr_file_op``."""

    OPEN = 1
    UNLINK = 2
    RMDIR = 3
    RENAME = 4
    CHMOD = 5
    CHOWN = 6


# -- struct mirrors ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Mirror:
    """A C struct as (field, struct format) pairs, packed little-endian.

    The C side pads explicitly, so natural C alignment equals this packed layout.
    """

    c_name: str
    fields: tuple[tuple[str, str], ...]

    @property
    def struct(self) -> struct.Struct:
        return struct.Struct("<" + "".join(fmt for _, fmt in self.fields))

    @property
    def size(self) -> int:
        return self.struct.size

    def offsets(self) -> dict[str, int]:
        out, fmt = {}, "<"
        for name, f in self.fields:
            out[name] = struct.calcsize(fmt)
            fmt += f
        return out


_HEADER_FMT = f"IIIIIIQ{COMM_LEN}s"
HEADER = Mirror(
    "edr_header",
    (
        ("type", "I"),
        ("pid", "I"),
        ("tid", "I"),
        ("uid", "I"),
        ("gid", "I"),
        ("_pad0", "I"),
        ("ktime_ns", "Q"),
        ("comm", f"{COMM_LEN}s"),
    ),
)
FORK = Mirror(
    "edr_fork_event",
    (
        ("h", _HEADER_FMT),
        ("ppid", "I"),
        ("child_pid", "I"),
        ("child_start_ticks", "Q"),
        ("flags", "I"),
        ("_pad0", "I"),
    ),
)
EXEC = Mirror(
    "edr_exec_event",
    (
        ("h", _HEADER_FMT),
        ("old_pid", "I"),
        ("flags", "I"),
        ("args_count", "I"),
        ("args_size", "I"),
        ("cgroup_id", "Q"),
        ("loginuid", "I"),
        ("_pad1", "I"),
        ("filename", f"{PATH_LEN}s"),
        ("args", f"{ARGS_BUF}s"),
    ),
)
EXIT = Mirror(
    "edr_exit_event",
    (("h", _HEADER_FMT), ("exit_code", "i"), ("signal", "i"), ("flags", "I"), ("_pad0", "I")),
)
CHDIR = Mirror(
    "edr_chdir_event", (("h", _HEADER_FMT), ("fd", "i"), ("_pad0", "I"), ("path", f"{PATH_LEN}s"))
)
FILE = Mirror(
    "edr_file_event",
    (
        ("h", _HEADER_FMT),
        ("op", "I"),
        ("flags", "I"),
        ("dfd", "i"),
        ("dfd2", "i"),
        ("fd", "i"),
        ("mode", "I"),
        ("owner_uid", "I"),
        ("owner_gid", "I"),
        ("emit", "I"),
        ("_pad0", "I"),
        ("ret", "q"),
        ("path", f"{PATH_LEN}s"),
        ("path2", f"{PATH_LEN}s"),
    ),
)
WRITE = Mirror(
    "edr_write_event", (("h", _HEADER_FMT), ("fd", "i"), ("_pad0", "I"), ("open_id", "Q"))
)
NET = Mirror(
    "edr_net_event",
    (
        ("h", _HEADER_FMT),
        ("family", "H"),
        ("protocol", "H"),
        ("sport", "H"),
        ("dport", "H"),
        ("saddr", "16s"),
        ("daddr", "16s"),
        ("ret", "i"),
        ("flags", "I"),
    ),
)
CGROUP = Mirror(
    "edr_cgroup_event",
    (("h", _HEADER_FMT), ("target_pid", "I"), ("root", "i"), ("path", f"{PATH_LEN}s")),
)
MIRRORS: tuple[Mirror, ...] = (HEADER, FORK, EXEC, EXIT, CHDIR, FILE, WRITE, NET, CGROUP)

_HEADER_S = HEADER.struct
_EXEC_FIXED = struct.Struct("<" + "".join(f for n, f in EXEC.fields if n != "args"))
_FORK_S, _EXIT_S, _CHDIR_S, _FILE_S, _WRITE_S, _NET_S, _CGROUP_S = (
    m.struct for m in (FORK, EXIT, CHDIR, FILE, WRITE, NET, CGROUP)
)


# -- decoded records ---------------------------------------------------------------------------


def prefix_heads(prefixes: Iterable[str]) -> set[int]:
    """The ``sensitive_heads`` indices (file.bpf.c) that the paths under ``prefixes`` can have.

    A path's index is its bytes 1 and 2 as ``b1 << 8 | b2``. A prefix of three bytes or more
    allows one index, "/x" every index with ``b1 == x``, and "/" every index.
    """
    heads: set[int] = set()
    for prefix in prefixes:
        data = prefix.encode()
        if len(data) >= 3:
            heads.add(data[1] << 8 | data[2])
        elif len(data) == 2:
            heads.update(data[1] << 8 | b2 for b2 in range(256))
        else:
            heads.update(range(1 << 16))
    return heads


def head_words(heads: Iterable[int]) -> dict[int, int]:
    """``prefix_heads`` as the words of file.bpf.c's bitmap: bit ``h & 63`` of word ``h >> 6``."""
    words: dict[int, int] = {}
    for head in heads:
        words[head >> 6] = words.get(head >> 6, 0) | 1 << (head & 63)
    return words


class DecodeError(ValueError):
    """A ring-buffer record that does not have the shape its type tag promises."""


@dataclass(slots=True)
class Header:
    type: int
    pid: int
    tid: int
    uid: int
    gid: int
    ktime_ns: int
    comm: str


@dataclass(slots=True)
class ForkRecord:
    h: Header
    ppid: int
    child_pid: int
    child_start_ticks: int
    into_cgroup: bool = False  # clone3(CLONE_INTO_CGROUP): not in its parent's cgroups


@dataclass(slots=True)
class ExecRecord:
    h: Header
    old_pid: int
    filename: str
    args: list[str] | None  # None: the kernel had no argv (read /proc instead)
    args_truncated: bool
    cgroup_id: int = 0
    # the audit login uid read from the task, None when unset; UNKNOWN when the kernel could
    # not read it (no BTF offset): then user space reads /proc
    loginuid: int | None = UNKNOWN


@dataclass(slots=True)
class CgroupRecord:
    h: Header
    target_pid: int
    root: int
    path: str


@dataclass(slots=True)
class ExitRecord:
    h: Header
    exit_code: int | None
    signal: int | None


@dataclass(slots=True)
class ChdirRecord:
    h: Header
    fd: int
    path: str


@dataclass(slots=True)
class FileRecord:
    h: Header
    op: FileOp
    flags: int
    dfd: int
    dfd2: int
    fd: int
    mode: int
    owner_uid: int | None
    owner_gid: int | None
    emit: int  # FILE_REPORT | FILE_WATCH
    ret: int
    path: str
    path2: str


@dataclass(slots=True)
class WriteRecord:
    h: Header
    fd: int
    open_id: int  # ktime_ns of the open record that registered the fd


@dataclass(slots=True)
class NetRecord:
    h: Header
    transport: str
    local: tuple[str, int] | None
    remote: tuple[str, int] | None
    ret: int


def _cstr(raw: bytes) -> str:
    """A NUL-terminated C string; bytes that are not UTF-8 become visible \\xNN escapes.

    Events travel as JSON and msgpack, which carry only valid Unicode: a lone surrogate
    (surrogateescape) would make the whole batch unencodable.
    """
    return raw.split(b"\0", 1)[0].decode("utf-8", "backslashreplace")


def _header(values: tuple[Any, ...]) -> Header:
    typ, pid, tid, uid, gid, _pad, ktime, comm = values[:8]
    return Header(typ, pid, tid, uid, gid, ktime, _cstr(comm))


def _check_size(raw: bytes, need: int, what: str) -> None:
    if len(raw) < need:
        raise DecodeError(f"{what} record is {len(raw)} bytes, expected at least {need}")


def split_args(buf: bytes, count: int) -> list[str]:
    """argv from NUL-separated strings; a last string cut by the byte bound is kept."""
    parts = buf.split(b"\0")
    if parts and parts[-1] == b"":
        parts.pop()
    return [p.decode("utf-8", "backslashreplace") for p in parts[:count]]


def decode_fork(raw: bytes) -> ForkRecord:
    _check_size(raw, _FORK_S.size, "fork")
    v = _FORK_S.unpack_from(raw)
    return ForkRecord(_header(v), v[8], v[9], v[10], bool(v[11] & FORK_INTO_CGROUP))


def decode_exec(raw: bytes) -> ExecRecord:
    _check_size(raw, _EXEC_FIXED.size, "exec")
    v = _EXEC_FIXED.unpack_from(raw)
    old_pid, flags, count, size, cgroup_id, loginuid, _pad, filename = v[8:16]
    if size > ARGS_MAX_BYTES or count > ARGS_MAX_COUNT:
        raise DecodeError(f"exec record claims {count} args in {size} bytes, beyond the bounds")
    _check_size(raw, _EXEC_FIXED.size + size, "exec")
    args = None
    truncated = bool(flags & EXEC_ARGS_TRUNCATED)
    if not flags & EXEC_NO_ARGS:
        block = raw[_EXEC_FIXED.size : _EXEC_FIXED.size + size]
        if flags & EXEC_ARGS_BLOCK:  # the kernel did not count: keep the first MAX_COUNT
            args = split_args(block, ARGS_MAX_COUNT + 1)
            if len(args) > ARGS_MAX_COUNT:
                del args[ARGS_MAX_COUNT:]
                truncated = True
        else:
            args = split_args(block, count)
    return ExecRecord(
        _header(v),
        old_pid,
        _cstr(filename),
        args,
        truncated,
        cgroup_id,
        (None if loginuid == NO_LOGINUID else loginuid) if flags & EXEC_HAVE_LOGINUID else UNKNOWN,
    )


def decode_cgroup(raw: bytes) -> CgroupRecord:
    _check_size(raw, _CGROUP_S.size, "cgroup")
    v = _CGROUP_S.unpack_from(raw)
    return CgroupRecord(_header(v), v[8], v[9], _cstr(v[10]))


def decode_exit(raw: bytes) -> ExitRecord:
    _check_size(raw, _EXIT_S.size, "exit")
    v = _EXIT_S.unpack_from(raw)
    code, sig, flags = v[8:11]
    return ExitRecord(
        _header(v),
        code if flags & EXIT_HAVE_CODE else None,
        sig if flags & EXIT_HAVE_SIGNAL else None,
    )


def decode_chdir(raw: bytes) -> ChdirRecord:
    _check_size(raw, _CHDIR_S.size, "chdir")
    v = _CHDIR_S.unpack_from(raw)
    return ChdirRecord(_header(v), v[8], _cstr(v[10]))


def decode_file(raw: bytes) -> FileRecord:
    _check_size(raw, _FILE_S.size, "file")
    v = _FILE_S.unpack_from(raw)
    op, flags, dfd, dfd2, fd, mode, ouid, ogid, emit, _pad, ret, path, path2 = v[8:21]
    try:
        fop = FileOp(op)
    except ValueError:
        raise DecodeError(f"file record with unknown operation {op}") from None
    return FileRecord(
        _header(v),
        fop,
        flags,
        dfd,
        dfd2,
        fd,
        mode,
        None if ouid == NO_ID else ouid,
        None if ogid == NO_ID else ogid,
        emit,
        ret,
        _cstr(path),
        _cstr(path2),
    )


def decode_write(raw: bytes) -> WriteRecord:
    _check_size(raw, _WRITE_S.size, "file write")
    v = _WRITE_S.unpack_from(raw)
    return WriteRecord(_header(v), v[8], v[10])


def ip_text(family: int, raw: bytes) -> str:
    """Printable address; v4-mapped IPv6 (``::ffff:a.b.c.d``) becomes plain IPv4."""
    if family == 2:
        return str(ipaddress.IPv4Address(raw[:4]))
    if family == 10:
        addr = ipaddress.IPv6Address(raw[:16])
        return str(addr.ipv4_mapped) if addr.ipv4_mapped else str(addr)
    raise DecodeError(f"network record with unknown address family {family}")


def decode_net(raw: bytes) -> NetRecord:
    _check_size(raw, _NET_S.size, "network")
    v = _NET_S.unpack_from(raw)
    family, proto, sport, dport, saddr, daddr, ret, flags = v[8:16]
    transport = {6: "tcp", 17: "udp"}.get(proto)
    if transport is None:
        raise DecodeError(f"network record with unknown protocol {proto}")
    local = (ip_text(family, saddr), sport) if flags & NET_HAVE_LOCAL else None
    remote = (ip_text(family, daddr), dport) if flags & NET_HAVE_PEER else None
    return NetRecord(_header(v), transport, local, remote, ret)


def record_type(raw: bytes) -> int:
    if len(raw) < 4:
        raise DecodeError(f"record of {len(raw)} bytes has no type tag")
    return int.from_bytes(raw[:4], "little")


class RealpathCache:
    """``os.path.realpath`` with a small, bounded, time-limited cache (see REALPATH_TTL_S)."""

    def __init__(
        self,
        ttl: float = REALPATH_TTL_S,
        entries: int = REALPATH_ENTRIES,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.ttl = ttl
        self.entries = entries
        self._clock = clock
        self._cache: dict[str, tuple[str, float]] = {}
        self.hits = 0
        self.misses = 0

    def __call__(self, path: str) -> str:
        now = self._clock()
        hit = self._cache.get(path)
        if hit is not None and hit[1] > now:
            self.hits += 1
            return hit[0]
        self.misses += 1
        resolved = os.path.realpath(path)
        if len(self._cache) >= self.entries:
            # drop what expired; if everything is fresh, start over (a bound, not an LRU)
            self._cache = {k: v for k, v in self._cache.items() if v[1] > now}
            if len(self._cache) >= self.entries:
                self._cache.clear()
        self._cache[path] = (resolved, now + self.ttl)
        return resolved


# -- dispatch ----------------------------------------------------------------------------------

Handler = Callable[["TracepointSource", bytes], None]
_HANDLERS: dict[EventType, Handler] = {}
# the same table keyed by the plain int tag: the hot path skips the IntEnum lookup
_BY_TAG: dict[int, Handler] = {}


def handles(kind: EventType) -> Callable[[Handler], Handler]:
    """Register the handler for one event type; a second registration is a bug."""

    def register(fn: Handler) -> Handler:
        if kind in _HANDLERS:
            raise RuntimeError(
                f"two handlers for {kind.name}: {_HANDLERS[kind].__name__}, {fn.__name__}"
            )
        _HANDLERS[kind] = fn
        _BY_TAG[int(kind)] = fn
        return fn

    return register


def handler_for(kind: int) -> Handler | None:
    return _BY_TAG.get(kind)


_FORK_SIZE, _EXIT_SIZE = _FORK_S.size, _EXIT_S.size


@handles(EventType.FORK)
def _on_fork(src: TracepointSource, raw: bytes) -> None:
    # Fork and exit come once per spawn each and need no comm: unpacked here directly rather
    # than through decode_fork's records (same checks, a third of the cost).
    if len(raw) < _FORK_SIZE:
        raise DecodeError(f"fork record is {len(raw)} bytes, expected at least {_FORK_SIZE}")
    v = _FORK_S.unpack_from(raw)
    child = src.ctx.table.fork(v[8], v[9], v[10])
    if v[11] & FORK_INTO_CGROUP:
        src.ctx.table.refresh_container(v[9])
    # the table is fed either way; the exec event carries the parent, so reporting the fork
    # itself is opt-in (it doubled the events of a fork + exec storm)
    if src.ctx.emit_forks and src._process:
        src._emit(src.event(Action.FORK, child, epoch_ns=src.ctx.table.boot_epoch_ns + v[6]))


@handles(EventType.EXEC)
def _on_exec(src: TracepointSource, raw: bytes) -> None:
    r = decode_exec(raw)
    table = src.ctx.table
    known = table.get(r.h.pid)
    executable = resolve_path(r.filename, known.cwd if known else None) if r.filename else None
    if executable and executable.startswith("/"):
        # the kernel reports the name as called (/bin/true); symlinks resolved, it matches
        # /proc/<pid>/exe and what the other tiers report (/usr/bin/true)
        executable = src._realpath(executable)
    # refresh=False: the table keeps the cwd inherited at fork and updated by chdir events,
    # which is right for this moment; /proc/<pid>/cwd is "now", possibly after later chdirs
    # still in the ring (it is read only when the cwd is unknown).
    info = table.exec(
        r.h.pid,
        executable=executable if executable and executable.startswith("/") else None,
        args=r.args,
        args_truncated=r.args_truncated,
        uid=r.h.uid,
        gid=r.h.gid,
        comm=r.h.comm,
        refresh=False,
        cgroup_id=r.cgroup_id or None,
        # cgroup moves arrive as CGROUP records (and clone3 into a cgroup is flagged on the
        # fork), so the container inherited at fork stays right without a /proc read
        cgroups_tracked=True,
        loginuid=r.loginuid,
    )
    if r.h.pid in src._writes_by_pid:
        src._forget_writes(r.h.pid, cloexec_only=True)
    if src._process:
        ev = src.event(Action.EXEC, info, epoch_ns=src._epoch(r.h))
        if r.old_pid != r.h.pid:
            ev["process"]["thread"] = {"id": r.old_pid}  # exec from a non-leader thread
        src._emit(ev)


@handles(EventType.EXIT)
def _on_exit(src: TracepointSource, raw: bytes) -> None:
    if len(raw) < _EXIT_SIZE:
        raise DecodeError(f"exit record is {len(raw)} bytes, expected at least {_EXIT_SIZE}")
    v = _EXIT_S.unpack_from(raw)
    pid, ktime, flags = v[1], v[6], v[10]
    exit_code = v[8] if flags & EXIT_HAVE_CODE else None
    signal = v[9] if flags & EXIT_HAVE_SIGNAL else None
    # Killed by a signal: the code is -signal (Python's convention), never confused with a
    # genuine exit(137); the signal itself is in edr.exit_signal.
    code = exit_code if exit_code is not None else (-signal if signal else None)
    table = src.ctx.table
    info = table.exit(pid, code)
    if pid in src._writes_by_pid:
        src._forget_writes(pid)
    if src._process:
        ev = src.event(Action.EXIT, info, epoch_ns=table.boot_epoch_ns + ktime)
        if signal:
            ev["edr"]["exit_signal"] = signal
        src._emit(ev)


@handles(EventType.CGROUP)
def _on_cgroup(src: TracepointSource, raw: bytes) -> None:
    r = decode_cgroup(raw)
    src.ctx.table.refresh_container(r.target_pid, r.path)


@handles(EventType.CHDIR)
def _on_chdir(src: TracepointSource, raw: bytes) -> None:
    r = decode_chdir(raw)
    if r.fd >= 0:
        cwd = procfs.link(r.h.pid, f"fd/{r.fd}") or procfs.link(r.h.pid, "cwd")
    else:
        known = src.ctx.table.get(r.h.pid)
        cwd = resolve_path(r.path, known.cwd if known else None)
        if not cwd.startswith("/"):
            cwd = procfs.link(r.h.pid, "cwd")
    if cwd:
        src.ctx.table.chdir(r.h.pid, cwd)


@handles(EventType.FILE)
def _on_file(src: TracepointSource, raw: bytes) -> None:
    r = decode_file(raw)
    if Family.FILE not in src.enabled or r.h.pid in src.ctx.ignored_pids:
        return
    if not r.emit & (FILE_REPORT | FILE_WATCH):
        return
    path, resolved = src._file_path(r.h.pid, r.path, r.dfd, r.fd)
    original = None
    if r.op is FileOp.RENAME:
        original, orig_ok = path, resolved
        path, resolved = src._file_path(r.h.pid, r.path2, r.dfd2, -1)
        resolved = resolved and orig_ok
        if not (src.ctx.filters.wants(path) or src.ctx.filters.wants(original)):
            src.filtered += 1
            return
    elif resolved and not src.ctx.filters.wants(path):
        src.filtered += 1
        return
    if r.op is FileOp.OPEN:
        if r.emit & FILE_WATCH and r.ret >= 0:
            src._watch_write(r, path, resolved)
        if not r.emit & FILE_REPORT:
            return
        # a plain write open is watched, not reported: its first write is the write event
        if r.flags & O_CREAT:
            action = Action.FILE_CREATE
        elif r.flags & O_TRUNC:
            action = Action.FILE_WRITE  # truncation modifies; such opens are not watched
        else:
            action = Action.FILE_OPEN
    else:
        action = {
            FileOp.UNLINK: Action.FILE_DELETE,
            FileOp.RMDIR: Action.FILE_DELETE,
            FileOp.RENAME: Action.FILE_RENAME,
            FileOp.CHMOD: Action.FILE_CHMOD,
            FileOp.CHOWN: Action.FILE_CHOWN,
        }[r.op]
    proc = src.ctx.table.lookup(r.h.pid)
    ev = src.file_event(
        action,
        proc,
        path,
        original_path=original,
        mode=r.mode if r.op is FileOp.CHMOD else None,
        uid=r.owner_uid if r.op is FileOp.CHOWN else None,
        gid=r.owner_gid if r.op is FileOp.CHOWN else None,
        epoch_ns=src._epoch(r.h),
        outcome="success" if r.ret >= 0 else "failure",
    )
    if r.ret < 0:
        ev["edr"]["errno"] = -r.ret
    if r.op is FileOp.RMDIR:
        ev["file"]["type"] = "dir"
    if not resolved:
        ev["edr"]["path_unresolved"] = True
    src._emit(ev)


@handles(EventType.FILE_WRITE)
def _on_file_write(src: TracepointSource, raw: bytes) -> None:
    r = decode_write(raw)
    if Family.FILE not in src.enabled or r.h.pid in src.ctx.ignored_pids:
        return
    watched = src._unwatch_write(r.h.pid, r.open_id)
    if watched is None:
        # an fd closed without close(2) (exec, close_range, exit) reused by another file, a
        # second fd of an already written open (dup2), or an open filtered in user space
        src.stale_writes += 1
        return
    path, resolved, _flags = watched
    ev = src.file_event(
        Action.FILE_WRITE, src.ctx.table.lookup(r.h.pid), path, epoch_ns=src._epoch(r.h)
    )
    if not resolved:
        ev["edr"]["path_unresolved"] = True
    src._emit(ev)


def _on_net(action: Action) -> Handler:
    def handle(src: TracepointSource, raw: bytes) -> None:
        r = decode_net(raw)
        if Family.NETWORK not in src.enabled or r.h.pid in src.ctx.ignored_pids:
            return
        proc = src.ctx.table.lookup(r.h.pid)
        if action is Action.CONNECT:
            source, destination = r.local, r.remote
        else:
            # accept: the peer is the source; listen: the local endpoint is where traffic goes
            source, destination = r.remote, r.local
        src._emit(
            src.network_event(
                action,
                proc,
                transport=r.transport,
                source=source,
                destination=destination,
                epoch_ns=src._epoch(r.h),
                outcome="success" if r.ret == 0 else "failure",
            )
        )

    handle.__name__ = f"_on_{action.value}"
    return handle


handles(EventType.CONNECT)(_on_net(Action.CONNECT))
handles(EventType.LISTEN)(_on_net(Action.LISTEN))
handles(EventType.ACCEPT)(_on_net(Action.ACCEPT))


# -- building the C ----------------------------------------------------------------------------


def _tracepoint_exists(category: str, name: str) -> bool:
    return (TRACEFS / "events" / category / name).is_dir()


def _tracepoint_has_field(category: str, name: str, field: str) -> bool:
    try:
        text = (TRACEFS / "events" / category / name / "format").read_text()
    except OSError:
        return False
    return re.search(rf"\b{re.escape(field)};", text) is not None


def _expand_includes(path: Path, seen: frozenset[str] = frozenset()) -> str:
    """The file with its ``#include "x.bpf.c"`` lines replaced by those files, in place."""

    def inline(m: re.Match[str]) -> str:
        name = m.group(1)
        if name in seen:
            raise ValueError(f"{name} includes itself")
        body = _expand_includes(BPF_DIR / name, seen | {name})
        line = text.count("\n", 0, m.start()) + 2
        return f'#line 1 "{name}"\n{body}\n#line {line} "{path.name}"'

    text = path.read_text()
    return _INCLUDE.sub(inline, text)


def bpf_source_text(families: Iterable[Family], tier: Tier) -> tuple[str, list[str]]:
    """The exact C and cflags the sensor compiles for these families in this tier."""
    fams = set(families)
    if tier not in (Tier.TRACEPOINT, Tier.KPROBE):
        raise ValueError(f"no BPF programs for the {tier.value} tier")
    unknown = fams - set(TracepointSource.families)
    if unknown or not fams:
        raise ValueError(f"families must be a non-empty subset of process, file, network: {fams}")
    cflags = [
        f"-I{BPF_DIR}",
        f"-DEDR_RINGBUF_PAGES={RINGBUF_BYTES // os.sysconf('SC_PAGE_SIZE')}",
        f"-DEDR_WAKE_EVERY={WAKE_EVERY}",
    ]
    for fam in sorted(fams, key=lambda f: f.value):
        cflags.append(f"-DEDR_{fam.value.upper()}=1")
    if _tracepoint_has_field("sched", "sched_process_exit", "group_dead"):
        cflags.append("-DEDR_HAVE_GROUP_DEAD=1")
    if _tracepoint_exists("syscalls", "sys_enter_open"):
        cflags.append("-DEDR_HAVE_LEGACY_SYSCALLS=1")  # x86_64 keeps open, creat, rename, ...
    if _tracepoint_exists("syscalls", "sys_enter_fchmodat2"):
        cflags.append("-DEDR_HAVE_FCHMODAT2=1")
    if tier is Tier.KPROBE:
        cflags.append("-DEDR_KPROBES=1")
    cflags.extend(f"-D{name}={value}" for name, value in sorted(_task_offsets().items()))
    return _expand_includes(BPF_DIR / "edr.bpf.c"), cflags


_TASK_OFFSETS: dict[str, int] | None = None


def _task_offsets() -> dict[str, int]:
    """task_struct offsets from the kernel's BTF, read once per process (it takes ~0.3 s)."""
    global _TASK_OFFSETS
    if _TASK_OFFSETS is None:
        _TASK_OFFSETS = task_offsets()
        if not _TASK_OFFSETS:
            log.info("no usable kernel BTF for task_struct: login uids come from /proc")
    return _TASK_OFFSETS


# -- environment -------------------------------------------------------------------------------

CAP_SYS_ADMIN, CAP_PERFMON, CAP_BPF = 21, 38, 39


def _effective_caps() -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("CapEff:"):
                return int(line.split()[1], 16)
    except (OSError, ValueError):
        pass
    return 0


def kernel_headers() -> Path | None:
    """Where BCC will find kernel headers; sets BCC_KERNEL_SOURCE to the generic set if needed."""
    env = os.environ.get("BCC_KERNEL_SOURCE")
    if env:
        return Path(env) if (Path(env) / "include").is_dir() else None
    build = Path(f"/lib/modules/{os.uname().release}/build")
    if (build / "include").is_dir():
        return build
    if (GENERIC_HEADERS / "include").is_dir():
        os.environ["BCC_KERNEL_SOURCE"] = str(GENERIC_HEADERS)
        return GENERIC_HEADERS
    return None


def headers_release(headers: Path) -> str | None:
    try:
        text = (headers / "include/generated/utsrelease.h").read_text()
    except OSError:
        return None
    m = re.search(r'UTS_RELEASE\s+"([^"]+)"', text)
    return m.group(1) if m else None


def ensure_tracefs() -> bool:
    """Mount tracefs at /sys/kernel/tracing when it is not; True when events are visible."""
    if (TRACEFS / "events").is_dir():
        return True
    if os.geteuid() == 0 and TRACEFS.is_dir():
        subprocess.run(
            ["mount", "-t", "tracefs", "nodev", str(TRACEFS)],
            check=False,
            capture_output=True,
            timeout=10,
        )
    return (TRACEFS / "events").is_dir()


def _bcc_importable() -> bool:
    try:
        import bcc  # noqa: F401
    except ImportError:
        return False
    return True


# -- the source --------------------------------------------------------------------------------


class TracepointSource(Source):
    """Process, file and network capture from BCC tracepoint programs."""

    tier: ClassVar[Tier] = Tier.TRACEPOINT
    families: ClassVar[frozenset[Family]] = frozenset({Family.PROCESS, Family.FILE, Family.NETWORK})

    def __init__(self, ctx: CaptureContext, families: frozenset[Family]) -> None:
        super().__init__(ctx, families)
        self._bpf: Any = None
        self._ring: RingReader | None = None
        self._batch: list[bytes] = []
        # events built while a batch is processed, handed over together at its end
        self._pending: list[Event] | None = None
        self._realpath = RealpathCache()
        self._process = Family.PROCESS in self.enabled  # checked per process record
        self._lock = threading.Lock()
        self._closed = False
        self._last_counters = 0.0
        self.per_type: dict[str, int] = {}
        self.decode_errors = 0
        self.handler_errors = 0
        self.filtered = 0
        self.received = 0
        self.stale_writes = 0
        # (tgid, open_id) -> (path, resolved, open flags) of opens the kernel watches for a
        # first write; bounded like the kernel's LRU map, oldest dropped first
        self._writes: OrderedDict[tuple[int, int], tuple[str, bool, int]] = OrderedDict()
        self._writes_by_pid: dict[int, set[int]] = {}  # tgid -> its open_ids in _writes
        self._hot = self._compiled_path()

    def _compiled_path(self) -> Any:
        """The C record loop (sensor/_hotpath.c) when it is built and wanted, else ``None``.

        ``EDR_HOTPATH=0`` forces the Python path (tests compare both).
        """
        if _hotpath is None or os.environ.get("EDR_HOTPATH", "1") == "0":
            return None
        try:
            return _hotpath.Hot(
                src=self,
                table=self.ctx.table,
                host=self.ctx.host,
                tier=self.tier.value,
                schema=SCHEMA_VERSION,
                skeletons=tuple(event_skeleton(a) for a in (Action.FORK, Action.EXEC, Action.EXIT)),
                by_tag=_BY_TAG,
                decode_error=DecodeError,
                unknown=UNKNOWN,
                info_type=ProcessInfo,
                user_names=process_table._user_names,
                user_name=process_table.user_name,
                resolve_path=resolve_path,
                realpath=self._realpath,
                monotonic=time.monotonic,
                proc_link=procfs.link,
                proc_cmdline=procfs.cmdline,
                proc_loginuid=procfs.loginuid,
                clk_tck=procfs.CLK_TCK,
                exited_kept=process_table.EXITED_KEPT,
                record_failed=self._record_failed,
                encode=orjson.dumps,
            )
        except (TypeError, AttributeError, ValueError) as exc:
            # e.g. a ProcessInfo with a field the C side does not know: correct, just slower
            log.warning("%s: compiled record path unusable (%s); using Python", self.name, exc)
            return None

    @property
    def compiled(self) -> bool:
        """Whether fork, exec and exit records go through the C path."""
        return self._hot is not None

    # -- availability ---------------------------------------------------------------------

    @classmethod
    def unavailable(cls) -> str | None:
        caps = _effective_caps()
        if (
            os.geteuid() != 0
            and not (caps & (1 << CAP_BPF) and caps & (1 << CAP_PERFMON))
            and not caps & (1 << CAP_SYS_ADMIN)
        ):
            return "needs root, or CAP_BPF and CAP_PERFMON, to load BPF programs"
        if not _bcc_importable():
            return "BCC is not importable (install python3-bpfcc; scripts/setup.sh links it in)"
        if kernel_headers() is None:
            return (
                f"no kernel headers for BCC: neither BCC_KERNEL_SOURCE, "
                f"/lib/modules/{os.uname().release}/build nor {GENERIC_HEADERS} "
                "(run scripts/setup.sh)"
            )
        if not ensure_tracefs():
            return f"tracefs is not mounted at {TRACEFS} and could not be mounted"
        for cat, name in (("sched", "sched_process_exec"), ("syscalls", "sys_enter_openat")):
            if not _tracepoint_exists(cat, name):
                return f"the kernel lacks the tracepoint {cat}:{name}"
        return None

    # -- lifecycle --------------------------------------------------------------------------

    def open(self) -> None:
        reason = self.unavailable()
        if reason:
            raise TierUnavailable(reason)
        if not self.enabled:
            raise TierUnavailable(f"{self.tier.value}: no families to capture")
        from bcc import BPF

        text, cflags = bpf_source_text(self.enabled, self.tier)
        try:
            self._bpf = BPF(text=text.encode(), cflags=cflags)
        except Exception as exc:  # BCC raises bare Exception for compile and load errors
            self.close()
            raise TierUnavailable(
                f"BCC could not load the {self.tier.value} programs: {exc}"
            ) from exc
        try:
            self._fill_maps()
            self._ring = RingReader(self._bpf[b"events"].map_fd, RINGBUF_BYTES)
        except Exception:
            self.close()
            raise
        log.info("%s loaded: %d tracepoints", self.name, self._bpf.num_open_tracepoints())

    def _fill_maps(self) -> None:
        bpf = self._bpf
        ignored = bpf[b"ignored_tgids"]
        for pid in self.ctx.ignored_pids:
            ignored[ignored.Key(pid)] = ignored.Leaf(1)
        if Family.FILE in self.enabled:
            filters = self.ctx.filters
            self._fill_prefixes(bpf[b"exclude_prefixes"], filters.exclude_prefixes)
            self._fill_prefixes(bpf[b"sensitive_prefixes"], filters.sensitive_read_prefixes)
            heads = bpf[b"sensitive_heads"]
            words = head_words(prefix_heads(filters.sensitive_read_prefixes))
            for index, word in words.items():
                heads[heads.Key(index)] = heads.Leaf(word)

    @staticmethod
    def _fill_prefixes(trie: Any, prefixes: Iterable[str]) -> None:
        for prefix in prefixes:
            data = prefix.encode()
            if not prefix.startswith("/") or not 0 < len(data) <= 64:
                raise TierUnavailable(
                    f"path prefix {prefix!r} must be absolute and at most 64 bytes for the "
                    "kernel filter"
                )
            key = trie.Key()
            key.prefixlen = len(data) * 8
            key.data = data  # a c_char array field takes bytes, zero-filled after
            trie[key] = trie.Leaf(1)

    def run(self, stop: threading.Event) -> None:
        while not stop.is_set():
            with self._lock:
                ring = self._ring
                if ring is None:
                    return
                # No wake-ups for most events: the wait ends on a forced wake-up or the
                # timer, and consume copies out whatever is committed by then.
                ring.wait(POLL_MS / 1000)
                ring.consume(self._batch)
            self.process_batch()
            if time.monotonic() - self._last_counters > COUNTER_REFRESH_S:
                self.counters()
        self.drain()

    def drain(self) -> None:
        """Consume and handle what is in the ring now (tests and shutdown use it)."""
        with self._lock:
            if self._ring is not None:
                self._ring.consume(self._batch)
        self.process_batch()

    def process_batch(self) -> int:
        """Handle the copied records; their events go to the pipeline as one batch."""
        batch, self._batch = self._batch, []
        if not batch:
            return 0
        pending: list[Event] = []
        self._pending = pending
        try:
            self._handle(batch)
        finally:
            self._pending = None
            if pending:
                try:
                    self.ctx.emit_batch(pending)
                except Exception:
                    self.handler_errors += 1
                    log.exception("%s: handing over %d events failed", self.name, len(pending))
        return len(batch)

    def handle_record(self, raw: bytes) -> None:
        """Decode and dispatch one raw record; bad records are counted and logged, never fatal."""
        self._handle([raw])

    def _handle(self, records: list[bytes]) -> None:
        # one loop over a whole batch: the per-record work stays inside it
        self.received += len(records)
        if self._hot is not None:
            self._hot.handle(records, self._pending)  # the same loop, in C
            return
        by_tag = _BY_TAG
        for raw in records:
            try:
                handler = by_tag.get(record_type(raw))
                if handler is None:
                    raise DecodeError(f"record with unknown type tag {record_type(raw)}")
                handler(self, raw)
            except Exception as exc:
                self._record_failed(raw, exc)

    def _record_failed(self, raw: bytes, exc: Exception) -> None:
        """A record that could not be handled: counted and logged, never fatal."""
        if isinstance(exc, DecodeError | struct.error):
            self.decode_errors += 1
            log.warning("%s: undecodable record of %d bytes: %s", self.name, len(raw), exc)
        else:
            self.handler_errors += 1
            log.error("%s: handling a record failed", self.name, exc_info=exc)

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            bpf, self._bpf = self._bpf, None
            ring, self._ring = self._ring, None
        if ring is not None:
            ring.close()
        if bpf is not None:
            try:
                self._read_counters(bpf)
            except Exception:  # counters are best effort once detaching
                log.debug("reading counters at close failed", exc_info=True)
            bpf.cleanup()

    # -- counters ---------------------------------------------------------------------------

    def counters(self) -> dict[str, int]:
        bpf = self._bpf
        if bpf is not None:
            self._read_counters(bpf)
        out = {"submitted": self.submitted, "dropped": self.dropped}
        out.update(self.per_type)
        out.update(
            received=self.received,
            decode_errors=self.decode_errors,
            handler_errors=self.handler_errors,
            filtered=self.filtered,
            stale_writes=self.stale_writes,
            watched_writes=len(self._writes),
            realpath_hits=self._realpath.hits,
            realpath_misses=self._realpath.misses,
        )
        return out

    def _read_counters(self, bpf: Any) -> None:
        table = bpf[b"counters"]
        submitted = dropped = 0
        per_type: dict[str, int] = {}
        for kind in EventType:
            cpus = table[ctypes.c_int(int(kind))]
            s = sum(c.submitted for c in cpus)
            d = sum(c.dropped for c in cpus)
            per_type[f"submitted.{kind.name.lower()}"] = s
            per_type[f"dropped.{kind.name.lower()}"] = d
            submitted += s
            dropped += d
        self.submitted, self.dropped, self.per_type = submitted, dropped, per_type
        self._last_counters = time.monotonic()

    # -- helpers for handlers ---------------------------------------------------------------

    def _watch_write(self, r: FileRecord, path: str, resolved: bool) -> None:
        """Remember the path of an open the kernel watches for its first write."""
        pid, open_id = r.h.pid, r.h.ktime_ns
        self._writes[(pid, open_id)] = (path, resolved, r.flags)
        self._writes_by_pid.setdefault(pid, set()).add(open_id)
        while len(self._writes) > WRITE_WATCH_ENTRIES:
            (old_pid, old_id), _ = self._writes.popitem(last=False)
            self._unindex_write(old_pid, old_id)

    def _unwatch_write(self, pid: int, open_id: int) -> tuple[str, bool, int] | None:
        watched = self._writes.pop((pid, open_id), None)
        if watched is not None:
            self._unindex_write(pid, open_id)
        return watched

    def _unindex_write(self, pid: int, open_id: int) -> None:
        ids = self._writes_by_pid.get(pid)
        if ids is not None:
            ids.discard(open_id)
            if not ids:
                del self._writes_by_pid[pid]

    def _forget_writes(self, pid: int, *, cloexec_only: bool = False) -> None:
        """Drop a process's watched opens: all at exit, the O_CLOEXEC ones at exec."""
        for open_id in list(self._writes_by_pid.get(pid, ())):
            if not cloexec_only or self._writes[(pid, open_id)][2] & O_CLOEXEC:
                self._unwatch_write(pid, open_id)

    def _epoch(self, h: Header) -> int:
        return self.ctx.table.boot_epoch_ns + h.ktime_ns

    def _emit(self, ev: Event) -> None:
        pending = self._pending
        if pending is not None:
            pending.append(ev)
        else:
            self.ctx.emit(ev)

    def _file_path(self, pid: int, path: str, dfd: int, fd: int) -> tuple[str, bool]:
        """Absolute path for a file operation and whether it could be resolved."""
        if fd >= 0 or (not path and dfd >= 0):
            target = procfs.link(pid, f"fd/{fd if fd >= 0 else dfd}")
            if target is None:
                return path or f"fd:{fd if fd >= 0 else dfd}", False
            return target, True
        if path.startswith("/"):
            return resolve_path(path, None), True
        if dfd == AT_FDCWD:
            info: ProcessInfo | None = self.ctx.table.get(pid)
            base = info.cwd if info else None
            if base is None:
                base = procfs.link(pid, "cwd")
        else:
            base = procfs.link(pid, f"fd/{dfd}")
        if base is None:
            return path, False
        return resolve_path(path, base), True


class KprobeSource(TracepointSource):
    """The tracepoint programs plus struct-reading enrichment (kprobe.bpf.c).

    UNTESTED HERE: this machine's kernel has no kprobes; it runs only where the kernel has
    CONFIG_KPROBES and the headers match the running kernel (the QEMU harness).
    """

    tier: ClassVar[Tier] = Tier.KPROBE

    @classmethod
    def unavailable(cls) -> str | None:
        reason = super().unavailable()
        if reason:
            return reason
        if not (TRACEFS / "kprobe_events").exists():
            return f"the kernel has no kprobes (CONFIG_KPROBES unset: no {TRACEFS}/kprobe_events)"
        headers = kernel_headers()
        release = headers_release(headers) if headers else None
        if release != os.uname().release:
            return (
                f"kernel headers at {headers} are for {release or 'an unknown kernel'}, not the "
                f"running {os.uname().release}: struct reads would be wrong"
            )
        return None

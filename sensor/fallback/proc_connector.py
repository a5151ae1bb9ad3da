"""Process events from the netlink proc connector: fork, exec and exit, no BPF needed.

The kernel multicasts one message per fork/exec/exit to listeners of ``CN_IDX_PROC``.
Subscribing is answered only for callers in the initial user and pid namespaces (others are
ignored silently, which :func:`_subscribe` detects by the missing answer); older kernels also
demand CAP_NET_ADMIN and answer EPERM. *Measured* on kernel 6.18 here: an unprivileged user
(``nobody``) in the initial namespaces is allowed to subscribe and receives every event.
When refused, the runner uses :class:`ProcPollSource` instead
(:func:`sensor.fallback.choose_process_source` makes that choice and says why).

Why a raw ``socket(AF_NETLINK, SOCK_DGRAM, NETLINK_CONNECTOR)`` and not pyroute2's
``ProcEventSocket``: in pyroute2 0.9.7 a receive error such as ENOBUFS (the socket buffer
overflowed, events were lost) is turned into a synthetic message that ``ProcEventMarshal``
(``error_type = -1``, keyed on the ``what`` field) cannot decode, so drops would go
unnoticed; its ``get()`` also blocks with no timeout, which would keep ``run`` from noticing
``stop``. The wire format is small and fixed, so ``struct`` decodes it directly.

The message carries only pids: argv, executable and cwd are read from /proc as soon as the
exec arrives. A process that exits before that (``/bin/true`` can) is reported with what is
known and ``edr.incomplete`` saying so; its image is never guessed from the parent.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import secrets
import select
import socket
import struct
import threading
import time
from dataclasses import dataclass
from typing import ClassVar

from backplane.schema import Action, Family, Tier
from sensor import procfs
from sensor.capture import CaptureContext, Source, TierUnavailable

log = logging.getLogger(__name__)

NETLINK_CONNECTOR = 11
CN_IDX_PROC = 1
CN_VAL_PROC = 1
PROC_CN_MCAST_LISTEN = 1
PROC_CN_MCAST_IGNORE = 2
NLMSG_ERROR = 2
NLMSG_DONE = 3

PROC_EVENT_NONE = 0x0
PROC_EVENT_FORK = 0x1
PROC_EVENT_EXEC = 0x2
PROC_EVENT_EXIT = 0x80000000

_NLMSGHDR = struct.Struct("=IHHII")  # len, type, flags, seq, pid
_CN_MSG = struct.Struct("=IIIIHH")  # idx, val, seq, ack, len, flags
_EVENT_HEAD = struct.Struct("=IIQ")  # what, cpu, timestamp_ns (CLOCK_MONOTONIC)
_FORK = struct.Struct("=IIII")  # parent_pid, parent_tgid, child_pid, child_tgid
_EXEC = struct.Struct("=II")  # process_pid, process_tgid
_EXIT = struct.Struct("=IIIIII")  # pid, tgid, exit_code, exit_signal, parent_pid, parent_tgid
_ACK = struct.Struct("=I")  # event_data.ack.err for PROC_EVENT_NONE

RCVBUF_BYTES = 8 << 20
POLL_TIMEOUT_S = 0.2
ACK_TIMEOUT_S = 1.0
DRAIN_MAX = 4096  # messages per batch, so a storm cannot starve the stop check
KTHREADD_PID = 2


@dataclass(frozen=True, slots=True)
class ProcMessage:
    """One decoded proc-connector event (only the kinds the sensor uses)."""

    what: int
    timestamp_ns: int  # CLOCK_MONOTONIC
    pid: int = 0  # thread id (fork: the child's)
    tgid: int = 0  # process id (fork: the child's)
    parent_tgid: int = 0
    exit_status: int = 0  # wait(2) status: (code << 8) | signal | core-dump bit
    ack_err: int = 0  # PROC_EVENT_NONE: the kernel's answer to a subscription
    seq: int = 0  # cn_msg seq/ack: an answer carries the request's ack + 1
    ack: int = 0


def control_message(op: int, seq: int = 0, ack: int = 0) -> bytes:
    """The netlink datagram that subscribes (``PROC_CN_MCAST_LISTEN``) or unsubscribes."""
    payload = struct.pack("=I", op)
    cn = _CN_MSG.pack(CN_IDX_PROC, CN_VAL_PROC, seq, ack, len(payload), 0) + payload
    return _NLMSGHDR.pack(_NLMSGHDR.size + len(cn), NLMSG_DONE, 0, seq, 0) + cn


def decode(datagram: bytes) -> list[ProcMessage]:
    """Decode every proc event in one datagram; unknown kinds and short records are skipped.

    Raises:
        OSError: the datagram is a netlink error message (its errno is carried over).
    """
    out: list[ProcMessage] = []
    offset = 0
    while offset + _NLMSGHDR.size <= len(datagram):
        length, mtype, _flags, _seq, _pid = _NLMSGHDR.unpack_from(datagram, offset)
        if length < _NLMSGHDR.size or offset + length > len(datagram):
            break  # truncated or corrupt: nothing after it can be trusted
        body = offset + _NLMSGHDR.size
        if mtype == NLMSG_ERROR and length >= _NLMSGHDR.size + 4:
            (err,) = struct.unpack_from("=i", datagram, body)
            if err:
                raise OSError(-err, os.strerror(-err))
        elif mtype == NLMSG_DONE:
            msg = _decode_event(datagram, body, offset + length)
            if msg is not None:
                out.append(msg)
        offset += (length + 3) & ~3  # NLMSG_ALIGN
    return out


def _decode_event(whole: bytes, start: int, end: int) -> ProcMessage | None:
    # Only this message's bytes: a record cut short must not borrow the next message's.
    buf = memoryview(whole)[:end]
    if start + _CN_MSG.size + _EVENT_HEAD.size > end:
        return None
    idx, val, seq, ack, *_ = _CN_MSG.unpack_from(buf, start)
    if (idx, val) != (CN_IDX_PROC, CN_VAL_PROC):
        return None
    at = start + _CN_MSG.size
    what, _cpu, ts = _EVENT_HEAD.unpack_from(buf, at)
    at += _EVENT_HEAD.size
    try:
        if what == PROC_EVENT_FORK:
            _ppid, ptgid, cpid, ctgid = _FORK.unpack_from(buf, at)
            return ProcMessage(what, ts, pid=cpid, tgid=ctgid, parent_tgid=ptgid)
        if what == PROC_EVENT_EXEC:
            pid, tgid = _EXEC.unpack_from(buf, at)
            return ProcMessage(what, ts, pid=pid, tgid=tgid)
        if what == PROC_EVENT_EXIT:
            pid, tgid, status, _sig, _ppid, ptgid = _EXIT.unpack_from(buf, at)
            return ProcMessage(what, ts, pid=pid, tgid=tgid, parent_tgid=ptgid, exit_status=status)
        if what == PROC_EVENT_NONE:
            (err,) = _ACK.unpack_from(buf, at) if at + _ACK.size <= end else (0,)
            return ProcMessage(what, ts, ack_err=err, seq=seq, ack=ack)
    except struct.error:
        return None
    return None


def split_status(status: int) -> tuple[int | None, int | None, bool]:
    """``(exit_code, signal, core_dumped)`` from a wait(2) status word."""
    sig = status & 0x7F
    if sig:
        return None, sig, bool(status & 0x80)
    return (status >> 8) & 0xFF, None, False


class ProcConnectorSource(Source):
    """fork/exec/exit from the proc connector (initial namespaces; CAP_NET_ADMIN on old kernels).

    Every process is seen, however short-lived, but argv/executable/cwd come from /proc after
    the fact. ENOBUFS on the socket means the kernel discarded events because we fell behind:
    each occurrence is counted in ``dropped`` and ``enobufs`` (a lower bound: the kernel does not
    say how many were lost) and logged.
    """

    tier: ClassVar[Tier] = Tier.FALLBACK
    families: ClassVar[frozenset[Family]] = frozenset({Family.PROCESS})

    def __init__(
        self,
        ctx: CaptureContext,
        families: frozenset[Family],
        *,
        emit_forks: bool = True,
        rcvbuf: int = RCVBUF_BYTES,
    ) -> None:
        super().__init__(ctx, families)
        self.emit_forks = emit_forks
        self.rcvbuf = rcvbuf
        self._sock: socket.socket | None = None
        self._close_lock = threading.Lock()
        self._mono_to_epoch_ns = 0
        self.enobufs = 0
        self.incomplete = 0
        self.received = 0

    @classmethod
    def unavailable(cls) -> str | None:
        """Try a real subscription: only the kernel knows whether it will allow it."""
        try:
            sock = _subscribe(rcvbuf=0)
        except TierUnavailable as exc:
            return str(exc)
        sock.close()
        return None

    def open(self) -> None:
        self._sock = _subscribe(rcvbuf=self.rcvbuf)
        self._mono_to_epoch_ns = time.time_ns() - time.monotonic_ns()

    def run(self, stop: threading.Event) -> None:
        sock = self._sock
        if sock is None:
            raise RuntimeError("ProcConnectorSource.run called before open")
        poller = select.poll()
        poller.register(sock.fileno(), select.POLLIN)
        while not stop.is_set():
            if not poller.poll(POLL_TIMEOUT_S * 1000):
                continue
            messages = self._drain(sock)
            if messages is None:
                return
            # Short-lived processes vanish within a millisecond: read /proc for every exec in
            # the batch first, then do the slower table and event work.
            snaps = {
                m.tgid: _snapshot(m.tgid, self.ctx) for m in messages if m.what == PROC_EVENT_EXEC
            }
            for msg in messages:
                self.received += 1
                self.handle(msg, snaps.get(msg.tgid) if msg.what == PROC_EVENT_EXEC else None)

    def _drain(self, sock: socket.socket) -> list[ProcMessage] | None:
        """Every message queued on the socket now; ``None`` when the socket was closed."""
        messages: list[ProcMessage] = []
        while len(messages) < DRAIN_MAX:
            try:
                data = sock.recv(65536, socket.MSG_DONTWAIT)
            except BlockingIOError:
                break
            except OSError as exc:
                if exc.errno == errno.ENOBUFS:
                    self._overflow()
                    continue
                if self._sock is None:  # closed under us by close()
                    return None
                raise
            try:
                messages.extend(decode(data))
            except OSError as exc:
                if exc.errno == errno.ENOBUFS:
                    self._overflow()
                else:
                    log.warning("proc connector: netlink error %s", exc)
        return messages

    def _overflow(self) -> None:
        self.enobufs += 1
        self.dropped += 1
        log.warning("proc connector: socket buffer overflowed (ENOBUFS), process events lost")

    def handle(self, msg: ProcMessage, snap: Snapshot | None = None) -> None:
        """Turn one decoded message into table updates and events.

        ``snap`` is what /proc showed for an exec'd process; read now when not given.
        """
        ignored = self.ctx.ignored_pids
        epoch_ns = msg.timestamp_ns + self._mono_to_epoch_ns
        if msg.what == PROC_EVENT_FORK:
            # A new thread (pid != tgid) is not a new process; kernel threads are not reported.
            if msg.pid != msg.tgid or msg.parent_tgid == KTHREADD_PID or msg.tgid in ignored:
                return
            info = self.ctx.table.fork(msg.parent_tgid, msg.tgid)
            if self.emit_forks:
                self._emit(self.event(Action.FORK, info, epoch_ns=epoch_ns))
        elif msg.what == PROC_EVENT_EXEC:
            if msg.tgid in ignored:
                return
            self._exec(msg.tgid, epoch_ns, snap or _snapshot(msg.tgid, self.ctx))
        elif msg.what == PROC_EVENT_EXIT:
            # Threads exit one by one; the process is gone when its leader exits.
            if msg.pid != msg.tgid or msg.tgid in ignored or msg.parent_tgid == KTHREADD_PID:
                return
            code, sig, core = split_status(msg.exit_status)
            # As in every tier: killed by a signal is exit_code -signal (never confused with a
            # genuine exit(137)), the signal itself in edr.exit_signal.
            info = self.ctx.table.exit(msg.tgid, -sig if sig is not None else code)
            ev = self.event(Action.EXIT, info, epoch_ns=epoch_ns)
            if sig is not None:
                ev["edr"]["exit_signal"] = sig
                ev["edr"]["core_dumped"] = core
            self._emit(ev)
        elif msg.what == PROC_EVENT_NONE and msg.ack_err:
            log.warning("proc connector: kernel reported error %d", msg.ack_err)

    def _exec(self, pid: int, epoch_ns: int, snap: Snapshot) -> None:
        exe, argv, st, creds = snap
        args, truncated = argv if argv and argv[0] else ([], False)
        info = self.ctx.table.exec(
            pid,
            executable=exe,
            args=args,
            args_truncated=truncated,
            uid=creds[0] if creds else None,
            gid=creds[1] if creds else None,
            comm=st[0] if st else None,
        )
        if exe is None:
            # Gone: the table would otherwise keep the image it inherited from the parent at
            # fork, which would be a lie about this process.
            info.executable = None
            if st is None:
                info.comm = ""
        ev = self.event(Action.EXEC, info, epoch_ns=epoch_ns)
        if exe is None or not args:
            self.incomplete += 1
            missing = [n for n, ok in (("executable", exe), ("args", args)) if not ok]
            ev["edr"]["incomplete"] = (
                f"{' and '.join(missing)} unavailable: the process exited before /proc was read"
            )
        self._emit(ev)

    def _emit(self, ev: dict) -> None:
        self.ctx.emit(ev)
        self.submitted += 1

    def close(self) -> None:
        with self._close_lock:
            sock, self._sock = self._sock, None
        if sock is None:
            return
        # Unsubscribing is a courtesy; closing the socket ends delivery anyway.
        with contextlib.suppress(OSError):
            sock.send(control_message(PROC_CN_MCAST_IGNORE))
        sock.close()

    def counters(self) -> dict[str, int]:
        return {
            **super().counters(),
            "received": self.received,
            "enobufs": self.enobufs,
            "incomplete": self.incomplete,
        }


Snapshot = tuple[
    str | None, tuple[list[str], bool] | None, tuple[str, int, int] | None, tuple[int, int] | None
]


def _snapshot(pid: int, ctx: CaptureContext) -> Snapshot:
    """``(exe, argv, stat, ids)`` of a process right now; argv first, it matters most."""
    argv = procfs.cmdline(pid, ctx.max_args, ctx.max_arg_bytes)
    exe = procfs.link(pid, "exe")
    # A zombie still has its comm in stat; its credentials matter for setuid images.
    return exe, argv, procfs.stat(pid), procfs.ids(pid)


def _subscribe(rcvbuf: int) -> socket.socket:
    """Open, bind and subscribe a proc-connector socket, or raise ``TierUnavailable``."""
    try:
        sock = socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, NETLINK_CONNECTOR)
    except OSError as exc:
        raise TierUnavailable(f"proc connector: cannot create netlink socket: {exc}") from exc
    try:
        if rcvbuf:
            try:
                # SO_RCVBUFFORCE (root) passes rmem_max: bursts of forks need the room.
                sock.setsockopt(socket.SOL_SOCKET, 33, rcvbuf)  # SO_RCVBUFFORCE
            except OSError:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.bind((0, CN_IDX_PROC))
        # Answers are multicast to every listener: a random ack tells ours apart from another
        # program's subscription answered at the same moment (the kernel echoes ack + 1; its
        # seq is the kernel's own counter on 6.18, so it cannot be matched).
        seq, ack = secrets.randbits(32), secrets.randbits(31)
        sock.send(control_message(PROC_CN_MCAST_LISTEN, seq, ack))
        # The kernel answers the subscription with a PROC_EVENT_NONE carrying an error code.
        # No answer at all means it ignored us: requests from outside the initial user and
        # pid namespaces are dropped silently, and then no events would ever arrive.
        sock.settimeout(ACK_TIMEOUT_S)
        deadline = time.monotonic() + ACK_TIMEOUT_S
        acked = False
        while not acked and time.monotonic() < deadline:
            try:
                data = sock.recv(65536)
            except TimeoutError:
                break
            for msg in decode(data):
                if msg.what == PROC_EVENT_NONE and msg.ack == ack + 1:
                    if msg.ack_err:
                        raise OSError(msg.ack_err, os.strerror(msg.ack_err))
                    acked = True
                    break
        if not acked:
            raise TierUnavailable(
                "proc connector did not answer the subscription (not in the initial user and "
                "pid namespaces?)"
            )
        sock.settimeout(None)
        sock.setblocking(False)
    except TierUnavailable:
        sock.close()
        raise
    except OSError as exc:
        sock.close()
        why = exc.strerror or str(exc)
        if exc.errno in (errno.EPERM, errno.EACCES):
            why = "EPERM: this kernel needs CAP_NET_ADMIN in the initial user namespace"
        raise TierUnavailable(f"proc connector refused ({why})") from exc
    return sock

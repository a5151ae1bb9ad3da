"""The controller's side of the backplane: a ZeroMQ ROUTER carrying one TLS session per peer.

Each ROUTER routing id is one sensor connection and owns one :class:`~backplane.tls.TlsSession`;
a DEALER that reconnects gets a new routing id and so a fresh handshake. The host identity comes
from the verified client certificate, never from a message. Everything the server learns goes
to a :class:`ControllerHooks` implementation (the controller's store); an EVENTS batch is acked
only after ``commit_batch`` returned, which is what makes delivery at-least-once with no loss.

Memory is bounded per session: a message larger than ``max_message`` is a protocol error, ZMQ
frames above ``max_frame`` are refused by libzmq, and at most ``max_pending`` decoded messages
may wait for the (possibly slow) store; a sensor keeps a small window of unacked batches, so a
slow store slows sensors down instead of growing the queue. A sensor that exceeds the window is
dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import ssl
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import zmq
import zmq.asyncio

from backplane.messages import (
    DEFAULT_MAX_MESSAGE,
    PROTOCOL_VERSION,
    Ack,
    Command,
    CommandResult,
    Error,
    Events,
    Heartbeat,
    Hello,
    Message,
    Policy,
    PolicyAck,
    ProtocolError,
    RenewRequest,
    RenewResponse,
)
from backplane.tls import Revocations, TlsError, TlsSession, server_context

log = logging.getLogger(__name__)


class ControllerHooks(Protocol):
    """What the backplane needs from the controller's store. All calls run on the loop."""

    async def on_hello(self, host_id: str, hello: Hello, peer: str) -> None:
        """A sensor connected and authenticated (``peer`` is its address, for display)."""

    async def commit_batch(
        self, host_id: str, seq: int, events: list[dict[str, Any]], dropped: int
    ) -> bool:
        """Store a batch durably before returning. False when (host, seq) was already stored."""
        ...

    async def on_heartbeat(self, host_id: str, heartbeat: Heartbeat) -> None: ...

    async def pending_commands(self, host_id: str) -> list[Command]:
        """Commands for the host that have no result yet, oldest first."""
        ...

    async def command_result(self, host_id: str, result: CommandResult) -> None: ...

    async def current_policy(self, host_id: str) -> Policy | None: ...

    async def policy_applied(self, host_id: str, version: int) -> None: ...

    async def renew(self, host_id: str, csr_pem: bytes) -> bytes:
        """Sign a renewal CSR for the host; raise ValueError to refuse."""
        ...

    async def on_disconnect(self, host_id: str, reason: str) -> None: ...


@dataclass
class ServerConfig:
    endpoint: str  # e.g. "tcp://0.0.0.0:5555"; port 0 picks a free port
    ca_file: Path
    cert_file: Path
    key_file: Path | None
    crl_file: Path
    max_message: int = DEFAULT_MAX_MESSAGE
    max_frame: int = 1024 * 1024  # TLS records are ≤ 16 KiB; the client sends ≤ 256 KiB
    max_pending: int = 64  # decoded messages waiting for the store, per session
    max_sessions: int = 10_000
    handshake_timeout: float = 10.0
    heartbeat_timeout: float = 30.0  # no traffic this long: the peer is dead
    sweep_interval: float = 0.5


@dataclass
class _Conn:
    rid: bytes
    peer: str
    tls: Any  # TlsSession, or the benchmark's plain stand-in
    last_seen: float
    queue: asyncio.Queue[Message] = field(default_factory=asyncio.Queue)
    worker: asyncio.Task[None] | None = None
    hello: Hello | None = None
    sent_commands: set[str] = field(default_factory=set)
    policy_sent: int | None = None
    closed: bool = False

    @property
    def host_id(self) -> str | None:
        return self.tls.peer_host_id  # type: ignore[no-any-return]


class BackplaneServer:
    """Asyncio ZMQ ROUTER server. Protocol logic lives in the loop-agnostic TlsSession."""

    def __init__(
        self,
        config: ServerConfig,
        hooks: ControllerHooks,
        *,
        context: zmq.asyncio.Context | None = None,
        clock: Callable[[], float] = time.monotonic,
        _session_factory: Callable[[], Any] | None = None,
    ) -> None:
        self.config = config
        self.hooks = hooks
        self._own_ctx = context is None
        self._zctx = context or zmq.asyncio.Context()
        self._clock = clock
        self._ssl: ssl.SSLContext | None = None
        self._revoked: Revocations | None = None
        self._crl_mtime: float = 0.0
        self._session_factory = _session_factory
        self.sessions: dict[bytes, _Conn] = {}
        # Routing ids we closed; their further frames get an empty "reset" frame so the
        # sensor reconnects at once instead of waiting for its dead-peer timeout.
        self._closed: OrderedDict[bytes, None] = OrderedDict()
        self._sock: zmq.asyncio.Socket | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self.endpoint: str | None = None
        self.refused = 0  # handshakes refused, for metrics and tests
        self._bg: set[asyncio.Task[Any]] = set()

    # -- lifecycle ---------------------------------------------------------------------------
    async def start(self) -> str:
        """Bind and start serving; returns the bound endpoint (with the real port)."""
        if self._session_factory is None:
            self.reload_crl()
        sock = self._zctx.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        sock.setsockopt(zmq.MAXMSGSIZE, self.config.max_frame)
        sock.setsockopt(zmq.SNDHWM, 10_000)
        sock.setsockopt(zmq.RCVHWM, 10_000)
        sock.bind(self.config.endpoint)
        self._sock = sock
        self.endpoint = sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self._tasks = [
            asyncio.create_task(self._recv_loop(), name="backplane-recv"),
            asyncio.create_task(self._sweep_loop(), name="backplane-sweep"),
        ]
        log.info("backplane: listening on %s", self.endpoint)
        return self.endpoint

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        for conn in list(self.sessions.values()):
            await self._drop(conn, "server stopping", notify=False)
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        self._tasks = []
        if self._sock is not None:
            self._sock.close(linger=0)
            self._sock = None
        if self._own_ctx:
            self._zctx.term()

    # -- revocation --------------------------------------------------------------------------
    def reload_crl(self) -> int:
        """Load the CRL again: new handshakes use it, revoked open sessions are dropped.

        Returns the number of sessions dropped. A bad CRL file keeps the previous one (and is
        logged); the first load raises instead, so a server never starts without a CRL.
        """
        cfg = self.config
        try:
            mtime = os.stat(cfg.crl_file).st_mtime
            revoked = Revocations.load(cfg.crl_file, cfg.ca_file)
            ctx = server_context(cfg.ca_file, cfg.cert_file, cfg.key_file, cfg.crl_file)
        except (OSError, ValueError, ssl.SSLError) as exc:
            if self._ssl is None:
                raise
            log.error(
                "backplane: CRL reload from %s failed, keeping the old one: %s", cfg.crl_file, exc
            )
            return 0
        self._ssl, self._revoked, self._crl_mtime = ctx, revoked, mtime
        if revoked.stale():
            log.warning(
                "backplane: CRL %s is past its next update; publish a fresh one", cfg.crl_file
            )
        dropped = 0
        for conn in list(self.sessions.values()):
            cert = getattr(conn.tls, "peer_cert", None)
            if cert is not None and revoked.revokes(cert):
                log.warning(
                    "backplane: host %s certificate serial %x revoked; dropping session",
                    conn.host_id,
                    cert.serial_number,
                )
                self._spawn(
                    self._drop(
                        conn,
                        "certificate revoked",
                        error=("revoked", "your certificate was revoked"),
                    )
                )
                dropped += 1
        return dropped

    # -- pushing to sensors ------------------------------------------------------------------
    def notify_command(self, host_id: str) -> None:
        """New commands are queued for a host: push them now to its open sessions."""
        for conn in self._conns_of(host_id):
            self._spawn(self._push_commands(conn))

    def notify_policy(self, host_id: str) -> None:
        for conn in self._conns_of(host_id):
            self._spawn(self._push_policy(conn))

    def connected_hosts(self) -> set[str]:
        return {c.host_id for c in self.sessions.values() if c.hello and c.host_id}

    def _conns_of(self, host_id: str) -> list[_Conn]:
        return [
            c
            for c in self.sessions.values()
            if c.host_id == host_id and c.hello is not None and not c.closed
        ]

    # -- receiving ---------------------------------------------------------------------------
    async def _recv_loop(self) -> None:
        assert self._sock is not None
        while True:
            frames = await self._sock.recv_multipart(copy=False)
            try:
                self._on_frames(frames)
            except Exception:  # one bad peer must never stop the server
                log.exception("backplane: unexpected error handling a frame")

    def _on_frames(self, frames: list[zmq.Frame]) -> None:
        rid = frames[0].bytes
        if len(frames) != 2:
            log.warning(
                "backplane: refused %d-frame message from %s (garbage frames)",
                len(frames),
                rid.hex(),
            )
            conn = self.sessions.get(rid)
            if conn is not None:
                self._spawn(self._drop(conn, "garbage frames"))
            return
        data = frames[1].bytes
        conn = self.sessions.get(rid)
        if conn is None:
            if rid in self._closed:
                self._send(rid, b"")
                return
            if not data:
                return
            if len(self.sessions) >= self.config.max_sessions:
                log.warning(
                    "backplane: refused connection %s: %d sessions open (limit)",
                    rid.hex(),
                    len(self.sessions),
                )
                self._send(rid, b"")
                return
            conn = self._new_conn(rid, self._peer_address(frames[1]))
        conn.last_seen = self._clock()
        was_open = conn.tls.state == "open"
        try:
            msgs = conn.tls.receive(data)
        except (TlsError, ProtocolError) as exc:
            reason = getattr(exc, "reason", str(exc))
            if not was_open:
                self.refused += 1
                log.warning(
                    "backplane: refused handshake from %s (conn %s): %s",
                    conn.peer,
                    rid.hex(),
                    reason,
                )
            else:
                # A sensor shutting down closes TLS cleanly: not worth a warning.
                level = logging.INFO if reason == "peer closed the TLS session" else logging.WARNING
                log.log(
                    level,
                    "backplane: closing session of host %s from %s: %s",
                    conn.host_id,
                    conn.peer,
                    reason,
                )
            self._flush(conn)  # carries the TLS alert, so the peer learns why
            self._spawn(self._drop(conn, reason, error=("protocol", reason) if was_open else None))
            return
        self._flush(conn)
        if not was_open and conn.tls.state == "open":
            log.info("backplane: host %s authenticated from %s", conn.host_id, conn.peer)
        for msg in msgs:
            try:
                conn.queue.put_nowait(msg)
            except asyncio.QueueFull:
                log.warning(
                    "backplane: host %s exceeded %d queued messages (window); dropping",
                    conn.host_id,
                    self.config.max_pending,
                )
                self._spawn(
                    self._drop(
                        conn,
                        "window exceeded",
                        error=("window", "too many unacknowledged messages"),
                    )
                )
                return

    def _new_conn(self, rid: bytes, peer: str) -> _Conn:
        if self._session_factory is not None:
            tls = self._session_factory()
        else:
            assert self._ssl is not None
            tls = TlsSession(
                self._ssl,
                server_side=True,
                max_message=self.config.max_message,
                handshake_timeout=self.config.handshake_timeout,
                clock=self._clock,
            )
        conn = _Conn(
            rid, peer, tls, self._clock(), queue=asyncio.Queue(maxsize=self.config.max_pending)
        )
        conn.worker = asyncio.create_task(self._work(conn), name=f"backplane-{rid.hex()}")
        self.sessions[rid] = conn
        return conn

    @staticmethod
    def _peer_address(frame: zmq.Frame) -> str:
        try:
            return frame.get("Peer-Address") or "?"
        except (zmq.ZMQError, UnicodeDecodeError):
            return "?"

    # -- per-session processing --------------------------------------------------------------
    async def _work(self, conn: _Conn) -> None:
        try:
            while True:
                msg = await conn.queue.get()
                await self._handle(conn, msg)
                self._flush(conn)
        except asyncio.CancelledError:
            raise
        except (ProtocolError, TlsError) as exc:
            reason = getattr(exc, "reason", str(exc))
            log.warning("backplane: closing session of host %s: %s", conn.host_id, reason)
            self._spawn(self._drop(conn, reason, error=("protocol", reason)))
        except Exception as exc:
            # A hook failed (store down?): close so the sensor resends the unacked batches.
            log.exception("backplane: hook failed for host %s; closing its session", conn.host_id)
            self._spawn(
                self._drop(
                    conn,
                    f"controller error: {type(exc).__name__}",
                    error=("internal", "controller error, retry later"),
                )
            )

    async def _handle(self, conn: _Conn, msg: Message) -> None:
        host = conn.host_id
        assert host is not None
        if conn.hello is None:
            if not isinstance(msg, Hello):
                raise ProtocolError(f"expected hello first, got {msg.KIND}")
            if msg.protocol != PROTOCOL_VERSION:
                raise ProtocolError(
                    f"protocol version {msg.protocol} not supported "
                    f"(this controller speaks {PROTOCOL_VERSION})"
                )
            conn.hello = msg
            await self.hooks.on_hello(host, msg, conn.peer)
            # A TLS 1.3 client cannot tell from the handshake alone that we accepted its
            # certificate; this first heartbeat tells it.
            self._send_msg(conn, Heartbeat())
            await self._push_policy(conn)
            await self._push_commands(conn)
            return
        match msg:
            case Events(seq=seq, events=events, dropped=dropped):
                fresh = await self.hooks.commit_batch(host, seq, events, dropped)
                if not fresh:
                    log.debug("backplane: host %s resent batch %d (duplicate)", host, seq)
                self._send_msg(conn, Ack(seq))
            case Heartbeat():
                await self.hooks.on_heartbeat(host, msg)
                self._send_msg(conn, Heartbeat())  # lets the sensor see we are alive
            case CommandResult():
                await self.hooks.command_result(host, msg)
                conn.sent_commands.discard(msg.id)
            case PolicyAck(version=version):
                await self.hooks.policy_applied(host, version)
            case RenewRequest(csr=csr):
                try:
                    cert = await self.hooks.renew(host, csr)
                except ValueError as exc:
                    log.warning("backplane: renewal for host %s refused: %s", host, exc)
                    self._send_msg(conn, Error("renew_refused", str(exc)))
                else:
                    log.info("backplane: renewed the certificate of host %s", host)
                    self._send_msg(conn, RenewResponse(cert))
            case Error(code=code, message=text):
                raise ProtocolError(f"sensor reported error {code}: {text[:200]}")
            case _:
                raise ProtocolError(f"a sensor may not send {msg.KIND}")

    async def _push_commands(self, conn: _Conn) -> None:
        if conn.closed or conn.host_id is None:
            return
        for cmd in await self.hooks.pending_commands(conn.host_id):
            if cmd.id not in conn.sent_commands and not conn.closed:
                conn.sent_commands.add(cmd.id)
                self._send_msg(conn, cmd)
        self._flush(conn)

    async def _push_policy(self, conn: _Conn) -> None:
        if conn.closed or conn.host_id is None or conn.hello is None:
            return
        policy = await self.hooks.current_policy(conn.host_id)
        if policy is None or conn.closed:
            return
        current = conn.policy_sent if conn.policy_sent is not None else conn.hello.policy_version
        if policy.version != current:
            conn.policy_sent = policy.version
            self._send_msg(conn, policy)
            self._flush(conn)

    # -- sending and closing -----------------------------------------------------------------
    def _send_msg(self, conn: _Conn, msg: Message) -> None:
        if not conn.closed:
            conn.tls.send(msg)

    def _flush(self, conn: _Conn) -> None:
        data = conn.tls.outgoing()
        if data:
            self._send(conn.rid, data)

    def _send(self, rid: bytes, data: bytes) -> None:
        if self._sock is None:
            return
        # DONTWAIT through the asyncio socket: it completes (or fails) at once, keeps records in
        # the order TLS produced them, and lets pyzmq re-arm its edge-triggered wake-ups (a
        # separate shadow socket would swallow them and stall the receive loop).
        fut = self._sock.send_multipart([rid, data], flags=zmq.NOBLOCK)
        exc = fut.exception() if fut.done() else None
        if isinstance(exc, zmq.ZMQError):
            conn = self.sessions.get(rid)
            # EHOSTUNREACH: the peer is gone; EAGAIN: its queue is full, it is stuck.
            if conn is not None and not conn.closed:
                self._spawn(self._drop(conn, f"send failed: {exc.strerror}", notify=True))

    async def _drop(
        self, conn: _Conn, reason: str, *, error: tuple[str, str] | None = None, notify: bool = True
    ) -> None:
        if conn.closed:
            return
        conn.closed = True
        self.sessions.pop(conn.rid, None)
        self._closed[conn.rid] = None
        while len(self._closed) > 4096:
            self._closed.popitem(last=False)
        if conn.tls.state == "open" and error is not None:
            with contextlib.suppress(TlsError, ProtocolError):
                conn.tls.send(Error(*error))
        with contextlib.suppress(Exception):
            tail = conn.tls.close()
            if tail:
                self._send(conn.rid, tail)
        if conn.worker is not None and conn.worker is not asyncio.current_task():
            conn.worker.cancel()
        if notify and conn.hello is not None and conn.host_id is not None:
            log.info("backplane: host %s disconnected: %s", conn.host_id, reason)
            try:
                await self.hooks.on_disconnect(conn.host_id, reason)
            except Exception:
                log.exception("backplane: on_disconnect hook failed for %s", conn.host_id)

    async def _sweep_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.sweep_interval)
            now = self._clock()
            for conn in list(self.sessions.values()):
                if conn.tls.handshake_expired(now):
                    self.refused += 1
                    log.warning(
                        "backplane: refused handshake from %s (conn %s): timed out",
                        conn.peer,
                        conn.rid.hex(),
                    )
                    await self._drop(conn, "handshake timeout")
                elif now - conn.last_seen > self.config.heartbeat_timeout:
                    log.warning(
                        "backplane: host %s silent for %.0f s; dropping (dead peer)",
                        conn.host_id,
                        now - conn.last_seen,
                    )
                    await self._drop(conn, "heartbeat timeout")
            if self._session_factory is None:
                try:
                    mtime = os.stat(self.config.crl_file).st_mtime
                except OSError:
                    continue
                if mtime != self._crl_mtime:
                    log.info("backplane: CRL %s changed; reloading", self.config.crl_file)
                    self.reload_crl()

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._bg.add(task)
        task.add_done_callback(self._bg.discard)

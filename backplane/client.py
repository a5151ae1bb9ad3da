"""The sensor's side of the backplane: one thread owning a DEALER socket and its TLS session.

The thread handshakes, says HELLO, streams outbox batches with a window of unacked batches,
deletes a batch from the outbox only when its ACK arrives, sends heartbeats, and hands
COMMAND / POLICY messages to callbacks. Any failure (disconnect, TLS error, protocol error,
silent peer) closes the socket; the next attempt uses a fresh socket and handshake after a
jittered exponential backoff, and resends every unacked batch (the controller drops
duplicates by (host, seq)).

The client's key and certificate live in ONE PEM file, so certificate rotation replaces both
with a single atomic rename.
"""

from __future__ import annotations

import concurrent.futures
import logging
import queue
import random
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psutil
import zmq
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from backplane.files import write_atomic
from backplane.messages import (
    DEFAULT_MAX_MESSAGE,
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
from backplane.outbox import Outbox
from backplane.tls import TlsError, TlsSession, client_context
from certs.pki import RENEW_BEFORE

log = logging.getLogger(__name__)

_SEND_CHUNK = 256 * 1024  # below the server's max_frame


class _Disconnected(Exception):
    """The connection is gone or useless; reconnect."""


@dataclass
class ClientConfig:
    endpoint: str  # "tcp://controller:5555"
    server_name: str  # the name the controller's certificate must carry
    ca_file: Path
    credentials_file: Path  # client key + certificate, PEM, mode 0600
    window: int = 8  # batches in flight without an ack
    heartbeat_interval: float = 10.0
    dead_after: float = 30.0  # nothing from the controller this long: reconnect
    handshake_timeout: float = 10.0
    backoff_min: float = 0.2
    backoff_max: float = 30.0
    max_message: int = DEFAULT_MAX_MESSAGE
    renew_before: timedelta = RENEW_BEFORE
    poll_interval: float = 0.05


@dataclass
class ClientStats:
    connects: int = 0
    batches_sent: int = 0
    batches_acked: int = 0
    renewals: int = 0
    last_error: str = ""
    ack_latencies: list[float] = field(default_factory=list)  # seconds, only when recording


def default_heartbeat(
    outbox: Outbox, tiers: dict[str, str] | None = None, bpf: dict[str, Any] | None = None
) -> Heartbeat:
    """Host metrics from psutil plus the outbox depth."""
    vm = psutil.virtual_memory()
    disk = psutil.disk_usage(str(outbox.path.parent))
    net = psutil.net_io_counters()
    metrics = {
        "cpu_percent": psutil.cpu_percent(interval=None),
        "mem_total": vm.total,
        "mem_used": vm.used,
        "mem_percent": vm.percent,
        "disk_total": disk.total,
        "disk_used": disk.used,
        "disk_percent": disk.percent,
        "net_bytes_sent": net.bytes_sent,
        "net_bytes_recv": net.bytes_recv,
        "net_packets_sent": net.packets_sent,
        "net_packets_recv": net.packets_recv,
        "outbox_bytes": outbox.size_bytes,
    }
    return Heartbeat(metrics, dict(tiers or {}), dict(bpf or {}), outbox.depth)


def write_credentials(path: Path, key_pem: bytes, cert_pem: bytes) -> None:
    """Write key + certificate to one file, 0600, replacing the old one atomically."""
    write_atomic(path, key_pem + cert_pem, 0o600)


def load_certificate(path: Path) -> x509.Certificate:
    """The certificate from a credentials file (the key is skipped)."""
    data = path.read_bytes()
    start = data.find(b"-----BEGIN CERTIFICATE-----")
    if start < 0:
        raise ValueError(f"{path} holds no certificate")
    return x509.load_pem_x509_certificate(data[start:])


class BackplaneClient:
    """Runs in its own thread; ``start``/``stop`` from the sensor."""

    def __init__(
        self,
        config: ClientConfig,
        outbox: Outbox,
        *,
        hello: Callable[[], Hello],
        on_command: Callable[[Command], CommandResult],
        on_policy: Callable[[int, dict[str, Any]], int],
        heartbeat: Callable[[], Heartbeat] | None = None,
        now: Callable[[], datetime] = lambda: datetime.now(UTC),
        record_latency: bool = False,
        _session_factory: Callable[[], Any] | None = None,
    ) -> None:
        self.config = config
        self.outbox = outbox
        self._hello = hello
        self._on_command = on_command
        self._on_policy = on_policy
        self._heartbeat = heartbeat or (lambda: default_heartbeat(outbox))
        self._now = now
        self._record_latency = record_latency
        self._session_factory = _session_factory
        self.stats = ClientStats()
        self.connected = threading.Event()  # set while a session is accepted by the controller
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._zctx = zmq.Context()
        self._cmd_pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="edr-cmd")
        self._results: queue.Queue[CommandResult] = queue.Queue()
        self._done: OrderedDict[str, CommandResult] = OrderedDict()  # recent results by id
        self._running: set[str] = set()
        self._cmd_lock = threading.Lock()
        self._renew_key: ec.EllipticCurvePrivateKey | None = None
        self._renew_not_before = 0.0

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="edr-backplane", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
        self._cmd_pool.shutdown(wait=False, cancel_futures=True)
        self._zctx.term()

    def renewal_due(self) -> bool:
        cert = load_certificate(self.config.credentials_file)
        return cert.not_valid_after_utc - self._now() <= self.config.renew_before

    # -- the loop ----------------------------------------------------------------------------
    def _run(self) -> None:
        backoff = self.config.backoff_min
        while not self._stop.is_set():
            accepted = False
            try:
                accepted = self._session()
            except (_Disconnected, TlsError, ProtocolError) as exc:
                reason = getattr(exc, "reason", str(exc))
                self.stats.last_error = reason
                log.warning("backplane: connection to %s lost: %s", self.config.endpoint, reason)
            except Exception as exc:  # keep the sensor's uplink alive whatever happens
                self.stats.last_error = f"{type(exc).__name__}: {exc}"
                log.exception("backplane: unexpected client error")
            finally:
                self.connected.clear()
            if self._stop.is_set():
                break
            if accepted:
                backoff = self.config.backoff_min
            # Full jitter: sensors cut off together must not reconnect together.
            self._stop.wait(random.uniform(self.config.backoff_min, backoff))  # noqa: S311
            backoff = min(self.config.backoff_max, backoff * 2)

    def _session(self) -> bool:
        """One connection, until it fails. Returns True if the controller accepted us."""
        cfg = self.config
        sock = self._zctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SNDHWM, 1000)
        sock.setsockopt(zmq.MAXMSGSIZE, cfg.max_message + 64 * 1024)
        sock.setsockopt(zmq.RECONNECT_IVL, 100)
        monitor = sock.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        poller.register(monitor, zmq.POLLIN)
        accepted = False
        try:
            if self._session_factory is not None:
                tls = self._session_factory()
            else:
                ctx = client_context(cfg.ca_file, cfg.credentials_file)  # re-read: rotation
                tls = TlsSession(
                    ctx,
                    server_side=False,
                    server_hostname=cfg.server_name,
                    max_message=cfg.max_message,
                    handshake_timeout=cfg.handshake_timeout,
                )
            sock.connect(cfg.endpoint)
            tls.start()
            self._flush(sock, tls)
            inflight: dict[int, float] = {}
            last_sent = -1
            hello_sent = False
            last_rx = last_hb = time.monotonic()
            while not self._stop.is_set():
                events = dict(poller.poll(int(cfg.poll_interval * 1000)))
                now = time.monotonic()
                if monitor in events:
                    monitor.recv_multipart()
                    raise _Disconnected("socket disconnected")
                if sock in events:
                    for msg in self._receive(sock, tls):
                        last_rx = now
                        if not accepted:
                            accepted = True
                            self.stats.connects += 1
                            self.connected.set()
                            log.info("backplane: connected to %s", cfg.endpoint)
                        self._handle(tls, msg, inflight)
                if tls.state == "handshake":
                    if tls.handshake_expired():
                        raise _Disconnected("handshake timed out")
                    continue
                if not hello_sent:
                    tls.send(self._hello())
                    hello_sent = True
                self.outbox.flush_due()
                if len(inflight) < cfg.window:
                    for batch in self.outbox.peek(last_sent, cfg.window - len(inflight)):
                        tls.send(Events(batch.seq, batch.events, batch.dropped))
                        inflight[batch.seq] = now
                        last_sent = batch.seq
                        self.stats.batches_sent += 1
                while not self._results.empty():
                    tls.send(self._results.get_nowait())
                if now - last_hb >= cfg.heartbeat_interval:
                    tls.send(self._heartbeat())
                    last_hb = now
                if now - last_rx > cfg.dead_after:
                    raise _Disconnected(f"controller silent for {now - last_rx:.1f} s (dead peer)")
                if accepted:
                    self._maybe_renew(tls)
                self._flush(sock, tls)
            # Stopping: say goodbye politely.
            tail = tls.close()
            if tail:
                sock.send(tail, zmq.NOBLOCK)
        finally:
            sock.disable_monitor()
            monitor.close(linger=0)
            sock.close(linger=0)
        return accepted

    def _receive(self, sock: zmq.Socket[bytes], tls: Any) -> list[Message]:
        msgs: list[Message] = []
        while True:
            try:
                frame = sock.recv(zmq.NOBLOCK)
            except zmq.Again:
                break
            if not frame:
                raise _Disconnected("controller reset the session")
            msgs.extend(tls.receive(frame))
        self._flush(sock, tls)
        return msgs

    def _flush(self, sock: zmq.Socket[bytes], tls: Any) -> None:
        data = tls.outgoing()
        for i in range(0, len(data), _SEND_CHUNK):
            try:
                sock.send(data[i : i + _SEND_CHUNK], zmq.NOBLOCK)
            except zmq.Again:
                raise _Disconnected("send queue full (controller unreachable)") from None

    def _handle(self, tls: Any, msg: Message, inflight: dict[int, float]) -> None:
        match msg:
            case Ack(seq=seq):
                sent = inflight.pop(seq, None)
                self.outbox.ack(seq)
                self.stats.batches_acked += 1
                if sent is not None and self._record_latency:
                    self.stats.ack_latencies.append(time.monotonic() - sent)
            case Heartbeat():
                pass
            case Command():
                self._command(tls, msg)
            case Policy(version=version, document=doc):
                applied = self._on_policy(version, doc)
                tls.send(PolicyAck(applied))
            case RenewResponse(certificate=cert_pem):
                self._install_renewal(cert_pem)
            case Error(code="renew_refused", message=text):
                log.error("backplane: controller refused certificate renewal: %s", text)
                self._renew_key = None
                self._renew_not_before = time.monotonic() + 3600
            case Error(code=code, message=text):
                raise _Disconnected(f"controller error {code}: {text[:200]}")
            case _:
                raise ProtocolError(f"a controller may not send {msg.KIND}")

    # -- commands ----------------------------------------------------------------------------
    def _command(self, tls: Any, cmd: Command) -> None:
        with self._cmd_lock:
            done = self._done.get(cmd.id)
            if done is None:
                if cmd.id in self._running:
                    return
                self._running.add(cmd.id)
        if done is not None:  # redelivered after a reconnect: answer again, never rerun
            tls.send(done)
            return

        def run() -> None:
            try:
                result = self._on_command(cmd)
            except Exception as exc:
                log.exception("backplane: command %s (%s) failed", cmd.id, cmd.action)
                result = CommandResult(cmd.id, "error", {"error": f"{type(exc).__name__}: {exc}"})
            with self._cmd_lock:
                self._done[cmd.id] = result
                while len(self._done) > 1024:
                    self._done.popitem(last=False)
                self._running.discard(cmd.id)
            self._results.put(result)

        self._cmd_pool.submit(run)

    # -- certificate rotation ----------------------------------------------------------------
    def _maybe_renew(self, tls: Any) -> None:
        if self._renew_key is not None or time.monotonic() < self._renew_not_before:
            return
        if self._session_factory is not None or not self.renewal_due():
            self._renew_not_before = time.monotonic() + 60
            return
        key = ec.generate_private_key(ec.SECP256R1())
        # The CA sets the subject itself; the CN here is only informative.
        csr = (
            x509.CertificateSigningRequestBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "renewal")]))
            .sign(key, hashes.SHA256())
        )
        self._renew_key = key
        log.info("backplane: certificate expires soon; requesting renewal")
        tls.send(RenewRequest(csr.public_bytes(serialization.Encoding.PEM)))

    def _install_renewal(self, cert_pem: bytes) -> None:
        key, self._renew_key = self._renew_key, None
        if key is None:
            raise ProtocolError("unrequested renew_response")
        try:
            cert = x509.load_pem_x509_certificate(cert_pem)
            ca = x509.load_pem_x509_certificate(self.config.ca_file.read_bytes())
            cert.verify_directly_issued_by(ca)
        except (ValueError, TypeError) as exc:
            raise ProtocolError(f"renewed certificate is invalid: {exc}") from None
        if cert.public_key() != key.public_key():
            raise ProtocolError("renewed certificate is not for the key we generated")
        key_pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        write_credentials(self.config.credentials_file, key_pem, cert_pem)
        self.stats.renewals += 1
        self._renew_not_before = time.monotonic() + 60
        log.info("backplane: certificate renewed; valid until %s", cert.not_valid_after_utc)

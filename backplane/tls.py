"""TLS 1.3 with mutual X.509 authentication, driven over memory BIOs.

ZeroMQ has no TLS, so each sensor connection carries its own TLS session whose records travel
in ZeroMQ frames. :class:`TlsSession` knows nothing of sockets or event loops: bytes from the
peer go in through :meth:`TlsSession.receive`, bytes for the peer come out of
:meth:`TlsSession.outgoing`, and decoded messages come back as return values. The server and
the sensor client both drive it, each from its own loop.
"""

from __future__ import annotations

import contextlib
import logging
import os
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from backplane.messages import DEFAULT_MAX_MESSAGE, FrameDecoder, Message, encode
from certs.pki import host_id_of

log = logging.getLogger(__name__)

DEFAULT_HANDSHAKE_TIMEOUT = 10.0
_READ_CHUNK = 256 * 1024


class TlsError(Exception):
    """The TLS layer failed; the session is dead. ``reason`` is safe to log."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class HandshakeRefused(TlsError):
    """The peer could not be authenticated."""


def _tls13(ctx: ssl.SSLContext) -> ssl.SSLContext:
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.maximum_version = ssl.TLSVersion.TLSv1_3
    ctx.verify_mode = ssl.CERT_REQUIRED
    # No compression, no renegotiation: neither exists in TLS 1.3, set for clarity of intent.
    ctx.options |= ssl.OP_NO_COMPRESSION
    return ctx


def server_context(
    ca_file: str | os.PathLike[str],
    cert_file: str | os.PathLike[str],
    key_file: str | os.PathLike[str] | None,
    crl_file: str | os.PathLike[str],
) -> ssl.SSLContext:
    """The controller's context: requires a client certificate from our CA, not revoked.

    A CRL is mandatory: with ``VERIFY_CRL_CHECK_LEAF`` OpenSSL refuses every client whose
    issuer has no CRL loaded, so a missing CRL would fail closed in a confusing way.
    OpenSSL's server side checks the client's extended key usage (purpose ``sslclient``);
    :meth:`TlsSession.receive` checks it again explicitly after the handshake.
    """
    ctx = _tls13(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER))
    ctx.load_cert_chain(os.fspath(cert_file), None if key_file is None else os.fspath(key_file))
    # cafile (not cadata) because OpenSSL's file loader also reads CRLs from PEM.
    ctx.load_verify_locations(cafile=os.fspath(ca_file))
    ctx.load_verify_locations(cafile=os.fspath(crl_file))
    ctx.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF | ssl.VERIFY_X509_STRICT
    return ctx


def client_context(
    ca_file: str | os.PathLike[str],
    cert_file: str | os.PathLike[str],
    key_file: str | os.PathLike[str] | None = None,
) -> ssl.SSLContext:
    """The sensor's context: presents its client certificate, checks the server name.

    ``key_file`` may be None when ``cert_file`` holds both key and certificate; the sensor
    keeps them in one file so that certificate rotation replaces both in one rename.
    """
    ctx = _tls13(ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT))
    ctx.check_hostname = True
    ctx.load_cert_chain(os.fspath(cert_file), None if key_file is None else os.fspath(key_file))
    ctx.load_verify_locations(cafile=os.fspath(ca_file))
    ctx.verify_flags |= ssl.VERIFY_X509_STRICT
    return ctx


def describe_ssl_error(exc: BaseException) -> str:
    """A short operator-facing reason for a failed handshake. Never includes key material."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"certificate verification failed: {exc.verify_message}"
    text = getattr(exc, "reason", None) or str(exc)
    hints = {
        "PEER_DID_NOT_RETURN_A_CERTIFICATE": "peer presented no client certificate",
        "CERTIFICATE_REQUIRED": "peer presented no client certificate",
        "WRONG_VERSION_NUMBER": "not TLS (plain or garbage bytes)",
        "HTTP_REQUEST": "not TLS (plain HTTP)",
        "UNSUPPORTED_PROTOCOL": "peer does not speak TLS 1.3",
        "CERTIFICATE_REVOKED": "certificate revoked",
        "CERTIFICATE_EXPIRED": "certificate expired",
        "UNKNOWN_CA": "peer does not trust our CA",
        "BAD_CERTIFICATE": "peer refused our certificate",
    }
    for key, words in hints.items():
        if key in str(text).upper():
            return f"{words} ({text})"
    return f"TLS error: {text}"


class TlsSession:
    """One TLS session over memory BIOs, carrying length-prefixed messages.

    States: ``handshake`` → ``open`` → ``closed``. Every failure closes the session and
    raises :class:`TlsError` (or :class:`~backplane.messages.ProtocolError` for a bad message
    inside a good TLS stream); the caller then drops it.
    """

    def __init__(
        self,
        ctx: ssl.SSLContext,
        *,
        server_side: bool,
        server_hostname: str | None = None,
        max_message: int = DEFAULT_MAX_MESSAGE,
        handshake_timeout: float = DEFAULT_HANDSHAKE_TIMEOUT,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._in = ssl.MemoryBIO()
        self._out = ssl.MemoryBIO()
        self._ssl = ctx.wrap_bio(
            self._in, self._out, server_side=server_side, server_hostname=server_hostname
        )
        self.server_side = server_side
        self.max_message = max_message
        self._decoder = FrameDecoder(max_message)
        self._clock = clock
        self.started = clock()
        self.handshake_deadline = self.started + handshake_timeout
        self.state = "handshake"
        self.peer_cert: x509.Certificate | None = None
        self.peer_host_id: str | None = None

    # -- driving ---------------------------------------------------------------------------
    def start(self) -> None:
        """Begin the handshake (the client speaks first; harmless on the server)."""
        if not self.server_side:
            self._step_handshake()

    def receive(self, data: bytes) -> list[Message]:
        """Feed bytes from the peer; return the messages they complete."""
        if self.state == "closed":
            raise TlsError("session already closed")
        self._in.write(data)
        if self.state == "handshake":
            self._step_handshake()
            if self.state != "open":
                return []
        return self._read_app()

    def send(self, msg: Message) -> None:
        """Encrypt one message; fetch the records with :meth:`outgoing`."""
        if self.state != "open":
            raise TlsError(f"cannot send {msg.KIND}: session is {self.state}")
        self.send_raw(encode(msg, max_size=self.max_message))

    def send_raw(self, data: bytes) -> None:
        try:
            self._ssl.write(data)
        except ssl.SSLError as exc:
            self.state = "closed"
            raise TlsError(describe_ssl_error(exc)) from None

    def outgoing(self) -> bytes:
        """TLS records waiting to go to the peer (possibly empty)."""
        return self._out.read()

    def close(self) -> bytes:
        """Send close_notify if possible and mark closed; returns the final records."""
        if self.state == "open":
            # The peer's half of the shutdown never arrives over a BIO here; that is fine.
            with contextlib.suppress(ssl.SSLError, ValueError):
                self._ssl.unwrap()
        self.state = "closed"
        return self._out.read()

    def handshake_expired(self, now: float | None = None) -> bool:
        now = self._clock() if now is None else now
        return self.state == "handshake" and now > self.handshake_deadline

    @property
    def buffered(self) -> int:
        """Bytes held for this session (undecoded plaintext plus unread records)."""
        return self._decoder.buffered + self._in.pending + self._out.pending

    # -- internals ---------------------------------------------------------------------------
    def _step_handshake(self) -> None:
        try:
            self._ssl.do_handshake()
        except ssl.SSLWantReadError:
            return
        except ssl.SSLError as exc:
            self.state = "closed"
            raise HandshakeRefused(describe_ssl_error(exc)) from None
        if self.server_side:
            self._authenticate_client()
        self.state = "open"

    def _authenticate_client(self) -> None:
        der = self._ssl.getpeercert(binary_form=True)
        if not der:
            self.state = "closed"
            raise HandshakeRefused("peer presented no client certificate")
        cert = x509.load_der_x509_certificate(der)
        try:
            eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        except x509.ExtensionNotFound:
            eku = None
        if eku is None or ExtendedKeyUsageOID.CLIENT_AUTH not in eku:
            self.state = "closed"
            raise HandshakeRefused("client certificate lacks the clientAuth extended key usage")
        try:
            host_id = host_id_of(cert)
        except ValueError as exc:
            self.state = "closed"
            raise HandshakeRefused(str(exc)) from None
        self.peer_cert = cert
        self.peer_host_id = host_id

    def _read_app(self) -> list[Message]:
        out: list[Message] = []
        while True:
            try:
                chunk = self._ssl.read(_READ_CHUNK)
            except ssl.SSLWantReadError:
                break
            except ssl.SSLZeroReturnError:
                self.state = "closed"
                raise TlsError("peer closed the TLS session") from None
            except ssl.SSLError as exc:
                self.state = "closed"
                raise TlsError(describe_ssl_error(exc)) from None
            if not chunk:
                self.state = "closed"
                raise TlsError("peer closed the TLS session")
            try:
                out.extend(self._decoder.feed(chunk))
            except Exception:
                self.state = "closed"
                raise
        return out


@dataclass(frozen=True)
class Revocations:
    """Serial numbers listed in a CRL, to drop sessions already open when a CRL is reloaded."""

    serials: frozenset[int]
    next_update: datetime | None

    @classmethod
    def load(cls, crl_file: str | os.PathLike[str], ca_file: str | os.PathLike[str]) -> Revocations:
        """Parse a CRL and check it was signed by our CA (ValueError otherwise)."""
        crl = x509.load_pem_x509_crl(Path(crl_file).read_bytes())
        ca = x509.load_pem_x509_certificate(Path(ca_file).read_bytes())
        if crl.issuer != ca.subject or not crl.is_signature_valid(ca.public_key()):  # type: ignore[arg-type]
            raise ValueError(f"CRL {crl_file} is not signed by the CA in {ca_file}")
        return cls(
            frozenset(r.serial_number for r in crl),
            crl.next_update_utc,
        )

    def revokes(self, cert: x509.Certificate) -> bool:
        return cert.serial_number in self.serials

    def stale(self, now: datetime | None = None) -> bool:
        now = now or datetime.now(UTC)
        return self.next_update is not None and now > self.next_update

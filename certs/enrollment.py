"""Enrollment and renewal: the signing logic behind the HTTPS endpoint and the backplane.

``Enrollment.enroll`` checks the CSR before touching the token, then, in one database
transaction, consumes a token use, assigns a host id, signs and records the certificate: a
bad CSR never burns a token, and a failure after the token check rolls its use back.
"""

from __future__ import annotations

import logging
import re
from datetime import UTC, datetime, timedelta

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from certs import pki, tokens
from certs.store import PKIStore

log = logging.getLogger(__name__)

MAX_CSR_BYTES = 8192  # a P-384 CSR with a long subject is under 1 KiB
MAX_HOSTNAME_CHARS = 253
_HOSTNAME_RE = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9._-]{0,252})")


class EnrollmentError(ValueError):
    """A request was refused. ``str()`` is the precise reason; ``public_message`` is safe to
    send to the remote side (equal to ``str()`` except for token refusals)."""

    def __init__(
        self, message: str, public_message: str | None = None, *, token_refused: bool = False
    ) -> None:
        super().__init__(message)
        self.public_message = public_message or message
        self.token_refused = token_refused


def check_hostname(hostname: str) -> str:
    """Return ``hostname`` if it is a plausible host name (informational only, not identity)."""
    if not isinstance(hostname, str) or not _HOSTNAME_RE.fullmatch(hostname):
        raise EnrollmentError(
            f"invalid hostname {str(hostname)[:80]!r}: expected 1-{MAX_HOSTNAME_CHARS} "
            "characters of letters, digits, '.', '-', '_'"
        )
    return hostname


def check_csr(csr_pem: bytes | str) -> bytes:
    """Size-check, parse and verify a CSR; return it as bytes.

    Raises:
        EnrollmentError: too large, not a CSR, refused key type or bad signature.
    """
    if isinstance(csr_pem, str):
        csr_pem = csr_pem.encode("utf-8", "replace")
    if not isinstance(csr_pem, bytes):
        raise EnrollmentError("CSR must be a PEM string")
    if len(csr_pem) > MAX_CSR_BYTES:
        raise EnrollmentError(f"CSR too large: {len(csr_pem)} bytes (limit {MAX_CSR_BYTES})")
    try:
        pki.load_csr(csr_pem)
    except ValueError as exc:
        raise EnrollmentError(str(exc)) from None
    return csr_pem


def renewal_due(
    cert: x509.Certificate, now: datetime | None = None, renew_before: timedelta = pki.RENEW_BEFORE
) -> bool:
    """True when ``cert`` should be rotated.

    That is ``renew_before`` before expiry, but never later than two thirds into the
    certificate's lifetime, so short-lived certificates (days, not months) still rotate with
    time to spare.
    """
    now = now or datetime.now(UTC)
    lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
    margin = min(renew_before, lifetime / 3)
    return now >= cert.not_valid_after_utc - margin


class Enrollment:
    """Enrollment (token + CSR) and renewal (authenticated host + CSR) against one store."""

    def __init__(self, store: PKIStore, *, validity: timedelta = pki.VALIDITY_CLIENT) -> None:
        self.store = store
        self.validity = validity

    def enroll(
        self, token: str, csr_pem: bytes | str, hostname: str, *, now: datetime | None = None
    ) -> tuple[str, bytes, bytes]:
        """Sign a new sensor's CSR if its token is good.

        Returns:
            ``(host_id, cert_pem, ca_pem)``.

        Raises:
            EnrollmentError: bad hostname/CSR (precise public message) or refused token
                (generic public message, precise ``str()`` for the local log).
        """
        check_hostname(hostname)
        csr = check_csr(csr_pem)
        ca = self.store.load_ca()
        try:
            with self.store.transaction() as conn:
                token_id = tokens.consume(conn, token, now=now)
                host_id = self.store.new_host_id(conn)
                cert_pem = ca.sign_csr(csr, host_id, now=now, validity=self.validity)
                self.store.record(
                    conn,
                    cert_pem,
                    hostname=hostname,
                    source="enroll",
                    token_id=token_id,
                    now=now,
                )
        except tokens.TokenError as exc:
            # The reason names the token id, never the secret.
            log.warning("enrollment refused for hostname %s: %s", hostname, exc)
            raise EnrollmentError(str(exc), exc.public_message, token_refused=True) from None
        log.info("enrolled host %s (hostname %s) with token %s", host_id, hostname, token_id)
        return host_id, cert_pem, ca.cert_pem

    def renew(self, host_id: str, csr_pem: bytes | str, *, now: datetime | None = None) -> bytes:
        """Sign a fresh certificate for an already-authenticated host.

        ``host_id`` must come from the peer certificate of the mutual-TLS session
        (``pki.host_id_of``), never from a message field. The host's earlier certificates are
        marked ``superseded`` but stay valid until they expire, so the session that asked for
        the renewal is not cut off.

        Returns:
            The new certificate PEM.

        Raises:
            EnrollmentError: unknown or revoked host, bad CSR.
        """
        pki.validate_host_id(host_id)
        csr = check_csr(csr_pem)
        ca = self.store.load_ca()
        with self.store.transaction() as conn:
            rows = conn.execute(
                "SELECT status, hostname FROM certificates WHERE host_id = ?"
                " ORDER BY issued_at DESC",
                (host_id,),
            ).fetchall()
            if not rows:
                raise EnrollmentError(f"host {host_id} is not enrolled")
            statuses = {r[0] for r in rows}
            if "revoked" in statuses:
                raise EnrollmentError(f"host {host_id} is revoked; it must enroll again")
            if "active" not in statuses:
                raise EnrollmentError(f"host {host_id} has no active certificate to renew")
            cert_pem = ca.sign_csr(csr, host_id, now=now, validity=self.validity)
            conn.execute(
                "UPDATE certificates SET status = 'superseded'"
                " WHERE host_id = ? AND status = 'active'",
                (host_id,),
            )
            self.store.record(conn, cert_pem, hostname=rows[0][1], source="renew", now=now)
        log.info("renewed certificate of host %s", host_id)
        return cert_pem


def public_key_matches(
    cert_pem: bytes, key: ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey
) -> bool:
    """True if ``cert_pem`` certifies ``key``'s public half (used by sensors after renewal)."""
    return x509.load_pem_x509_certificate(cert_pem).public_key() == key.public_key()

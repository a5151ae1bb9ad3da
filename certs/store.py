"""The PKI state directory: CA and server key pairs, the CRL, and the issuance database.

Layout of the state directory (default ``/var/lib/edr/pki``, mode 0700)::

    ca.pem  ca.key        the CA (key 0600)
    server.pem server.key the controller's TLS certificate (key 0600)
    crl.pem               revoked serials, rewritten atomically on every revocation
    pki.db                SQLite (WAL): issued certificates and enrollment tokens (0600)

Every file is written to a temporary name and renamed, under umask 077, so a crash never
leaves a half-written key or CRL and no key is ever readable by others, even briefly.
A connection is opened per operation, so one store object may be shared between threads
and several processes (CLI and controller) may use the same directory at once.
"""

from __future__ import annotations

import os
import secrets
import sqlite3
from collections.abc import Iterator
from contextlib import closing, contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509

from backplane.files import write_atomic
from certs import pki, tokens

DEFAULT_STATE_DIR = Path("/var/lib/edr/pki")
ENV_STATE_DIR = "EDR_PKI_DIR"
CRL_VALIDITY = timedelta(days=7)

_SCHEMA = (
    """
CREATE TABLE IF NOT EXISTS certificates (
    serial       TEXT PRIMARY KEY,          -- lowercase hex: serials exceed SQLite's int64
    host_id      TEXT NOT NULL,
    hostname     TEXT NOT NULL DEFAULT '',
    fingerprint  TEXT NOT NULL,
    not_before   TEXT NOT NULL,
    not_after    TEXT NOT NULL,
    issued_at    TEXT NOT NULL,
    source       TEXT NOT NULL,             -- enroll | renew | offline
    token_id     TEXT,
    status       TEXT NOT NULL DEFAULT 'active',  -- active | superseded | revoked | orphaned
    revoked_at   TEXT
);
CREATE INDEX IF NOT EXISTS certificates_host ON certificates (host_id);
"""
    + tokens.SCHEMA
)


class PKIError(Exception):
    """A PKI store operation failed; the message is meant for the operator."""


class NotInitialized(PKIError):
    pass


class AlreadyInitialized(PKIError):
    pass


class UnknownHost(PKIError):
    pass


@dataclass(frozen=True)
class IssuedCert:
    """One row of the issuance database."""

    serial: int
    host_id: str
    hostname: str
    fingerprint: str
    not_before: datetime
    not_after: datetime
    issued_at: datetime
    source: str
    status: str
    revoked_at: datetime | None

    def effective_status(self, now: datetime | None = None) -> str:
        """The stored status, or ``expired`` for an unrevoked certificate past its end."""
        now = now or datetime.now(UTC)
        if self.status in ("active", "superseded") and now >= self.not_after:
            return "expired"
        return self.status


def default_state_dir() -> Path:
    """``$EDR_PKI_DIR`` if set, else ``/var/lib/edr/pki``."""
    return Path(os.environ.get(ENV_STATE_DIR) or DEFAULT_STATE_DIR)


@contextmanager
def _umask(mask: int) -> Iterator[None]:
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def _ts(dt: datetime) -> str:
    return dt.astimezone(UTC).isoformat()


class PKIStore:
    """The CA, server certificate, CRL and issuance records kept in one directory."""

    def __init__(self, state_dir: Path | str | None = None) -> None:
        self.state_dir = Path(state_dir) if state_dir is not None else default_state_dir()
        self.ca_path = self.state_dir / "ca.pem"
        self.ca_key_path = self.state_dir / "ca.key"
        self.server_cert_path = self.state_dir / "server.pem"
        self.server_key_path = self.state_dir / "server.key"
        self.crl_path = self.state_dir / "crl.pem"
        self.db_path = self.state_dir / "pki.db"
        self._ca: pki.CertificateAuthority | None = None

    # -- database ----------------------------------------------------------------------

    def _connect(self) -> sqlite3.Connection:
        if not self.ca_path.exists():
            raise NotInitialized(
                f"no CA in {self.state_dir}: run 'edr-certs init' (or pass --state-dir)"
            )
        with _umask(0o077):
            conn = sqlite3.connect(self.db_path, timeout=30, isolation_level=None)
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA busy_timeout = 30000")
        conn.executescript(_SCHEMA)
        return conn

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """A write transaction (BEGIN IMMEDIATE): serialised against every other writer."""
        with closing(self._connect()) as conn:
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")

    @contextmanager
    def reading(self) -> Iterator[sqlite3.Connection]:
        with closing(self._connect()) as conn:
            yield conn

    # -- CA and server certificate -----------------------------------------------------

    @property
    def initialized(self) -> bool:
        return self.ca_path.exists() and self.ca_key_path.exists()

    def init(
        self,
        names: list[str],
        *,
        force: bool = False,
        common_name: str = "EDR CA",
        now: datetime | None = None,
    ) -> pki.CertificateAuthority:
        """Create the CA, the controller's server certificate and an empty CRL.

        Refuses to replace an existing CA unless ``force``; even then the old files are kept
        in ``replaced-<timestamp>/`` and the old CA's certificates are marked ``orphaned``.
        """
        if (self.ca_path.exists() or self.ca_key_path.exists()) and not force:
            raise AlreadyInitialized(
                f"a CA already exists in {self.state_dir}; refusing to overwrite it "
                "(use --force to replace it: every enrolled sensor must then re-enroll)"
            )
        ca = pki.CertificateAuthority.create(common_name, now=now)
        server_cert, server_key = ca.issue_server(names, now=now)  # validates names first
        with _umask(0o077):
            self.state_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.state_dir, 0o700)
        if force and self.ca_path.exists():
            backup = self.state_dir / f"replaced-{datetime.now(UTC):%Y%m%dT%H%M%S%f}"
            with _umask(0o077):
                backup.mkdir()
            for path in (
                self.ca_path,
                self.ca_key_path,
                self.server_cert_path,
                self.server_key_path,
                self.crl_path,
            ):
                if path.exists():
                    os.replace(path, backup / path.name)
            if self.db_path.exists():
                with closing(sqlite3.connect(self.db_path, isolation_level=None)) as conn:
                    conn.executescript(_SCHEMA)
                    conn.execute(
                        "UPDATE certificates SET status = 'orphaned' WHERE status != 'revoked'"
                    )
        # The key goes first: a ca.pem without its key would look initialised but be useless.
        write_atomic(self.ca_key_path, ca.key_pem, 0o600)
        write_atomic(self.ca_path, ca.cert_pem, 0o644)
        write_atomic(self.server_key_path, server_key, 0o600)
        write_atomic(self.server_cert_path, server_cert, 0o644)
        self._ca = ca
        with self.reading():
            pass  # creates pki.db (0600) and its schema now, not at first use
        self.write_crl(now=now)
        return ca

    def load_ca(self) -> pki.CertificateAuthority:
        """The CA, loaded once from ``ca.pem``/``ca.key``."""
        if self._ca is None:
            if not self.initialized:
                raise NotInitialized(
                    f"no CA in {self.state_dir}: run 'edr-certs init' (or pass --state-dir)"
                )
            try:
                self._ca = pki.CertificateAuthority.load(
                    self.ca_path.read_bytes(), self.ca_key_path.read_bytes()
                )
            except ValueError as exc:
                raise PKIError(f"CA files in {self.state_dir} are unusable: {exc}") from None
        return self._ca

    # -- issuance records --------------------------------------------------------------

    def new_host_id(self, conn: sqlite3.Connection) -> str:
        """A fresh controller-assigned host id (16 hex digits) not used before."""
        while True:
            host_id = secrets.token_hex(8)
            if (
                conn.execute("SELECT 1 FROM certificates WHERE host_id = ?", (host_id,)).fetchone()
                is None
            ):
                return host_id

    def record(
        self,
        conn: sqlite3.Connection,
        cert_pem: bytes,
        *,
        hostname: str,
        source: str,
        token_id: str | None = None,
        now: datetime | None = None,
    ) -> IssuedCert:
        """Insert an issued certificate into the database (inside the caller's transaction)."""
        cert = x509.load_pem_x509_certificate(cert_pem)
        host_id = pki.host_id_of(cert)
        now = now or datetime.now(UTC)
        conn.execute(
            "INSERT INTO certificates (serial, host_id, hostname, fingerprint, not_before,"
            " not_after, issued_at, source, token_id) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                format(cert.serial_number, "x"),
                host_id,
                hostname,
                pki.fingerprint(cert_pem),
                _ts(cert.not_valid_before_utc),
                _ts(cert.not_valid_after_utc),
                _ts(now),
                source,
                token_id,
            ),
        )
        return IssuedCert(
            serial=cert.serial_number,
            host_id=host_id,
            hostname=hostname,
            fingerprint=pki.fingerprint(cert_pem),
            not_before=cert.not_valid_before_utc,
            not_after=cert.not_valid_after_utc,
            issued_at=now,
            source=source,
            status="active",
            revoked_at=None,
        )

    def issue_offline(
        self,
        hostname: str,
        *,
        now: datetime | None = None,
        validity: timedelta = pki.VALIDITY_CLIENT,
    ) -> tuple[str, bytes, bytes]:
        """Issue a key and certificate for an air-gapped host.

        Returns:
            ``(host_id, cert_pem, key_pem)``; the key is not kept here.
        """
        from certs.enrollment import check_hostname  # avoid a module cycle

        check_hostname(hostname)
        ca = self.load_ca()
        with self.transaction() as conn:
            host_id = self.new_host_id(conn)
            cert_pem, key_pem = ca.issue_client(host_id, now=now, validity=validity)
            self.record(conn, cert_pem, hostname=hostname, source="offline", now=now)
        return host_id, cert_pem, key_pem

    def certificates(self, host_id: str | None = None) -> list[IssuedCert]:
        """Issued certificates, oldest first; only ``host_id``'s if given."""
        query = (
            "SELECT serial, host_id, hostname, fingerprint, not_before, not_after, issued_at,"
            " source, status, revoked_at FROM certificates"
        )
        args: tuple[str, ...] = ()
        if host_id is not None:
            query += " WHERE host_id = ?"
            args = (host_id,)
        with self.reading() as conn:
            rows = conn.execute(query + " ORDER BY issued_at, serial", args).fetchall()
        return [
            IssuedCert(
                serial=int(r[0], 16),
                host_id=r[1],
                hostname=r[2],
                fingerprint=r[3],
                not_before=datetime.fromisoformat(r[4]),
                not_after=datetime.fromisoformat(r[5]),
                issued_at=datetime.fromisoformat(r[6]),
                source=r[7],
                status=r[8],
                revoked_at=datetime.fromisoformat(r[9]) if r[9] else None,
            )
            for r in rows
        ]

    def resolve_host(self, host: str) -> str:
        """Map a host id or a hostname to exactly one host id.

        Raises:
            UnknownHost: nothing matches, or a hostname matches several host ids.
        """
        with self.reading() as conn:
            if conn.execute("SELECT 1 FROM certificates WHERE host_id = ?", (host,)).fetchone():
                return host
            ids = sorted(
                {
                    r[0]
                    for r in conn.execute(
                        "SELECT host_id FROM certificates WHERE hostname = ?", (host,)
                    )
                }
            )
        if not ids:
            raise UnknownHost(f"no certificate was issued to a host id or hostname {host!r}")
        if len(ids) > 1:
            raise UnknownHost(
                f"hostname {host!r} matches several host ids ({', '.join(ids)}); name one host id"
            )
        return ids[0]

    def host_revoked(self, host_id: str) -> bool:
        """True once ``host_id`` has been revoked (revocation covers all its certificates)."""
        with self.reading() as conn:
            return (
                conn.execute(
                    "SELECT 1 FROM certificates WHERE host_id = ? AND status = 'revoked'",
                    (host_id,),
                ).fetchone()
                is not None
            )

    def is_revoked(self, serial: int) -> bool:
        with self.reading() as conn:
            row = conn.execute(
                "SELECT status FROM certificates WHERE serial = ?", (format(serial, "x"),)
            ).fetchone()
        return row is not None and row[0] == "revoked"

    # -- revocation --------------------------------------------------------------------

    def revoke(self, host: str, *, now: datetime | None = None) -> list[int]:
        """Revoke every certificate of a host (id or hostname) and rewrite the CRL.

        Returns:
            The serials newly revoked (empty if the host was already revoked).
        """
        host_id = self.resolve_host(host)
        now = now or datetime.now(UTC)
        with self.transaction() as conn:
            serials = [
                r[0]
                for r in conn.execute(
                    "SELECT serial FROM certificates WHERE host_id = ? AND status != 'revoked'",
                    (host_id,),
                )
            ]
            conn.execute(
                "UPDATE certificates SET status = 'revoked', revoked_at = ?"
                " WHERE host_id = ? AND status != 'revoked'",
                (_ts(now), host_id),
            )
            # Written while the transaction holds the write lock, so two revocations cannot
            # interleave and leave a CRL missing one of them. If writing fails, the rollback
            # keeps the database consistent with the CRL on disk.
            self._write_crl(conn, now)
        return [int(s, 16) for s in serials]

    def revoked_serials(self) -> list[tuple[int, datetime]]:
        with self.reading() as conn:
            return self._revoked(conn)

    @staticmethod
    def _revoked(conn: sqlite3.Connection) -> list[tuple[int, datetime]]:
        return [
            (int(r[0], 16), datetime.fromisoformat(r[1]))
            for r in conn.execute(
                "SELECT serial, revoked_at FROM certificates WHERE status = 'revoked'"
                " ORDER BY revoked_at, serial"
            )
        ]

    def _write_crl(self, conn: sqlite3.Connection, now: datetime | None) -> bytes:
        crl = self.load_ca().crl(self._revoked(conn), now=now, next_update=CRL_VALIDITY)
        write_atomic(self.crl_path, crl, 0o644)
        return crl

    def write_crl(self, *, now: datetime | None = None) -> bytes:
        """Regenerate ``crl.pem`` from the database; return it."""
        with self.transaction() as conn:
            return self._write_crl(conn, now)

    def refresh_crl(self, *, now: datetime | None = None) -> bool:
        """Rewrite the CRL once half its validity has passed (or it is missing or broken).

        The controller should call this periodically (hourly is plenty): a CRL past its
        next-update time makes strict verifiers reject every client.

        Returns:
            True if the CRL was rewritten.
        """
        now = now or datetime.now(UTC)
        try:
            crl = x509.load_pem_x509_crl(self.crl_path.read_bytes())
            next_update = crl.next_update_utc
        except (OSError, ValueError):
            next_update = None
        if next_update is not None and now < next_update - CRL_VALIDITY / 2:
            return False
        self.write_crl(now=now)
        return True

    # -- tokens ------------------------------------------------------------------------

    def create_token(
        self, ttl: timedelta, uses: int = 1, *, comment: str = "", now: datetime | None = None
    ) -> str:
        """Create an enrollment token; the returned secret is not stored and cannot be shown
        again."""
        with self.transaction() as conn:
            return tokens.create(conn, ttl, uses, comment=comment, now=now)

    def list_tokens(self) -> list[tokens.TokenInfo]:
        with self.reading() as conn:
            return tokens.list_all(conn)

    def revoke_token(self, token_id: str, *, now: datetime | None = None) -> None:
        with self.transaction() as conn:
            tokens.revoke(conn, token_id, now=now)

    def consume_token(self, token: str, *, now: datetime | None = None) -> str:
        """Check and count one use of a token on its own (enrollment does this itself)."""
        with self.transaction() as conn:
            return tokens.consume(conn, token, now=now)

"""The certificate authority: CA creation, server and client issuance, CSR signing, CRLs.

Every key is ECDSA P-256 unless a sensor brings its own (P-256, P-384 or Ed25519 through a
CSR). A sensor's identity is its host id, carried twice in its certificate: as the subject
CN and as the SAN URI ``urn:edr:host:<host_id>``. The backplane takes the identity from the
certificate (``host_id_of``), never from a message field.

Times are injectable (``now=``) because Python's ``ssl`` cannot take a fake clock: tests make
expired certificates by issuing them in the past.
"""

from __future__ import annotations

import hashlib
import ipaddress
import re
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

VALIDITY_CA = timedelta(days=3650)
VALIDITY_SERVER = timedelta(days=825)
VALIDITY_CLIENT = timedelta(days=90)
RENEW_BEFORE = timedelta(days=30)

# Certificates start slightly in the past so a sensor whose clock runs a little behind the
# controller's does not reject a certificate that is "not yet valid".
CLOCK_SKEW = timedelta(minutes=5)

HOST_URI_PREFIX = "urn:edr:host:"
ORGANIZATION = "EDR"

# Host ids are controller-assigned (secrets.token_hex(8)); offline issuance may use readable
# ids, so allow the same small alphabet as DNS labels.
_HOST_ID_RE = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,62})")
_DNS_LABEL_RE = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)")

_ALLOWED_CURVES = (ec.SECP256R1, ec.SECP384R1)


def _now(now: datetime | None) -> datetime:
    """Return ``now`` as an aware UTC datetime (naive values are taken as UTC)."""
    if now is None:
        return datetime.now(UTC)
    if now.tzinfo is None:
        return now.replace(tzinfo=UTC)
    return now.astimezone(UTC)


def validate_host_id(host_id: str) -> str:
    """Return ``host_id`` if it is a well-formed host id, else raise ValueError."""
    if not isinstance(host_id, str) or not _HOST_ID_RE.fullmatch(host_id):
        raise ValueError(
            f"invalid host id {host_id!r}: expected 1-63 characters of [a-z0-9-], "
            "starting with a letter or digit"
        )
    return host_id


def _general_name(name: str) -> x509.GeneralName:
    """Turn a controller name (DNS name or IP address) into a SAN entry."""
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        pass
    if not name or len(name) > 253:
        raise ValueError(f"invalid server name {name!r}: empty or longer than 253 characters")
    labels = name.rstrip(".").split(".")
    if not all(_DNS_LABEL_RE.fullmatch(label) for label in labels):
        raise ValueError(f"invalid server name {name!r}: not a DNS name or IP address")
    return x509.DNSName(name.rstrip(".").lower())


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def fingerprint(cert_pem: bytes) -> str:
    """Lowercase hex SHA-256 of the DER encoding of a PEM certificate."""
    cert = x509.load_pem_x509_certificate(cert_pem)
    return hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()


def host_id_of(cert: x509.Certificate) -> str:
    """Return the host id a client certificate was issued to.

    The subject CN must be exactly the host id and the SAN must carry the matching URI
    ``urn:edr:host:<host_id>``; anything else (a server certificate, a CA, a certificate
    whose two fields disagree) raises ValueError.
    """
    cns = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if len(cns) != 1 or not isinstance(cns[0].value, str):
        raise ValueError("certificate carries no host identity: no single subject CN")
    host_id = cns[0].value
    try:
        validate_host_id(host_id)
    except ValueError as exc:
        raise ValueError(f"certificate carries no host identity: {exc}") from None
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        raise ValueError("certificate carries no host identity: no SAN extension") from None
    uris = [
        u
        for u in san.get_values_for_type(x509.UniformResourceIdentifier)
        if u.startswith(HOST_URI_PREFIX)
    ]
    if uris != [HOST_URI_PREFIX + host_id]:
        raise ValueError(
            f"certificate carries no host identity: SAN URIs {uris!r} do not match CN {host_id!r}"
        )
    return host_id


def check_public_key(key: object) -> None:
    """Accept ECDSA P-256/P-384 and Ed25519 public keys; raise ValueError for anything else."""
    if isinstance(key, ec.EllipticCurvePublicKey):
        if isinstance(key.curve, _ALLOWED_CURVES):
            return
        raise ValueError(
            f"refused key type: ECDSA curve {key.curve.name} (allowed: P-256, P-384, Ed25519)"
        )
    if isinstance(key, ed25519.Ed25519PublicKey):
        return
    kind = type(key).__name__.removeprefix("_").replace("PublicKey", "")
    size = getattr(key, "key_size", None)
    detail = f"{kind}-{size}" if size else kind
    raise ValueError(f"refused key type: {detail} (allowed: ECDSA P-256, P-384, Ed25519)")


def load_csr(csr_pem: bytes) -> x509.CertificateSigningRequest:
    """Parse a PEM CSR and check its key type and self-signature.

    Raises:
        ValueError: unparsable CSR, refused key type, or a signature that does not verify.
    """
    try:
        csr = x509.load_pem_x509_csr(csr_pem)
    except ValueError as exc:
        raise ValueError(f"CSR is not a valid PEM certificate request: {exc}") from None
    try:
        public_key = csr.public_key()
    except (ValueError, x509.UnsupportedGeneralNameType) as exc:
        raise ValueError(f"CSR public key cannot be read: {exc}") from None
    check_public_key(public_key)
    try:
        signature_ok = csr.is_signature_valid
    except (ValueError, InvalidSignature):
        signature_ok = False
    if not signature_ok:
        raise ValueError("CSR signature is invalid: the request was not signed by its key")
    return csr


class CertificateAuthority:
    """An EDR certificate authority: a self-signed ECDSA P-256 CA and its private key."""

    def __init__(self, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> None:
        self.cert = cert
        self._key = key
        self.cert_pem = cert.public_bytes(serialization.Encoding.PEM)
        self.key_pem = _key_pem(key)
        self.fingerprint_sha256 = hashlib.sha256(
            cert.public_bytes(serialization.Encoding.DER)
        ).hexdigest()
        self._ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())

    @classmethod
    def create(
        cls,
        common_name: str = "EDR CA",
        *,
        now: datetime | None = None,
        validity: timedelta = VALIDITY_CA,
    ) -> CertificateAuthority:
        """Create a new self-signed CA valid for ``validity`` from ``now``."""
        if not common_name:
            raise ValueError("CA common name must not be empty")
        start = _now(now)
        key = _new_key()
        name = x509.Name(
            [
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, ORGANIZATION),
                x509.NameAttribute(NameOID.COMMON_NAME, common_name),
            ]
        )
        ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start - CLOCK_SKEW)
            .not_valid_after(start + validity)
            # path_length=0: this CA signs leaves only, never another CA.
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(ski, critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski),
                critical=False,
            )
            .sign(key, hashes.SHA256())
        )
        return cls(cert, key)

    @classmethod
    def load(cls, cert_pem: bytes, key_pem: bytes) -> CertificateAuthority:
        """Load a CA from PEM; raise ValueError if the pair is not a usable CA."""
        try:
            cert = x509.load_pem_x509_certificate(cert_pem)
        except ValueError as exc:
            raise ValueError(f"CA certificate is not a valid PEM certificate: {exc}") from None
        try:
            key = serialization.load_pem_private_key(key_pem, password=None)
        except (ValueError, TypeError) as exc:
            raise ValueError(f"CA key is not an unencrypted PEM private key: {exc}") from None
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise ValueError("CA key is not an ECDSA key")
        if key.public_key() != cert.public_key():
            raise ValueError("CA key does not match the CA certificate")
        try:
            bc = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
        except x509.ExtensionNotFound:
            bc = None
        if bc is None or not bc.ca:
            raise ValueError("certificate is not a CA certificate (basicConstraints CA=false)")
        return cls(cert, key)

    # -- issuance ----------------------------------------------------------------------

    def _leaf(
        self,
        subject: x509.Name,
        public_key: ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey,
        sans: list[x509.GeneralName],
        eku: x509.ObjectIdentifier,
        now: datetime | None,
        validity: timedelta,
    ) -> x509.Certificate:
        start = _now(now)
        if validity <= timedelta(0):
            raise ValueError("validity must be positive")
        # A leaf never outlives its CA: verifiers would reject the chain at CA expiry anyway.
        end = min(start + validity, self.cert.not_valid_after_utc)
        if end <= start:
            raise ValueError("the CA has expired; create a new CA")
        return (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(self.cert.subject)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(max(start - CLOCK_SKEW, self.cert.not_valid_before_utc))
            .not_valid_after(end)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=False,
                    crl_sign=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.ExtendedKeyUsage([eku]), critical=False)
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(self._ski),
                critical=False,
            )
            .sign(self._key, hashes.SHA256())
        )

    def issue_server(
        self,
        names: list[str],
        *,
        now: datetime | None = None,
        validity: timedelta = VALIDITY_SERVER,
    ) -> tuple[bytes, bytes]:
        """Issue the controller's certificate; ``names`` (DNS names or IPs) become SANs.

        Returns:
            ``(cert_pem, key_pem)``.
        """
        if not names:
            raise ValueError("a server certificate needs at least one DNS name or IP address")
        sans = [_general_name(n) for n in names]
        key = _new_key()
        subject = x509.Name(
            [
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, ORGANIZATION),
                x509.NameAttribute(NameOID.COMMON_NAME, names[0][:64]),
            ]
        )
        cert = self._leaf(
            subject, key.public_key(), sans, ExtendedKeyUsageOID.SERVER_AUTH, now, validity
        )
        return cert.public_bytes(serialization.Encoding.PEM), _key_pem(key)

    def _client(
        self,
        host_id: str,
        public_key: ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey,
        now: datetime | None,
        validity: timedelta,
    ) -> bytes:
        validate_host_id(host_id)
        subject = x509.Name(
            [
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, ORGANIZATION),
                x509.NameAttribute(NameOID.COMMON_NAME, host_id),
            ]
        )
        sans: list[x509.GeneralName] = [x509.UniformResourceIdentifier(HOST_URI_PREFIX + host_id)]
        cert = self._leaf(subject, public_key, sans, ExtendedKeyUsageOID.CLIENT_AUTH, now, validity)
        return cert.public_bytes(serialization.Encoding.PEM)

    def issue_client(
        self,
        host_id: str,
        *,
        now: datetime | None = None,
        validity: timedelta = VALIDITY_CLIENT,
    ) -> tuple[bytes, bytes]:
        """Generate a key and issue a client certificate for ``host_id`` (offline issuance).

        Returns:
            ``(cert_pem, key_pem)``.
        """
        validate_host_id(host_id)
        key = _new_key()
        return self._client(host_id, key.public_key(), now, validity), _key_pem(key)

    def sign_csr(
        self,
        csr_pem: bytes,
        host_id: str,
        *,
        now: datetime | None = None,
        validity: timedelta = VALIDITY_CLIENT,
    ) -> bytes:
        """Sign a sensor's CSR as a client certificate for ``host_id``.

        Only the CSR's public key is used: subject and extensions are set by the CA, never
        copied from the request.

        Raises:
            ValueError: unparsable CSR, bad signature, or a refused key type.
        """
        validate_host_id(host_id)
        csr = load_csr(csr_pem)
        public_key = csr.public_key()
        assert isinstance(public_key, ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey)
        return self._client(host_id, public_key, now, validity)

    def crl(
        self,
        revoked: Iterable[tuple[int, datetime]],
        *,
        now: datetime | None = None,
        next_update: timedelta = timedelta(days=7),
    ) -> bytes:
        """Build a CRL (PEM) listing ``(serial, revoked_at)`` pairs."""
        start = _now(now)
        builder = (
            x509.CertificateRevocationListBuilder()
            .issuer_name(self.cert.subject)
            .last_update(start)
            .next_update(start + next_update)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(self._ski),
                critical=False,
            )
            # CRL numbers must grow; milliseconds since the epoch do without stored state.
            .add_extension(x509.CRLNumber(int(start.timestamp() * 1000)), critical=False)
        )
        for serial, when in revoked:
            builder = builder.add_revoked_certificate(
                x509.RevokedCertificateBuilder()
                .serial_number(serial)
                .revocation_date(_now(when))
                .build()
            )
        crl = builder.sign(self._key, hashes.SHA256())
        return crl.public_bytes(serialization.Encoding.PEM)

"""certs.pki: chains verify with an injected clock, CSR rules, CRLs, host identity."""

from __future__ import annotations

import base64
import ipaddress
import socket
import ssl
import threading
from datetime import UTC, datetime, timedelta

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509 import verification
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from certs import pki

T0 = datetime(2030, 1, 1, tzinfo=UTC)


def _csr(key, cn: str = "evil-admin", extra_san: bool = True) -> bytes:
    builder = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    )
    if extra_san:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.DNSName("controller.example")]), critical=False
        )
    algo = None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256()
    return builder.sign(key, algo).public_bytes(serialization.Encoding.PEM)


def _csr_pem(der: bytes) -> bytes:
    body = base64.encodebytes(der)
    return b"-----BEGIN CERTIFICATE REQUEST-----\n" + body + b"-----END CERTIFICATE REQUEST-----\n"


def _client_verify(ca: pki.CertificateAuthority, cert_pem: bytes, when: datetime):
    store = verification.Store([ca.cert])
    verifier = verification.PolicyBuilder().store(store).time(when).build_client_verifier()
    return verifier.verify(x509.load_pem_x509_certificate(cert_pem), [])


def _server_verify(ca: pki.CertificateAuthority, cert_pem: bytes, name, when: datetime):
    store = verification.Store([ca.cert])
    verifier = verification.PolicyBuilder().store(store).time(when).build_server_verifier(name)
    return verifier.verify(x509.load_pem_x509_certificate(cert_pem), [])


@pytest.fixture(scope="module")
def ca() -> pki.CertificateAuthority:
    return pki.CertificateAuthority.create(now=T0)


def test_ca_properties(ca: pki.CertificateAuthority) -> None:
    assert isinstance(ca.cert.public_key(), ec.EllipticCurvePublicKey)
    assert isinstance(ca.cert.public_key().curve, ec.SECP256R1)
    bc = ca.cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and bc.value.ca
    assert ca.cert.not_valid_after_utc - T0 == pki.VALIDITY_CA
    assert ca.key_pem.startswith(b"-----BEGIN PRIVATE KEY-----")  # PKCS8, unencrypted
    assert ca.fingerprint_sha256 == pki.fingerprint(ca.cert_pem)
    assert len(ca.fingerprint_sha256) == 64
    assert ca.fingerprint_sha256 == ca.fingerprint_sha256.lower()


def test_load_roundtrip_and_refusals(ca: pki.CertificateAuthority) -> None:
    again = pki.CertificateAuthority.load(ca.cert_pem, ca.key_pem)
    assert again.fingerprint_sha256 == ca.fingerprint_sha256
    other = pki.CertificateAuthority.create(now=T0)
    with pytest.raises(ValueError, match="does not match"):
        pki.CertificateAuthority.load(ca.cert_pem, other.key_pem)
    with pytest.raises(ValueError, match="not a valid PEM"):
        pki.CertificateAuthority.load(b"garbage", ca.key_pem)
    with pytest.raises(ValueError, match="private key"):
        pki.CertificateAuthority.load(ca.cert_pem, b"garbage")
    leaf_pem, leaf_key = ca.issue_client("abc", now=T0)
    with pytest.raises(ValueError, match="not a CA"):
        pki.CertificateAuthority.load(leaf_pem, leaf_key)


def test_client_chain_verifies_and_expires(ca: pki.CertificateAuthority) -> None:
    cert_pem, key_pem = ca.issue_client("0123456789abcdef", now=T0)
    cert = x509.load_pem_x509_certificate(cert_pem)
    assert pki.host_id_of(cert) == "0123456789abcdef"
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    key = serialization.load_pem_private_key(key_pem, None)
    assert key.public_key() == cert.public_key()
    verified = _client_verify(ca, cert_pem, T0 + timedelta(days=1))
    assert verified.chain[-1] == ca.cert
    # Still valid on the last day, refused the day after: the injected clock drives expiry.
    _client_verify(ca, cert_pem, T0 + pki.VALIDITY_CLIENT - timedelta(minutes=1))
    with pytest.raises(verification.VerificationError):
        _client_verify(ca, cert_pem, T0 + pki.VALIDITY_CLIENT + timedelta(days=1))
    # Another CA does not vouch for it.
    with pytest.raises(verification.VerificationError):
        _client_verify(pki.CertificateAuthority.create(now=T0), cert_pem, T0)


def test_leaf_never_outlives_ca() -> None:
    short = pki.CertificateAuthority.create(now=T0, validity=timedelta(days=10))
    cert = x509.load_pem_x509_certificate(short.issue_client("h1", now=T0)[0])
    assert cert.not_valid_after_utc == short.cert.not_valid_after_utc
    with pytest.raises(ValueError, match="expired"):
        short.issue_client("h1", now=T0 + timedelta(days=11))


def test_server_chain_verifies_with_sans(ca: pki.CertificateAuthority) -> None:
    cert_pem, _ = ca.issue_server(["controller.example", "127.0.0.1", "::1"], now=T0)
    when = T0 + timedelta(days=2)
    _server_verify(ca, cert_pem, verification.DNSName("controller.example"), when)
    _server_verify(ca, cert_pem, verification.IPAddress(ipaddress.ip_address("127.0.0.1")), when)
    _server_verify(ca, cert_pem, verification.IPAddress(ipaddress.ip_address("::1")), when)
    with pytest.raises(verification.VerificationError):
        _server_verify(ca, cert_pem, verification.DNSName("other.example"), when)
    with pytest.raises(ValueError, match="no host identity"):
        pki.host_id_of(x509.load_pem_x509_certificate(cert_pem))
    with pytest.raises(ValueError, match="no host identity"):
        pki.host_id_of(ca.cert)


@pytest.mark.parametrize("bad", [[], [""], ["bad name"], ["a..b"], ["-x.example"], ["x" * 300]])
def test_server_names_refused(ca: pki.CertificateAuthority, bad: list[str]) -> None:
    with pytest.raises(ValueError):
        ca.issue_server(bad, now=T0)


@pytest.mark.parametrize("bad", ["", "UPPER", "has space", "-lead", "a/b", "x" * 64, "a_b"])
def test_host_id_refused(ca: pki.CertificateAuthority, bad: str) -> None:
    with pytest.raises(ValueError, match="invalid host id"):
        ca.issue_client(bad, now=T0)


@pytest.mark.parametrize(
    "make_key",
    [
        lambda: ec.generate_private_key(ec.SECP256R1()),
        lambda: ec.generate_private_key(ec.SECP384R1()),
        ed25519.Ed25519PrivateKey.generate,
    ],
    ids=["p256", "p384", "ed25519"],
)
def test_sign_csr_accepts_allowed_keys_and_ignores_subject(ca, make_key) -> None:
    key = make_key()
    cert_pem = ca.sign_csr(_csr(key), "host-1", now=T0)
    cert = x509.load_pem_x509_certificate(cert_pem)
    assert cert.public_key() == key.public_key()
    # Subject and SAN come from the CA, never from the CSR's "evil-admin"/controller.example.
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "host-1"
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert list(san) == [x509.UniformResourceIdentifier("urn:edr:host:host-1")]
    assert pki.host_id_of(cert) == "host-1"
    _client_verify(ca, cert_pem, T0)


def test_sign_csr_refuses_rsa_and_other_curves(ca: pki.CertificateAuthority) -> None:
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=1024)  # noqa: S505 - the point is refusing it
    with pytest.raises(ValueError, match="refused key type: RSA-1024"):
        ca.sign_csr(_csr(rsa_key), "h", now=T0)
    k1 = ec.generate_private_key(ec.SECP256K1())
    with pytest.raises(ValueError, match="secp256k1"):
        ca.sign_csr(_csr(k1), "h", now=T0)


def test_sign_csr_refuses_bad_signature(ca: pki.CertificateAuthority) -> None:
    pem = _csr(ec.generate_private_key(ec.SECP256R1()))
    der = bytearray(x509.load_pem_x509_csr(pem).public_bytes(serialization.Encoding.DER))
    der[-5] ^= 0x55  # inside the ECDSA signature's integers
    tampered = _csr_pem(bytes(der))
    with pytest.raises(ValueError, match="CSR"):
        ca.sign_csr(tampered, "h", now=T0)


def test_sign_csr_refuses_swapped_key(ca: pki.CertificateAuthority) -> None:
    key_a = ec.generate_private_key(ec.SECP256R1())
    key_b = ec.generate_private_key(ec.SECP256R1())
    der_a = x509.load_pem_x509_csr(_csr(key_a)).public_bytes(serialization.Encoding.DER)
    spki_a = key_a.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    spki_b = key_b.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    assert len(spki_a) == len(spki_b) and spki_a in der_a
    pem = _csr_pem(der_a.replace(spki_a, spki_b))
    with pytest.raises(ValueError, match="signature is invalid"):
        ca.sign_csr(pem, "h", now=T0)


def test_sign_csr_refuses_garbage(ca: pki.CertificateAuthority) -> None:
    with pytest.raises(ValueError, match="not a valid PEM"):
        ca.sign_csr(b"not a csr", "h", now=T0)


def test_crl_lists_revoked_serials(ca: pki.CertificateAuthority) -> None:
    certs = [x509.load_pem_x509_certificate(ca.issue_client(f"h{i}", now=T0)[0]) for i in range(3)]
    crl_pem = ca.crl([(certs[0].serial_number, T0), (certs[2].serial_number, T0)], now=T0)
    crl = x509.load_pem_x509_crl(crl_pem)
    assert crl.is_signature_valid(ca.cert.public_key())
    assert crl.get_revoked_certificate_by_serial_number(certs[0].serial_number) is not None
    assert crl.get_revoked_certificate_by_serial_number(certs[1].serial_number) is None
    assert crl.get_revoked_certificate_by_serial_number(certs[2].serial_number) is not None
    assert crl.next_update_utc == T0 + timedelta(days=7)
    later = x509.load_pem_x509_crl(ca.crl([], now=T0 + timedelta(seconds=1)))
    num = x509.CRLNumber
    assert (
        later.extensions.get_extension_for_class(num).value.crl_number
        > crl.extensions.get_extension_for_class(num).value.crl_number
    )


def test_host_id_of_refuses_mismatched_fields(ca: pki.CertificateAuthority) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "aaa")]))
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(T0)
        .not_valid_after(T0 + timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier("urn:edr:host:bbb")]),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    with pytest.raises(ValueError, match="do not match"):
        pki.host_id_of(cert)


def test_real_mutual_tls_handshake_over_loopback(tmp_path) -> None:
    """The certificates work with Python's ssl (OpenSSL) in a real mutual-TLS 1.3 handshake."""
    ca = pki.CertificateAuthority.create()
    srv_cert, srv_key = ca.issue_server(["127.0.0.1"])
    cli_cert, cli_key = ca.issue_client("feedface00000001")
    for name, data in [
        ("ca.pem", ca.cert_pem),
        ("s.pem", srv_cert),
        ("s.key", srv_key),
        ("c.pem", cli_cert),
        ("c.key", cli_key),
    ]:
        (tmp_path / name).write_bytes(data)
    sctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    sctx.minimum_version = ssl.TLSVersion.TLSv1_3
    sctx.load_cert_chain(tmp_path / "s.pem", tmp_path / "s.key")
    sctx.load_verify_locations(tmp_path / "ca.pem")
    sctx.verify_mode = ssl.CERT_REQUIRED
    sctx.verify_flags |= ssl.VERIFY_X509_STRICT
    cctx = ssl.create_default_context(cafile=str(tmp_path / "ca.pem"))
    cctx.verify_flags |= ssl.VERIFY_X509_STRICT
    cctx.load_cert_chain(tmp_path / "c.pem", tmp_path / "c.key")

    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(10)
    seen: dict[str, str] = {}

    def serve() -> None:
        conn, _ = listener.accept()
        with sctx.wrap_socket(conn, server_side=True) as tls:
            der = tls.getpeercert(binary_form=True)
            seen["host"] = pki.host_id_of(x509.load_der_x509_certificate(der))
            seen["version"] = tls.version() or ""
            tls.sendall(b"ok")

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    with (
        socket.create_connection(listener.getsockname(), timeout=10) as raw,
        cctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
    ):
        assert tls.recv(2) == b"ok"
    t.join(10)
    listener.close()
    assert seen == {"host": "feedface00000001", "version": "TLSv1.3"}

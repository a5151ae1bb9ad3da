"""certs.store, certs.tokens and certs.enrollment against a real state directory and SQLite."""

from __future__ import annotations

import os
import stat
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509 import verification

from certs import enrollment, pki, tokens
from certs.enrollment import Enrollment, EnrollmentError, renewal_due
from certs.store import AlreadyInitialized, NotInitialized, PKIStore, UnknownHost

pytestmark = pytest.mark.timeout(60)


def _mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


def test_init_layout_and_permissions(store: PKIStore) -> None:
    assert _mode(store.state_dir) == 0o700
    assert _mode(store.ca_key_path) == 0o600
    assert _mode(store.server_key_path) == 0o600
    assert _mode(store.db_path) == 0o600
    assert _mode(store.ca_path) == 0o644
    crl = x509.load_pem_x509_crl(store.crl_path.read_bytes())
    assert len(list(crl)) == 0
    ca = store.load_ca()
    assert crl.is_signature_valid(ca.cert.public_key())
    server = x509.load_pem_x509_certificate(store.server_cert_path.read_bytes())
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["localhost"]
    with store.reading() as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_init_refuses_overwrite_and_force_keeps_backup(store: PKIStore) -> None:
    old_fp = store.load_ca().fingerprint_sha256
    with pytest.raises(AlreadyInitialized, match="refusing to overwrite"):
        store.init(["localhost"])
    assert store.load_ca().fingerprint_sha256 == old_fp
    host_id, _, _ = store.issue_offline("box")
    fresh = PKIStore(store.state_dir)
    fresh.init(["localhost"], force=True)
    assert fresh.load_ca().fingerprint_sha256 != old_fp
    backups = list(store.state_dir.glob("replaced-*/ca.key"))
    assert len(backups) == 1 and _mode(backups[0]) == 0o600
    assert pki.fingerprint(backups[0].with_name("ca.pem").read_bytes()) == old_fp
    assert [c.status for c in fresh.certificates(host_id)] == ["orphaned"]


def test_init_bad_names_writes_nothing(tmp_path: Path) -> None:
    s = PKIStore(tmp_path / "pki")
    with pytest.raises(ValueError, match="invalid server name"):
        s.init(["not a name"])
    assert not s.state_dir.exists()


def test_uninitialised_store_refuses_clearly(tmp_path: Path) -> None:
    s = PKIStore(tmp_path / "none")
    with pytest.raises(NotInitialized, match="edr-certs init"):
        s.load_ca()
    with pytest.raises(NotInitialized):
        s.create_token(timedelta(hours=1))
    assert not (tmp_path / "none").exists()


def test_offline_issue_revoke_and_crl(store: PKIStore) -> None:
    host_a, cert_a, _key_a = store.issue_offline("alpha")
    host_b, cert_b, _ = store.issue_offline("beta")
    assert host_a != host_b and len(host_a) == 16
    serial_a = x509.load_pem_x509_certificate(cert_a).serial_number
    serial_b = x509.load_pem_x509_certificate(cert_b).serial_number
    assert store.revoke("alpha") == [serial_a]  # by hostname
    assert store.revoke(host_a) == []  # already revoked: nothing new
    crl = x509.load_pem_x509_crl(store.crl_path.read_bytes())
    assert crl.get_revoked_certificate_by_serial_number(serial_a) is not None
    assert crl.get_revoked_certificate_by_serial_number(serial_b) is None
    assert store.is_revoked(serial_a) and not store.is_revoked(serial_b)
    assert store.host_revoked(host_a) and not store.host_revoked(host_b)
    [row] = store.certificates(host_a)
    assert row.status == "revoked" and row.revoked_at is not None
    with pytest.raises(UnknownHost, match="no certificate"):
        store.revoke("nobody")


def test_revoke_ambiguous_hostname(store: PKIStore) -> None:
    a, _, _ = store.issue_offline("same")
    b, _, _ = store.issue_offline("same")
    with pytest.raises(UnknownHost, match="several host ids"):
        store.revoke("same")
    assert not store.host_revoked(a) and not store.host_revoked(b)


def test_refresh_crl(store: PKIStore) -> None:
    now = datetime.now(UTC)
    assert not store.refresh_crl(now=now + timedelta(days=1))
    assert store.refresh_crl(now=now + timedelta(days=4))
    crl = x509.load_pem_x509_crl(store.crl_path.read_bytes())
    assert crl.next_update_utc > now + timedelta(days=10)
    store.crl_path.write_bytes(b"broken")
    assert store.refresh_crl()


# -- tokens ------------------------------------------------------------------------------


def test_token_hashed_at_rest(store: PKIStore) -> None:
    token = store.create_token(timedelta(hours=1), 1, comment="rack 4")
    token_id, secret = token.split(".")
    raw = b"".join(p.read_bytes() for p in store.state_dir.glob("pki.db*"))
    assert secret.encode() not in raw and token.encode() not in raw
    [info] = store.list_tokens()
    assert info.id == token_id and info.comment == "rack 4" and info.status() == "active"


def test_token_uses_counted_then_used_up(store: PKIStore) -> None:
    token = store.create_token(timedelta(hours=1), 3)
    for n in range(3):
        store.consume_token(token)
        assert store.list_tokens()[0].uses_count == n + 1
    with pytest.raises(tokens.TokenUsedUp, match="used 3 of 3"):
        store.consume_token(token)
    assert store.list_tokens()[0].status() == "used"


def test_token_expired_unknown_malformed_revoked(store: PKIStore) -> None:
    now = datetime.now(UTC)
    token = store.create_token(timedelta(minutes=5), 1, now=now)
    with pytest.raises(tokens.TokenExpired, match="expired"):
        store.consume_token(token, now=now + timedelta(minutes=5))
    token_id, secret = token.split(".")
    wrong = f"{token_id}.{'A' * 43}"
    with pytest.raises(tokens.TokenUnknown, match="unknown"):
        store.consume_token(wrong, now=now)
    with pytest.raises(tokens.TokenUnknown, match="unknown"):
        store.consume_token(f"deadbeef.{secret}", now=now)
    for bad in ["", "nodot", f"{token_id}.{secret}x", "x" * 500, None]:
        with pytest.raises(tokens.TokenMalformed):
            store.consume_token(bad, now=now)  # type: ignore[arg-type]
    store.revoke_token(token_id)
    with pytest.raises(tokens.TokenRevoked):
        store.consume_token(token, now=now)
    assert store.list_tokens()[0].uses_count == 0  # no refusal counted a use
    with pytest.raises(tokens.TokenUnknown):
        store.revoke_token("00000000")
    with pytest.raises(ValueError, match="8 hex"):
        store.revoke_token("zz")


@pytest.mark.parametrize(
    ("ttl", "uses"),
    [
        (timedelta(0), 1),
        (timedelta(days=31), 1),
        (timedelta(hours=1), 0),
        (timedelta(hours=1), 10**6),
    ],
)
def test_token_create_limits(store: PKIStore, ttl: timedelta, uses: int) -> None:
    with pytest.raises(ValueError):
        store.create_token(ttl, uses)
    assert store.list_tokens() == []


def test_one_use_token_concurrently_succeeds_once(store: PKIStore, csr) -> None:
    token = store.create_token(timedelta(hours=1), 1)
    results: list[str] = []
    barrier = threading.Barrier(8)

    def attempt() -> None:
        mine = PKIStore(store.state_dir)  # own object, own connections, like separate workers
        barrier.wait()
        try:
            Enrollment(mine).enroll(token, csr(), "racer")
            results.append("ok")
        except EnrollmentError as exc:
            results.append(str(exc))

    threads = [threading.Thread(target=attempt) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert results.count("ok") == 1, results
    assert all("used" in r for r in results if r != "ok")
    assert len(store.certificates()) == 1


# -- enrollment --------------------------------------------------------------------------


def test_enroll_signs_records_and_verifies(store: PKIStore, csr) -> None:
    token = store.create_token(timedelta(hours=1), 1)
    host_id, cert_pem, ca_pem = Enrollment(store).enroll(token, csr(cn="admin"), "web-01")
    cert = x509.load_pem_x509_certificate(cert_pem)
    assert pki.host_id_of(cert) == host_id
    assert ca_pem == store.ca_path.read_bytes()
    [row] = store.certificates()
    assert (row.host_id, row.hostname, row.source, row.status) == (
        host_id,
        "web-01",
        "enroll",
        "active",
    )
    verifier = (
        verification.PolicyBuilder()
        .store(verification.Store([store.load_ca().cert]))
        .time(datetime.now(UTC))
        .build_client_verifier()
    )
    verifier.verify(cert, [])


def test_bad_csr_does_not_burn_token(store: PKIStore, csr) -> None:
    token = store.create_token(timedelta(hours=1), 1)
    e = Enrollment(store)
    weak = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    with pytest.raises(EnrollmentError, match="refused key type: RSA-2048"):
        e.enroll(token, csr(weak), "h")
    with pytest.raises(EnrollmentError, match="too large"):
        e.enroll(token, b"A" * (enrollment.MAX_CSR_BYTES + 1), "h")
    with pytest.raises(EnrollmentError, match="not a valid PEM"):
        e.enroll(token, "garbage", "h")
    with pytest.raises(EnrollmentError, match="invalid hostname"):
        e.enroll(token, csr(), "bad host;rm")
    assert store.list_tokens()[0].uses_count == 0
    assert store.certificates() == []
    e.enroll(token, csr(), "h")  # the token is still good


def test_bad_token_public_message_is_generic(store: PKIStore, csr) -> None:
    with pytest.raises(EnrollmentError) as info:
        Enrollment(store).enroll("deadbeef." + "A" * 43, csr(), "h")
    assert info.value.public_message == "invalid or expired token"
    assert "unknown" in str(info.value)


def test_renew_rotates_and_refuses_revoked(store: PKIStore, csr) -> None:
    e = Enrollment(store)
    token = store.create_token(timedelta(hours=1), 1)
    host_id, _first, _ = e.enroll(token, csr(), "web-02")
    second = e.renew(host_id, csr())
    assert pki.host_id_of(x509.load_pem_x509_certificate(second)) == host_id
    rows = store.certificates(host_id)
    assert [r.status for r in rows] == ["superseded", "active"]
    assert [r.source for r in rows] == ["enroll", "renew"] and rows[1].hostname == "web-02"
    with pytest.raises(EnrollmentError, match="not enrolled"):
        e.renew("0000000000000000", csr())
    with pytest.raises(EnrollmentError, match="refused key type"):
        e.renew(host_id, csr(rsa.generate_private_key(public_exponent=65537, key_size=2048)))
    store.revoke(host_id)
    with pytest.raises(EnrollmentError, match="revoked"):
        e.renew(host_id, csr())
    crl = x509.load_pem_x509_crl(store.crl_path.read_bytes())
    assert len(list(crl)) == 2  # the superseded certificate is revoked too


def test_renewal_due() -> None:
    ca = pki.CertificateAuthority.create()
    t0 = datetime(2031, 5, 1, tzinfo=UTC)
    cert = x509.load_pem_x509_certificate(ca.issue_client("h", now=t0)[0])
    assert not renewal_due(cert, t0)
    assert not renewal_due(cert, t0 + pki.VALIDITY_CLIENT - pki.RENEW_BEFORE - timedelta(hours=1))
    assert renewal_due(cert, t0 + pki.VALIDITY_CLIENT - pki.RENEW_BEFORE + timedelta(hours=1))
    short = x509.load_pem_x509_certificate(
        ca.issue_client("h", now=t0, validity=timedelta(days=3))[0]
    )
    assert not renewal_due(short, t0 + timedelta(days=1))
    assert renewal_due(short, t0 + timedelta(days=2, hours=1))


def test_umask_restored(store: PKIStore) -> None:
    before = os.umask(0o022)
    os.umask(before)
    store.issue_offline("x")
    store.revoke("x")
    now = os.umask(0o022)
    os.umask(now)
    assert now == before

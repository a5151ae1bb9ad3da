"""Fixtures for the PKI tests: a freshly initialised state directory per test."""

from __future__ import annotations

from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509 import CertificateSigningRequestBuilder, Name, NameAttribute
from cryptography.x509.oid import NameOID

from certs.store import PKIStore


@pytest.fixture
def store(tmp_path: Path) -> PKIStore:
    s = PKIStore(tmp_path / "pki")
    s.init(["127.0.0.1", "localhost"])
    return s


@pytest.fixture
def csr():
    """A factory: ``csr(key=None, cn=...)`` returns a PEM CSR signed by ``key`` (new P-256)."""
    return _make_csr


def _make_csr(key=None, cn: str = "whatever") -> bytes:
    key = key or ec.generate_private_key(ec.SECP256R1())
    return (
        CertificateSigningRequestBuilder()
        .subject_name(Name([NameAttribute(NameOID.COMMON_NAME, cn)]))
        .sign(key, hashes.SHA256())
        .public_bytes(serialization.Encoding.PEM)
    )

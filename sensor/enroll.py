"""``edr-sensor enroll``: get this host a client certificate from the controller.

The sensor makes its own ECDSA P-256 key (it never leaves the host), fetches the CA
certificate without verification, accepts it only if its SHA-256 matches the fingerprint the
admin gave out (``edr-certs fingerprint``), and then sends the token and CSR over TLS verified
against that CA. Nothing is sent before the pin matches, so a man in the middle learns
neither the token nor the CSR.

Files in the state directory (0700): ``sensor.key`` (0600), ``sensor.pem``, ``ca.pem``,
``host_id``. The key is written first (as ``sensor.key.pending``) and the identity is
switched over only once the certificate is in hand, so a failed enrollment never clobbers a
working one.
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import http.client
import ipaddress
import json
import os
import re
import socket
import ssl
import sys
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from backplane.files import write_atomic

DEFAULT_PORT = 8443
DEFAULT_STATE_DIR = Path("/var/lib/edr/sensor")
ENROLL_PATH = "/api/v1/enroll"
CA_PATH = "/api/v1/enroll/ca"
TIMEOUT = 15.0
MAX_RESPONSE = 1024 * 1024
_HOST_RE = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9.-]{0,252})")


class EnrollError(Exception):
    """Enrollment failed; the message is meant for the operator."""


def parse_controller(controller: str, default_port: int = DEFAULT_PORT) -> tuple[str, int]:
    """Split ``HOST[:PORT]``, ``[V6]:PORT`` or ``https://HOST[:PORT]`` into host and port.

    The one parser of controller addresses: enrollment (HTTPS) and the backplane use it.
    """
    text = controller.strip()
    if text.startswith("https://"):
        text = text[len("https://") :].rstrip("/")
    elif "://" in text:
        raise EnrollError(f"controller {controller!r}: only https:// is supported")
    host, port_text = text, ""
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise EnrollError(f"controller {controller!r}: unclosed '[' in IPv6 address")
        host, rest = text[1:end], text[end + 1 :]
        if rest:
            if not rest.startswith(":"):
                raise EnrollError(f"controller {controller!r}: expected ':PORT' after ']'")
            port_text = rest[1:]
    elif text.count(":") == 1:
        host, port_text = text.split(":")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        if not _HOST_RE.fullmatch(host):
            raise EnrollError(f"controller {controller!r}: not a host name or address") from None
    port = default_port
    if port_text:
        if not port_text.isdigit() or not 0 < int(port_text) < 65536:
            raise EnrollError(f"controller {controller!r}: port must be 1-65535")
        port = int(port_text)
    return host, port


def normalize_fingerprint(value: str) -> str:
    """Accept ``AB:CD:..``, spaced or plain hex SHA-256; return lowercase plain hex."""
    fp = re.sub(r"[\s:]", "", value).lower()
    if not re.fullmatch(r"[0-9a-f]{64}", fp):
        raise EnrollError(
            "--ca-sha256 must be the 64-hex-digit SHA-256 printed by 'edr-certs fingerprint'"
        )
    return fp


def _request(
    host: str, port: int, ctx: ssl.SSLContext, method: str, path: str, body: bytes | None = None
) -> tuple[int, bytes]:
    conn = http.client.HTTPSConnection(host, port, timeout=TIMEOUT, context=ctx)
    try:
        headers = {"Accept": "application/json, application/x-pem-file"}
        if body is not None:
            headers["Content-Type"] = "application/json"
        conn.request(method, path, body=body, headers=headers)
        resp = conn.getresponse()
        data = resp.read(MAX_RESPONSE + 1)
        if len(data) > MAX_RESPONSE:
            raise EnrollError(f"controller response to {path} is larger than {MAX_RESPONSE} bytes")
        return resp.status, data
    except ssl.SSLCertVerificationError as exc:
        raise EnrollError(
            f"TLS verification of {host}:{port} against the pinned CA failed: "
            f"{exc.verify_message}; the controller's server certificate must name {host}"
        ) from None
    except (OSError, http.client.HTTPException) as exc:
        raise EnrollError(f"cannot reach controller {host}:{port}: {exc}") from None
    finally:
        conn.close()


def _server_error(status: int, data: bytes) -> str:
    try:
        message = json.loads(data)["error"]
    except (ValueError, KeyError, TypeError):
        message = data[:200].decode("utf-8", "replace")
    return f"controller refused enrollment (HTTP {status}): {message}"


def fetch_ca(host: str, port: int, ca_sha256: str) -> bytes:
    """Fetch the CA certificate unverified and return it only if it matches the pin."""
    pinned = normalize_fingerprint(ca_sha256)
    # The one unverified request: the pin below is what authenticates the answer.
    insecure = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    insecure.check_hostname = False
    insecure.verify_mode = ssl.CERT_NONE
    status, data = _request(host, port, insecure, "GET", CA_PATH)
    if status != 200:
        raise EnrollError(_server_error(status, data))
    try:
        ca = x509.load_pem_x509_certificate(data)
    except ValueError:
        raise EnrollError(f"controller {host}:{port} did not return a PEM CA certificate") from None
    actual = hashlib.sha256(ca.public_bytes(serialization.Encoding.DER)).hexdigest()
    if not hmac.compare_digest(actual, pinned):
        raise EnrollError(
            f"CA fingerprint mismatch: controller {host}:{port} sent a CA with SHA-256 {actual}, "
            f"expected {pinned}; refusing to send the token (wrong controller, wrong pin, or "
            "someone in between)"
        )
    return ca.public_bytes(serialization.Encoding.PEM)


def build_csr(key: ec.EllipticCurvePrivateKey, hostname: str) -> bytes:
    """A CSR for ``key``; the CA sets the real subject, the CN here is only a hint."""
    return (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname[:64])]))
        .sign(key, hashes.SHA256())
        .public_bytes(serialization.Encoding.PEM)
    )


def _check_issued(
    cert_pem: bytes, ca_pem: bytes, key: ec.EllipticCurvePrivateKey, host_id: Any
) -> x509.Certificate:
    try:
        cert = x509.load_pem_x509_certificate(cert_pem)
    except ValueError:
        raise EnrollError("controller returned something that is not a certificate") from None
    if cert.public_key() != key.public_key():
        raise EnrollError("controller returned a certificate for a different key")
    ca = x509.load_pem_x509_certificate(ca_pem)
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature) as exc:
        raise EnrollError(f"returned certificate is not signed by the pinned CA: {exc}") from None
    # Same rule as certs.pki.host_id_of, without making the sensor import the CA code.
    cns = [a.value for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    if not isinstance(host_id, str) or cns != [host_id]:
        raise EnrollError("returned certificate does not carry the returned host id")
    return cert


def enroll(
    controller: str,
    token: str,
    ca_sha256: str,
    state_dir: Path,
    *,
    hostname: str | None = None,
    force: bool = False,
) -> str:
    """Enroll this host with the controller and save its identity in ``state_dir``.

    Returns:
        The host id the controller assigned.

    Raises:
        EnrollError: with a message saying what went wrong; nothing in ``state_dir`` is
            replaced unless enrollment succeeded.
    """
    host, port = parse_controller(controller)
    pinned = normalize_fingerprint(ca_sha256)
    token = token.strip()
    if not token:
        raise EnrollError("--token must not be empty")
    state_dir = Path(state_dir)
    cert_path = state_dir / "sensor.pem"
    # After the first start the identity lives in credentials.pem (see sensor.uplink).
    if (cert_path.exists() or (state_dir / "credentials.pem").exists()) and not force:
        raise EnrollError(
            f"{state_dir} already holds an enrolled identity ({cert_path}); "
            "use --force to replace it"
        )
    hostname = hostname or socket.gethostname()
    old = os.umask(0o077)
    try:
        state_dir.mkdir(parents=True, exist_ok=True)
    finally:
        os.umask(old)
    os.chmod(state_dir, 0o700)

    key = ec.generate_private_key(ec.SECP256R1())
    pending = state_dir / "sensor.key.pending"
    write_atomic(
        pending,
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
        0o600,
    )
    try:
        ca_pem = fetch_ca(host, port, pinned)
        verified = ssl.create_default_context(cadata=ca_pem.decode())
        verified.minimum_version = ssl.TLSVersion.TLSv1_2
        body = json.dumps(
            {
                "token": token,
                "csr": build_csr(key, hostname).decode(),
                "hostname": hostname,
            }
        ).encode()
        status, data = _request(host, port, verified, "POST", ENROLL_PATH, body)
        if status != 200:
            raise EnrollError(_server_error(status, data))
        try:
            reply = json.loads(data)
            host_id, cert_pem = reply["host_id"], reply["certificate"].encode()
        except (ValueError, KeyError, TypeError, AttributeError):
            raise EnrollError("controller sent a malformed enrollment reply") from None
        _check_issued(cert_pem, ca_pem, key, host_id)
        write_atomic(state_dir / "ca.pem", ca_pem, 0o644)
        write_atomic(cert_path, cert_pem, 0o644)
        write_atomic(state_dir / "host_id", host_id.encode() + b"\n", 0o644)
        os.replace(pending, state_dir / "sensor.key")
    except BaseException:
        pending.unlink(missing_ok=True)
        raise
    return host_id


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``edr-sensor enroll``."""
    parser.add_argument(
        "--controller",
        required=True,
        metavar="HOST[:PORT]",
        help=f"controller address (HTTPS, default port {DEFAULT_PORT})",
    )
    parser.add_argument(
        "--token", required=True, help="one-time enrollment token from 'edr-certs token create'"
    )
    parser.add_argument(
        "--ca-sha256",
        required=True,
        metavar="FP",
        help="the CA fingerprint from 'edr-certs fingerprint'",
    )
    parser.add_argument(
        "--state-dir",
        type=Path,
        default=DEFAULT_STATE_DIR,
        help=f"where the identity is kept (default {DEFAULT_STATE_DIR})",
    )
    parser.add_argument(
        "--hostname", default=None, help="name to register (default: this machine's hostname)"
    )
    parser.add_argument(
        "--force", action="store_true", help="replace an existing identity in the state directory"
    )


def main(args: argparse.Namespace) -> int:
    """Run ``edr-sensor enroll``; one line on stderr and exit code 1 on failure."""
    try:
        host_id = enroll(
            args.controller,
            args.token,
            args.ca_sha256,
            args.state_dir,
            hostname=args.hostname,
            force=args.force,
        )
    except EnrollError as exc:
        print(f"edr-sensor enroll: error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"edr-sensor enroll: error: {exc}", file=sys.stderr)
        return 1
    print(f"enrolled as host {host_id}; identity saved in {args.state_dir}")
    return 0


if __name__ == "__main__":
    _parser = argparse.ArgumentParser(prog="edr-sensor enroll")
    add_arguments(_parser)
    sys.exit(main(_parser.parse_args()))

"""The enrollment endpoint: a thin Sanic blueprint over ``certs.enrollment``.

``GET  /api/v1/enroll/ca``  the CA certificate (PEM); sensors pin its SHA-256 out of band.
``POST /api/v1/enroll``     JSON ``{token, csr, hostname}`` → ``{host_id, certificate, ca}``.

Errors are JSON ``{"error": message}``. A refused token always reads "invalid or expired
token": the precise reason (unknown, expired, used up, revoked) goes to the controller's log
with the token's id, never its secret, so a remote caller learns nothing it could use to
probe tokens. The request body is read as a stream and cut off at ``max_body`` bytes, so an
oversized upload is refused without being buffered.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

from sanic import Blueprint, Request
from sanic.response import HTTPResponse, raw
from sanic.response import json as json_response

from certs.enrollment import Enrollment, EnrollmentError
from certs.store import PKIError, PKIStore

log = logging.getLogger(__name__)

DEFAULT_MAX_BODY = 16 * 1024  # a CSR is under 1 KiB; the JSON envelope adds little


def _error(status: int, message: str) -> HTTPResponse:
    return json_response({"error": message}, status=status)


async def _read_body(request: Request, limit: int) -> bytes | None:
    """The request body, or None as soon as it exceeds ``limit`` bytes."""
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            if int(declared) > limit:
                return None
        except ValueError:
            pass  # Sanic itself rejects a malformed Content-Length before we get here
    # For stream=True routes this is Sanic's Http object; its read() is not in the type.
    stream: Any = request.stream
    chunks: list[bytes] = []
    size = 0
    while stream is not None:
        chunk = await stream.read()
        if chunk is None:
            break
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


def create_blueprint(
    store: PKIStore,
    *,
    max_body: int = DEFAULT_MAX_BODY,
    name: str = "enroll",
    enrollment: Enrollment | None = None,
) -> Blueprint:
    """Build the enrollment blueprint for ``store``.

    Args:
        store: the PKI state directory (must be initialised with ``edr-certs init``).
        max_body: largest accepted POST body in bytes.
        name: blueprint name (unique per app).
        enrollment: signing logic to use; defaults to ``Enrollment(store)``.
    """
    bp = Blueprint(name, url_prefix="/api/v1/enroll")
    enroller = enrollment or Enrollment(store)

    @bp.get("/ca")
    async def get_ca(request: Request) -> HTTPResponse:
        try:
            pem = store.load_ca().cert_pem
        except PKIError as exc:
            log.error("enrollment CA unavailable: %s", exc)
            return _error(503, "enrollment is not available: the controller has no CA")
        return raw(pem, content_type="application/x-pem-file")

    @bp.post("", stream=True)
    async def post_enroll(request: Request) -> HTTPResponse:
        body = await _read_body(request, max_body)
        if body is None:
            return _error(413, f"request body too large (limit {max_body} bytes)")
        try:
            payload: Any = json.loads(body)
        except (ValueError, UnicodeDecodeError):
            return _error(400, "request body is not valid JSON")
        if not isinstance(payload, dict):
            return _error(400, "request body must be a JSON object")
        missing = [k for k in ("token", "csr", "hostname") if not isinstance(payload.get(k), str)]
        if missing:
            return _error(400, f"missing or non-string field(s): {', '.join(missing)}")
        unknown = sorted(set(payload) - {"token", "csr", "hostname"})
        if unknown:
            return _error(400, f"unknown field(s): {', '.join(unknown)}")
        loop = asyncio.get_running_loop()
        try:
            # Signing and the SQLite transaction (which may wait on another writer) run off
            # the event loop.
            host_id, cert_pem, ca_pem = await loop.run_in_executor(
                None, enroller.enroll, payload["token"], payload["csr"], payload["hostname"]
            )
        except EnrollmentError as exc:
            # Token refusals were logged by Enrollment, with the token id only.
            if not exc.token_refused:
                log.info("enrollment refused from %s: %s", request.ip, exc)
            return _error(403 if exc.token_refused else 400, exc.public_message)
        except PKIError as exc:
            log.error("enrollment failed: %s", exc)
            return _error(503, "enrollment is not available: the controller has no CA")
        return json_response(
            {"host_id": host_id, "certificate": cert_pem.decode(), "ca": ca_pem.decode()}
        )

    return bp

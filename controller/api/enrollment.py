"""Enrollment administration (admin only): enrollment tokens and host certificates.

``POST /api/v1/enrollment/tokens``                        ``{ttl?, uses?, comment?}`` → the
                                                          token, shown this once
``GET  /api/v1/enrollment/tokens``                        every token (never a secret)
``POST /api/v1/enrollment/tokens/<id>/revoke``
``GET  /api/v1/enrollment/certificates``                  issued certificates (``host``)
``POST /api/v1/enrollment/certificates/<host_id>/revoke`` revoke every certificate of the
                                                          host, then reload the backplane's
                                                          CRL so its open sessions drop

The sensors' own endpoint (``/api/v1/enroll``) is ``controller.enroll_api``. The token secret
appears only in the creation response: the audit log records the token's id.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Any, cast

from sanic import Blueprint, Request
from sanic.response import HTTPResponse, json

from certs import tokens
from certs.store import IssuedCert, NotInitialized, PKIError, PKIStore, UnknownHost
from controller.api import inputs
from controller.api.hosts import check_host_id
from controller.auth import audit, require
from controller.errors import ApiError

DEFAULT_TOKEN_TTL = 3600
MAX_TOKEN_TTL = int(tokens.MAX_TTL.total_seconds())


def token_json(info: tokens.TokenInfo, now: datetime) -> dict[str, Any]:
    doc: dict[str, Any] = inputs.to_json(info)
    doc["status"] = info.status(now)
    return doc


def cert_json(cert: IssuedCert, now: datetime) -> dict[str, Any]:
    doc: dict[str, Any] = inputs.to_json(cert)
    doc["serial"] = format(cert.serial, "x")  # 128-bit serials overflow JSON numbers
    doc["effective_status"] = cert.effective_status(now)
    return doc


def _pki(request: Request) -> PKIStore:
    pki = getattr(request.app.ctx, "pki", None)
    if pki is None:
        raise ApiError(503, "the PKI is not available")
    return cast(PKIStore, pki)


async def _pki_call(fn: Any, *args: Any, **kwargs: Any) -> Any:
    try:
        return await asyncio.to_thread(fn, *args, **kwargs)
    except NotInitialized as e:
        raise ApiError(503, f"the PKI is not initialised: {e}") from None
    except UnknownHost as e:
        raise ApiError(404, str(e)) from None
    except tokens.TokenUnknown as e:
        raise ApiError(404, str(e)) from None
    except (PKIError, ValueError) as e:
        raise ApiError(400, str(e)) from None


def _int_field(body: dict[str, Any], name: str, default: int, lo: int, hi: int) -> int:
    value = body.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise ApiError(400, f"{name} must be an integer from {lo} to {hi}")
    return value


def create_blueprint() -> Blueprint:
    bp = Blueprint("api_enrollment", url_prefix="/api/v1/enrollment")

    @bp.post("/tokens")
    @require("admin")
    async def create_token(request: Request) -> HTTPResponse:
        inputs.check_query(request, ())
        body = inputs.json_object(request) if inputs.has_body(request) else {}
        inputs.check_fields(body, ("ttl", "uses", "comment"))
        ttl = _int_field(body, "ttl", DEFAULT_TOKEN_TTL, 1, MAX_TOKEN_TTL)
        uses = _int_field(body, "uses", 1, 1, tokens.MAX_USES)
        comment = inputs.text_field(body, "comment", default="", max_len=200, allow_empty=True)
        if comment and not comment.isprintable():
            raise ApiError(400, "comment must be printable")
        pki = _pki(request)
        secret: str = await _pki_call(
            pki.create_token, timedelta(seconds=ttl), uses, comment=comment or ""
        )
        token_id = secret.split(".", 1)[0]
        await audit(
            request, "enrollment.token.create", f"token:{token_id}", {"ttl": ttl, "uses": uses}
        )
        infos = await _pki_call(pki.list_tokens)
        info = next(i for i in infos if i.id == token_id)
        doc = token_json(info, datetime.now(UTC))
        doc["token"] = secret
        return json(doc, status=201, headers={"Cache-Control": "no-store"})

    @bp.get("/tokens")
    @require("admin")
    async def list_tokens(request: Request) -> HTTPResponse:
        inputs.check_query(request, ())
        infos = await _pki_call(_pki(request).list_tokens)
        now = datetime.now(UTC)
        return json({"tokens": [token_json(i, now) for i in infos]})

    @bp.post("/tokens/<token_id:str>/revoke")
    @require("admin")
    async def revoke_token(request: Request, token_id: str) -> HTTPResponse:
        inputs.check_query(request, ())
        pki = _pki(request)
        await _pki_call(pki.revoke_token, token_id)
        await audit(request, "enrollment.token.revoke", f"token:{token_id}")
        info = next(i for i in await _pki_call(pki.list_tokens) if i.id == token_id)
        return json(token_json(info, datetime.now(UTC)))

    @bp.get("/certificates")
    @require("admin")
    async def list_certificates(request: Request) -> HTTPResponse:
        inputs.check_query(request, ("host",))
        host = inputs.query_str(request, "host", max_len=256)
        certs = await _pki_call(_pki(request).certificates, host)
        now = datetime.now(UTC)
        return json({"certificates": [cert_json(c, now) for c in certs]})

    @bp.post("/certificates/<host_id:str>/revoke")
    @require("admin")
    async def revoke_certificate(request: Request, host_id: str) -> HTTPResponse:
        inputs.check_query(request, ())
        pki = _pki(request)
        check_host_id(host_id)
        if not await _pki_call(pki.certificates, host_id):
            # Hostnames are not accepted here: one name may cover several hosts.
            raise ApiError(404, f"no certificate was issued to host {host_id}")
        serials: list[int] = await _pki_call(pki.revoke, host_id)
        dropped = 0
        backplane = getattr(request.app.ctx, "backplane", None)
        if backplane is not None:
            dropped = backplane.reload_crl()
        await audit(
            request, "enrollment.certificate.revoke", f"host:{host_id}",
            {"serials": [format(s, "x") for s in serials], "sessions_dropped": dropped},
        )  # fmt: skip
        return json(
            {
                "host_id": host_id,
                "revoked_serials": [format(s, "x") for s in serials],
                "sessions_dropped": dropped,
            }
        )

    return bp

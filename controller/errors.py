"""JSON errors for the whole controller API, and JSON body parsing with clear 400s.

Every error leaves the controller as ``{"error": message, ...}`` with a fitting status:
``ApiError`` raised by handlers, Sanic's own errors (unknown route 404, wrong method 405,
oversized body 413, malformed request 400), the store's errors (unknown id 404, refused
input 400, conflicts 409) and anything unexpected (500, with the details only in the log so
nothing internal leaks to a caller). ``install_error_handlers(app)`` wires this into an app.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import orjson
from sanic import Request, Sanic
from sanic.exceptions import PayloadTooLarge, SanicException
from sanic.response import HTTPResponse
from sanic.response import json as json_response

from controller.store.interface import Conflict, InvalidInput, InvalidTransition, NotFound

log = logging.getLogger(__name__)

# A JSON API body is small; 1 MiB leaves room for rule uploads and policy documents.
DEFAULT_MAX_BODY = 1024 * 1024


class ApiError(Exception):
    """An error a handler raises on purpose; rendered as ``{"error": message, **extra}``.

    Args:
        status: the HTTP status code.
        message: what went wrong, for the caller (never secrets or internals).
        headers: extra response headers, e.g. ``Retry-After`` or ``WWW-Authenticate``.
        **extra: more JSON members, e.g. ``field="username"``.
    """

    def __init__(
        self, status: int, message: str, *, headers: Mapping[str, str] | None = None, **extra: Any
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = dict(headers or {})
        self.extra = extra


def error_response(
    status: int, message: str, headers: Mapping[str, str] | None = None, **extra: Any
) -> HTTPResponse:
    body: dict[str, Any] = {"error": message, **extra}
    return json_response(body, status=status, headers=dict(headers or {}))


def _render(request: Request, exc: BaseException) -> HTTPResponse:
    if isinstance(exc, ApiError):
        return error_response(exc.status, exc.message, exc.headers, **exc.extra)
    if isinstance(exc, NotFound):
        # The store's message quotes the key, which for credentials is already "<hash>".
        return error_response(404, str(exc))
    if isinstance(exc, InvalidInput):
        return error_response(400, str(exc))
    if isinstance(exc, Conflict | InvalidTransition):
        return error_response(409, str(exc))
    if isinstance(exc, SanicException):
        status = exc.status_code or 500
        headers = dict(getattr(exc, "headers", None) or {})
        if status >= 500:
            log.error("%s %s failed: %s", request.method, request.path, exc, exc_info=exc)
            return error_response(status, "internal server error", headers)
        message = str(exc.message or exc) or "request failed"
        return error_response(status, message, headers)
    log.error("%s %s failed unexpectedly", request.method, request.path, exc_info=exc)
    return error_response(500, "internal server error")


def _check_declared_size(request: Request) -> None:
    """Refuse a declared oversized body before it is read (Sanic's HTTP/1 server enforces
    the limit while reading too; this also covers ASGI deployments)."""
    declared = request.headers.get("content-length")
    if declared is None:
        return
    try:
        size = int(declared)
    except ValueError:
        raise ApiError(400, "Content-Length is not a number") from None
    limit = request.app.config.REQUEST_MAX_SIZE
    if size > limit:
        raise PayloadTooLarge(f"request body is larger than {limit} bytes")


def install_error_handlers(app: Sanic, *, max_body: int | None = None) -> None:
    """Render every error of ``app`` as JSON and enforce the body size limit.

    Args:
        app: the Sanic application.
        max_body: largest accepted request body in bytes (``REQUEST_MAX_SIZE``); unchanged
            when ``None``.
    """
    if max_body is not None:
        app.config.REQUEST_MAX_SIZE = max_body
    # Errors raised before any handler of ours runs still come out as JSON.
    app.config.FALLBACK_ERROR_FORMAT = "json"
    app.error_handler.add(Exception, _render)
    app.register_middleware(_check_declared_size, "request")


# -- JSON bodies --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Field:
    """One member of a JSON object body.

    Args:
        kind: the Python type the value must have (``str``, ``int``, ``bool``, ``dict``, ...).
        required: whether the member must be present.
        min_len / max_len: bounds on the length of strings (and lists).
        choices: the allowed values, if restricted.
        minimum / maximum: bounds on numbers.
    """

    kind: type | tuple[type, ...]
    required: bool = True
    min_len: int | None = None
    max_len: int | None = None
    choices: tuple[Any, ...] | None = None
    minimum: float | None = None
    maximum: float | None = None


def _type_name(kind: type | tuple[type, ...]) -> str:
    names = {
        str: "a string",
        int: "an integer",
        bool: "a boolean",
        dict: "an object",
        list: "an array",
        float: "a number",
    }
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join(names.get(k, k.__name__) for k in kinds)


def _check_field(name: str, value: Any, spec: Field) -> None:
    kinds = spec.kind if isinstance(spec.kind, tuple) else (spec.kind,)
    # bool is an int in Python but not in JSON: never accept true for a number.
    ok = isinstance(value, kinds) and not (isinstance(value, bool) and bool not in kinds)
    if not ok:
        raise ApiError(400, f"{name} must be {_type_name(spec.kind)}", field=name)
    if isinstance(value, float) and not math.isfinite(value):
        raise ApiError(400, f"{name} must be a finite number", field=name)
    if isinstance(value, str | list):
        if spec.min_len is not None and len(value) < spec.min_len:
            raise ApiError(
                400,
                f"{name} must have at least {spec.min_len} characters"
                if isinstance(value, str)
                else f"{name} must have at least {spec.min_len} items",
                field=name,
            )
        if spec.max_len is not None and len(value) > spec.max_len:
            raise ApiError(
                400,
                f"{name} must have at most {spec.max_len} characters"
                if isinstance(value, str)
                else f"{name} must have at most {spec.max_len} items",
                field=name,
            )
    if isinstance(value, int | float) and not isinstance(value, bool):
        if spec.minimum is not None and value < spec.minimum:
            raise ApiError(400, f"{name} must be at least {spec.minimum:g}", field=name)
        if spec.maximum is not None and value > spec.maximum:
            raise ApiError(400, f"{name} must be at most {spec.maximum:g}", field=name)
    if spec.choices is not None and value not in spec.choices:
        allowed = ", ".join(str(c) for c in spec.choices)
        raise ApiError(400, f"{name} must be one of: {allowed}", field=name)


def parse_json(request: Request) -> Any:
    """The request body decoded as JSON; 415 for another content type, 400 if malformed.

    Requiring ``application/json`` also keeps plain HTML forms (which cannot send it
    cross-site without a CORS preflight) away from every endpoint, including login.
    """
    content_type = request.headers.get("content-type", "")
    if content_type.split(";", 1)[0].strip().lower() != "application/json":
        raise ApiError(415, "request body must be JSON (Content-Type: application/json)")
    body = request.body or b""
    if not body.strip():
        raise ApiError(400, "request body is empty: a JSON object is expected")
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as e:
        raise ApiError(400, f"request body is not valid JSON: {e}") from None


async def json_body(request: Request, schema: Mapping[str, Field]) -> dict[str, Any]:
    """Parse and validate a JSON object body against ``schema``.

    Unknown members are refused rather than ignored, so a misspelt field is a clear 400
    instead of a silently missing change.

    Raises:
        ApiError: 415 for a non-JSON content type, 400 with a message naming the problem.
    """
    doc = parse_json(request)
    if not isinstance(doc, dict):
        raise ApiError(400, "request body must be a JSON object")
    unknown = sorted(set(doc) - set(schema))
    if unknown:
        raise ApiError(400, f"unknown field: {unknown[0]}", field=unknown[0])
    for name, spec in schema.items():
        if name not in doc:
            if spec.required:
                raise ApiError(400, f"{name} is required", field=name)
            continue
        _check_field(name, doc[name], spec)
    return doc


# The name controller.app.create_app looks for.
install = install_error_handlers

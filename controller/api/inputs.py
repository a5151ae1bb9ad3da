"""Request parsing, store calls and JSON shaping shared by the resource blueprints.

Every handler reads its input through these helpers so bad input always ends the same way:
an ``ApiError`` with a message naming the field and what was expected, before anything is
written. Store calls run in a worker thread (the store blocks) and the store's own errors
become HTTP statuses here, in one place.
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
from collections.abc import Callable, Iterable, Mapping
from datetime import UTC, datetime
from enum import Enum
from typing import Any, TypeVar

from sanic import Request

from controller.errors import ApiError, parse_json
from controller.store import Conflict, InvalidInput, InvalidTransition, NotFound, StoreError

# JSON bodies of this API are small documents (a command, a policy, a comment): anything
# bigger is a mistake or an attack, refused before it is parsed.
MAX_BODY = 64 * 1024
MAX_TEXT = 4096
MAX_LIMIT = 1000

T = TypeVar("T")


# -- bodies ---------------------------------------------------------------------------------


def raw_body(request: Request, *, max_bytes: int = MAX_BODY) -> bytes:
    """The request body, refused with 413 beyond ``max_bytes``."""
    body = request.body or b""
    if len(body) > max_bytes:
        raise ApiError(413, f"request body is {len(body)} bytes; the limit is {max_bytes}")
    return body


def json_object(request: Request, *, max_bytes: int = MAX_BODY) -> dict[str, Any]:
    """The body as a JSON object, or a 400/413/415 saying what is wrong with it."""
    raw_body(request, max_bytes=max_bytes)
    value = parse_json(request)  # 415 unless application/json, 400 if empty or malformed
    if not isinstance(value, dict):
        raise ApiError(400, f"request body must be a JSON object, not {_json_type(value)}")
    return value


def has_body(request: Request) -> bool:
    """Whether the request carries a body (for endpoints where it is optional)."""
    return bool((request.body or b"").strip())


def check_fields(
    body: Mapping[str, Any], allowed: Iterable[str], required: Iterable[str] = ()
) -> None:
    """Refuse unknown and missing top-level fields (typos must not be silently ignored)."""
    allowed_set = set(allowed)
    unknown = sorted(set(body) - allowed_set)
    if unknown:
        raise ApiError(
            400,
            f"unknown field(s): {', '.join(unknown)}; allowed: {', '.join(sorted(allowed_set))}",
        )
    missing = [name for name in required if name not in body]
    if missing:
        raise ApiError(400, f"missing required field(s): {', '.join(missing)}")


def text_field(
    body: Mapping[str, Any],
    name: str,
    *,
    default: str | None = None,
    max_len: int = MAX_TEXT,
    allow_empty: bool = False,
) -> str | None:
    """An optional string field without control characters (newlines allowed)."""
    value = body.get(name, default)
    if value is None:
        return None
    if not isinstance(value, str):
        raise ApiError(400, f"{name} must be a string, not {_json_type(value)}")
    if len(value) > max_len:
        raise ApiError(400, f"{name} is {len(value)} characters; the limit is {max_len}")
    if not allow_empty and not value.strip():
        raise ApiError(400, f"{name} must not be empty")
    if any((ord(c) < 32 and c not in "\n\t") or c == "\x7f" for c in value):
        raise ApiError(400, f"{name} must not contain control characters")
    return value


def _json_type(value: object) -> str:
    return {
        dict: "an object",
        list: "an array",
        str: "a string",
        bool: "a boolean",
        int: "a number",
        float: "a number",
        type(None): "null",
    }.get(type(value), type(value).__name__)


def json_type(value: object) -> str:
    """How a JSON value's type reads in an error message ("an array", "null", ...)."""
    return _json_type(value)


# -- query strings --------------------------------------------------------------------------


def check_query(request: Request, allowed: Iterable[str]) -> None:
    """Refuse unknown and repeated query parameters."""
    allowed_set = set(allowed)
    unknown = sorted(set(request.args) - allowed_set)
    if unknown:
        raise ApiError(
            400,
            f"unknown query parameter(s): {', '.join(unknown)}; "
            f"allowed: {', '.join(sorted(allowed_set)) or 'none'}",
        )
    for name, values in request.args.items():
        if len(values) > 1:
            raise ApiError(400, f"query parameter {name} given {len(values)} times")


def query_str(request: Request, name: str, *, max_len: int = MAX_TEXT) -> str | None:
    value = request.args.get(name)
    if value is None:
        return None
    if not value or len(value) > max_len:
        raise ApiError(400, f"{name} must be 1 to {max_len} characters")
    if any(ord(c) < 32 or c == "\x7f" for c in value):
        raise ApiError(400, f"{name} must not contain control characters")
    return value


def query_int(
    request: Request, name: str, *, lo: int, hi: int, default: int | None = None
) -> int | None:
    value = request.args.get(name)
    if value is None:
        return default
    try:
        number = int(value, 10)
    except ValueError:
        raise ApiError(400, f"{name} must be an integer from {lo} to {hi}, not {value!r}") from None
    if not lo <= number <= hi:
        raise ApiError(400, f"{name} must be an integer from {lo} to {hi}, not {number}")
    return number


def query_limit(request: Request, *, default: int = 100, maximum: int = MAX_LIMIT) -> int:
    limit = query_int(request, "limit", lo=1, hi=maximum, default=default)
    assert limit is not None
    return limit


def query_time(request: Request, name: str) -> float | None:
    """A time as POSIX seconds or an ISO 8601 timestamp (UTC when it names no zone)."""
    value = request.args.get(name)
    if value is None:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            dt = datetime.fromisoformat(value)
        except ValueError:
            raise ApiError(
                400, f"{name} must be POSIX seconds or an ISO 8601 timestamp, not {value!r}"
            ) from None
        if dt.tzinfo is None:
            dt = dt.replace(tzinfo=UTC)
        seconds = dt.timestamp()
    if not math.isfinite(seconds):
        raise ApiError(400, f"{name} must be a finite time")
    return seconds


def query_bool(request: Request, name: str) -> bool | None:
    value = request.args.get(name)
    if value is None:
        return None
    lowered = value.lower()
    if lowered in ("true", "1", "yes"):
        return True
    if lowered in ("false", "0", "no"):
        return False
    raise ApiError(400, f"{name} must be true or false, not {value!r}")


def query_choice(request: Request, name: str, choices: Iterable[str]) -> str | None:
    value = request.args.get(name)
    if value is None:
        return None
    options = list(choices)
    if value not in options:
        raise ApiError(400, f"{name} must be one of {', '.join(options)}, not {value!r}")
    return value


# -- store calls ----------------------------------------------------------------------------


async def call(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Run a blocking store call in a thread; its errors become API errors."""
    try:
        return await asyncio.to_thread(fn, *args, **kwargs)
    except NotFound as e:
        raise ApiError(404, f"{e.kind} {e.key} not found") from None
    except InvalidTransition as e:
        raise ApiError(409, str(e), current=str(e.current), wanted=str(e.wanted)) from None
    except Conflict as e:
        raise ApiError(409, str(e)) from None
    except InvalidInput as e:
        raise ApiError(400, str(e)) from None
    except StoreError as e:  # any other refusal the store makes on purpose
        raise ApiError(400, str(e)) from None


def ctx_store(request: Request) -> Any:
    return request.app.ctx.store


def connected_hosts(request: Request) -> set[str]:
    """Host ids with an open backplane session (empty when no backplane runs)."""
    backplane = getattr(request.app.ctx, "backplane", None)
    if backplane is None:
        return set()
    return set(backplane.connected_hosts())


def notify_policy_all(request: Request, host_ids: Iterable[str]) -> None:
    """Tell every host's open sessions that a new policy version exists."""
    backplane = getattr(request.app.ctx, "backplane", None)
    if backplane is None:
        return
    for host_id in host_ids:
        backplane.notify_policy(host_id)


def publish(request: Request, kind: str, item: Mapping[str, Any]) -> None:
    """Hand a change to the live stream, when the app has one."""
    live = getattr(request.app.ctx, "live", None)
    if live is not None:
        live.publish(kind, dict(item))


# -- JSON shaping ---------------------------------------------------------------------------


def to_json(value: Any) -> Any:
    """Records (dataclasses), enums, sets and datetimes as plain JSON values."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: to_json(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, Mapping):
        return {str(k): to_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [to_json(v) for v in value]
    if isinstance(value, set | frozenset):
        return sorted(to_json(v) for v in value)
    return value

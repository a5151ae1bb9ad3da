"""Policy: the versioned document sensors enforce, its history and who runs which version.

``GET /api/v1/policy``                   the current version (``version`` null before the first)
``PUT /api/v1/policy``                   admin: ``{document, comment?, base_version?}``
``GET /api/v1/policy/history``           versions, newest first
``GET /api/v1/policy/versions/<v>``      one version
``GET /api/v1/policy/hosts``             each host's applied version and whether it is current
``GET /api/v1/hosts/<host_id>/policy``   one host's applied version

The document (every key optional; ``validate_document`` fills defaults and normalises)::

    {
      "allow": {"executables": [...], "command_lines": [...], "paths": [...], "hashes": [...]},
      "deny":  {... same keys ...},
      "watch_paths": ["/etc", ...],
      "responses": {
        "quarantine_on_denied_hash": false,
        "hold_suspicious_exec": {"enabled": false, "patterns": [...]}
      }
    }

Executables, paths and watch paths are absolute, normalised paths (``*``/``?`` globs
allowed); command-line and hold patterns are shell-style globs (``fnmatch``), never regular
expressions, so a policy cannot make a sensor spend unbounded time matching; hashes are
SHA-256 in lower-case hex. After each change every host is told (``notify_policy``); sensors
acknowledge the version they applied, which ``/policy/hosts`` shows.
"""

from __future__ import annotations

import asyncio
import posixpath
import re
from collections.abc import Mapping
from typing import Any

from sanic import Blueprint, Request, Sanic
from sanic.response import HTTPResponse, json

from controller.api import inputs
from controller.api.hosts import check_host_id
from controller.auth import audit, require
from controller.errors import ApiError
from controller.store import PolicyVersion

LIST_KINDS = ("executables", "command_lines", "paths", "hashes")
MAX_ENTRIES = 10_000
MAX_PATH = 4096
MAX_PATTERN = 1024
MAX_POLICY_BODY = 2 * 1024 * 1024  # 4 lists x 10,000 entries fit; far more is a mistake
_SHA256 = re.compile(r"[0-9a-fA-F]{64}")


class PolicyInvalid(ValueError):
    """A policy document that cannot be stored; the message names the offending entry."""


def default_document() -> dict[str, Any]:
    return {
        "allow": {kind: [] for kind in LIST_KINDS},
        "deny": {kind: [] for kind in LIST_KINDS},
        "watch_paths": [],
        "responses": {
            "quarantine_on_denied_hash": False,
            "hold_suspicious_exec": {"enabled": False, "patterns": []},
        },
    }


def _keys(value: Any, where: str, allowed: tuple[str, ...]) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise PolicyInvalid(f"{where} must be an object, not {inputs.json_type(value)}")
    unknown = sorted(set(value) - set(allowed))
    if unknown:
        raise PolicyInvalid(
            f"{where}: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(allowed)}"
        )
    return value


def _printable(value: Any, where: str, max_len: int) -> str:
    if not isinstance(value, str):
        raise PolicyInvalid(f"{where} must be a string, not {inputs.json_type(value)}")
    if not value or len(value) > max_len:
        raise PolicyInvalid(f"{where} must be 1 to {max_len} characters")
    if any(ord(c) < 32 or c == "\x7f" for c in value):
        raise PolicyInvalid(f"{where} must not contain control characters (or NUL)")
    return value


def check_path(value: Any, where: str) -> str:
    """An absolute path without ``..`` (globs allowed), returned normalised."""
    path = _printable(value, where, MAX_PATH)
    if not path.startswith("/"):
        raise PolicyInvalid(f"{where}: {path!r} is not an absolute path")
    if ".." in path.split("/"):
        raise PolicyInvalid(f"{where}: {path!r} must not contain '..'")
    normal = posixpath.normpath(path)
    # normpath keeps a leading "//" (POSIX allows it a meaning); nothing here needs it.
    return "/" + normal.lstrip("/")


def _check_hash(value: Any, where: str) -> str:
    if not isinstance(value, str) or not _SHA256.fullmatch(value):
        raise PolicyInvalid(f"{where} must be a SHA-256 hash (64 hex digits), not {value!r}")
    return value.lower()


def _check_pattern(value: Any, where: str) -> str:
    return _printable(value, where, MAX_PATTERN)


_CHECKS = {
    "executables": check_path,
    "command_lines": _check_pattern,
    "paths": check_path,
    "hashes": _check_hash,
}


def _entries(value: Any, where: str, check: Any) -> list[str]:
    if not isinstance(value, list):
        raise PolicyInvalid(f"{where} must be an array, not {inputs.json_type(value)}")
    if len(value) > MAX_ENTRIES:
        raise PolicyInvalid(f"{where} has {len(value)} entries; the limit is {MAX_ENTRIES}")
    out: list[str] = []
    seen: set[str] = set()
    for i, item in enumerate(value):
        entry = check(item, f"{where}[{i}]")
        if entry not in seen:  # duplicates are harmless but would bloat every sensor's copy
            seen.add(entry)
            out.append(entry)
    return out


def validate_document(document: Any) -> dict[str, Any]:
    """The document normalised, with every key present.

    Raises:
        PolicyInvalid: the first problem found, naming where it is.
    """
    doc = _keys(document, "document", ("allow", "deny", "watch_paths", "responses"))
    out = default_document()
    for side in ("allow", "deny"):
        lists = _keys(doc.get(side, {}), side, LIST_KINDS)
        for kind in LIST_KINDS:
            out[side][kind] = _entries(lists.get(kind, []), f"{side}.{kind}", _CHECKS[kind])
    out["watch_paths"] = _entries(doc.get("watch_paths", []), "watch_paths", check_path)
    responses = _keys(
        doc.get("responses", {}), "responses", ("quarantine_on_denied_hash", "hold_suspicious_exec")
    )
    quarantine = responses.get("quarantine_on_denied_hash", False)
    if not isinstance(quarantine, bool):
        raise PolicyInvalid("responses.quarantine_on_denied_hash must be true or false")
    out["responses"]["quarantine_on_denied_hash"] = quarantine
    hold = _keys(
        responses.get("hold_suspicious_exec", {}),
        "responses.hold_suspicious_exec",
        ("enabled", "patterns"),
    )
    enabled = hold.get("enabled", False)
    if not isinstance(enabled, bool):
        raise PolicyInvalid("responses.hold_suspicious_exec.enabled must be true or false")
    patterns = _entries(
        hold.get("patterns", []), "responses.hold_suspicious_exec.patterns", _check_pattern
    )
    if enabled and not patterns:
        raise PolicyInvalid("responses.hold_suspicious_exec is enabled but has no patterns")
    out["responses"]["hold_suspicious_exec"] = {"enabled": enabled, "patterns": patterns}
    return out


def version_json(version: PolicyVersion | None) -> dict[str, Any]:
    if version is None:
        return {
            "version": None,
            "document": default_document(),
            "author": None,
            "created_at": None,
            "comment": "",
        }
    doc: dict[str, Any] = inputs.to_json(version)
    return doc


def policy_lock(app: Sanic) -> asyncio.Lock:
    """One lock per app so read-modify-write changes (mark safe, base_version) don't race."""
    lock = getattr(app.ctx, "api_policy_lock", None)
    if lock is None:
        lock = asyncio.Lock()
        app.ctx.api_policy_lock = lock
    return lock


async def notify_all_hosts(request: Request) -> list[str]:
    """Tell every known or connected host about a new policy; returns the host ids."""
    store = inputs.ctx_store(request)
    hosts = await inputs.call(store.list_hosts)
    ids = sorted({h.host_id for h in hosts} | inputs.connected_hosts(request))
    inputs.notify_policy_all(request, ids)
    return ids


async def store_policy(
    request: Request, document: Mapping[str, Any], comment: str
) -> PolicyVersion:
    """Persist a validated document as the next version by the requesting user, audit it
    and push it. The caller holds ``policy_lock``."""
    store = inputs.ctx_store(request)
    author = request.ctx.user.username
    version: PolicyVersion = await inputs.call(store.put_policy, document, author, comment)
    await audit(request, "policy.update", f"policy:{version.version}", {"comment": comment})
    await notify_all_hosts(request)
    return version


def create_blueprint() -> Blueprint:
    bp = Blueprint("api_policy", url_prefix="/api/v1")

    @bp.get("/policy")
    @require("viewer")
    async def current(request: Request) -> HTTPResponse:
        inputs.check_query(request, ())
        store = inputs.ctx_store(request)
        return json(version_json(await inputs.call(store.current_policy)))

    @bp.put("/policy")
    @require("admin")
    async def put(request: Request) -> HTTPResponse:
        inputs.check_query(request, ())
        body = inputs.json_object(request, max_bytes=MAX_POLICY_BODY)
        inputs.check_fields(body, ("document", "comment", "base_version"), ("document",))
        comment = inputs.text_field(body, "comment", default="", allow_empty=True) or ""
        base = body.get("base_version")
        if base is not None and (isinstance(base, bool) or not isinstance(base, int) or base < 0):
            raise ApiError(400, "base_version must be a non-negative integer")
        try:
            document = validate_document(body["document"])
        except PolicyInvalid as e:
            raise ApiError(400, f"invalid policy: {e}") from None
        store = inputs.ctx_store(request)
        async with policy_lock(request.app):
            if base is not None:
                latest = await inputs.call(store.current_policy)
                latest_v = 0 if latest is None else latest.version
                if latest_v != base:
                    raise ApiError(
                        409,
                        f"policy changed since version {base}: the current version is "
                        f"{latest_v}; reload and apply your change again",
                        current_version=latest_v,
                    )
            version = await store_policy(request, document, comment)
        return json(version_json(version), status=201)

    @bp.get("/policy/history")
    @require("viewer")
    async def history(request: Request) -> HTTPResponse:
        inputs.check_query(request, ("limit",))
        limit = inputs.query_limit(request)
        store = inputs.ctx_store(request)
        versions = await inputs.call(store.policy_history, limit=limit)
        return json({"versions": [version_json(v) for v in versions]})

    @bp.get("/policy/versions/<version:int>")
    @require("viewer")
    async def get_version(request: Request, version: int) -> HTTPResponse:
        inputs.check_query(request, ())
        store = inputs.ctx_store(request)
        return json(version_json(await inputs.call(store.get_policy, version)))

    def applied_json(host: Any, current: int | None) -> dict[str, Any]:
        return {
            "host_id": host.host_id,
            "hostname": host.hostname,
            "policy_version": host.policy_version,
            "policy_applied_at": host.policy_applied_at,
            "current": current is not None and host.policy_version == current,
        }

    @bp.get("/policy/hosts")
    @require("viewer")
    async def applied(request: Request) -> HTTPResponse:
        inputs.check_query(request, ())
        store = inputs.ctx_store(request)
        latest = await inputs.call(store.current_policy)
        current = None if latest is None else latest.version
        hosts = await inputs.call(store.list_hosts)
        return json(
            {"current_version": current, "hosts": [applied_json(h, current) for h in hosts]}
        )

    @bp.get("/hosts/<host_id:str>/policy")
    @require("viewer")
    async def host_applied(request: Request, host_id: str) -> HTTPResponse:
        inputs.check_query(request, ())
        store = inputs.ctx_store(request)
        host = await inputs.call(store.get_host, check_host_id(host_id))
        latest = await inputs.call(store.current_policy)
        doc = applied_json(host, None if latest is None else latest.version)
        doc["current_version"] = None if latest is None else latest.version
        return json(doc)

    return bp

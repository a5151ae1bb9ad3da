"""The controller's OpenAPI 3.1 document, served at ``GET /api/v1/openapi.json``.

Hand-written as data: one ``_op`` call per endpoint, grouped by blueprint. A test compares
the document's paths and methods with the routes the real app mounts, so an endpoint added
without a description here fails the build.
"""

from __future__ import annotations

import copy
from typing import Any

from sanic import Blueprint, Request
from sanic.response import HTTPResponse
from sanic.response import json as json_response

ROLES = ["viewer", "responder", "admin"]
_ERROR_STATUSES = {
    "400": "Malformed request: bad JSON, bad or unknown field or parameter",
    "401": "Not authenticated (no, expired or revoked credentials)",
    "403": "Role too low, or missing/wrong X-CSRF-Token on a cookie session",
    "404": "Unknown id",
    "409": "Conflict with the current state",
    "413": "Request body too large",
    "415": "Request body is not JSON",
    "429": "Too many failed attempts (see Retry-After)",
    "503": "A backing service is unavailable",
}

# -- small schema helpers -----------------------------------------------------------------


def _s(kind: str, **kw: Any) -> dict[str, Any]:
    return {"type": kind, **kw}


def _obj(props: dict[str, Any], required: tuple[str, ...] = (), **kw: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {"type": "object", "properties": props, **kw}
    if required:
        doc["required"] = list(required)
    return doc


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


_ANY_OBJECT = {"type": "object", "additionalProperties": True}
_NUM = _s("number")
_NULLABLE_NUM = {"type": ["number", "null"]}


def _param(
    name: str, where: str, schema: dict[str, Any], desc: str = "", required: bool = False
) -> dict[str, Any]:
    p: dict[str, Any] = {
        "name": name,
        "in": where,
        "schema": schema,
        "required": required or where == "path",
    }
    if desc:
        p["description"] = desc
    return p


def _path_param(name: str, kind: str = "string") -> dict[str, Any]:
    schema = _s("integer", minimum=0) if kind == "integer" else _s("string", minLength=1)
    return _param(name, "path", schema)


def _q(name: str, kind: str = "string", desc: str = "", **kw: Any) -> dict[str, Any]:
    return _param(name, "query", _s(kind, **kw), desc)


_LIMIT = _q("limit", "integer", "Page size", minimum=1, maximum=1000)


def _op(
    summary: str,
    tag: str,
    role: str | None,
    *,
    params: list[dict[str, Any]] | None = None,
    body: dict[str, Any] | None = None,
    body_required: bool = True,
    ok: int = 200,
    result: dict[str, Any] | None = None,
    errors: tuple[str, ...] = (),
    unsafe: bool = False,
) -> dict[str, Any]:
    """One operation. ``role`` None means no authentication."""
    op: dict[str, Any] = {"summary": summary, "tags": [tag]}
    if role is None:
        op["security"] = []
    else:
        op["description"] = f"Needs the **{role}** role (viewer < responder < admin)."
        op["security"] = (
            [{"sessionCookie": [], "csrfHeader": []}, {"bearerToken": []}]
            if unsafe
            else [{"sessionCookie": []}, {"bearerToken": []}]
        )
    if params:
        op["parameters"] = params
    if body is not None:
        op["requestBody"] = {
            "required": body_required,
            "content": {"application/json": {"schema": body}},
        }
    responses: dict[str, Any] = {
        str(ok): {
            "description": "Success",
            "content": {"application/json": {"schema": result or _ANY_OBJECT}},
        }
    }
    statuses = set(errors)
    if role is not None:
        statuses |= {"401", "403"}
    if body is not None:
        statuses |= {"400", "413", "415"}
    if params:
        statuses.add("400")
    for status in sorted(statuses):
        responses[status] = {"$ref": f"#/components/responses/E{status}"}
    op["responses"] = responses
    return op


# -- AUTH's endpoints ---------------------------------------------------------------------

_USER = _obj(
    {
        "username": _s("string"),
        "role": _s("string", enum=ROLES),
        "disabled": _s("boolean"),
        "created_at": _NUM,
        "updated_at": _NUM,
    },
    ("username", "role", "disabled"),
)
_TOKEN = _obj(
    {
        "id": _s("integer"),
        "name": _s("string"),
        "role": _s("string", enum=ROLES),
        "owner": {"type": ["string", "null"]},
        "created_at": _NUM,
        "last_used": _NULLABLE_NUM,
        "revoked": _s("boolean"),
    },
    ("id", "name", "role", "revoked"),
)
_AUDIT = _obj(
    {
        "id": _s("integer"),
        "ts": _NUM,
        "actor": _s("string"),
        "action": _s("string"),
        "target": _s("string"),
        "details": _ANY_OBJECT,
        "source": _s("string"),
    },
    ("id", "ts", "actor", "action", "target", "source"),
)
_PASSWORD = _s("string", minLength=12, maxLength=1024)
_USERNAME = _s("string", minLength=1, maxLength=64, pattern="^[A-Za-z0-9][A-Za-z0-9._@-]*$")
_SESSION_INFO = _obj(
    {
        "username": _s("string"),
        "role": _s("string", enum=ROLES),
        "via": _s("string", enum=["session", "token"]),
        "csrf_token": {"type": ["string", "null"]},
        "expires_at": _NULLABLE_NUM,
    },
    ("username", "role", "via"),
)


def _auth_paths() -> dict[str, dict[str, Any]]:
    closed = {"additionalProperties": False}
    return {
        "/api/v1/auth/login": {
            "post": _op(
                "Log in: sets the __Host-edr_session cookie and returns the CSRF token",
                "auth",
                None,
                body=_obj(
                    {
                        "username": _s("string", minLength=1, maxLength=64),
                        "password": _s("string", minLength=1, maxLength=1024),
                    },
                    ("username", "password"),
                    **closed,
                ),
                result=_obj(
                    {
                        "username": _s("string"),
                        "role": _s("string", enum=ROLES),
                        "csrf_token": _s("string"),
                    },
                    ("username", "role", "csrf_token"),
                ),
                errors=("401", "429"),
            )
        },
        "/api/v1/auth/logout": {
            "post": _op(
                "End the current session",
                "auth",
                "viewer",
                unsafe=True,
                errors=("400",),
            )
        },
        "/api/v1/auth/me": {
            "get": _op(
                "Who am I (and the session's CSRF token, so a reload keeps the session)",
                "auth",
                "viewer",
                result=_SESSION_INFO,
            )
        },
        "/api/v1/auth/session": {
            "get": _op(
                "The current session if there is one: never 401, so a console's first visit "
                "logs no error",
                "auth",
                None,
                result=_obj(
                    {
                        "authenticated": _s("boolean"),
                        "username": _s("string"),
                        "role": _s("string", enum=ROLES),
                        "csrf_token": {"type": ["string", "null"]},
                    },
                    ("authenticated",),
                ),
            )
        },
        "/api/v1/auth/csrf": {
            "get": _op(
                "The session's CSRF token",
                "auth",
                "viewer",
                result=_obj({"csrf_token": {"type": ["string", "null"]}}),
            )
        },
        "/api/v1/auth/password": {
            "post": _op(
                "Change your own password (ends your other sessions)",
                "auth",
                "viewer",
                unsafe=True,
                body=_obj(
                    {
                        "current_password": _s("string", minLength=1, maxLength=1024),
                        "new_password": _PASSWORD,
                    },
                    ("current_password", "new_password"),
                    **closed,
                ),
                errors=("429",),
            )
        },
        "/api/v1/users": {
            "get": _op(
                "List users",
                "users",
                "admin",
                result=_obj({"users": _s("array", items=_USER)}, ("users",)),
            ),
            "post": _op(
                "Create a user",
                "users",
                "admin",
                unsafe=True,
                ok=201,
                result=_USER,
                body=_obj(
                    {
                        "username": _USERNAME,
                        "password": _PASSWORD,
                        "role": _s("string", enum=ROLES),
                    },
                    ("username", "password", "role"),
                    **closed,
                ),
                errors=("409",),
            ),
        },
        "/api/v1/users/{username}": {
            "parameters": [_path_param("username")],
            "get": _op("Get a user", "users", "admin", result=_USER, errors=("404",)),
            "patch": _op(
                "Change a user's role or disable/enable them (the last admin is protected)",
                "users",
                "admin",
                unsafe=True,
                result=_USER,
                body=_obj({"role": _s("string", enum=ROLES), "disabled": _s("boolean")}, **closed),
                errors=("404", "409"),
            ),
        },
        "/api/v1/users/{username}/password": {
            "parameters": [_path_param("username")],
            "post": _op(
                "Reset a user's password (ends their sessions)",
                "users",
                "admin",
                unsafe=True,
                result=_USER,
                body=_obj({"password": _PASSWORD}, ("password",), **closed),
                errors=("404",),
            ),
        },
        "/api/v1/api-tokens": {
            "get": _op(
                "List API tokens (never their secrets)",
                "api-tokens",
                "admin",
                result=_obj({"tokens": _s("array", items=_TOKEN)}, ("tokens",)),
            ),
            "post": _op(
                "Create an API token: the secret is in this response only",
                "api-tokens",
                "admin",
                unsafe=True,
                ok=201,
                body=_obj(
                    {
                        "name": _s("string", minLength=1, maxLength=128),
                        "role": _s("string", enum=ROLES),
                    },
                    ("name", "role"),
                    **closed,
                ),
                result={"allOf": [_TOKEN, _obj({"token": _s("string")}, ("token",))]},
            ),
        },
        "/api/v1/api-tokens/{token_id}": {
            "parameters": [_path_param("token_id", "integer")],
            "delete": _op(
                "Revoke an API token",
                "api-tokens",
                "admin",
                unsafe=True,
                result=_TOKEN,
                errors=("404",),
            ),
        },
        "/api/v1/audit": {
            "get": _op(
                "Read the audit log, newest first",
                "audit",
                "admin",
                params=[
                    _q("actor", desc="Only entries by this actor", minLength=1, maxLength=256),
                    _q(
                        "action",
                        desc="Only this action, e.g. user.create",
                        minLength=1,
                        maxLength=256,
                    ),
                    _q("since", "number", "POSIX seconds"),
                    _LIMIT,
                    _q("before_id", "integer", "Entries older than this id (paging)", minimum=0),
                ],
                result=_obj(
                    {
                        "entries": _s("array", items=_AUDIT),
                        "next_before_id": {"type": ["integer", "null"]},
                    },
                    ("entries", "next_before_id"),
                ),
            )
        },
        "/api/v1/openapi.json": {"get": _op("This document", "meta", None)},
    }


# -- the API engineer's resource endpoints (controller/api/*.py) --------------------------


def _fields(names: dict[str, Any], required: tuple[str, ...] = ()) -> dict[str, Any]:
    return _obj(names, required, additionalProperties=False)


def _resource_paths() -> dict[str, dict[str, Any]]:
    host = _path_param("host_id")
    ttl = _s(
        "number", exclusiveMinimum=0, description="Seconds before an undelivered command expires"
    )
    status_q = _q("status", desc="Comma-separated command states")
    return {
        "/api/v1/hosts": {
            "get": _op(
                "List hosts",
                "hosts",
                "viewer",
                params=[
                    _q("status", desc="online or offline", enum=["online", "offline"]),
                    _q("isolated", "boolean"),
                    _q("q", desc="Hostname or id contains"),
                    _q("sort"),
                    _q("order", enum=["asc", "desc"]),
                    _LIMIT,
                ],
            )
        },
        "/api/v1/hosts/{host_id}": {
            "parameters": [host],
            "get": _op("Get a host", "hosts", "viewer", errors=("404",)),
        },
        "/api/v1/hosts/{host_id}/metrics": {
            "parameters": [host],
            "get": _op(
                "A host's metrics history",
                "hosts",
                "viewer",
                params=[_q("since", "number", "POSIX seconds"), _LIMIT],
                errors=("404",),
            ),
        },
        "/api/v1/hosts/{host_id}/commands": {
            "parameters": [host],
            "get": _op(
                "A host's command history",
                "commands",
                "viewer",
                params=[status_q, _LIMIT],
                errors=("404",),
            ),
            "post": {
                **_op(
                    "Queue a response command for a host",
                    "commands",
                    "responder",
                    unsafe=True,
                    ok=201,
                    errors=("404", "409"),
                    body=_fields(
                        {
                            "action": _s(
                                "string",
                                description="kill, kill-tree, suspend, "
                                "resume, quarantine, restore, delete-file, block-ip,"
                                " block-port, block-domain, unblock, isolate, "
                                "unisolate",
                            ),
                            "args": _ANY_OBJECT,
                            "ttl": ttl,
                        },
                        ("action",),
                    ),
                ),
                "parameters": [
                    _param(
                        "Idempotency-Key",
                        "header",
                        _s("string", maxLength=128),
                        "Retrying with the same key does not run twice",
                    )
                ],
            },
        },
        "/api/v1/hosts/{host_id}/processes/{entity_id}": {
            "parameters": [host, _path_param("entity_id")],
            "get": _op(
                "A process with its ancestry and children", "events", "viewer", errors=("404",)
            ),
        },
        "/api/v1/hosts/{host_id}/policy": {
            "parameters": [host],
            "get": _op("The policy version a host applied", "policy", "viewer", errors=("404",)),
        },
        "/api/v1/commands": {
            "get": _op(
                "Commands across hosts",
                "commands",
                "viewer",
                params=[_q("host", maxLength=256), status_q, _LIMIT],
            )
        },
        "/api/v1/commands/{command_id}": {
            "parameters": [_path_param("command_id", "integer")],
            "get": _op("Get a command", "commands", "viewer", errors=("404",)),
        },
        "/api/v1/commands/{command_id}/retry": {
            "parameters": [_path_param("command_id", "integer")],
            "post": _op(
                "Queue a failed or expired command again",
                "commands",
                "responder",
                unsafe=True,
                ok=201,
                body=_fields({"ttl": ttl}),
                body_required=False,
                errors=("404", "409"),
            ),
        },
        "/api/v1/events": {
            "get": _op(
                "Search events, newest first",
                "events",
                "viewer",
                params=[
                    _q("since", "number", "POSIX seconds"),
                    _q("until", "number"),
                    _q("host"),
                    _q("action"),
                    _q("category"),
                    _q("pid", "integer", minimum=0),
                    _q("entity_id"),
                    _q("executable"),
                    _q("path"),
                    _q("ip"),
                    _q("port", "integer", minimum=0, maximum=65535),
                    _q("q", desc="Full text over command lines and paths"),
                    _LIMIT,
                    _q("cursor", desc="next_cursor of the previous page"),
                ],
            )
        },
        "/api/v1/events/{event_id}": {
            "parameters": [_path_param("event_id", "integer")],
            "get": _op("Get an event", "events", "viewer", errors=("404",)),
        },
        "/api/v1/events/{event_id}/tree": {
            "parameters": [_path_param("event_id", "integer")],
            "get": _op("The process tree around an event", "events", "viewer", errors=("404",)),
        },
        "/api/v1/alerts": {
            "get": _op(
                "List alerts, newest first",
                "alerts",
                "viewer",
                params=[
                    _q("status", enum=["new", "acknowledged", "resolved", "false_positive"]),
                    _q("severity", enum=["informational", "low", "medium", "high", "critical"]),
                    _q("host"),
                    _q("rule"),
                    _q("assignee"),
                    _q("since", "number"),
                    _LIMIT,
                    _q("before_id", "integer", minimum=0),
                ],
            )
        },
        "/api/v1/alerts/{alert_id}": {
            "parameters": [_path_param("alert_id", "integer")],
            "get": _op("Get an alert with comments", "alerts", "viewer", errors=("404",)),
            "patch": _op(
                "Triage: status and/or assignee (null unassigns)",
                "alerts",
                "responder",
                unsafe=True,
                errors=("404", "409"),
                body=_fields(
                    {
                        "status": _s(
                            "string", enum=["new", "acknowledged", "resolved", "false_positive"]
                        ),
                        "assignee": {"type": ["string", "null"], "maxLength": 256},
                    }
                ),
            ),
        },
        "/api/v1/alerts/{alert_id}/comments": {
            "parameters": [_path_param("alert_id", "integer")],
            "post": _op(
                "Comment on an alert",
                "alerts",
                "responder",
                unsafe=True,
                ok=201,
                body=_fields({"text": _s("string", minLength=1)}, ("text",)),
                errors=("404",),
            ),
        },
        "/api/v1/alerts/{alert_id}/mark-safe": {
            "parameters": [_path_param("alert_id", "integer")],
            "post": _op(
                "Add an allow entry to the policy from an alert",
                "alerts",
                "admin",
                unsafe=True,
                body_required=False,
                errors=("404", "409"),
                body=_fields(
                    {"kind": _s("string"), "value": _s("string"), "comment": _s("string")}
                ),
            ),
        },
        "/api/v1/policy": {
            "get": _op("The current policy", "policy", "viewer"),
            "put": _op(
                "Store a new policy version and push it to sensors",
                "policy",
                "admin",
                unsafe=True,
                errors=("409",),
                body=_fields(
                    {
                        "document": _ANY_OBJECT,
                        "comment": _s("string"),
                        "base_version": {"type": ["integer", "null"]},
                    },
                    ("document",),
                ),
            ),
        },
        "/api/v1/policy/history": {
            "get": _op("Policy versions, newest first", "policy", "viewer", params=[_LIMIT])
        },
        "/api/v1/policy/versions/{version}": {
            "parameters": [_path_param("version", "integer")],
            "get": _op("One policy version", "policy", "viewer", errors=("404",)),
        },
        "/api/v1/policy/hosts": {"get": _op("Applied policy version per host", "policy", "viewer")},
        "/api/v1/rules": {
            "get": _op("Loaded rules and rules that failed to load", "rules", "viewer"),
            "post": _op(
                "Upload a Sigma rule (JSON, or the YAML itself as application/yaml)",
                "rules",
                "admin",
                unsafe=True,
                ok=201,
                errors=("409",),
                body=_fields(
                    {"yaml": _s("string"), "filename": _s("string"), "overwrite": _s("boolean")},
                    ("yaml",),
                ),
            ),
        },
        "/api/v1/rules/reload": {
            "post": _op("Reload rules from their directories", "rules", "admin", unsafe=True)
        },
        "/api/v1/rules/{rule_id}/enable": {
            "parameters": [_path_param("rule_id")],
            "post": _op("Enable a rule", "rules", "admin", unsafe=True, errors=("404",)),
        },
        "/api/v1/rules/{rule_id}/disable": {
            "parameters": [_path_param("rule_id")],
            "post": _op("Disable a rule", "rules", "admin", unsafe=True, errors=("404",)),
        },
        "/api/v1/enrollment/tokens": {
            "get": _op("List enrollment tokens", "enrollment", "admin"),
            "post": _op(
                "Create a one-time enrollment token (secret shown once)",
                "enrollment",
                "admin",
                unsafe=True,
                ok=201,
                body_required=False,
                errors=("503",),
                body=_fields(
                    {
                        "ttl": _s("integer", minimum=1),
                        "uses": _s("integer", minimum=1),
                        "comment": _s("string", maxLength=200),
                    }
                ),
            ),
        },
        "/api/v1/enrollment/tokens/{token_id}/revoke": {
            "parameters": [_path_param("token_id")],
            "post": _op(
                "Revoke an enrollment token", "enrollment", "admin", unsafe=True, errors=("404",)
            ),
        },
        "/api/v1/enrollment/certificates": {
            "get": _op("Issued sensor certificates", "enrollment", "admin", params=[_q("host")])
        },
        "/api/v1/enrollment/certificates/{host_id}/revoke": {
            "parameters": [host],
            "post": _op(
                "Revoke a host's certificate (CRL reloaded)",
                "enrollment",
                "admin",
                unsafe=True,
                errors=("404",),
            ),
        },
        # Mounted by controller.app and controller.enroll_api:
        "/api/v1/enroll/ca": {
            "get": {
                "summary": "The CA certificate (PEM); sensors pin its SHA-256",
                "tags": ["enroll"],
                "security": [],
                "responses": {
                    "200": {
                        "description": "PEM",
                        "content": {"application/x-pem-file": {"schema": _s("string")}},
                    },
                    "503": {"$ref": "#/components/responses/E503"},
                },
            }
        },
        "/api/v1/enroll": {
            "post": _op(
                "Enroll a sensor: a one-time token and a CSR give a signed certificate",
                "enroll",
                None,
                body=_fields(
                    {"token": _s("string"), "csr": _s("string"), "hostname": _s("string")},
                    ("token", "csr", "hostname"),
                ),
                result=_obj(
                    {"host_id": _s("string"), "certificate": _s("string"), "ca": _s("string")}
                ),
                errors=("401", "403"),
            )
        },
        "/api/v1/stream": {
            "get": {
                "summary": "Websocket live stream of events, alerts, host and command changes",
                "description": "Upgrade to a websocket (viewer role). Filters are query "
                "parameters; comma-separated lists.",
                "tags": ["stream"],
                "security": [{"sessionCookie": []}, {"bearerToken": []}],
                "parameters": [
                    _q("host"),
                    _q("kind", desc="event, alert, host, command"),
                    _q("severity"),
                    _q("text"),
                ],
                "responses": {
                    "101": {"description": "Switching to the websocket protocol"},
                    "401": {"$ref": "#/components/responses/E401"},
                    "403": {"$ref": "#/components/responses/E403"},
                },
            }
        },
        "/metrics": {
            "get": {
                "summary": "Prometheus metrics",
                "tags": ["meta"],
                "security": [],
                "responses": {
                    "200": {
                        "description": "Prometheus text format",
                        "content": {"text/plain": {"schema": _s("string")}},
                    }
                },
            }
        },
    }


def build_document() -> dict[str, Any]:
    """The whole OpenAPI 3.1 document (a fresh copy each call)."""
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "EDR controller API",
            "version": "1",
            "description": "Analysts log in (POST /api/v1/auth/login) for a session cookie and "
            "send the returned csrf_token as X-CSRF-Token on every POST, PUT, PATCH and "
            "DELETE. Automation uses API tokens: Authorization: Bearer <token>. Every error "
            'is JSON: {"error": message}.',
        },
        "servers": [{"url": "/"}],
        "paths": copy.deepcopy({**_auth_paths(), **_resource_paths()}),
        "components": {
            "securitySchemes": {
                "sessionCookie": {
                    "type": "apiKey",
                    "in": "cookie",
                    "name": "__Host-edr_session",
                    "description": "Set by POST /api/v1/auth/login",
                },
                "csrfHeader": {
                    "type": "apiKey",
                    "in": "header",
                    "name": "X-CSRF-Token",
                    "description": "The session's csrf_token; required with the "
                    "cookie on state-changing methods",
                },
                "bearerToken": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "An API token from POST /api/v1/api-tokens",
                },
            },
            "schemas": {
                "Error": _obj({"error": _s("string")}, ("error",), additionalProperties=True),
            },
            "responses": {
                f"E{status}": {
                    "description": text,
                    "content": {"application/json": {"schema": _ref("Error")}},
                }
                for status, text in _ERROR_STATUSES.items()
            },
        },
    }


def create_blueprint() -> Blueprint:
    """Serve the document at ``GET /api/v1/openapi.json`` (public: it holds no secrets)."""
    bp = Blueprint("openapi", url_prefix="/api/v1")
    document = build_document()

    @bp.get("/openapi.json")
    async def openapi_json(request: Request) -> HTTPResponse:
        return json_response(document)

    return bp

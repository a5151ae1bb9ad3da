"""Alerts: list and filter, read one (with its event and ancestry), triage, comment, mark safe.

``GET   /api/v1/alerts``                   ``status``, ``severity``, ``host``, ``rule``,
                                           ``assignee``, ``since``, ``limit``, ``before_id``
``GET   /api/v1/alerts/<id>``              one alert with comments, event and ancestry
``PATCH /api/v1/alerts/<id>``              responder: ``{status?, assignee?}`` (null unassigns)
``POST  /api/v1/alerts/<id>/comments``     responder: ``{text}``
``POST  /api/v1/alerts/<id>/mark-safe``    admin: ``{kind?, value?, comment?}``

"Mark safe" adds an allow entry to the policy (a new version by the requesting user, pushed
to every host) and closes the alert as a false positive. It needs the admin role because an
allow entry silences detection fleet-wide, which is a policy change. ``kind`` is one of
``hash``, ``executable``, ``command_line``, ``path``; the entry's value is taken from the
alert's event unless ``value`` is given. Without ``kind`` the most precise one the event
supports is used: the executable's hash, else the executable, else the file path.
"""

from __future__ import annotations

import glob
from typing import Any

from sanic import Blueprint, Request
from sanic.response import HTTPResponse, json

from backplane.schema import get_path
from controller.api import inputs
from controller.api.policy import (
    PolicyInvalid,
    policy_lock,
    store_policy,
    validate_document,
)
from controller.auth import audit, require
from controller.errors import ApiError
from controller.store import Alert, AlertStatus, Severity

MAX_COMMENT = 65536
SAFE_KINDS = {
    # kind → (policy allow list, where the value is in the event)
    "hash": ("hashes", ("process.hash.sha256", "file.hash.sha256")),
    "executable": ("executables", ("process.executable",)),
    "command_line": ("command_lines", ("process.command_line",)),
    "path": ("paths", ("file.path",)),
}
DEFAULT_KIND_ORDER = ("hash", "executable", "path")


def alert_json(alert: Alert) -> dict[str, Any]:
    doc: dict[str, Any] = inputs.to_json(alert)
    return doc


def _alert_id(alert_id: int) -> int:
    if alert_id < 0 or alert_id > 2**63 - 1:
        raise ApiError(404, f"alert {alert_id} not found")
    return alert_id


def safe_entry(alert: Alert, kind: str | None, value: str | None) -> tuple[str, str]:
    """The (kind, value) to allow for ``alert``, validated as a policy entry would be."""
    if kind is None:
        for candidate in DEFAULT_KIND_ORDER:
            if any(get_path(alert.event, p) for p in SAFE_KINDS[candidate][1]):
                kind = candidate
                break
        else:
            raise ApiError(
                400,
                "the alert's event has no hash, executable or file path to allow; "
                "give kind and value",
            )
    if kind not in SAFE_KINDS:
        raise ApiError(400, f"kind must be one of {', '.join(SAFE_KINDS)}, not {kind!r}")
    if value is None:
        found = [get_path(alert.event, p) for p in SAFE_KINDS[kind][1]]
        value = next((v for v in found if isinstance(v, str) and v), None)
        if value is None:
            raise ApiError(400, f"the alert's event has no {kind} to allow; give value")
        if kind == "command_line":
            # Policy command lines are globs: allow exactly this one, not what it matches.
            value = glob.escape(value)
    return kind, value


def create_blueprint() -> Blueprint:
    bp = Blueprint("api_alerts", url_prefix="/api/v1")

    @bp.get("/alerts")
    @require("viewer")
    async def list_alerts(request: Request) -> HTTPResponse:
        inputs.check_query(
            request,
            ("status", "severity", "host", "rule", "assignee", "since", "limit", "before_id"),
        )
        filters: dict[str, Any] = {
            "status": inputs.query_choice(request, "status", [s.value for s in AlertStatus]),
            "severity": inputs.query_choice(request, "severity", [s.value for s in Severity]),
            "host_id": inputs.query_str(request, "host", max_len=256),
            "rule_id": inputs.query_str(request, "rule", max_len=256),
            "assignee": inputs.query_str(request, "assignee", max_len=256),
            "since": inputs.query_time(request, "since"),
            "before_id": inputs.query_int(request, "before_id", lo=0, hi=2**63 - 1),
            "limit": inputs.query_limit(request),
        }
        store = inputs.ctx_store(request)
        alerts = await inputs.call(store.list_alerts, **filters)
        next_before = alerts[-1].id if len(alerts) == filters["limit"] else None
        return json({"alerts": [alert_json(a) for a in alerts], "next_before_id": next_before})

    @bp.get("/alerts/<alert_id:int>")
    @require("viewer")
    async def get_alert(request: Request, alert_id: int) -> HTTPResponse:
        inputs.check_query(request, ())
        store = inputs.ctx_store(request)
        return json(alert_json(await inputs.call(store.get_alert, _alert_id(alert_id))))

    @bp.patch("/alerts/<alert_id:int>")
    @require("responder")
    async def triage(request: Request, alert_id: int) -> HTTPResponse:
        inputs.check_query(request, ())
        body = inputs.json_object(request)
        inputs.check_fields(body, ("status", "assignee"))
        if not body:
            raise ApiError(400, "give status and/or assignee")
        status = body.get("status")
        if status is not None and status not in {s.value for s in AlertStatus}:
            raise ApiError(
                400,
                f"status must be one of {', '.join(s.value for s in AlertStatus)}, not {status!r}",
            )
        kwargs: dict[str, Any] = {"status": status}
        if "assignee" in body:
            if body["assignee"] is None:
                kwargs["unassign"] = True
            else:
                kwargs["assignee"] = inputs.text_field(body, "assignee", max_len=256)
        store = inputs.ctx_store(request)
        alert = await inputs.call(store.triage_alert, _alert_id(alert_id), **kwargs)
        await audit(
            request, "alert.triage", f"alert:{alert.id}",
            {"status": status, "assignee": body.get("assignee")} if "assignee" in body
            else {"status": status},
        )  # fmt: skip
        doc = alert_json(alert)
        inputs.publish(request, "alert", doc)
        return json(doc)

    @bp.post("/alerts/<alert_id:int>/comments")
    @require("responder")
    async def comment(request: Request, alert_id: int) -> HTTPResponse:
        inputs.check_query(request, ())
        body = inputs.json_object(request, max_bytes=MAX_COMMENT * 4 + 1024)
        inputs.check_fields(body, ("text",), ("text",))
        text = inputs.text_field(body, "text", max_len=MAX_COMMENT)
        store = inputs.ctx_store(request)
        added = await inputs.call(
            store.add_alert_comment, _alert_id(alert_id), request.ctx.user.username, text
        )
        await audit(request, "alert.comment", f"alert:{alert_id}", {"comment_id": added.id})
        return json(inputs.to_json(added), status=201)

    @bp.post("/alerts/<alert_id:int>/mark-safe")
    @require("admin")
    async def mark_safe(request: Request, alert_id: int) -> HTTPResponse:
        inputs.check_query(request, ())
        body = inputs.json_object(request) if inputs.has_body(request) else {}
        inputs.check_fields(body, ("kind", "value", "comment"))
        kind = body.get("kind")
        if kind is not None and not isinstance(kind, str):
            raise ApiError(400, f"kind must be one of {', '.join(SAFE_KINDS)}")
        value = inputs.text_field(body, "value")
        note = inputs.text_field(body, "comment", default="", allow_empty=True) or ""
        store = inputs.ctx_store(request)
        alert = await inputs.call(store.get_alert, _alert_id(alert_id))
        kind, value = safe_entry(alert, kind, value)
        list_name = SAFE_KINDS[kind][0]
        try:
            # Normalised exactly as a policy entry, so the duplicate check compares like forms.
            value = validate_document({"allow": {list_name: [value]}})["allow"][list_name][0]
        except PolicyInvalid as e:
            raise ApiError(400, f"cannot allow {kind}: {e}") from None
        async with policy_lock(request.app):
            latest = await inputs.call(store.current_policy)
            try:
                document = validate_document({} if latest is None else latest.document)
                changed = value not in document["allow"][list_name]
                if changed:
                    document["allow"][list_name].append(value)
                    document = validate_document(document)
            except PolicyInvalid as e:
                raise ApiError(409, f"cannot add to the current policy: {e}") from None
            version = latest  # already allowed: no new version, just close the alert
            if changed:
                why = f"mark safe: alert {alert.id} ({alert.rule_name})"
                if note:
                    why += f": {note}"
                version = await store_policy(request, document, why[:4096])
        if alert.status == AlertStatus.RESOLVED:
            # Closed alerts reopen through "acknowledged" (the store never skips it).
            await inputs.call(store.triage_alert, alert.id, status=AlertStatus.ACKNOWLEDGED)
        alert = await inputs.call(store.triage_alert, alert.id, status=AlertStatus.FALSE_POSITIVE)
        version_no = None if version is None else version.version
        text = f"marked safe: allow {kind} {value!r} (policy version {version_no})"
        if note:
            text += f"\n{note}"
        await inputs.call(store.add_alert_comment, alert.id, request.ctx.user.username, text)
        await audit(
            request, "alert.mark_safe", f"alert:{alert.id}",
            {"kind": kind, "value": value, "policy_version": version_no},
        )  # fmt: skip
        alert = await inputs.call(store.get_alert, alert.id)
        doc = alert_json(alert)
        inputs.publish(request, "alert", doc)
        return json(
            {
                "alert": doc,
                "policy_version": version_no,
                "policy_changed": changed,
                "allowed": {"kind": kind, "list": f"allow.{list_name}", "value": value},
            }
        )

    return bp

"""Hosts: the fleet registry with live connection state, and each host's metrics history.

``GET /api/v1/hosts``                 list, with ``status``/``isolated``/``q`` filters and sort
``GET /api/v1/hosts/<host_id>``       one host
``GET /api/v1/hosts/<host_id>/metrics``  heartbeat samples for charts, oldest first
"""

from __future__ import annotations

from typing import Any

from sanic import Blueprint, Request
from sanic.response import HTTPResponse, json

from controller.api import inputs
from controller.auth import require
from controller.errors import ApiError
from controller.store import Host

SORT_KEYS = ("hostname", "last_seen", "first_seen", "events_dropped", "host_id")
MAX_HOST_ID = 256


def host_json(host: Host, connected: set[str]) -> dict[str, Any]:
    """A host as the API shows it: the stored record plus whether a session is open now."""
    doc: dict[str, Any] = inputs.to_json(host)
    doc["connected"] = host.host_id in connected
    # The backplane knows for sure; the store's heartbeat age is the fallback when a
    # session exists but the first heartbeat has not arrived yet, or vice versa.
    doc["online"] = host.online or doc["connected"]
    doc["status"] = "online" if doc["online"] else "offline"
    return doc


def check_host_id(host_id: str) -> str:
    if not host_id or len(host_id) > MAX_HOST_ID or any(ord(c) < 32 for c in host_id):
        raise ApiError(400, f"host id must be 1 to {MAX_HOST_ID} printable characters")
    return host_id


def create_blueprint() -> Blueprint:
    bp = Blueprint("api_hosts", url_prefix="/api/v1")

    @bp.get("/hosts")
    @require("viewer")
    async def list_hosts(request: Request) -> HTTPResponse:
        inputs.check_query(request, ("status", "isolated", "q", "sort", "order", "limit"))
        status = inputs.query_choice(request, "status", ("online", "offline"))
        isolated = inputs.query_bool(request, "isolated")
        needle = inputs.query_str(request, "q", max_len=256)
        sort = inputs.query_choice(request, "sort", SORT_KEYS) or "hostname"
        order = inputs.query_choice(request, "order", ("asc", "desc")) or "asc"
        limit = inputs.query_limit(request, default=1000, maximum=10_000)
        store = inputs.ctx_store(request)
        hosts = await inputs.call(store.list_hosts)
        connected = inputs.connected_hosts(request)
        docs = [host_json(h, connected) for h in hosts]
        if status is not None:
            docs = [d for d in docs if d["status"] == status]
        if isolated is not None:
            docs = [d for d in docs if d["isolated"] is isolated]
        if needle is not None:
            low = needle.lower()
            docs = [d for d in docs if low in d["hostname"].lower() or low in d["host_id"].lower()]
        docs.sort(key=lambda d: (d[sort], d["host_id"]), reverse=order == "desc")
        return json({"hosts": docs[:limit], "total": len(docs)})

    @bp.get("/hosts/<host_id:str>")
    @require("viewer")
    async def get_host(request: Request, host_id: str) -> HTTPResponse:
        inputs.check_query(request, ())
        store = inputs.ctx_store(request)
        host = await inputs.call(store.get_host, check_host_id(host_id))
        return json(host_json(host, inputs.connected_hosts(request)))

    @bp.get("/hosts/<host_id:str>/metrics")
    @require("viewer")
    async def metrics(request: Request, host_id: str) -> HTTPResponse:
        inputs.check_query(request, ("since", "limit"))
        since = inputs.query_time(request, "since")
        limit = inputs.query_limit(request, default=1000, maximum=100_000)
        store = inputs.ctx_store(request)
        samples = await inputs.call(
            store.metrics_history, check_host_id(host_id), since=since, limit=limit
        )
        return json({"host_id": host_id, "samples": inputs.to_json(samples)})

    return bp

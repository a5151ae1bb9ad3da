"""Events: indexed search, one event, and a process's tree (ancestry and children).

``GET /api/v1/events``            search: ``since``/``until`` (POSIX seconds or ISO 8601),
                                  ``host``, ``action``, ``category``, ``pid``, ``entity_id``,
                                  ``executable``, ``path``, ``ip``, ``port``, ``q`` (full text
                                  over command lines, executables and paths), ``limit``,
                                  ``cursor`` (from the previous page's ``next_cursor``)
``GET /api/v1/events/<id>``       one event
``GET /api/v1/events/<id>/tree``  the process tree of the process that produced the event
``GET /api/v1/hosts/<host_id>/processes/<entity_id>``  a process tree by entity id
"""

from __future__ import annotations

from typing import Any

from sanic import Blueprint, Request
from sanic.response import HTTPResponse, json

from backplane.schema import get_path
from controller.api import inputs
from controller.api.hosts import check_host_id
from controller.auth import require
from controller.errors import ApiError
from controller.store import ProcessTree, Store, StoredEvent

SEARCH_PARAMS = (
    "since", "until", "host", "action", "category", "pid", "entity_id", "executable", "path",
    "ip", "port", "q", "limit", "cursor",
)  # fmt: skip
MAX_PID = 2**31 - 1


def event_json(stored: StoredEvent) -> dict[str, Any]:
    return {"id": stored.id, "host_id": stored.host_id, "ts": stored.ts, "event": stored.event}


def tree_json(tree: ProcessTree) -> dict[str, Any]:
    doc: dict[str, Any] = inputs.to_json(tree)
    return doc


def create_blueprint() -> Blueprint:
    bp = Blueprint("api_events", url_prefix="/api/v1")

    @bp.get("/events")
    @require("viewer")
    async def search(request: Request) -> HTTPResponse:
        inputs.check_query(request, SEARCH_PARAMS)
        since = inputs.query_time(request, "since")
        until = inputs.query_time(request, "until")
        if since is not None and until is not None and since > until:
            raise ApiError(400, "since must not be after until")
        filters: dict[str, Any] = {
            "since": since,
            "until": until,
            "host_id": inputs.query_str(request, "host", max_len=256),
            "action": inputs.query_str(request, "action", max_len=64),
            "category": inputs.query_str(request, "category", max_len=64),
            "pid": inputs.query_int(request, "pid", lo=0, hi=MAX_PID),
            "entity_id": inputs.query_str(request, "entity_id", max_len=256),
            "executable": inputs.query_str(request, "executable"),
            "path": inputs.query_str(request, "path"),
            "ip": inputs.query_str(request, "ip", max_len=64),
            "port": inputs.query_int(request, "port", lo=0, hi=65535),
            "text": inputs.query_str(request, "q", max_len=1024),
            "cursor": inputs.query_str(request, "cursor", max_len=128),
            "limit": inputs.query_limit(request),
        }
        store = inputs.ctx_store(request)
        page = await inputs.call(store.search_events, **filters)
        return json(
            {"events": [event_json(e) for e in page.events], "next_cursor": page.next_cursor}
        )

    @bp.get("/events/<event_id:int>")
    @require("viewer")
    async def get_event(request: Request, event_id: int) -> HTTPResponse:
        inputs.check_query(request, ())
        store = inputs.ctx_store(request)
        return json(event_json(await inputs.call(store.get_event, event_id)))

    @bp.get("/events/<event_id:int>/tree")
    @require("viewer")
    async def event_tree(request: Request, event_id: int) -> HTTPResponse:
        inputs.check_query(request, ())
        store = inputs.ctx_store(request)
        stored = await inputs.call(store.get_event, event_id)
        entity_id = get_path(stored.event, "process.entity_id")
        if not isinstance(entity_id, str) or not entity_id:
            raise ApiError(404, f"event {event_id} names no process (no process.entity_id)")
        return json(tree_json(await _fresh_tree(store, stored.host_id, entity_id)))

    @bp.get("/hosts/<host_id:str>/processes/<entity_id:str>")
    @require("viewer")
    async def process_tree(request: Request, host_id: str, entity_id: str) -> HTTPResponse:
        inputs.check_query(request, ())
        if not entity_id or len(entity_id) > 256:
            raise ApiError(400, "entity id must be 1 to 256 characters")
        store = inputs.ctx_store(request)
        return json(tree_json(await _fresh_tree(store, check_host_id(host_id), entity_id)))

    return bp


# A tree request folds at most TREE_FOLDS x FOLD_ROWS pending events (~0.5 s under overload);
# a backlog beyond that is left to the maintenance loop rather than held in a request.
TREE_FOLDS = 4
FOLD_ROWS = 50_000


async def _fresh_tree(store: Store, host_id: str, entity_id: str) -> ProcessTree:
    """The process tree with every stored exec/fork/exit folded in first.

    The maintenance loop folds the process table in large batches, up to a second or so
    behind ingest; an analyst opening a process just seen on the live stream must find it,
    with its latest children. What is pending is folded here first (bounded), then read.
    """
    for _ in range(TREE_FOLDS):
        if await inputs.call(store.fold_processes, FOLD_ROWS) < FOLD_ROWS:
            break
    return await inputs.call(store.process_tree, host_id, entity_id)

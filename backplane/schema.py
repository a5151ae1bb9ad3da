"""The event schema shared by sensor and controller.

Events are nested dicts named after the Elastic Common Schema (ECS), so they export to
Elasticsearch/OpenSearch and SIEMs unchanged. Every tier (kprobe, tracepoint, fallback)
emits exactly this shape; fields a tier cannot know are left out, never faked.

Fields outside ECS live under ``edr.*`` (the capture tier) or follow Elastic Endpoint's
``*.Ext.*`` convention (``file.Ext.original.path`` for renames).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

SCHEMA_VERSION = 1

Event = dict[str, Any]


class Family(StrEnum):
    PROCESS = "process"
    FILE = "file"
    NETWORK = "network"


class Tier(StrEnum):
    KPROBE = "kprobe"
    TRACEPOINT = "tracepoint"
    FALLBACK = "fallback"


class Action(StrEnum):
    """``event.action`` values. The table below gives each its ECS category and type."""

    EXEC = "exec"
    EXIT = "exit"
    FORK = "fork"
    FILE_CREATE = "create"
    FILE_WRITE = "write"
    FILE_OPEN = "open"  # a read of a sensitive path
    FILE_DELETE = "delete"
    FILE_RENAME = "rename"
    FILE_CHMOD = "chmod"
    FILE_CHOWN = "chown"
    CONNECT = "connect"
    ACCEPT = "accept"
    LISTEN = "listen"
    DNS_QUERY = "dns-query"
    HOLD = "hold"  # the sensor stopped a process on its own (policy)
    QUARANTINE = "quarantine"  # the sensor quarantined a file on its own (policy)


_ACTIONS: dict[Action, tuple[Family, tuple[str, ...]]] = {
    Action.EXEC: (Family.PROCESS, ("start",)),
    Action.EXIT: (Family.PROCESS, ("end",)),
    Action.FORK: (Family.PROCESS, ("start",)),
    Action.FILE_CREATE: (Family.FILE, ("creation",)),
    Action.FILE_WRITE: (Family.FILE, ("change",)),
    Action.FILE_OPEN: (Family.FILE, ("access",)),
    Action.FILE_DELETE: (Family.FILE, ("deletion",)),
    Action.FILE_RENAME: (Family.FILE, ("change",)),
    Action.FILE_CHMOD: (Family.FILE, ("change",)),
    Action.FILE_CHOWN: (Family.FILE, ("change",)),
    Action.CONNECT: (Family.NETWORK, ("connection", "start")),
    Action.ACCEPT: (Family.NETWORK, ("connection", "start")),
    Action.LISTEN: (Family.NETWORK, ("start",)),
    Action.DNS_QUERY: (Family.NETWORK, ("protocol",)),
    Action.HOLD: (Family.PROCESS, ("change",)),
    Action.QUARANTINE: (Family.FILE, ("deletion",)),
}


def family_of(action: Action) -> Family:
    return _ACTIONS[action][0]


# epoch second -> its "YYYY-mm-ddTHH:MM:SS" text; a few seconds are live at once (event time,
# process start times), so a small dict rather than one slot, cleared when it grows.
_SECONDS: dict[int, str] = {}
_SECONDS_KEPT = 256


def iso_timestamp(epoch_ns: int | None = None) -> str:
    """RFC 3339 UTC timestamp with microseconds, as ECS ``@timestamp`` expects.

    Events come in bursts within a second, so the seconds part is formatted once per second
    and cached; per call only the fraction is formatted (a datetime per event was a hot spot).
    """
    ns = time.time_ns() if epoch_ns is None else epoch_ns
    sec = ns // 1_000_000_000
    text = _SECONDS.get(sec)
    if text is None:
        text = datetime.fromtimestamp(sec, tz=UTC).strftime("%Y-%m-%dT%H:%M:%S")
        if len(_SECONDS) >= _SECONDS_KEPT:
            _SECONDS.clear()
        _SECONDS[sec] = text
    return f"{text}.{(ns // 1000) % 1_000_000:06d}Z"


# per action: (event.category, event.type, event.action) as plain str values, built once.
# The lists are shared by every event of the action: treat them as read-only.
_SKELETONS: dict[Action, tuple[list[str], list[str], str]] = {
    action: ([family.value], list(types), action.value)
    for action, (family, types) in _ACTIONS.items()
}
_TIER_VALUES: dict[Tier, str] = {tier: tier.value for tier in Tier}


def event_skeleton(action: Action) -> tuple[list[str], list[str], str]:
    """``(event.category, event.type, event.action)`` of an action, shared: read-only."""
    return _SKELETONS[action]


def new_event(
    action: Action,
    *,
    host: Mapping[str, Any],
    tier: Tier,
    epoch_ns: int | None = None,
    outcome: str | None = None,
) -> Event:
    """The skeleton every event starts from: timestamp, ``event.*``, ``host.*``, tier.

    ``host`` and the ``event.category``/``event.type`` lists are shared between events, not
    copied (a sensor builds thousands per second): consumers add fields to an event's own
    dicts (``event``, ``edr``, ``process``...) and never modify those.
    """
    category, types, value = _SKELETONS[action]
    event: dict[str, Any] = {
        "kind": "event",
        "category": category,
        "type": types,
        "action": value,
    }
    if outcome is not None:
        event["outcome"] = outcome
    return {
        "@timestamp": iso_timestamp(epoch_ns),
        "event": event,
        "host": host,
        "edr": {"tier": _TIER_VALUES[tier], "schema": SCHEMA_VERSION},
    }


# Sigma's Linux field names (process_creation, file_event, network_connection) mapped
# onto this schema, as dotted paths. The controller's detection uses this one table.
SIGMA_FIELDS: dict[str, str] = {
    "Image": "process.executable",
    "CommandLine": "process.command_line",
    "CurrentDirectory": "process.working_directory",
    "ProcessId": "process.pid",
    "ParentImage": "process.parent.executable",
    "ParentCommandLine": "process.parent.command_line",
    "ParentProcessId": "process.parent.pid",
    "User": "user.name",
    "LogonId": "user.audit.id",
    "TargetFilename": "file.path",
    "SourceFilename": "file.Ext.original.path",
    "DestinationIp": "destination.ip",
    "DestinationPort": "destination.port",
    "DestinationHostname": "destination.domain",
    "SourceIp": "source.ip",
    "SourcePort": "source.port",
    "Protocol": "network.transport",
    "Initiated": "network.direction",  # "egress" is Sigma's Initiated: 'true'
    "Hashes": "process.hash.sha256",
}


def get_path(event: Mapping[str, Any], dotted: str) -> Any:
    """Look up ``a.b.c`` in a nested event; ``None`` when any part is missing."""
    node: Any = event
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return None
        node = node[part]
    return node

"""Turn a rule match into the alert record the controller stores and shows.

The controller owns process ancestry (it has the process table); it passes the chain in
and this module only shapes the record, so alerts look the same wherever they are built.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from typing import Any

from backplane.schema import iso_timestamp
from controller.detection.engine import Match

ALERT_SCHEMA = 1


def build_alert(
    match: Match,
    *,
    host: Mapping[str, Any] | None = None,
    ancestry: Sequence[Mapping[str, Any]] = (),
    epoch_ns: int | None = None,
) -> dict[str, Any]:
    """The alert dict for ``match``.

    Args:
        match: what fired.
        host: the host identity as the controller knows it (from the sensor's certificate);
            defaults to the event's own ``host`` block.
        ancestry: the process chain, nearest parent first, as ECS ``process``-shaped dicts.
        epoch_ns: alert time (defaults to now); injectable for tests.

    Raises:
        TypeError: ``host`` is not a mapping or ``ancestry`` holds something that is not.
    """
    if host is None:
        event_host = match.event.get("host")
        host = event_host if isinstance(event_host, Mapping) else {}
    elif not isinstance(host, Mapping):
        raise TypeError(f"host must be a mapping, not {type(host).__name__}")
    if isinstance(ancestry, str | bytes) or not isinstance(ancestry, Sequence):
        raise TypeError("ancestry must be a sequence of process mappings")
    chain = []
    for i, proc in enumerate(ancestry):
        if not isinstance(proc, Mapping):
            raise TypeError(f"ancestry[{i}] must be a mapping, not {type(proc).__name__}")
        chain.append(dict(proc))
    meta = match.event.get("event")
    action = meta.get("action") if isinstance(meta, Mapping) else None
    return {
        "@timestamp": iso_timestamp(epoch_ns),
        "id": str(uuid.uuid4()),
        "kind": "alert",
        "schema": ALERT_SCHEMA,
        "status": "open",
        "severity": match.severity,
        "rule": {
            "id": match.rule_id,
            "name": match.title,
            "level": match.level,
            "tags": list(match.tags),
            "description": match.description,
            "ruleset": "sigma",
        },
        "host": dict(host),
        "action": action,
        "event": match.event,
        "ancestry": chain,
    }

"""Live fan-out of events, alerts, host and command changes to websocket clients.

``LiveHub.publish`` is called from ingest, so it never blocks and never awaits: each
subscriber has a bounded queue, filters run before queueing (server-side, so a client
watching one host costs nothing for the others), and an item that finds the queue full is
dropped *for that subscriber only* and counted. The client is told how many it missed with
the next item it does receive. All methods run on the event loop thread.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import orjson

log = logging.getLogger(__name__)

KINDS = frozenset({"event", "alert", "host", "command"})
SEVERITY_RANK = {"informational": 0, "low": 1, "medium": 2, "high": 3, "critical": 4}
MAX_FILTER_TEXT = 256


class FilterError(ValueError):
    """A stream filter parameter that cannot be understood."""


@dataclass(frozen=True, slots=True)
class StreamFilter:
    """Which items a subscriber wants. ``None`` means "any".

    Attributes:
        hosts: host ids or host names.
        kinds: item kinds (event, alert, host, command) or event actions (exec, connect, ...);
            an event passes if its kind or its action is listed.
        min_severity: rank in ``SEVERITY_RANK``; only items carrying a severity pass.
        text: case-insensitive substring of the item's JSON.
    """

    hosts: frozenset[str] | None = None
    kinds: frozenset[str] | None = None
    min_severity: int | None = None
    text: str | None = None

    @classmethod
    def parse(
        cls,
        host: str | None = None,
        kind: str | None = None,
        severity: str | None = None,
        text: str | None = None,
    ) -> StreamFilter:
        """Build a filter from query parameters (comma-separated lists).

        Raises:
            FilterError: unknown severity, empty list items, oversized text.
        """

        def split(name: str, raw: str | None) -> frozenset[str] | None:
            if raw is None or raw == "":
                return None
            parts = [p.strip() for p in raw.split(",")]
            if any(not p or len(p) > 256 for p in parts) or len(parts) > 64:
                raise FilterError(f"{name}: expected a comma-separated list of names")
            return frozenset(parts)

        rank = None
        if severity:
            key = severity.strip().lower()
            if key not in SEVERITY_RANK:
                known = ", ".join(SEVERITY_RANK)
                raise FilterError(f"severity: {severity!r} is not one of {known}")
            rank = SEVERITY_RANK[key]
        if text is not None and len(text) > MAX_FILTER_TEXT:
            raise FilterError(f"text: longer than {MAX_FILTER_TEXT} characters")
        return cls(split("host", host), split("kind", kind), rank, text.lower() if text else None)

    def matches(self, kind: str, item: Mapping[str, Any]) -> bool:
        if self.kinds is not None and kind not in self.kinds:
            action = _action(item)
            if action is None or action not in self.kinds:
                return False
        if self.hosts is not None and not (_hosts(item) & self.hosts):
            return False
        if self.min_severity is not None:
            sev = item.get("severity")
            rank = SEVERITY_RANK.get(sev) if isinstance(sev, str) else None
            if rank is None or rank < self.min_severity:
                return False
        if self.text is not None:
            blob = orjson.dumps(item, default=str).decode().lower()
            if self.text not in blob:
                return False
        return True


def _action(item: Mapping[str, Any]) -> str | None:
    ev = item.get("event")
    if isinstance(ev, Mapping):
        action = ev.get("action")
        if isinstance(action, str):
            return action
    action = item.get("action")
    return action if isinstance(action, str) else None


def _hosts(item: Mapping[str, Any]) -> set[str]:
    out: set[str] = set()
    hid = item.get("host_id")
    if isinstance(hid, str):
        out.add(hid)
    host = item.get("host")
    if isinstance(host, Mapping):
        for k in ("id", "name", "hostname"):
            v = host.get(k)
            if isinstance(v, str):
                out.add(v)
    name = item.get("hostname")
    if isinstance(name, str):
        out.add(name)
    return out


class Subscription:
    """One client's view of the hub: a bounded queue of ``(kind, item)`` and a drop count."""

    def __init__(self, hub: LiveHub, flt: StreamFilter, maxsize: int) -> None:
        self.hub = hub
        self.filter = flt
        self.queue: asyncio.Queue[tuple[str, dict[str, Any]]] = asyncio.Queue(maxsize)
        self.dropped = 0  # items lost because this client was slow
        self._reported = 0

    def offer(self, kind: str, item: dict[str, Any]) -> None:
        if not self.filter.matches(kind, item):
            return
        try:
            self.queue.put_nowait((kind, item))
        except asyncio.QueueFull:
            self.dropped += 1
            self.hub.dropped += 1

    async def next(self) -> dict[str, Any]:
        """The next message for the client: ``{"kind", "data"}`` plus ``missed`` after drops."""
        kind, item = await self.queue.get()
        msg: dict[str, Any] = {"kind": kind, "data": item}
        if self.dropped != self._reported:
            msg["missed"] = self.dropped - self._reported
            self._reported = self.dropped
        return msg

    def close(self) -> None:
        self.hub.unsubscribe(self)

    def __enter__(self) -> Subscription:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class LiveHub:
    """Publish/subscribe for the websocket stream. Loop-thread only; never blocks."""

    def __init__(self, *, queue_size: int = 1000, max_subscribers: int = 256) -> None:
        if queue_size <= 0 or max_subscribers <= 0:
            raise ValueError("queue_size and max_subscribers must be positive")
        self.queue_size = queue_size
        self.max_subscribers = max_subscribers
        self._subs: list[Subscription] = []
        self.published: dict[str, int] = dict.fromkeys(sorted(KINDS), 0)
        self.dropped = 0  # summed over subscribers

    @property
    def subscribers(self) -> int:
        return len(self._subs)

    def subscribe(
        self, flt: StreamFilter | None = None, *, queue_size: int | None = None
    ) -> Subscription:
        """A new subscription; raises ``OverflowError`` past ``max_subscribers``."""
        if len(self._subs) >= self.max_subscribers:
            raise OverflowError(f"too many live subscribers (limit {self.max_subscribers})")
        sub = Subscription(self, flt or StreamFilter(), queue_size or self.queue_size)
        # A new list, not an append: publish may be iterating the old one.
        self._subs = [*self._subs, sub]
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        self._subs = [s for s in self._subs if s is not sub]

    def publish(self, kind: str, item: dict[str, Any]) -> None:
        """Offer ``item`` to every subscriber whose filter wants it.

        Raises:
            ValueError: unknown ``kind`` (a programming error, not client input).
        """
        if kind not in KINDS:
            raise ValueError(f"unknown live item kind {kind!r}")
        self.published[kind] += 1
        for sub in self._subs:
            sub.offer(kind, item)

    def publish_many(self, kind: str, items: list[dict[str, Any]]) -> None:
        """``publish`` for a batch; returns at once when nobody listens (the common case)."""
        if kind not in KINDS:
            raise ValueError(f"unknown live item kind {kind!r}")
        self.published[kind] += len(items)
        subs = self._subs
        if not subs:
            return
        for item in items:
            for sub in subs:
                sub.offer(kind, item)

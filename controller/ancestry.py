"""Process ancestry for alerts: recent processes seen in the event stream, then the store.

The detection worker keeps a ``ProcessCache`` filled from every exec and fork event in stream
order, so an alert's ancestry does not wait for the store's background indexer. When the chain
leaves the cache, the rest comes from the store's process table; the controller process owns
the store, so a ``Walk`` made in the worker can end ``pending`` and ``finish`` completes it.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from controller.store import Store, StoreError

MAX_ANCESTRY = 32
PROCESS_CACHE = 200_000  # recent processes per controller
_STUB_FIELDS = ("entity_id", "pid", "executable", "command_line")


@dataclass(slots=True)
class Walk:
    """An event's ancestors found in the cache, nearest first.

    ``pending`` is the entity id where the cache ran out (the store may know more), ``seen``
    the entity ids already on the chain, ``stub`` the parent as the event itself names it
    (the chain when nothing else is known).
    """

    chain: list[dict[str, Any]]
    pending: str | None = None
    seen: tuple[str, ...] = ()
    stub: dict[str, Any] | None = None


class ProcessCache:
    """(host, entity id) → process node for the most recent ``size`` processes."""

    def __init__(self, size: int = PROCESS_CACHE) -> None:
        self.size = size
        self._procs: OrderedDict[tuple[str, str], dict[str, Any]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._procs)

    def remember(self, host_id: str, ev: Mapping[str, Any]) -> None:
        """Record the process of an exec or fork event."""
        # Runs for every exec and fork: plain dicts (as decoded from JSON) skip the Mapping
        # ABC checks, which cost more than the rest of this method.
        proc = ev.get("process")
        if proc.__class__ is not dict and not isinstance(proc, Mapping):
            return
        eid = proc.get("entity_id")
        if eid.__class__ is not str and not isinstance(eid, str):
            return
        parent = proc.get("parent")
        user = ev.get("user")
        key = (host_id, eid)
        procs = self._procs
        procs[key] = {
            "entity_id": eid,
            "pid": proc.get("pid"),
            "executable": proc.get("executable"),
            "command_line": proc.get("command_line"),
            "user": (user.get("name") if user.__class__ is dict or isinstance(user, Mapping)
                     else None),
            "parent_entity_id": (parent.get("entity_id") if parent.__class__ is dict
                                 or isinstance(parent, Mapping) else None),
        }  # fmt: skip
        procs.move_to_end(key)
        if len(procs) > self.size:
            procs.popitem(last=False)

    def walk(self, host_id: str, ev: Mapping[str, Any]) -> Walk:
        """The event's ancestors as far as the cache knows them."""
        proc = ev.get("process")
        if not isinstance(proc, Mapping):
            return Walk([])
        parent = proc.get("parent")
        parent = parent if isinstance(parent, Mapping) else {}
        stub = {k: parent.get(k) for k in _STUB_FIELDS} if parent else None
        chain: list[dict[str, Any]] = []
        seen: list[str] = []
        if isinstance(proc.get("entity_id"), str):
            seen.append(proc["entity_id"])
        eid = parent.get("entity_id")
        while isinstance(eid, str) and eid not in seen and len(chain) < MAX_ANCESTRY:
            seen.append(eid)
            node = self._procs.get((host_id, eid))
            if node is None:
                return Walk(chain, eid, tuple(seen), stub)
            chain.append({k: v for k, v in node.items() if k != "parent_entity_id"})
            eid = node["parent_entity_id"]
        if not chain and stub is not None:
            chain.append(stub)
        return Walk(chain)


def finish(walk: Walk, host_id: str, store: Store) -> list[dict[str, Any]]:
    """The full chain: the cached part, then the store's process table from ``pending``."""
    chain = list(walk.chain)
    if walk.pending is not None:
        chain += _stored(store, host_id, walk.pending, set(walk.seen), MAX_ANCESTRY - len(chain))
    if not chain and walk.stub is not None:
        chain.append(dict(walk.stub))
    return chain


def _stored(
    store: Store, host_id: str, eid: str, seen: set[str], room: int
) -> list[dict[str, Any]]:
    try:
        tree = store.process_tree(host_id, eid, children=False)
    except StoreError:
        return []
    out = []
    for node in [tree.process, *tree.ancestors][:room]:
        if node.entity_id in seen and node is not tree.process:
            break
        seen.add(node.entity_id)
        out.append(
            {
                "entity_id": node.entity_id,
                "pid": node.pid,
                "executable": node.executable,
                "command_line": node.command_line,
                "user": node.user,
            }
        )
    return out

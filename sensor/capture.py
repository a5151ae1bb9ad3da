"""What every capture source is, and the event builders all tiers share.

A source captures one or more event families in one tier. It has a lifecycle
(``open`` → ``run`` in its own thread → ``close``), counts what it submitted and dropped,
and hands finished ECS events to ``CaptureContext.emit``. Building events goes through the
helpers here, so every tier produces the same fields.
"""

from __future__ import annotations

import abc
import ipaddress
import os
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

from backplane.schema import Action, Event, Family, Tier, new_event
from sensor.process_table import ProcessInfo, ProcessTable
from sensor.procfs import printable


class TierUnavailable(Exception):
    """A tier cannot run here; the message says why in words an operator can act on."""


@dataclass
class FilterConfig:
    """Which file paths are reported. Prefixes are absolute directory paths."""

    exclude_prefixes: tuple[str, ...] = ("/proc/", "/sys/", "/dev/")
    include_prefixes: tuple[str, ...] = ()  # empty: everything not excluded
    sensitive_read_prefixes: tuple[str, ...] = ("/etc/shadow", "/etc/sudoers", "/root/.ssh/")
    # Where the fallback tier's inotify watches (it cannot watch everything).
    watch_paths: tuple[str, ...] = ("/etc", "/tmp", "/var/tmp", "/root", "/home", "/usr/local/bin")  # noqa: S108

    def wants(self, path: str) -> bool:
        if any(path.startswith(p) for p in self.exclude_prefixes):
            return False
        return not self.include_prefixes or any(path.startswith(p) for p in self.include_prefixes)


@dataclass
class CaptureContext:
    """Everything a source needs; built once by the runner."""

    host: Mapping[str, Any]
    table: ProcessTable
    emit: Callable[[Event], None]
    filters: FilterConfig = field(default_factory=FilterConfig)
    ignored_pids: set[int] = field(default_factory=lambda: {os.getpid()})
    # Bounds on argv capture; the BPF tier compiles the same numbers in.
    max_args: int = 128
    max_arg_bytes: int = 4096
    # How often polling sources (fallback tier) look; they miss anything shorter-lived.
    poll_interval: float = 0.25
    # A whole batch at once (one queue item): sources that decode in batches use it through
    # ``emit_batch``. Unset, it is taken from ``emit``'s owner when that has ``emit_many``
    # (``EventPipeline``), else events go one by one through ``emit``.
    emit_many: Callable[[list[Event]], None] | None = None
    # Fork events: the exec event already carries the parent, so the BPF tiers track forks
    # in the process table without reporting them unless asked to.
    emit_forks: bool = False
    # Whether the consumer takes encoded events now (EventPipeline.takes_lines): the compiled
    # record path then hands process events over as their NDJSON line. Asked once per batch.
    lines: Callable[[], bool] | None = None

    def __post_init__(self) -> None:
        if self.emit_many is None:
            owner = getattr(self.emit, "__self__", None)
            many = getattr(owner, "emit_many", None)
            if callable(many) and getattr(owner, "emit", None) == self.emit:
                self.emit_many = many

    @property
    def takes_lines(self) -> bool:
        return self.lines is not None and self.lines()

    def emit_batch(self, events: list[Event]) -> None:
        """Hand over a batch of events; the list must not be reused by the caller."""
        if not events:
            return
        if self.emit_many is not None:
            self.emit_many(events)
        else:
            emit = self.emit
            for ev in events:
                emit(ev)


class Source(abc.ABC):
    """One capture source: some families in one tier."""

    tier: ClassVar[Tier]
    families: ClassVar[frozenset[Family]]

    def __init__(self, ctx: CaptureContext, families: frozenset[Family]) -> None:
        self.ctx = ctx
        self.enabled = families & self.families
        self.submitted = 0
        self.dropped = 0

    @classmethod
    @abc.abstractmethod
    def unavailable(cls) -> str | None:
        """Why this tier cannot run here, or ``None`` when it can."""

    @abc.abstractmethod
    def open(self) -> None:
        """Load and attach; raise ``TierUnavailable`` with the reason on failure."""

    @abc.abstractmethod
    def run(self, stop: threading.Event) -> None:
        """Capture until ``stop`` is set. Runs in its own thread."""

    @abc.abstractmethod
    def close(self) -> None:
        """Detach everything; safe to call twice and after a failed ``open``."""

    def counters(self) -> dict[str, int]:
        """Cumulative ``submitted`` and ``dropped`` (plus source-specific counters)."""
        return {"submitted": self.submitted, "dropped": self.dropped}

    @property
    def name(self) -> str:
        return f"{self.tier.value}:{'+'.join(sorted(f.value for f in self.enabled))}"

    # -- event building shared by every tier -----------------------------------------------

    def event(
        self,
        action: Action,
        proc: ProcessInfo | None,
        *,
        epoch_ns: int | None = None,
        outcome: str | None = None,
    ) -> Event:
        ev = new_event(
            action, host=self.ctx.host, tier=self.tier, epoch_ns=epoch_ns, outcome=outcome
        )
        if proc is not None:
            ev.update(self.ctx.table.ecs(proc))
        return ev

    def file_event(
        self,
        action: Action,
        proc: ProcessInfo | None,
        path: str,
        *,
        original_path: str | None = None,
        mode: int | None = None,
        uid: int | None = None,
        gid: int | None = None,
        epoch_ns: int | None = None,
        outcome: str | None = None,
    ) -> Event:
        ev = self.event(action, proc, epoch_ns=epoch_ns, outcome=outcome)
        path = printable(path)
        directory, _, name = path.rpartition("/")
        fil: dict[str, Any] = {"path": path, "name": name, "directory": directory or "/"}
        if original_path is not None:
            fil["Ext"] = {"original": {"path": printable(original_path)}}
        if mode is not None:
            fil["mode"] = f"{mode & 0o7777:o}"
        if uid is not None:
            fil["uid"] = str(uid)
        if gid is not None:
            fil["gid"] = str(gid)
        ev["file"] = fil
        return ev

    def network_event(
        self,
        action: Action,
        proc: ProcessInfo | None,
        *,
        transport: str,
        source: tuple[str, int] | None,
        destination: tuple[str, int] | None,
        epoch_ns: int | None = None,
        outcome: str | None = None,
    ) -> Event:
        """ECS direction: ``source`` is the side that initiated the connection.

        connect: source = local end, destination = remote. accept: source = the remote peer,
        destination = the local (listening) end. listen: destination = the local address.
        """
        ev = self.event(action, proc, epoch_ns=epoch_ns, outcome=outcome)
        network: dict[str, Any] = {"transport": transport}
        endpoint = destination or source
        if endpoint is not None:
            network["type"] = f"ipv{ipaddress.ip_address(endpoint[0]).version}"
        if action is Action.CONNECT:
            network["direction"] = "egress"
        elif action is Action.ACCEPT:
            network["direction"] = "ingress"
        ev["network"] = network
        if source is not None:
            ev["source"] = {"ip": source[0], "port": source[1]}
        if destination is not None:
            ev["destination"] = {"ip": destination[0], "port": destination[1]}
        return ev


def resolve_path(path: str, cwd: str | None) -> str:
    """Absolute, normalised path; relative paths resolve against the process's cwd."""
    if not path.startswith("/"):
        if cwd is None:
            return path  # cannot resolve; reported as given rather than guessed
        path = f"{cwd.rstrip('/')}/{path}"
    return os.path.normpath(path).replace("//", "/")

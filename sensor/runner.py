"""The sensor's capture lifecycle: choose a tier per family, open, run, drain, close.

Tier choice per family: a forced mode uses that tier or fails with the reason; ``auto`` takes
the first tier, in the order kprobe → tracepoint → fallback, whose source says it can run here
and then actually opens. Why each better tier was passed over is kept and reported.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from backplane.schema import Family, Tier
from sensor.capture import CaptureContext, Source, TierUnavailable
from sensor.sources import source_for

log = logging.getLogger("edr.sensor")

TIER_ORDER = (Tier.KPROBE, Tier.TRACEPOINT, Tier.FALLBACK)


class ModeUnavailable(Exception):
    """A forced tier cannot run here; the message says which family and why."""


@dataclass
class Selection:
    tiers: dict[Family, Tier] = field(default_factory=dict)
    passed_over: dict[Family, dict[Tier, str]] = field(default_factory=dict)


def candidates(mode: str) -> tuple[Tier, ...]:
    return TIER_ORDER if mode == "auto" else (Tier(mode),)


def availability(families: Iterable[Family]) -> dict[Family, dict[Tier, str | None]]:
    """For ``probe``: per family and tier, ``None`` if it can run here, else why not."""
    report: dict[Family, dict[Tier, str | None]] = {}
    for fam in families:
        report[fam] = {}
        for tier in TIER_ORDER:
            cls, reason = source_for(tier, fam)
            report[fam][tier] = reason if cls is None else cls.unavailable()
    return report


class CaptureRunner:
    """Opens the chosen sources and runs each in its own thread."""

    def __init__(
        self,
        ctx: CaptureContext,
        modes: dict[Family, str],
        families: Iterable[Family],
        on_source_exit: Callable[[Source, BaseException | None], None] | None = None,
    ) -> None:
        self.ctx = ctx
        self.modes = modes
        self.families = frozenset(families)
        self.selection = Selection()
        self.sources: list[Source] = []
        self._threads: list[threading.Thread] = []
        self._stop = threading.Event()
        self._on_exit = on_source_exit

    def open(self) -> Selection:
        """Choose and open sources; raises ``ModeUnavailable`` for a forced tier that fails."""
        refused: dict[Family, dict[Tier, str]] = {fam: {} for fam in self.families}
        pending = set(self.families)
        while pending:
            plan: dict[type[Source], set[Family]] = {}
            for fam in sorted(pending):
                cls = self._choose(fam, refused[fam])
                plan.setdefault(cls, set()).add(fam)
            pending = set()
            for cls, fams in plan.items():
                src = cls(self.ctx, frozenset(fams))
                try:
                    src.open()
                except TierUnavailable as exc:
                    src.close()
                    for fam in fams:
                        refused[fam][cls.tier] = f"failed to open: {exc}"
                    pending |= fams
                    continue
                self.sources.append(src)
                for fam in fams:
                    self.selection.tiers[fam] = cls.tier
        self.selection.passed_over = {f: r for f, r in refused.items() if r}
        return self.selection

    def _choose(self, fam: Family, refused: dict[Tier, str]) -> type[Source]:
        mode = self.modes.get(fam, "auto")
        for tier in candidates(mode):
            if tier in refused:
                continue
            cls, reason = source_for(tier, fam)
            if cls is not None:
                reason = cls.unavailable()
            if reason is None and cls is not None:
                return cls
            refused[tier] = reason or "unavailable"
        if mode != "auto":
            raise ModeUnavailable(f"{fam.value}: {mode} tier unavailable: {refused[Tier(mode)]}")
        why = "; ".join(f"{t.value}: {r}" for t, r in refused.items())
        raise ModeUnavailable(f"{fam.value}: no capture tier can run here ({why})")

    def start(self) -> None:
        for src in self.sources:
            thread = threading.Thread(
                target=self._run, args=(src,), name=f"edr-{src.name}", daemon=True
            )
            thread.start()
            self._threads.append(thread)

    def _run(self, src: Source) -> None:
        error: BaseException | None = None
        try:
            src.run(self._stop)
        except Exception as exc:  # a source failing must be reported, never vanish
            log.exception("capture source %s failed", src.name)
            error = exc
        if self._on_exit is not None and not self._stop.is_set():
            self._on_exit(src, error)

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout)
        for src in self.sources:
            try:
                src.close()
            except Exception:
                log.exception("closing %s failed", src.name)

    def counters(self) -> dict[str, Any]:
        return {src.name: src.counters() for src in self.sources}

    def dropped(self) -> int:
        return sum(src.counters().get("dropped", 0) for src in self.sources)

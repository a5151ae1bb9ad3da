"""Every capture source the sensor has, written out in one place.

Sources are imported lazily: the BPF tier needs BCC, which an unprivileged or containerised
sensor may not have, and that must make the tier unavailable, not the sensor fail.
"""

from __future__ import annotations

import importlib

from backplane.schema import Family, Tier
from sensor.capture import Source

# (tier, family) -> "module:Class". One BPF class covers several families with one program.
SOURCES: dict[tuple[Tier, Family], str] = {
    (Tier.KPROBE, Family.PROCESS): "sensor.ebpf:KprobeSource",
    (Tier.KPROBE, Family.FILE): "sensor.ebpf:KprobeSource",
    (Tier.KPROBE, Family.NETWORK): "sensor.ebpf:KprobeSource",
    (Tier.TRACEPOINT, Family.PROCESS): "sensor.ebpf:TracepointSource",
    (Tier.TRACEPOINT, Family.FILE): "sensor.ebpf:TracepointSource",
    (Tier.TRACEPOINT, Family.NETWORK): "sensor.ebpf:TracepointSource",
    (Tier.FALLBACK, Family.PROCESS): "sensor.fallback:choose_process_source",
    (Tier.FALLBACK, Family.FILE): "sensor.fallback:InotifyFileSource",
    (Tier.FALLBACK, Family.NETWORK): "sensor.fallback:TcpPollSource",
}


def source_for(tier: Tier, family: Family) -> tuple[type[Source] | None, str | None]:
    """The source class for ``family`` in ``tier``, or ``None`` and the reason."""
    target = SOURCES.get((tier, family))
    if target is None:
        return None, f"no {tier.value} source for {family.value} events"
    module_name, _, attr = target.partition(":")
    try:
        obj = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        return None, f"cannot load {target}: {exc}"
    if isinstance(obj, type):
        return obj, None
    # A factory picks the class for this environment (proc connector vs /proc polling).
    chosen, _why = obj()
    return chosen, None

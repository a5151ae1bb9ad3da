"""Prometheus metrics for the controller, in the text exposition format (version 0.0.4).

Counters live on one ``Metrics`` object that ingest updates (plain integer additions on the
loop thread, cheap enough for the hot path); gauges (queue depths, sessions) are read when
``/metrics`` is scraped. Rates such as events per second are the scraper's job:
``rate(edr_ingest_events_total[1m])``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from sanic import Blueprint, Request
from sanic.response import HTTPResponse, text

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(labels: Mapping[str, str]) -> str:
    if not labels:
        return ""
    inner = ",".join(f'{k}="{_escape(str(v))}"' for k, v in sorted(labels.items()))
    return "{" + inner + "}"


def _num(v: float) -> str:
    if isinstance(v, bool):
        return str(int(v))
    if isinstance(v, int):
        return str(v)
    if math.isnan(v):
        return "NaN"
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    return repr(float(v))


@dataclass
class Family:
    """One metric family: name, help, type and its samples (labels → value)."""

    name: str
    help: str
    type: str  # counter | gauge
    samples: list[tuple[dict[str, str], float]] = field(default_factory=list)

    def render(self) -> str:
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} {self.type}"]
        lines += [f"{self.name}{_labels(lab)} {_num(v)}" for lab, v in self.samples]
        return "\n".join(lines)


@dataclass
class Metrics:
    """Counters updated by the controller's ingest, detection and backplane hooks."""

    events: int = 0
    batches: int = 0
    duplicates: int = 0
    alerts: int = 0
    detection_errors: int = 0
    detection_worker_restarts: int = 0
    rule_hits: dict[str, int] = field(default_factory=dict)
    rule_names: dict[str, str] = field(default_factory=dict)
    # Per host: events the sensor's outbox dropped (reported with batches, cumulative here)
    # and the capture drop counters from its latest heartbeat (already cumulative).
    outbox_dropped: dict[str, int] = field(default_factory=dict)
    capture_dropped: dict[str, dict[str, int]] = field(default_factory=dict)
    hellos: int = 0
    disconnects: int = 0
    commands_sent: int = 0
    command_results: int = 0

    def rule_hit(self, rule_id: str, name: str) -> None:
        self.rule_hits[rule_id] = self.rule_hits.get(rule_id, 0) + 1
        self.rule_names[rule_id] = name

    def families(self, gauges: Mapping[str, tuple[str, float]] | None = None) -> list[Family]:
        """Every family; ``gauges`` maps name → (help, value) for values read at scrape time."""
        fams = [
            Family(
                "edr_ingest_events_total",
                "Events committed to the store.",
                "counter",
                [({}, self.events)],
            ),
            Family(
                "edr_ingest_batches_total",
                "Event batches committed.",
                "counter",
                [({}, self.batches)],
            ),
            Family(
                "edr_ingest_duplicate_batches_total",
                "Batches received again after a reconnect and dropped as duplicates.",
                "counter",
                [({}, self.duplicates)],
            ),
            Family(
                "edr_alerts_total", "Alerts raised by detection.", "counter", [({}, self.alerts)]
            ),
            Family(
                "edr_detection_errors_total",
                "Batches, events or alerts detection failed on (logged).",
                "counter",
                [({}, self.detection_errors)],
            ),
            Family(
                "edr_detection_worker_restarts_total",
                "Detection worker processes replaced after dying or breaking protocol.",
                "counter",
                [({}, self.detection_worker_restarts)],
            ),
            Family(
                "edr_rule_hits_total",
                "Events matched, per Sigma rule.",
                "counter",
                [
                    ({"rule_id": rid, "rule": self.rule_names.get(rid, "")}, n)
                    for rid, n in sorted(self.rule_hits.items())
                ],
            ),
            Family(
                "edr_sensor_outbox_dropped_events_total",
                "Events a sensor's outbox dropped (overflow), as it reported them.",
                "counter",
                [({"host_id": h}, n) for h, n in sorted(self.outbox_dropped.items())],
            ),
            Family(
                "edr_sensor_capture_dropped",
                "Capture drop counters from each sensor's latest heartbeat.",
                "gauge",
                [
                    ({"host_id": h, "counter": c}, n)
                    for h, counters in sorted(self.capture_dropped.items())
                    for c, n in sorted(counters.items())
                ],
            ),
            Family(
                "edr_backplane_hellos_total",
                "Sensor sessions that said hello.",
                "counter",
                [({}, self.hellos)],
            ),
            Family(
                "edr_backplane_disconnects_total",
                "Sensor sessions that ended.",
                "counter",
                [({}, self.disconnects)],
            ),
            Family(
                "edr_commands_sent_total",
                "Response commands sent to sensors.",
                "counter",
                [({}, self.commands_sent)],
            ),
            Family(
                "edr_command_results_total",
                "Command results received.",
                "counter",
                [({}, self.command_results)],
            ),
        ]
        for name, (help_text, value) in sorted((gauges or {}).items()):
            fams.append(Family(name, help_text, "gauge", [({}, value)]))
        return fams

    def render(
        self, gauges: Mapping[str, tuple[str, float]] | None = None, extra: Iterable[Family] = ()
    ) -> str:
        return "\n".join(f.render() for f in [*self.families(gauges), *extra]) + "\n"


def scrape_gauges(ctx: Any) -> tuple[dict[str, tuple[str, float]], list[Family]]:
    """Gauges read from the live objects on ``app.ctx`` (each optional)."""
    gauges: dict[str, tuple[str, float]] = {}
    extra: list[Family] = []
    bp = getattr(ctx, "backplane", None)
    if bp is not None:
        gauges["edr_backplane_sessions"] = ("Open sensor sessions (TLS).", len(bp.sessions))
        gauges["edr_backplane_hosts_connected"] = (
            "Hosts with an accepted session.",
            len(bp.connected_hosts()),
        )
        gauges["edr_backplane_refused_handshakes"] = ("Handshakes refused since start.", bp.refused)
        extra.append(
            Family(
                "edr_backplane_session_queue_depth",
                "Messages waiting for the store, summed over sessions.",
                "gauge",
                [({}, sum(c.queue.qsize() for c in bp.sessions.values()))],
            )
        )
    hooks = getattr(ctx, "hooks", None)
    if hooks is not None:
        gauges["edr_detection_queue_depth"] = (
            "Batches waiting for detection.",
            hooks.detection_backlog,
        )
    live = getattr(ctx, "live", None)
    if live is not None:
        gauges["edr_live_subscribers"] = ("Websocket stream clients.", live.subscribers)
        extra.append(
            Family(
                "edr_live_dropped_total",
                "Items not delivered to slow websocket clients.",
                "counter",
                [({}, live.dropped)],
            )
        )
        extra.append(
            Family(
                "edr_live_published_total",
                "Items published to the live stream.",
                "counter",
                [({"kind": k}, n) for k, n in sorted(live.published.items())],
            )
        )
    return gauges, extra


def create_blueprint() -> Blueprint:
    """``GET /metrics``. Unauthenticated like most exporters: it carries counts only, no
    event content; bind the console to a trusted network or scrape through a proxy."""
    bp = Blueprint("metrics")

    @bp.get("/metrics")
    async def metrics(request: Request) -> HTTPResponse:
        m: Metrics = request.app.ctx.metrics
        gauges, extra = scrape_gauges(request.app.ctx)
        return text(m.render(gauges, extra), content_type=CONTENT_TYPE)

    return bp

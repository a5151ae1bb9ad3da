"""The sensor's link to its controller: a durable outbox and the mutual-TLS backplane client.

Events go to the outbox (SQLite in the state directory) before anything is sent, and leave it
only when the controller has acknowledged them after committing: a controller restart, a
network partition or a ``kill -9`` of the sensor loses nothing that reached the outbox.

The identity comes from enrollment (``edr-sensor enroll``) or offline issuance
(``edr-certs issue``), which leave ``sensor.key`` and ``sensor.pem`` in the state directory. The
backplane client keeps key and certificate in one file, ``credentials.pem``, so that rotation is
one atomic rename; it is built from the enrolled pair on first start, after which the separate
key file is removed so the private key exists in one place only.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from backplane.client import BackplaneClient, ClientConfig, default_heartbeat, write_credentials
from backplane.files import write_json_atomic
from backplane.messages import PROTOCOL_VERSION, Command, CommandResult, Heartbeat, Hello
from backplane.outbox import Outbox
from backplane.schema import Event
from sensor import __version__, enroll

log = logging.getLogger("edr.sensor")

DEFAULT_BACKPLANE_PORT = 7443
CAPABILITIES = ["events", "heartbeat", "policy", "renew", "response"]


class UplinkError(Exception):
    """The uplink cannot start; the message says what the operator must do."""


def parse_controller(text: str) -> tuple[str, str]:
    """``HOST[:PORT]`` (IPv6 in brackets) → (ZeroMQ endpoint, name the certificate must carry)."""
    if "://" in text:
        raise UplinkError(f"--controller {text!r}: expected HOST or HOST:PORT, no scheme")
    try:
        host, port = enroll.parse_controller(text, DEFAULT_BACKPLANE_PORT)
    except enroll.EnrollError as exc:
        raise UplinkError(f"--{exc}") from None
    endpoint_host = f"[{host}]" if ":" in host else host
    return f"tcp://{endpoint_host}:{port}", host


def ensure_credentials(state_dir: Path) -> Path:
    """The credentials file, built from an enrolled key and certificate when they are newer."""
    creds = state_dir / "credentials.pem"
    key, cert = state_dir / "sensor.key", state_dir / "sensor.pem"
    if key.exists() and cert.exists():
        if not creds.exists() or cert.stat().st_mtime_ns >= creds.stat().st_mtime_ns:
            write_credentials(creds, key.read_bytes(), cert.read_bytes())
        key.unlink()
    if not creds.exists():
        raise UplinkError(
            f"{state_dir} holds no identity: run `edr-sensor enroll` (or copy the output of "
            "`edr-certs issue`) first"
        )
    if not (state_dir / "ca.pem").exists():
        raise UplinkError(f"{state_dir / 'ca.pem'} is missing: enroll again")
    return creds


class OutboxSink:
    """Pipeline sink: every event lands in the durable outbox."""

    def __init__(self, outbox: Outbox) -> None:
        self.outbox = outbox

    def write(self, events: list[Event]) -> None:
        self.outbox.append(events)
        self.outbox.flush_due()

    def close(self) -> None:
        self.outbox.flush()


class Uplink:
    def __init__(
        self,
        state_dir: Path,
        controller: str,
        host: dict[str, Any],
        *,
        tiers: Callable[[], dict[str, str]],
        counters: Callable[[], dict[str, Any]],
        outbox_max_bytes: int = 1 << 30,
        responder: Callable[[Command], CommandResult] | None = None,
        on_policy_applied: Callable[[int, dict[str, Any]], None] | None = None,
    ) -> None:
        endpoint, server_name = parse_controller(controller)
        creds = ensure_credentials(state_dir)
        self.state_dir = state_dir
        self.host = host
        self._tiers = tiers
        self._counters = counters
        self.outbox = Outbox(state_dir / "outbox.db", max_bytes=outbox_max_bytes)
        self._responder = responder
        self._on_policy_applied = on_policy_applied
        self.policy_file = state_dir / "policy.json"
        self.policy_version, self.policy = self._load_policy()
        self.client = BackplaneClient(
            ClientConfig(
                endpoint=endpoint,
                server_name=server_name,
                ca_file=state_dir / "ca.pem",
                credentials_file=creds,
            ),
            self.outbox,
            hello=self._hello,
            on_command=self._on_command,
            on_policy=self._on_policy,
            heartbeat=self._heartbeat,
        )

    def sink(self) -> OutboxSink:
        return OutboxSink(self.outbox)

    def start(self) -> None:
        self.client.start()

    def tick(self) -> None:
        """Seal a partial batch that has waited long enough, even while disconnected."""
        self.outbox.flush_due()

    def stop(self) -> None:
        self.outbox.flush()
        self.client.stop()
        self.outbox.close()

    def counters(self) -> dict[str, Any]:
        stats = self.client.stats
        return {
            "connected": self.client.connected.is_set(),
            "connects": stats.connects,
            "batches_sent": stats.batches_sent,
            "batches_acked": stats.batches_acked,
            "outbox_batches": self.outbox.depth,
            "outbox_events": self.outbox.pending_events(),
            "last_error": stats.last_error,
            "policy_version": self.policy_version,
        }

    # -- callbacks from the backplane client thread ------------------------------------------

    def _hello(self) -> Hello:
        os_fields = self.host.get("os", {})
        return Hello(
            protocol=PROTOCOL_VERSION,
            sensor_version=__version__,
            hostname=self.host.get("hostname", ""),
            os=f"{os_fields.get('name', 'Linux')} {os_fields.get('version', '')}".strip(),
            kernel=os_fields.get("kernel", ""),
            tiers=self._tiers(),
            capabilities=CAPABILITIES,
            policy_version=self.policy_version,
        )

    def _heartbeat(self) -> Heartbeat:
        return default_heartbeat(self.outbox, self._tiers(), _flat_counters(self._counters()))

    def _on_command(self, cmd: Command) -> CommandResult:
        if self._responder is not None:
            return self._responder(cmd)
        # Without response actions every command is refused with a reason the controller
        # stores, never silently ignored.
        return CommandResult(
            cmd.id, "refused", {"error": f"this sensor does not support {cmd.action!r} yet"}
        )

    def _on_policy(self, version: int, document: dict[str, Any]) -> int:
        write_json_atomic(self.policy_file, {"version": version, "document": document})
        self.policy_version, self.policy = version, document
        if self._on_policy_applied is not None:
            self._on_policy_applied(version, document)
        log.info("policy version %d applied", version)
        return version

    def _load_policy(self) -> tuple[int, dict[str, Any]]:
        try:
            saved = json.loads(self.policy_file.read_text())
            return int(saved["version"]), dict(saved["document"])
        except FileNotFoundError:
            return -1, {}
        except (ValueError, KeyError, TypeError) as exc:
            log.warning("ignoring unreadable %s: %s", self.policy_file, exc)
            return -1, {}


def _flat_counters(counters: dict[str, Any]) -> dict[str, Any]:
    """Heartbeat counters: numbers only, one level (``source.counter``)."""
    flat: dict[str, Any] = {}
    for name, value in counters.items():
        if isinstance(value, dict):
            for key, inner in value.items():
                if isinstance(inner, int | float) and not isinstance(inner, bool):
                    flat[f"{name}.{key}"] = inner
        elif isinstance(value, int | float) and not isinstance(value, bool):
            flat[name] = value
    return flat

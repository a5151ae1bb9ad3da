"""Automated enforcement of the local policy, fed every event by the pipeline's writer thread.

* A file created or written whose SHA-256 is on ``deny.hashes`` (and not on ``allow.hashes``)
  is quarantined at once, when ``responses.quarantine_on_denied_hash`` is on.
* An exec whose executable or command line matches ``responses.hold_suspicious_exec.patterns``
  (shell globs, from the policy: nothing is hard-coded) and is not allow-listed by executable,
  command line or hash is held with SIGSTOP; the analyst resumes or kills it from the console,
  and allow-listing it ("mark safe") stops future holds.

Everything done here is reported as an event (``hold`` / ``quarantine``) carrying the policy
version that caused it, plus ``edr.response.latency_ms`` from the triggering event's time.
"""

from __future__ import annotations

import fnmatch
import hashlib
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from backplane.schema import Action, Event, Tier, new_event
from sensor.response import ActionFailed, ActionRefused, Responder

log = logging.getLogger("edr.sensor.enforce")

HASH_MAX_BYTES = 256 * 1024 * 1024


def _any_glob(value: str | None, patterns: list[str]) -> str | None:
    if not value:
        return None
    return next((p for p in patterns if fnmatch.fnmatchcase(value, p)), None)


def _sha256(path: str) -> str | None:
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            read = 0
            while chunk := f.read(1 << 20):
                read += len(chunk)
                if read > HASH_MAX_BYTES:
                    return None
                digest.update(chunk)
    except OSError:
        return None
    return digest.hexdigest()


def _epoch_ns(timestamp: str) -> int | None:
    """ECS ``@timestamp`` (``YYYY-mm-ddTHH:MM:SS.ffffffZ``) → epoch ns."""
    from datetime import datetime

    try:
        moment = datetime.fromisoformat(timestamp.replace("Z", "+00:00"))
        return int(moment.timestamp() * 1e6) * 1000
    except (ValueError, AttributeError):
        return None


class Enforcer:
    """Applies the policy to events; call :meth:`inspect` once per event.

    Args:
        responder: carries out holds and quarantines (with all its safety rules).
        host: the ``host.*`` fields for the events it reports.
        policy: ``(version, document)`` as ``controller.api.policy.validate_document`` makes it.
    """

    def __init__(
        self,
        responder: Responder,
        host: dict[str, Any],
        policy: tuple[int, dict[str, Any]] = (-1, {}),
        clock: Callable[[], int] = time.time_ns,
    ) -> None:
        self._responder = responder
        self._host = host
        self._clock = clock
        self._lock = threading.Lock()
        self.holds = 0
        self.quarantines = 0
        self.set_policy(*policy)

    def set_policy(self, version: int, document: dict[str, Any]) -> None:
        allow, deny = document.get("allow", {}), document.get("deny", {})
        responses = document.get("responses", {})
        hold = responses.get("hold_suspicious_exec", {})
        with self._lock:
            self.version = version
            self._allow_exe = list(allow.get("executables", []))
            self._allow_cmd = list(allow.get("command_lines", []))
            self._allow_hash = {h.lower() for h in allow.get("hashes", [])}
            self._deny_hash = {h.lower() for h in deny.get("hashes", [])} - self._allow_hash
            self._quarantine = bool(responses.get("quarantine_on_denied_hash")) and bool(
                self._deny_hash
            )
            self._hold = bool(hold.get("enabled")) and bool(hold.get("patterns"))
            self._patterns = list(hold.get("patterns", []))
            # what inspect can act on under this policy; the pipeline passes only these
            self.actions = frozenset(
                ([Action.EXEC] if self._hold else [])
                + ([Action.FILE_CREATE, Action.FILE_WRITE] if self._quarantine else [])
            )

    def inspect(self, event: Event) -> list[Event]:
        """The events describing what was done about ``event`` (usually none)."""
        action = event["event"]["action"]
        if action == Action.EXEC and self._hold:
            return self._check_exec(event)
        if action in (Action.FILE_CREATE, Action.FILE_WRITE) and self._quarantine:
            return self._check_file(event)
        return []

    # -- exec holds --------------------------------------------------------------------------

    def _check_exec(self, event: Event) -> list[Event]:
        proc = event.get("process", {})
        exe, cmd = proc.get("executable"), proc.get("command_line")
        pattern = _any_glob(exe, self._patterns) or _any_glob(cmd, self._patterns)
        if pattern is None:
            return []
        sha = (proc.get("hash") or {}).get("sha256")
        if (
            _any_glob(exe, self._allow_exe)
            or _any_glob(cmd, self._allow_cmd)
            or (sha and sha.lower() in self._allow_hash)
        ):
            return []
        pid = proc.get("pid")
        try:
            result = self._responder.processes.suspend(pid, proc.get("entity_id"))
            outcome, detail = "success", result
            self.holds += 1
        except (ActionRefused, ActionFailed) as exc:
            outcome, detail = "failure", {"error": str(exc)}
        report = self._report(Action.HOLD, event, outcome, {"rule": pattern, **detail})
        report["process"] = {k: proc[k] for k in ("pid", "entity_id", "executable",
                             "command_line", "name") if k in proc}  # fmt: skip
        return [report]

    # -- denied files ------------------------------------------------------------------------

    def _check_file(self, event: Event) -> list[Event]:
        path = (event.get("file") or {}).get("path")
        if not path:
            return []
        digest = _sha256(path)
        if digest is None or digest not in self._deny_hash:
            return []
        try:
            result = self._responder.files.quarantine(path)
            outcome, detail = "success", {"quarantine_id": result["id"]}
            self.quarantines += 1
        except (ActionRefused, ActionFailed) as exc:
            outcome, detail = "failure", {"error": str(exc)}
        report = self._report(Action.QUARANTINE, event, outcome, detail)
        report["file"] = {"path": path, "hash": {"sha256": digest}}
        return [report]

    def _report(self, action: Action, cause: Event, outcome: str, detail: dict[str, Any]) -> Event:
        now = self._clock()
        ev = new_event(action, host=self._host, tier=Tier(cause["edr"]["tier"]), epoch_ns=now,
                       outcome=outcome)  # fmt: skip
        ev["rule"] = {"ruleset": "policy", "version": str(self.version)}
        caused = _epoch_ns(cause.get("@timestamp", ""))
        response: dict[str, Any] = {"policy_version": self.version, "automated": True,
                                    "cause": cause["event"]["action"], **detail}  # fmt: skip
        if caused is not None:
            response["latency_ms"] = round((now - caused) / 1e6, 3)
        ev["edr"]["response"] = response
        log.info("policy v%d: %s %s (%s)", self.version, action.value, outcome,
                 response.get("latency_ms"))  # fmt: skip
        return ev

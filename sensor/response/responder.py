"""Dispatch controller commands to the actions; every outcome is a structured result.

Action and argument names follow ``controller/api/commands.py`` exactly. The controller
validates before queueing, but the sensor checks again (it must never trust the wire) and its
safety rules are its own. A command whose id, or whose target, is already being acted on is
refused as a duplicate rather than run twice at once.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from backplane.messages import Command, CommandResult
from sensor.response.errors import ActionFailed, ActionRefused
from sensor.response.netfilter import DomainRefresher, Firewall, Resolver, resolve
from sensor.response.process import ProcessActions
from sensor.response.quarantine import DEFAULT_ALLOWED_ROOTS, FileActions

log = logging.getLogger("edr.sensor.response")

PID_ACTIONS = ("kill", "kill-tree", "suspend", "resume")
PATH_ACTIONS = ("quarantine", "restore", "delete-file")
NET_ACTIONS = ("block-ip", "block-port", "block-domain", "unblock", "isolate", "unisolate")
ACTIONS = PID_ACTIONS + PATH_ACTIONS + NET_ACTIONS


def _only(action: str, args: dict[str, Any], allowed: tuple[str, ...], required: tuple[str, ...]):
    unknown = sorted(set(args) - set(allowed))
    if unknown:
        raise ActionRefused(f"{action}: unknown argument(s) {', '.join(unknown)}")
    missing = [a for a in required if a not in args]
    if missing:
        raise ActionRefused(f"{action}: missing argument(s) {', '.join(missing)}")


class Responder:
    """The sensor's response actions behind one ``handle(Command)`` entry point.

    Args:
        state_dir: where quarantine and network state live.
        entity_of: ``(pid, start_ticks) -> entity_id``, as the process table computes it.
        controller: the controller's addresses (never blocked, the only peer under isolation).
        dns_servers: DNS servers isolation still allows (empty: none).
        allowed_roots: the only directories quarantine and delete-file may touch.
        resolver: domain → addresses for block-domain.
        domain_refresh: seconds between re-resolving blocked domains (0: never).
    """

    def __init__(
        self,
        state_dir: Path,
        entity_of: Callable[[int, int], str],
        *,
        controller: Iterable[str] = (),
        dns_servers: Iterable[str] = (),
        allowed_roots: Iterable[str] = DEFAULT_ALLOWED_ROOTS,
        resolver: Resolver = resolve,
        domain_refresh: float = 60.0,
        nft: str = "/usr/sbin/nft",
    ) -> None:
        self.processes = ProcessActions(entity_of)
        self.files = FileActions(state_dir / "quarantine", allowed_roots)
        self.firewall = Firewall(
            state_dir / "network.json", controller, dns_servers, resolver=resolver, nft=nft
        )
        self._refresher = DomainRefresher(self.firewall, domain_refresh) if domain_refresh else None
        self._lock = threading.Lock()
        self._in_flight: dict[str, str] = {}  # key (command id or target) -> command id

    def start(self) -> None:
        """Re-apply saved blocks and isolation; start refreshing blocked domains."""
        try:
            self.firewall.reapply()
        except ActionFailed as exc:
            log.error("could not re-apply saved network blocks: %s", exc)
        if self._refresher is not None:
            self._refresher.start()

    def stop(self) -> None:
        if self._refresher is not None:
            self._refresher.stop()

    # -- entry point --------------------------------------------------------------------------

    def handle(self, cmd: Command) -> CommandResult:
        started = time.monotonic()
        try:
            keys = self._claim(cmd)
        except ActionRefused as exc:
            return CommandResult(cmd.id, "refused", {"error": str(exc), **exc.details})
        try:
            output = self.run(cmd.action, dict(cmd.args), cmd.id)
            status = "ok"
        except ActionRefused as exc:
            status, output = "refused", {"error": str(exc), **exc.details}
        except ActionFailed as exc:
            status, output = "error", {"error": str(exc), **exc.details}
        finally:
            with self._lock:
                for key in keys:
                    self._in_flight.pop(key, None)
        output["action"] = cmd.action
        output["duration_ms"] = round((time.monotonic() - started) * 1000, 3)
        log.info("command %s %s: %s", cmd.id, cmd.action, status)
        return CommandResult(cmd.id, status, output)

    def _claim(self, cmd: Command) -> list[str]:
        """Mark the command (and its target) in flight; refuse if either already is."""
        target = _target_key(cmd.action, cmd.args)
        keys = [f"id:{cmd.id}", target]
        with self._lock:
            for key in keys:
                if key in self._in_flight:
                    raise ActionRefused(
                        f"duplicate: command {self._in_flight[key]} is already acting on this",
                        in_flight=self._in_flight[key],
                    )
            for key in keys:
                self._in_flight[key] = cmd.id
        return keys

    def run(self, action: str, args: dict[str, Any], command_id: str = "") -> dict[str, Any]:
        """Carry out one action; raises ActionRefused or ActionFailed."""
        if action in PID_ACTIONS:
            _only(action, args, ("pid", "entity_id"), ("pid",))
            pid, entity = args["pid"], args.get("entity_id")
            if entity is not None and not isinstance(entity, str):
                raise ActionRefused(f"{action}: entity_id must be a string")
            p = self.processes
            fn = {"kill": p.kill, "kill-tree": p.kill_tree, "suspend": p.suspend,
                  "resume": p.resume}[action]  # fmt: skip
            return fn(pid, entity)
        if action in PATH_ACTIONS:
            _only(action, args, ("path",), ("path",))
            f = self.files
            fn2 = {"quarantine": f.quarantine, "restore": f.restore, "delete-file": f.delete}
            return fn2[action](args["path"])
        fw = self.firewall
        if action == "block-ip":
            _only(action, args, ("address",), ("address",))
            return fw.block_ip(args["address"], command_id)
        if action == "block-port":
            _only(action, args, ("port", "protocol"), ("port",))
            return fw.block_port(args["port"], args.get("protocol", "tcp"), command_id)
        if action == "block-domain":
            _only(action, args, ("domain",), ("domain",))
            return fw.block_domain(args["domain"], command_id)
        if action == "unblock":
            _only(action, args, ("command_id", "kind", "address", "port", "protocol", "domain"), ())
            if "command_id" not in args and "kind" not in args:
                raise ActionRefused("unblock: give command_id or kind")
            return fw.unblock(args)
        if action in ("isolate", "unisolate"):
            _only(action, args, (), ())
            return fw.isolate() if action == "isolate" else fw.unisolate()
        raise ActionRefused(f"unknown action {action!r}; known: {', '.join(ACTIONS)}")


def _target_key(action: str, args: dict[str, Any]) -> str:
    """What an action acts on, so two commands on one target are not run at once."""
    if action in PID_ACTIONS:
        return f"pid:{args.get('pid')}"
    if action in PATH_ACTIONS:
        return f"path:{args.get('path')}"
    if action in NET_ACTIONS:
        # The firewall serialises changes itself; the same change twice at once is the duplicate.
        return f"net:{action}:{sorted((k, str(v)) for k, v in args.items())}"
    return f"other:{action}"

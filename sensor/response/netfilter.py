"""Network actions in an nftables table the sensor owns (``inet edr``).

The table is always rebuilt whole from the saved state (``network.json`` in the state
directory) in one ``nft -j -f -`` transaction: the kernel applies it atomically, a restart
re-applies exactly what was saved, and lifting isolation is just rebuilding without it, so
the previous state (the blocks) comes back exactly. Rules are JSON objects built from parsed
``ipaddress`` values and integers, never text pasted into a command; ``nft`` gets no argument
that comes from input. Removing everything is deleting the one table.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import socket
import subprocess
import threading
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from backplane.files import write_json_atomic
from sensor.response.errors import ActionFailed, ActionRefused

log = logging.getLogger("edr.sensor.response")

TABLE = "edr"
FAMILY = "inet"
PRIORITY = -10  # before the usual filter chains (priority 0), so a block cannot be bypassed
NFT_TIMEOUT = 10.0
Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Resolver = Callable[[str], list[str]]


def resolve(name: str) -> list[str]:
    """Every address ``name`` resolves to (A and AAAA), sorted; empty when it does not."""
    try:
        infos = socket.getaddrinfo(name, None, proto=socket.IPPROTO_TCP)
    except (socket.gaierror, UnicodeError):
        return []
    return sorted({str(ipaddress.ip_address(info[4][0].split("%")[0])) for info in infos})


def parse_network(text: Any) -> Network:
    if not isinstance(text, str) or not text or len(text) > 64:
        raise ActionRefused(f"address must be an IP address or CIDR string, not {text!r}")
    try:
        net = ipaddress.ip_network(text, strict=True)
    except ValueError as exc:
        raise ActionRefused(f"{text!r} is not an IP address or CIDR network ({exc})") from None
    if net.prefixlen == 0:
        raise ActionRefused(f"{text!r} would block every address; use isolate instead")
    return net


def _addr_match(net: Network, field: str) -> dict[str, Any]:
    right: Any = str(net.network_address)
    if net.prefixlen != net.max_prefixlen:
        right = {"prefix": {"addr": str(net.network_address), "len": net.prefixlen}}
    proto = "ip" if net.version == 4 else "ip6"
    return {"match": {"op": "==", "left": {"payload": {"protocol": proto, "field": field}},
                      "right": right}}  # fmt: skip


def _meta(key: str, value: str) -> dict[str, Any]:
    return {"match": {"op": "==", "left": {"meta": {"key": key}}, "right": value}}


def _port(proto: str, field: str, port: int) -> dict[str, Any]:
    return {"match": {"op": "==", "left": {"payload": {"protocol": proto, "field": field}},
                      "right": port}}  # fmt: skip


ACCEPT: dict[str, Any] = {"accept": None}
DROP: dict[str, Any] = {"drop": None}


class Firewall:
    """Blocks and isolation, persisted in ``state_file`` and applied with ``nft``.

    Args:
        state_file: where blocks and isolation are saved (JSON, 0600).
        controller: the controller's addresses: always reachable, never blockable.
        dns_servers: addresses isolation still lets DNS through to (empty: no DNS).
        resolver: name → addresses, for block-domain.
        nft: the ``nft`` executable.
    """

    def __init__(
        self,
        state_file: Path,
        controller: Iterable[str] = (),
        dns_servers: Iterable[str] = (),
        *,
        resolver: Resolver = resolve,
        nft: str = "/usr/sbin/nft",
    ) -> None:
        self.state_file = state_file
        self._resolver = resolver
        self._nft = nft
        self._lock = threading.RLock()
        self.state: dict[str, Any] = {"blocks": [], "isolated": False}
        if state_file.exists():
            try:
                saved = json.loads(state_file.read_text())
                self.state = {"blocks": list(saved["blocks"]), "isolated": bool(saved["isolated"])}
            except (OSError, ValueError, KeyError, TypeError) as exc:
                # Never guess: an unreadable state is kept aside for the operator and reported.
                aside = state_file.with_suffix(".bad")
                os.replace(state_file, aside)
                log.error("network state %s unreadable (%s); kept as %s", state_file, exc, aside)
        self.controller = [ipaddress.ip_address(a) for a in controller]
        self.dns_servers = [ipaddress.ip_address(a) for a in dns_servers]

    # -- state --------------------------------------------------------------------------------

    def _save(self) -> None:
        write_json_atomic(self.state_file, self.state)

    def _check_not_controller(self, net: Network) -> None:
        for addr in self.controller:
            if addr in net:
                raise ActionRefused(f"{net} contains the controller's address {addr}")

    def _change(self, mutate: Callable[[dict[str, Any]], None]) -> None:
        """Apply a changed state; the saved state changes only if nft accepted it."""
        with self._lock:
            new = json.loads(json.dumps(self.state))
            mutate(new)
            self._apply(new)
            self.state = new
            self._save()

    # -- actions -----------------------------------------------------------------------------

    def block_ip(self, address: str, command_id: str = "") -> dict[str, Any]:
        net = parse_network(address)
        self._check_not_controller(net)
        block = {"kind": "block-ip", "address": str(net), "command_id": command_id}
        self._add_block(block, ("address",))
        return {"blocked": str(net)}

    def block_port(self, port: int, protocol: str = "tcp", command_id: str = "") -> dict[str, Any]:
        if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
            raise ActionRefused(f"port must be an integer from 1 to 65535, not {port!r}")
        if protocol not in ("tcp", "udp"):
            raise ActionRefused(f"protocol must be tcp or udp, not {protocol!r}")
        block = {"kind": "block-port", "port": port, "protocol": protocol, "command_id": command_id}
        self._add_block(block, ("port", "protocol"))
        return {"blocked": f"{protocol}/{port}"}

    def block_domain(self, domain: str, command_id: str = "") -> dict[str, Any]:
        addresses = self._domain_addresses(domain)
        block = {"kind": "block-domain", "domain": domain, "addresses": addresses,
                 "command_id": command_id}  # fmt: skip
        self._add_block(block, ("domain",))
        return {"domain": domain, "addresses": addresses}

    def _domain_addresses(self, domain: str) -> list[str]:
        if not isinstance(domain, str) or not domain:
            raise ActionRefused(f"domain must be a host name, not {domain!r}")
        addresses = self._resolver(domain)
        if not addresses:
            raise ActionFailed(f"{domain} does not resolve; nothing to block", domain=domain)
        for text in addresses:
            self._check_not_controller(ipaddress.ip_network(text))
        return addresses

    def _add_block(self, block: dict[str, Any], key: tuple[str, ...]) -> None:
        def mutate(state: dict[str, Any]) -> None:
            def same(b: dict[str, Any]) -> bool:
                return b["kind"] == block["kind"] and all(b[k] == block[k] for k in key)

            if not any(same(b) for b in state["blocks"]):
                state["blocks"].append(block)

        self._change(mutate)

    def unblock(self, args: dict[str, Any]) -> dict[str, Any]:
        """Lift blocks by ``command_id`` or by ``kind`` plus that block's arguments."""
        kind = args.get("kind")
        cid = args.get("command_id")

        def matches(b: dict[str, Any]) -> bool:
            if kind is None:
                return cid is not None and str(b.get("command_id")) == str(cid)
            if b["kind"] != kind:
                return False
            if kind == "block-ip":
                return b["address"] == str(parse_network(args.get("address")))
            if kind == "block-port":
                return b["port"] == args.get("port") and b["protocol"] == args.get(
                    "protocol", "tcp"
                )
            return b["domain"] == args.get("domain")

        with self._lock:
            removed = [b for b in self.state["blocks"] if matches(b)]
            if not removed:
                raise ActionFailed("no such block is in force", args=args)
            self._change(lambda s: s.update(blocks=[b for b in s["blocks"] if not matches(b)]))
        return {"removed": removed}

    def isolate(self) -> dict[str, Any]:
        if not self.controller:
            raise ActionRefused("isolation needs the controller's address, and none is known")
        self._change(lambda s: s.update(isolated=True))
        return {"isolated": True, "allowed": [str(a) for a in self.controller + self.dns_servers]}

    def unisolate(self) -> dict[str, Any]:
        self._change(lambda s: s.update(isolated=False))
        return {"isolated": False, "blocks": len(self.state["blocks"])}

    def refresh_domains(self) -> bool:
        """Re-resolve blocked domains; True when an address set changed (and was applied)."""
        with self._lock:
            fresh = {}
            for b in self.state["blocks"]:
                if b["kind"] == "block-domain":
                    addrs = self._resolver(b["domain"])
                    if addrs and sorted(set(addrs) | set(b["addresses"])) != b["addresses"]:
                        # Keep the old addresses too: a client may have cached them.
                        fresh[b["domain"]] = sorted(set(addrs) | set(b["addresses"]))
            if not fresh:
                return False
            for addrs in fresh.values():
                for text in addrs:
                    self._check_not_controller(ipaddress.ip_network(text))

            def mutate(state: dict[str, Any]) -> None:
                for b in state["blocks"]:
                    if b["kind"] == "block-domain" and b["domain"] in fresh:
                        b["addresses"] = fresh[b["domain"]]

            self._change(mutate)
            return True

    def reapply(self) -> None:
        """Apply the saved state (at start-up); nothing to do when it is empty."""
        with self._lock:
            if self.state["blocks"] or self.state["isolated"]:
                self._apply(self.state)

    def remove_all(self) -> dict[str, Any]:
        """Delete the table and forget every block and the isolation, in one step."""
        with self._lock:
            before = self.state
            self._run({"nftables": [{"add": {"table": self._table()}},
                                    {"delete": {"table": self._table()}}]})  # fmt: skip
            self.state = {"blocks": [], "isolated": False}
            self._save()
        return {"removed_blocks": before["blocks"], "was_isolated": before["isolated"]}

    # -- nft ---------------------------------------------------------------------------------

    def _table(self) -> dict[str, Any]:
        return {"family": FAMILY, "name": TABLE}

    def ruleset(self, state: dict[str, Any]) -> dict[str, Any]:
        """The whole table as one nft JSON transaction."""
        cmds: list[dict[str, Any]] = [
            {"add": {"table": self._table()}},
            {"delete": {"table": self._table()}},  # the add makes this safe when absent
            {"add": {"table": self._table()}},
        ]
        for hook in ("input", "output"):
            cmds.append({"add": {"chain": {**self._chain(hook), "type": "filter", "hook": hook,
                                            "prio": PRIORITY, "policy": "accept"}}})  # fmt: skip

        def rule(hook: str, *expr: dict[str, Any]) -> None:
            cmds.append({"add": {"rule": {"family": FAMILY, "table": TABLE, "chain": hook,
                                          "expr": list(expr)}}})  # fmt: skip

        # The controller first: no block can cut the sensor off from its controller.
        for addr in self.controller:
            net = ipaddress.ip_network(addr)
            rule("output", _addr_match(net, "daddr"), ACCEPT)
            rule("input", _addr_match(net, "saddr"), ACCEPT)
        for b in state["blocks"]:
            if b["kind"] == "block-port":
                rule("input", _port(b["protocol"], "dport", b["port"]), DROP)
                continue
            texts = [b["address"]] if b["kind"] == "block-ip" else b["addresses"]
            for text in texts:
                net = ipaddress.ip_network(text)
                rule("output", _addr_match(net, "daddr"), DROP)
                rule("input", _addr_match(net, "saddr"), DROP)
        if state["isolated"]:
            rule("output", _meta("oifname", "lo"), ACCEPT)
            rule("input", _meta("iifname", "lo"), ACCEPT)
            for addr in self.dns_servers:
                net = ipaddress.ip_network(addr)
                for proto in ("udp", "tcp"):
                    rule("output", _addr_match(net, "daddr"), _port(proto, "dport", 53), ACCEPT)
                    rule("input", _addr_match(net, "saddr"), _port(proto, "sport", 53), ACCEPT)
            rule("output", DROP)
            rule("input", DROP)
        return {"nftables": cmds}

    def _chain(self, hook: str) -> dict[str, Any]:
        return {"family": FAMILY, "table": TABLE, "name": hook}

    def _apply(self, state: dict[str, Any]) -> None:
        if not state["blocks"] and not state["isolated"]:
            self._run({"nftables": [{"add": {"table": self._table()}},
                                    {"delete": {"table": self._table()}}]})  # fmt: skip
            return
        self._run(self.ruleset(state))

    def _run(self, doc: dict[str, Any]) -> None:
        try:
            proc = subprocess.run(
                [self._nft, "-j", "-f", "-"],
                input=json.dumps(doc),
                capture_output=True,
                text=True,
                timeout=NFT_TIMEOUT,
                check=False,
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise ActionFailed(f"nft could not run: {exc}") from None
        if proc.returncode != 0:
            raise ActionFailed(f"nft refused the ruleset: {proc.stderr.strip()[:500]}")

    def listed(self) -> dict[str, Any] | None:
        """The table as the kernel has it (``nft -j list table``); None when absent."""
        proc = subprocess.run(
            [self._nft, "-j", "list", "table", FAMILY, TABLE],
            capture_output=True, text=True, timeout=NFT_TIMEOUT, check=False,
        )  # fmt: skip
        if proc.returncode != 0:
            return None
        doc: dict[str, Any] = json.loads(proc.stdout)
        return doc


class DomainRefresher:
    """Re-resolves blocked domains every ``interval`` seconds while any is blocked."""

    def __init__(self, firewall: Firewall, interval: float = 60.0) -> None:
        self._fw = firewall
        self._interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="edr-dns-refresh", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(5)

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            try:
                if self._fw.refresh_domains():
                    log.info("blocked domains re-resolved; new addresses blocked")
            except (ActionFailed, ActionRefused) as exc:
                log.warning("domain block refresh failed: %s", exc)

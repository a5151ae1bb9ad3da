"""block-ip/port/domain, isolate/unisolate, restart and `unisolate --local` in network namespaces.

Three namespaces per test: "host" runs the sensor's network code (through ``ip netns exec``),
"controller" and "other" each run a TCP server. Addresses exist only inside them; the
machine's own interfaces and ruleset are never touched (checked at the end).
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from netns_lab import PORT, SERVER, Namespaces, netns_lab

pytestmark = [pytest.mark.root, pytest.mark.timeout(120)]

REPO = Path(__file__).resolve().parents[2]
HELPER = Path(__file__).with_name("net_helper.py")
CTRL, OTHER, OTHER6 = "10.77.1.2", "10.77.2.2", "fd77:2::2"

LOOPBACK = """
import socket
srv = socket.create_server(("127.0.0.1", 0))
with socket.create_connection(srv.getsockname(), timeout=1.0) as c:
    conn, _ = srv.accept()
    conn.sendall(b"ok")
    assert c.recv(2) == b"ok"
"""


@dataclass
class Lab(Namespaces):
    state: Path

    def action(self, action: str, args: dict | None = None, dns: tuple[str, ...] = ()) -> dict:
        argv = [sys.executable, str(HELPER), str(self.state), action, json.dumps(args or {}),
                "--controller", CTRL]  # fmt: skip
        for d in dns:
            argv += ["--dns", d]
        proc = self.exec(self.host, *argv, cwd=REPO)
        assert proc.returncode == 0, proc.stderr
        return json.loads(proc.stdout)

    def cli(self, *argv: str) -> subprocess.CompletedProcess[str]:
        return self.exec(self.host, sys.executable, "-m", "sensor.cli", *argv, cwd=REPO)

    def nft(self, *argv: str) -> subprocess.CompletedProcess[str]:
        return self.exec(self.host, "nft", *argv)


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[Lab]:
    with netns_lab("10.77", "fd77", "edr") as ns:
        state = tmp_path / "state"
        state.mkdir(mode=0o700)
        yield Lab(ns.host, ns.ctrl, ns.other, state)


def test_block_ip_spares_controller_and_unblock_restores(lab: Lab) -> None:
    out = lab.action("block-ip", {"address": OTHER})
    assert out["status"] == "ok", out
    assert not lab.reach(OTHER)
    assert lab.reach(CTRL)
    assert lab.reach(OTHER6)  # only the v4 address was blocked
    out = lab.action("block-ip", {"address": "fd77:2::/64"})
    assert out["status"] == "ok", out
    assert not lab.reach(OTHER6)
    assert lab.action("unblock", {"kind": "block-ip", "address": OTHER})["status"] == "ok"
    assert lab.reach(OTHER) and not lab.reach(OTHER6)
    assert lab.action("unblock", {"command_id": "net-1"})["status"] == "ok"  # the v6 block
    assert lab.reach(OTHER6)
    assert lab.nft("list", "table", "inet", "edr").returncode != 0  # empty: table removed


def test_block_port(lab: Lab) -> None:
    # Inbound to a local port: a server in "host", reached from "other".
    srv = subprocess.Popen(["ip", "netns", "exec", lab.host, sys.executable, "-c", SERVER,
                            "9090"], stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert srv.stdout is not None and srv.stdout.readline().strip() == "ready"
        assert lab.reach("10.77.2.1", 9090, ns=lab.other)
        assert lab.action("block-port", {"port": 9090})["status"] == "ok"
        assert not lab.reach("10.77.2.1", 9090, ns=lab.other)
        assert lab.reach(CTRL)
    finally:
        srv.kill()
        srv.wait(5)


def test_block_domain_resolves_and_blocks(lab: Lab) -> None:
    # `ip netns exec` bind-mounts /etc/netns/<ns>/hosts over /etc/hosts: a name only the
    # host namespace knows, resolved by the real resolver.
    etc = Path("/etc/netns") / lab.host
    etc.mkdir(parents=True)
    try:
        (etc / "hosts").write_text(f"127.0.0.1 localhost\n{OTHER} other.edr.test\n")
        out = lab.action("block-domain", {"domain": "other.edr.test"})
        assert out["status"] == "ok" and out["addresses"] == [OTHER], out
        assert not lab.reach(OTHER) and lab.reach(CTRL)
        (etc / "hosts").write_text(f"127.0.0.1 localhost\n{CTRL} ctrl.edr.test\n")
        out = lab.action("block-domain", {"domain": "ctrl.edr.test"})
        assert out["status"] == "refused" and "controller" in out["error"]
        out = lab.action("block-domain", {"domain": "nothing.edr.test"})
        assert out["status"] == "error" and "does not resolve" in out["error"]
    finally:
        (etc / "hosts").unlink(missing_ok=True)
        etc.rmdir()


def test_refuses_blocking_the_controller(lab: Lab) -> None:
    for address in (CTRL, "10.77.1.0/24", "10.0.0.0/8"):
        out = lab.action("block-ip", {"address": address})
        assert out["status"] == "refused" and "controller" in out["error"], out
    assert lab.reach(CTRL)
    assert lab.action("block-ip", {"address": "0.0.0.0/0"})["status"] == "refused"
    assert lab.action("block-ip", {"address": "10.77.2.2/24"})["status"] == "refused"


def test_isolate_unisolate_restart_and_local_unisolate(lab: Lab) -> None:
    assert lab.action("block-ip", {"address": OTHER6})["status"] == "ok"
    out = lab.action("isolate")
    assert out["status"] == "ok", out
    assert lab.reach(CTRL)
    assert not lab.reach(OTHER) and not lab.reach(OTHER6)
    assert lab.exec(lab.host, sys.executable, "-c", LOOPBACK).returncode == 0

    # Restart: the kernel lost the table (as after a reboot); start-up re-applies it.
    assert lab.nft("delete", "table", "inet", "edr").returncode == 0
    assert lab.reach(OTHER)
    assert lab.action("start")["state"]["isolated"] is True
    assert not lab.reach(OTHER) and lab.reach(CTRL)

    # Lifting isolation restores exactly the previous state: the v6 block stays.
    assert lab.action("unisolate")["status"] == "ok"
    assert lab.reach(OTHER) and not lab.reach(OTHER6) and lab.reach(CTRL)

    # The operator at the console removes everything in one step.
    assert lab.action("isolate")["status"] == "ok"
    proc = lab.cli("unisolate", "--local", "--state-dir", str(lab.state))
    assert proc.returncode == 0, proc.stderr
    assert lab.reach(OTHER) and lab.reach(OTHER6)
    assert lab.nft("list", "table", "inet", "edr").returncode != 0
    assert lab.action("start")["state"] == {"blocks": [], "isolated": False}


def test_isolate_with_dns_allowed(lab: Lab) -> None:
    # DNS only if configured: "other" plays the DNS server; port 53 to it stays open.
    srv = subprocess.Popen(["ip", "netns", "exec", lab.other, sys.executable, "-c", SERVER,
                            "53"], stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert srv.stdout is not None and srv.stdout.readline().strip() == "ready"
        assert lab.action("isolate", dns=(OTHER,))["status"] == "ok"
        assert lab.reach(OTHER, 53)
        assert not lab.reach(OTHER, PORT)
    finally:
        srv.kill()
        srv.wait(5)

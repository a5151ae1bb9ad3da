"""Three network namespaces joined by veth pairs, for tests of actions that touch the network.

"host" ⇄ "controller" (``<v4>.1.0/24``, ``<v6>:1::/64``) and "host" ⇄ "other"
(``<v4>.2.0/24``, ``<v6>:2::/64``); the peers are ``.2`` / ``::2`` and each runs a TCP server
on ``PORT`` that answers ``ok``. Addresses exist only inside the namespaces, and the machine's
own nftables ruleset is checked unchanged when the lab is taken down. Shared by
``tests/response/test_network_actions.py`` and ``tests/browser/test_response.py``.
"""

from __future__ import annotations

import subprocess
import sys
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import pytest

PORT = 8080

SERVER = """
import socket, sys
s = socket.socket(socket.AF_INET6)
s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("::", int(sys.argv[1])))
s.listen(16)
print("ready", flush=True)
while True:
    c, _ = s.accept()
    c.sendall(b"ok")
    c.close()
"""

CLIENT = """
import socket, sys
try:
    with socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=1.0) as s:
        sys.exit(0 if s.recv(2) == b"ok" else 1)
except OSError:
    sys.exit(1)
"""


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=10)


def host_ruleset() -> str:
    return subprocess.run(["nft", "list", "ruleset"], capture_output=True, text=True,
                          timeout=10, check=True).stdout  # fmt: skip


@dataclass
class Namespaces:
    host: str
    ctrl: str
    other: str

    def exec(self, ns: str, *argv: str, **kw: object) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["ip", "netns", "exec", ns, *argv], capture_output=True,
                              text=True, timeout=30, **kw)  # type: ignore[call-overload]  # fmt: skip

    def reach(self, addr: str, port: int = PORT, ns: str | None = None) -> bool:
        """Whether a TCP connect from ``ns`` (the host namespace) to ``addr:port`` is answered."""
        proc = self.exec(ns or self.host, sys.executable, "-c", CLIENT, addr, str(port))
        return proc.returncode == 0

    def has_edr_table(self) -> bool:
        return self.exec(self.host, "nft", "list", "table", "inet", "edr").returncode == 0


@contextmanager
def netns_lab(v4: str, v6: str, prefix: str) -> Iterator[Namespaces]:
    """The three namespaces, named ``<prefix>-{h,c,o}-<tag>``; skips the test where namespaces
    cannot be created."""
    tag = uuid.uuid4().hex[:6]
    names = [f"{prefix}-h-{tag}", f"{prefix}-c-{tag}", f"{prefix}-o-{tag}"]
    before = host_ruleset()
    servers: list[subprocess.Popen[str]] = []
    try:
        for ns in names:
            ip("netns", "add", ns)
    except subprocess.CalledProcessError as exc:
        for ns in names:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=10)
        pytest.skip(f"cannot create network namespaces here: {exc.stderr!r}")
    h, c, o = names
    try:
        for peer, net in ((c, "1"), (o, "2")):
            a, b = f"vh{net}{tag}", f"vp{net}{tag}"
            ip("link", "add", a, "netns", h, "type", "veth", "peer", "name", b, "netns", peer)
            ip("-n", h, "addr", "add", f"{v4}.{net}.1/24", "dev", a)
            ip("-n", peer, "addr", "add", f"{v4}.{net}.2/24", "dev", b)
            ip("-n", h, "addr", "add", f"{v6}:{net}::1/64", "dev", a, "nodad")
            ip("-n", peer, "addr", "add", f"{v6}:{net}::2/64", "dev", b, "nodad")
            for ns, dev in ((h, a), (peer, b)):
                ip("-n", ns, "link", "set", dev, "up")
                ip("-n", ns, "link", "set", "lo", "up")
            srv = subprocess.Popen(["ip", "netns", "exec", peer, sys.executable, "-c", SERVER,
                                    str(PORT)], stdout=subprocess.PIPE, text=True)  # fmt: skip
            servers.append(srv)
            assert srv.stdout is not None and srv.stdout.readline().strip() == "ready"
        lab = Namespaces(h, c, o)
        for addr in (f"{v4}.1.2", f"{v4}.2.2", f"{v6}:2::2"):
            assert lab.reach(addr), f"the lab's server at {addr} is not reachable before the test"
        yield lab
    finally:
        for srv in servers:
            srv.kill()
            srv.wait(5)
        for ns in names:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=10)
    assert host_ruleset() == before, "the machine's own nftables ruleset changed"

"""TCP poll source: real loopback sockets (IPv4 and IPv6), both backends, root and nobody."""

from __future__ import annotations

import os
import socket
import threading
from typing import Any

import pytest

from backplane.schema import Event, Family
from sensor.capture import CaptureContext, TierUnavailable
from sensor.fallback import TcpPollSource, net_poll
from sensor.process_table import ProcessTable

ALL = frozenset(Family)

HEADER = (
    "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  "
    "timeout inode\n"
)


def test_parse_proc_net_tcp_ipv4_and_ipv6() -> None:
    v4 = HEADER + (
        "   0: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0 "
        "       0 1234 1 0000000000000000 100 0 0 10 0\n"
        "   1: 0100007F:1F90 0100007F:D431 01 00000000:00000000 00:00000000 00000000  65534 "
        "       0 5678 1 0000000000000000 20 4 30 10 -1\n"
        "   2: 0100007F:1F90 0100007F:D432 06 00000000:00000000 03:00000000 00000000     0 "
        "       0 0 3 0000000000000000\n"  # TIME_WAIT: not reported
    )
    listen, est = net_poll.parse_proc_net_tcp(v4)
    assert listen == net_poll.TcpSocket(10, ("127.0.0.1", 8080), ("0.0.0.0", 0), 1234, 0)
    assert est.remote == ("127.0.0.1", 0xD431) and est.uid == 65534 and est.inode == 5678
    v6 = HEADER + (
        "   0: 00000000000000000000000001000000:0016 00000000000000000000000000000000:0000 0A "
        "00000000:00000000 00:00000000 00000000     0        0 42 1 0000000000000000 100 0 0 10 0\n"
    )
    (s6,) = net_poll.parse_proc_net_tcp(v6)
    assert s6.local == ("::1", 22)


@pytest.mark.parametrize(
    "row",
    [
        "   0: 0100007F:1F90 00000000:0000 0A\n",  # too few fields
        "   0: 0100007F:ZZZZ 00000000:0000 0A 0:0 0:0 0 0 0 1 1\n",  # bad port
        "   0: 01007F:1F90 00000000:0000 0A 0:0 0:0 0 0 0 1 1\n",  # 3-byte address
    ],
)
def test_parse_proc_net_tcp_rejects_malformed_rows(row: str) -> None:
    with pytest.raises(ValueError, match="line 2"):
        net_poll.parse_proc_net_tcp(HEADER + row)


def test_real_proc_net_tcp_and_sock_diag_agree_on_a_listener() -> None:
    with socket.socket(socket.AF_INET6) as s6, socket.socket() as s4:
        s4.bind(("127.0.0.1", 0))
        s4.listen()
        s6.bind(("::1", 0))
        s6.listen()
        want = {("127.0.0.1", s4.getsockname()[1]), ("::1", s6.getsockname()[1])}
        reader = net_poll.SockDiagReader()
        try:
            for sockets in (net_poll.read_proc_net_tcp(), reader.read()):
                got = {s.local for s in sockets if s.state == net_poll.TCP_LISTEN}
                assert want <= got
        finally:
            reader.close()
        inodes = {s.inode for s in net_poll.read_proc_net_tcp() if s.local in want}
        assert set(net_poll.socket_owners(inodes).values()) == {os.getpid()}


@pytest.mark.root
@pytest.mark.timeout(120)
@pytest.mark.parametrize("backend", ["sock_diag", "procfs"])
@pytest.mark.parametrize("user", ["root", "nobody"])
def test_listen_connect_accept_ipv4_ipv6(
    run_driver: Any, nobody_ready: None, user: str, backend: str
) -> None:
    out = run_driver("net", {"backend": backend}, user=user)
    assert out["backend"] == backend
    ports, me = out["ports"], out["me"]
    mine = [e for e in out["events"] if e.get("process", {}).get("pid") == me]
    seen = {
        (
            e["event"]["action"],
            (e.get("source") or e["destination"])["ip"],
            (e.get("source") or e["destination"])["port"],
            (e.get("destination") or {}).get("port") if "source" in e else None,
        )
        for e in mine
    }
    for host in ("127.0.0.1", "::1"):
        server, client = ports[host], ports[f"{host} client"]
        assert ("listen", host, server, None) in seen
        # connect: source is this side; accept: source is the peer that initiated.
        assert ("connect", host, client, server) in seen
        assert ("accept", host, client, server) in seen
    assert len(mine) == 6, mine  # each once, nothing twice
    for e in mine:
        assert e["network"]["transport"] == "tcp"
        ip = (e.get("source") or e["destination"])["ip"]
        assert e["network"]["type"] == ("ipv6" if ":" in ip else "ipv4")
        assert e["user"]["id"] == str(out["euid"])
        assert e["edr"]["discovered"] == f"poll:{backend}"
    directions = {e["event"]["action"]: e["network"].get("direction") for e in mine}
    assert directions == {"listen": None, "connect": "egress", "accept": "ingress"}
    assert out["counters"]["read_errors"] == 0
    assert out["timing"]["stop_s"] < 0.5


def _ctx(events: list[Event]) -> CaptureContext:
    return CaptureContext(
        host={"id": "h"}, table=ProcessTable("h"), emit=events.append, ignored_pids=set()
    )


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(ValueError, match="unknown backend"):
        TcpPollSource(_ctx([]), ALL, backend="netstat")
    with pytest.raises(ValueError, match="positive"):
        TcpPollSource(_ctx([]), ALL, interval=-1)
    src = TcpPollSource(_ctx([]), ALL)
    with pytest.raises(RuntimeError, match="before open"):
        src.run(threading.Event())
    src.close()
    src.close()


class _BrokenDiag:
    """sock_diag failing the way it does without NETLINK_SOCK_DIAG support."""

    def __init__(self) -> None:
        raise OSError(93, "Protocol not supported")


def test_sock_diag_failure_falls_back_to_proc(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(net_poll, "SockDiagReader", _BrokenDiag)
    events: list[Event] = []
    src = TcpPollSource(_ctx(events), ALL, interval=10)
    src.open()
    assert src.backend == "procfs"
    assert (
        "sock_diag failed" in src.backend_reason and "Protocol not supported" in src.backend_reason
    )
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        src.poll_once()
    src.close()
    mine = [e for e in events if e.get("process", {}).get("pid") == os.getpid()]
    assert [(e["event"]["action"], e["destination"]["port"]) for e in mine] == [("listen", port)]
    # Asked for sock_diag explicitly, its failure is the source's failure.
    forced = TcpPollSource(_ctx([]), ALL, backend="sock_diag")
    with pytest.raises(TierUnavailable, match="sock_diag unavailable"):
        forced.open()
    forced.close()


def test_unreadable_proc_row_is_counted_not_fatal(monkeypatch: pytest.MonkeyPatch) -> None:
    src = TcpPollSource(_ctx([]), ALL, interval=0.05, backend="procfs")
    src.open()

    def broken() -> list[net_poll.TcpSocket]:
        raise ValueError("/proc/net/tcp line 2: expected >= 10 fields")

    monkeypatch.setattr(net_poll, "read_proc_net_tcp", broken)
    stop = threading.Event()
    thread = threading.Thread(target=src.run, args=(stop,))
    thread.start()
    try:
        threading.Event().wait(0.3)
    finally:
        stop.set()
        thread.join(2)
        src.close()
    assert not thread.is_alive()
    assert src.counters()["read_errors"] >= 2

"""Real ZeroMQ + real TLS on loopback: delivery, commands, policy, refused handshakes."""

from __future__ import annotations

import logging
import socket
import ssl
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import zmq
from bp_harness import Pki, Recorder, ServerThread, make_client, make_event, wait_for
from bp_sqlite_hooks import SqliteHooks

from backplane.client import load_certificate
from backplane.outbox import Outbox
from backplane.tls import TlsError, TlsSession, client_context

pytestmark = pytest.mark.timeout(60)


def stored(hooks: SqliteHooks) -> int:
    return hooks.query("SELECT COUNT(*) FROM events")[0][0]


def test_events_commands_policy_roundtrip(
    tmp_path: Path, pki: Pki, hooks: SqliteHooks, server: ServerThread
) -> None:
    host = "a1b2c3d4e5f60708"
    hooks.queue_command(host, "c-offline", "kill", {"pid": 1})  # queued while offline
    hooks.set_policy(host, 3, {"block": ["10.0.0.0/8"]})
    ob = Outbox(tmp_path / "ob.db", batch_events=100)
    ob.append(make_event(i) for i in range(1050))
    rec = Recorder()
    client = make_client(pki.client_config(server.endpoint, pki.client(host)), ob, rec)
    client.start()
    try:
        wait_for(lambda: stored(hooks) == 1050 and ob.pending_events() == 0, 15, "events")
        wait_for(lambda: [c.id for c in rec.commands] == ["c-offline"], 5, "offline command")
        assert rec.policies == [(3, {"block": ["10.0.0.0/8"]})]
        # A new command for a connected host is pushed at once.
        hooks.queue_command(host, "c-live", "isolate")
        server.run(lambda: server.server.notify_command(host))
        wait_for(lambda: len(rec.commands) == 2, 5, "live command")
        wait_for(
            lambda: hooks.query("SELECT COUNT(*) FROM commands WHERE status='ok'")[0][0] == 2,
            5,
            "command results",
        )
        wait_for(lambda: hooks.query("SELECT heartbeats FROM hosts")[0][0] > 0, 5, "heartbeat")
        assert hooks.query("SELECT policy_applied FROM hosts") == [(3,)]
        # The identity is the certificate's, never a message field (hello says "test-host").
        assert hooks.query("SELECT host, hostname FROM hosts") == [(host, "test-host")]
        assert hooks.query("SELECT COUNT(DISTINCT n) FROM (SELECT idx AS n, seq FROM events)")
    finally:
        client.stop()
        ob.close()


def _refused(
    caplog: pytest.LogCaptureFixture, server: ServerThread, before: int, words: str
) -> None:
    wait_for(lambda: server.server.refused > before, 10, f"a refused handshake ({words})")
    lines = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
    assert any(words in line for line in lines), lines
    assert server.run(lambda: len(server.server.sessions)) == 0
    for r in caplog.records:  # key material never reaches the log
        assert "PRIVATE KEY" not in r.getMessage()


def _try_client(
    tmp_path: Path,
    pki: Pki,
    server: ServerThread,
    cred: Path,
    server_name: str = "localhost",
    ca_file: Path | None = None,
) -> None:
    ob = Outbox(tmp_path / f"ob-{cred.name}.db")
    ob.append([make_event(1)])
    ob.flush()
    cfg = pki.client_config(server.endpoint, cred, server_name=server_name)
    if ca_file is not None:
        cfg.ca_file = ca_file
    client = make_client(cfg, ob)
    client.start()
    try:
        # Give it time to try (and fail) more than once.
        assert not client.connected.wait(1.5)
        assert ob.depth == 1  # nothing was acked, nothing was lost
    finally:
        client.stop()
        ob.close()


@pytest.mark.parametrize("case", ["other_ca", "revoked", "expired", "server_cert"])
def test_refused_client_certificates(
    case: str,
    tmp_path: Path,
    pki: Pki,
    hooks: SqliteHooks,
    server: ServerThread,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    if case == "other_ca":
        cred = Pki(tmp_path / "other").client("abcd")
        words = "unable to get local issuer certificate"
    elif case == "revoked":
        cred = pki.client("abcd")
        pki.revoke(cred)
        server.run(server.server.reload_crl)
        words = "revoked"
    elif case == "expired":
        cred = pki.client("abcd", now=datetime.now(UTC) - timedelta(days=200))
        words = "expired"
    else:  # a server certificate presented as a client one (wrong EKU, no host identity)
        cred = pki.server(["localhost"], name="not-a-client.pem")
        words = "refused handshake"
    before = server.server.refused
    _try_client(tmp_path, pki, server, cred)
    _refused(caplog, server, before, words)
    assert stored(hooks) == 0


def test_no_client_certificate(
    pki: Pki, server: ServerThread, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.load_verify_locations(cafile=str(pki.ca_file))
    before = server.server.refused
    with pytest.raises(TlsError, match="no client certificate"):
        _raw_tls_exchange(
            server.endpoint, TlsSession(ctx, server_side=False, server_hostname="localhost")
        )
    _refused(caplog, server, before, "no client certificate")


def test_wrong_server_name_refused_by_client(
    tmp_path: Path, pki: Pki, server: ServerThread, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    sess = TlsSession(
        client_context(pki.ca_file, pki.client("abcd")),
        server_side=False,
        server_hostname="controller.example",
    )
    with pytest.raises(Exception, match=r"Hostname mismatch|hostname"):
        _raw_tls_exchange(server.endpoint, sess)
    # And the real client keeps its data and logs why.
    _try_client(tmp_path, pki, server, pki.client("abcd"), server_name="controller.example")
    assert any("Hostname mismatch" in r.getMessage() for r in caplog.records)


def _raw_tls_exchange(endpoint: str, sess: TlsSession) -> None:
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVTIMEO, 3000)
    try:
        sock.connect(endpoint)
        sess.start()
        sock.send(sess.outgoing())
        for _ in range(5):
            try:
                data = sock.recv()
            except zmq.Again:
                return
            sess.receive(data)
            out = sess.outgoing()
            if out:
                sock.send(out)
            if sess.state == "open":
                from backplane.messages import Ack

                sess.send(Ack(1))
                sock.send(sess.outgoing())
    finally:
        sock.close()
        ctx.term()


@pytest.mark.parametrize(
    "payload",
    [[b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"], [b"\x16\x03\x01\x00\x05hello"], [b"a", b"b", b"c"]],
    ids=["plain", "garbage", "frames"],
)
def test_plain_and_garbage_refused(
    payload: list[bytes], server: ServerThread, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        sock.connect(server.endpoint)
        before = server.server.refused
        sock.send_multipart(payload)
        if len(payload) == 1:
            _refused(caplog, server, before, "refused handshake")
        else:
            wait_for(
                lambda: any("garbage frames" in r.getMessage() for r in caplog.records),
                5,
                "garbage log",
            )
    finally:
        sock.close()
        ctx.term()
    assert server.run(lambda: len(server.server.sessions)) == 0


def test_plain_tcp_bytes_do_not_hurt(tmp_path: Path, pki: Pki, server: ServerThread) -> None:
    port = int(server.endpoint.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
        s.sendall(b"\xff" + b"\x00" * 64 + b"not zmtp at all")
    assert server.run(lambda: len(server.server.sessions)) == 0
    # The server still serves a good sensor afterwards.
    ob = Outbox(tmp_path / "ob.db")
    client = make_client(pki.client_config(server.endpoint, pki.client("beef")), ob)
    client.start()
    try:
        assert client.connected.wait(5)
    finally:
        client.stop()
        ob.close()


def test_revoked_open_session_dropped(
    tmp_path: Path,
    pki: Pki,
    hooks: SqliteHooks,
    server: ServerThread,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    host = "deadbeef00000001"
    cred = pki.client(host)
    ob = Outbox(tmp_path / "ob.db")
    client = make_client(pki.client_config(server.endpoint, cred), ob)
    client.start()
    try:
        assert client.connected.wait(5)
        assert server.run(lambda: server.server.connected_hosts()) == {host}
        pki.revoke(cred)  # the server's file watch picks the new CRL up
        wait_for(lambda: server.run(lambda: len(server.server.sessions)) == 0, 5, "session dropped")
        assert any("revoked; dropping session" in r.getMessage() for r in caplog.records)
        # It tries again and is refused every time.
        before = server.server.refused
        wait_for(lambda: server.server.refused > before, 5, "refused reconnect")
        assert not client.connected.is_set()
    finally:
        client.stop()
        ob.close()


def test_dead_peer_detected_and_reconnects(tmp_path: Path, pki: Pki, hooks: SqliteHooks) -> None:
    st = ServerThread(pki.server_config(heartbeat_timeout=1.0), hooks)
    ob = Outbox(tmp_path / "ob.db")
    cfg = pki.client_config(st.endpoint, pki.client("feed"), heartbeat_interval=60, dead_after=60)
    client = make_client(cfg, ob)
    client.start()
    try:
        assert client.connected.wait(5)
        # The sensor sends nothing (heartbeats every 60 s): the server declares it dead.
        wait_for(lambda: ("feed", "heartbeat timeout") in hooks.disconnects, 5, "dead peer")
        # The sensor learns of it on its next send (reset frame) and makes a new session.
        ob.append([make_event(1)])
        ob.flush()
        wait_for(lambda: stored(hooks) == 1, 10, "delivery after reconnect")
        assert client.stats.connects >= 2
    finally:
        client.stop()
        ob.close()
        st.close()


def test_certificate_rotation(
    tmp_path: Path, pki: Pki, hooks: SqliteHooks, server: ServerThread
) -> None:
    host = "0123456789abcdef"
    cred = pki.client(host, now=datetime.now(UTC) - timedelta(days=80))  # 10 days left
    old = load_certificate(cred)
    ob = Outbox(tmp_path / "ob.db")
    client = make_client(pki.client_config(server.endpoint, cred), ob)
    assert client.renewal_due()
    client.start()
    try:
        wait_for(lambda: client.stats.renewals == 1, 10, "renewal")
        new = load_certificate(cred)
        assert new.serial_number != old.serial_number
        assert new.not_valid_after_utc > old.not_valid_after_utc
        assert cred.stat().st_mode & 0o777 == 0o600
        assert not client.renewal_due()
    finally:
        client.stop()
        ob.close()
    # The new credentials work for a fresh session.
    ob2 = Outbox(tmp_path / "ob2.db")
    client2 = make_client(pki.client_config(server.endpoint, cred), ob2)
    client2.start()
    try:
        assert client2.connected.wait(5)
    finally:
        client2.stop()
        ob2.close()

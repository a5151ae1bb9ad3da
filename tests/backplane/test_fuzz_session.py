"""Fuzz the TLS session state machine: arbitrary bytes before and after the handshake."""

from __future__ import annotations

import contextlib
import ssl
from pathlib import Path

import pytest
from bp_harness import Pki
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from backplane.messages import Ack, ProtocolError
from backplane.tls import TlsError, TlsSession, client_context, server_context

MAX = 64 * 1024
FIXTURE_OK = [HealthCheck.function_scoped_fixture]  # the module fixture is read-only


@pytest.fixture(scope="module")
def contexts(tmp_path_factory: pytest.TempPathFactory) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    pki = Pki(Path(tmp_path_factory.mktemp("fuzzpki")))
    srv = server_context(pki.ca_file, pki.server_file, None, pki.crl_file)
    cli = client_context(pki.ca_file, pki.client("f00d"))
    return srv, cli


def pair(contexts) -> tuple[TlsSession, TlsSession]:
    srv, cli = contexts
    s = TlsSession(srv, server_side=True, max_message=MAX)
    c = TlsSession(cli, server_side=False, server_hostname="localhost", max_message=MAX)
    c.start()
    for _ in range(4):
        s.receive(c.outgoing())
        c.receive(s.outgoing())
    assert s.state == c.state == "open"
    return s, c


@settings(max_examples=200, deadline=None, suppress_health_check=FIXTURE_OK)
@given(st.lists(st.binary(max_size=4096), max_size=6))
def test_fuzz_bytes_before_handshake(contexts, chunks: list[bytes]) -> None:
    s = TlsSession(contexts[0], server_side=True, max_message=MAX)
    for chunk in chunks:
        try:
            assert s.receive(chunk) == []
        except TlsError:
            assert s.state == "closed"
            return
        assert s.buffered <= sum(map(len, chunks)) + 4096
    assert s.state == "handshake"


@settings(max_examples=150, deadline=None, suppress_health_check=FIXTURE_OK)
@given(st.lists(st.binary(max_size=3 * MAX), max_size=5))
def test_fuzz_plaintext_inside_tls(contexts, chunks: list[bytes]) -> None:
    """Whatever a peer with a valid certificate writes: messages, ProtocolError, or TlsError."""
    s, c = pair(contexts)
    for chunk in chunks:
        c.send_raw(chunk)
        try:
            s.receive(c.outgoing())
        except (ProtocolError, TlsError):
            assert s.state == "closed"
            return
        # Never more than one message plus a read chunk held in memory.
        assert s.buffered <= MAX + 4 + 256 * 1024
    # Further traffic is still handled without a crash (an incomplete fuzz frame may swallow it).
    c.send(Ack(1))
    with contextlib.suppress(ProtocolError):
        s.receive(c.outgoing())


@settings(max_examples=100, deadline=None, suppress_health_check=FIXTURE_OK)
@given(st.lists(st.tuples(st.integers(0, 200), st.binary(min_size=1, max_size=8)), max_size=4))
def test_fuzz_tampered_records(contexts, edits: list[tuple[int, bytes]]) -> None:
    """Flipped bytes in TLS records are refused by TLS itself (integrity), never decoded."""
    s, c = pair(contexts)
    c.send(Ack(42))
    rec = bytearray(c.outgoing())
    for pos, data in edits:
        pos %= len(rec)
        rec[pos : pos + len(data)] = bytes(b ^ 0x5A for b in data)
    try:
        out = s.receive(bytes(rec))
    except (TlsError, ProtocolError):
        return
    assert out in ([], [Ack(42)])

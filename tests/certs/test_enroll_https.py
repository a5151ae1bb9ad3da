"""End to end over real HTTPS: sensor.enroll against the blueprint served by Sanic."""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import logging
import socket
import ssl
import stat
import threading
import uuid
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from cryptography import x509
from sanic import Sanic

from certs import pki
from certs.store import PKIStore
from controller.enroll_api import create_blueprint
from sensor import enroll as sensor_enroll

pytestmark = pytest.mark.timeout(60)


class Server:
    """A Sanic app with the enrollment blueprint, served over TLS on 127.0.0.1:<random>."""

    def __init__(self, store: PKIStore) -> None:
        self.store = store
        self.app = Sanic(f"enroll_test_{uuid.uuid4().hex}")
        self.app.config.ACCESS_LOG = False
        # TouchUp rewrites Sanic internals once per process; a second app would fail it.
        self.app.config.TOUCHUP = False
        self.app.blueprint(create_blueprint(store, max_body=4096))
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.requests_seen = 0
        self.app.on_request(self._count)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(store.server_cert_path, store.server_key_path)
        self.ctx = ctx
        self.loop = asyncio.new_event_loop()
        self.started = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    async def _count(self, request) -> None:
        self.requests_seen += 1

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)

        async def serve() -> None:
            self.server = await self.app.create_server(
                sock=self.sock, ssl=self.ctx, return_asyncio_server=True, access_log=False
            )
            await self.server.startup()
            await self.server.before_start()
            await self.server.after_start()
            self.started.set()
            await self.server.serve_forever()

        with contextlib.suppress(asyncio.CancelledError):
            self.loop.run_until_complete(serve())

    def start(self) -> None:
        self.thread.start()
        assert self.started.wait(20), "Sanic did not start"

    def stop(self) -> None:
        async def shutdown() -> None:
            await self.server.before_stop()
            self.server.close()
            await self.server.wait_closed()
            await self.server.after_stop()
            for task in asyncio.all_tasks():
                if task is not asyncio.current_task():
                    task.cancel()

        asyncio.run_coroutine_threadsafe(shutdown(), self.loop).result(10)
        self.thread.join(10)
        self.loop.close()

    def post(self, body: bytes, headers: dict[str, str] | None = None) -> tuple[int, dict]:
        ctx = ssl.create_default_context(cafile=str(self.store.ca_path))
        conn = http.client.HTTPSConnection("127.0.0.1", self.port, timeout=10, context=ctx)
        try:
            conn.request(
                "POST",
                "/api/v1/enroll",
                body=body,
                headers={"Content-Type": "application/json", **(headers or {})},
            )
            resp = conn.getresponse()
            return resp.status, json.loads(resp.read())
        finally:
            conn.close()


@pytest.fixture
def server(store: PKIStore) -> Iterator[Server]:
    srv = Server(store)
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()


def _fp(store: PKIStore) -> str:
    return store.load_ca().fingerprint_sha256


def test_enroll_success(server: Server, store: PKIStore, tmp_path: Path, caplog) -> None:
    token = store.create_token(timedelta(hours=1), 1)
    state = tmp_path / "sensor"
    caplog.set_level(logging.DEBUG)
    host_id = sensor_enroll.enroll(
        f"127.0.0.1:{server.port}", token, _fp(store), state, hostname="web-01"
    )
    assert (state / "host_id").read_text().strip() == host_id
    assert stat.S_IMODE((state / "sensor.key").stat().st_mode) == 0o600
    assert stat.S_IMODE(state.stat().st_mode) == 0o700
    assert not (state / "sensor.key.pending").exists()
    cert = x509.load_pem_x509_certificate((state / "sensor.pem").read_bytes())
    assert pki.host_id_of(cert) == host_id
    assert (state / "ca.pem").read_bytes() == store.ca_path.read_bytes()
    [row] = store.certificates()
    assert (row.host_id, row.hostname) == (host_id, "web-01")
    assert token.split(".")[1] not in caplog.text  # the secret never reaches a log
    # The saved identity works for mutual TLS: load it like the backplane will.
    ctx = ssl.create_default_context(cafile=str(state / "ca.pem"))
    ctx.load_cert_chain(state / "sensor.pem", state / "sensor.key")
    # A second enrollment of the same state dir is refused without --force.
    with pytest.raises(sensor_enroll.EnrollError, match="already holds"):
        sensor_enroll.enroll(f"127.0.0.1:{server.port}", token, _fp(store), state)


def test_wrong_fingerprint_refused_before_token_sent(
    server: Server, store: PKIStore, tmp_path: Path
) -> None:
    token = store.create_token(timedelta(hours=1), 1)
    with pytest.raises(sensor_enroll.EnrollError, match="fingerprint mismatch"):
        sensor_enroll.enroll(f"127.0.0.1:{server.port}", token, "ab" * 32, tmp_path / "s")
    assert server.requests_seen == 1  # only GET /ca; the POST with the token never happened
    assert store.list_tokens()[0].uses_count == 0
    assert not (tmp_path / "s" / "sensor.pem").exists()
    assert not (tmp_path / "s" / "sensor.key.pending").exists()


def test_bad_token_refused_generically(server: Server, store: PKIStore, tmp_path: Path) -> None:
    token = store.create_token(timedelta(hours=1), 1)
    bad = token.split(".")[0] + "." + "B" * 43
    with pytest.raises(sensor_enroll.EnrollError, match=r"HTTP 403.*invalid or expired token"):
        sensor_enroll.enroll(f"127.0.0.1:{server.port}", bad, _fp(store), tmp_path / "s")
    assert not (tmp_path / "s" / "sensor.pem").exists()
    # A used-up token gives the same answer.
    sensor_enroll.enroll(f"127.0.0.1:{server.port}", token, _fp(store), tmp_path / "a")
    with pytest.raises(sensor_enroll.EnrollError, match="invalid or expired token"):
        sensor_enroll.enroll(f"127.0.0.1:{server.port}", token, _fp(store), tmp_path / "b")


def test_ca_endpoint(server: Server, store: PKIStore) -> None:
    ctx = ssl.create_default_context(cafile=str(store.ca_path))
    conn = http.client.HTTPSConnection("127.0.0.1", server.port, timeout=10, context=ctx)
    conn.request("GET", "/api/v1/enroll/ca")
    resp = conn.getresponse()
    assert resp.status == 200
    assert resp.getheader("content-type") == "application/x-pem-file"
    assert resp.read() == store.ca_path.read_bytes()
    conn.close()


@pytest.mark.parametrize(
    ("body", "status", "message"),
    [
        (b"{not json", 400, "not valid JSON"),
        (b"\xff\xfe", 400, "not valid JSON"),
        (b"[1, 2]", 400, "JSON object"),
        (b'{"token": "x"}', 400, "csr, hostname"),
        (b'{"token": "x", "csr": 5, "hostname": "h"}', 400, "csr"),
        (b'{"token": "x", "csr": "c", "hostname": "h", "extra": 1}', 400, "unknown field"),
        (b'{"token": "x", "csr": "garbage", "hostname": "h"}', 400, "CSR is not a valid PEM"),
        (b'{"token": "x", "csr": "garbage", "hostname": "a b"}', 400, "invalid hostname"),
    ],
)
def test_malformed_requests(
    server: Server, store: PKIStore, body: bytes, status: int, message: str
) -> None:
    got_status, reply = server.post(body)
    assert got_status == status and message in reply["error"], reply
    assert store.certificates() == []


def test_oversized_body(server: Server, store: PKIStore, csr) -> None:
    token = store.create_token(timedelta(hours=1), 1)
    body = json.dumps(
        {"token": token, "csr": csr().decode() + " " * 8000, "hostname": "h"}
    ).encode()
    status, reply = server.post(body)
    assert status == 413 and "too large" in reply["error"]
    assert store.list_tokens()[0].uses_count == 0


def test_oversized_chunked_body(server: Server, store: PKIStore) -> None:
    """Without a Content-Length the streamed body is still cut off at the limit."""
    ctx = ssl.create_default_context(cafile=str(store.ca_path))
    conn = http.client.HTTPSConnection("127.0.0.1", server.port, timeout=10, context=ctx)
    conn.request(
        "POST",
        "/api/v1/enroll",
        body=iter([b"x" * 3000, b"x" * 3000]),
        headers={"Content-Type": "application/json"},
        encode_chunked=True,
    )
    resp = conn.getresponse()
    assert resp.status == 413
    conn.close()


def test_server_cert_must_name_controller(tmp_path: Path) -> None:
    """The POST is verified against the pinned CA, hostname included: a server certificate
    that does not name the address dialled stops enrollment before the token is sent."""
    other = PKIStore(tmp_path / "pki-other")
    other.init(["controller.example"])
    token = other.create_token(timedelta(hours=1), 1)
    srv = Server(other)
    srv.start()
    try:
        with pytest.raises(sensor_enroll.EnrollError, match=r"TLS verification .* failed"):
            sensor_enroll.enroll(f"127.0.0.1:{srv.port}", token, _fp(other), tmp_path / "s")
        assert srv.requests_seen == 1  # the unverified GET /ca only
    finally:
        srv.stop()
    assert other.list_tokens()[0].uses_count == 0


def test_unreachable_controller(store: PKIStore, tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(sensor_enroll.EnrollError, match="cannot reach controller"):
        sensor_enroll.enroll(f"127.0.0.1:{port}", "t.x", _fp(store), tmp_path / "s")
    assert not (tmp_path / "s" / "sensor.key.pending").exists()


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("host", ("host", 8443)),
        ("host:9000", ("host", 9000)),
        ("https://h.example:1/", ("h.example", 1)),
        ("[::1]:5", ("::1", 5)),
        ("::1", ("::1", 8443)),
        ("10.0.0.1", ("10.0.0.1", 8443)),
    ],
)
def test_parse_controller(value: str, expected: tuple[str, int]) -> None:
    assert sensor_enroll.parse_controller(value) == expected


@pytest.mark.parametrize("value", ["http://h", "h:0", "h:99999", "h:x", "[::1", "bad host", ""])
def test_parse_controller_refuses(value: str) -> None:
    with pytest.raises(sensor_enroll.EnrollError):
        sensor_enroll.parse_controller(value)


def test_fingerprint_formats() -> None:
    fp = "AB" * 32
    assert sensor_enroll.normalize_fingerprint(":".join(["AB"] * 32)) == fp.lower()
    with pytest.raises(sensor_enroll.EnrollError, match="64-hex"):
        sensor_enroll.normalize_fingerprint("abc")


def test_cli_main(server: Server, store: PKIStore, tmp_path: Path, capsys) -> None:
    """``add_arguments``/``main`` as the lead mounts them under ``edr-sensor enroll``."""
    import argparse

    parser = argparse.ArgumentParser(prog="edr-sensor enroll")
    sensor_enroll.add_arguments(parser)
    token = store.create_token(timedelta(hours=1), 1)
    base = [
        "--controller",
        f"127.0.0.1:{server.port}",
        "--ca-sha256",
        _fp(store),
        "--state-dir",
        str(tmp_path / "s"),
    ]
    assert sensor_enroll.main(parser.parse_args([*base, "--token", token])) == 0
    assert "enrolled as host" in capsys.readouterr().out
    assert sensor_enroll.main(parser.parse_args([*base, "--token", token, "--force"])) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "edr-sensor enroll: error: controller refused enrollment (HTTP 403): "
        "invalid or expired token"
    ]
    # The failed forced re-enrollment left the working identity untouched.
    assert (
        pki.host_id_of(x509.load_pem_x509_certificate((tmp_path / "s" / "sensor.pem").read_bytes()))
        == (tmp_path / "s" / "host_id").read_text().strip()
    )
    bad_fp = [*base[:3], "nothex", *base[4:], "--token", token]
    assert sensor_enroll.main(parser.parse_args(bad_fp)) == 1
    assert "64-hex" in capsys.readouterr().err

"""The real sensor (`edr-sensor run --controller`) streaming over the real backplane.

The identity is issued the way an operator does it offline (key + certificate + CA in the
state directory); the sensor captures in the fallback tier; the server stores with the
reference SQLite hooks. A `kill -9` of the sensor loses nothing that reached its outbox.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
import uuid
from pathlib import Path

import msgpack
import pytest
from bp_harness import Pki, ServerThread, wait_for
from bp_sqlite_hooks import SqliteHooks

from sensor.uplink import UplinkError, ensure_credentials, parse_controller
from tests.sensor_cmd import fallback_sensor

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    ("text", "endpoint", "name"),
    [
        ("controller", "tcp://controller:7443", "controller"),
        ("controller:9000", "tcp://controller:9000", "controller"),
        ("127.0.0.1:7000", "tcp://127.0.0.1:7000", "127.0.0.1"),
        ("[::1]", "tcp://[::1]:7443", "::1"),
        ("[::1]:7001", "tcp://[::1]:7001", "::1"),
        ("::1", "tcp://[::1]:7443", "::1"),  # unbracketed IPv6: the whole text is the host
    ],
)
def test_parse_controller(text: str, endpoint: str, name: str) -> None:
    assert parse_controller(text) == (endpoint, name)


@pytest.mark.parametrize(
    "text", ["", "a b", "tcp://x", "https://x", "x:0", "x:70000", "x:port", "[::1", "[::1]x", "u@h"]
)
def test_parse_controller_refuses(text: str) -> None:
    with pytest.raises(UplinkError):
        parse_controller(text)


def enrolled_state(pki: Pki, state: Path, host_id: str) -> None:
    """What `edr-certs issue` / `edr-sensor enroll` leave behind."""
    cert, key = pki.ca.issue_client(host_id)
    state.mkdir(mode=0o700, parents=True, exist_ok=True)
    (state / "sensor.key").write_bytes(key)
    (state / "sensor.key").chmod(0o600)
    (state / "sensor.pem").write_bytes(cert)
    (state / "ca.pem").write_bytes(pki.ca.cert_pem)
    (state / "host_id").write_text(host_id + "\n")


def test_credentials_built_once_and_key_kept_in_one_place(pki: Pki, tmp_path: Path) -> None:
    state = tmp_path / "state"
    enrolled_state(pki, state, "host-a")
    creds = ensure_credentials(state)
    assert creds == state / "credentials.pem"
    assert not (state / "sensor.key").exists()
    assert creds.stat().st_mode & 0o777 == 0o600
    data = creds.read_bytes()
    assert b"PRIVATE KEY" in data and b"CERTIFICATE" in data
    assert ensure_credentials(state) == creds  # idempotent


def test_missing_identity_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(UplinkError, match="run `edr-sensor enroll`"):
        ensure_credentials(tmp_path)


def stored_events(hooks: SqliteHooks) -> list[dict]:
    rows = hooks._db.execute("SELECT body FROM events").fetchall()
    return [msgpack.unpackb(row[0]) for row in rows]


def start_sensor(state: Path, endpoint: str) -> subprocess.Popen[str]:
    """Start the sensor and return once it captures (its log line says so)."""
    port = endpoint.rsplit(":", 1)[1]
    proc = subprocess.Popen(
        fallback_sensor("--state-dir", str(state), "--controller", f"localhost:{port}"),
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stderr is not None
    seen = []
    for line in proc.stderr:  # ends if the sensor exits; the test timeout bounds a hang
        seen.append(line)
        if "capturing " in line:
            return proc
    raise AssertionError(f"sensor did not start: {''.join(seen)}")


def run_marked(tag: str) -> None:
    subprocess.run([sys.executable, "-c", "import time; time.sleep(0.6)", tag], check=True)


def execs_with(hooks: SqliteHooks, tag: str) -> list[dict]:
    return [
        e
        for e in stored_events(hooks)
        if e["event"]["action"] == "exec" and tag in e.get("process", {}).get("args", [])
    ]


@pytest.mark.root
def test_sensor_streams_to_controller_and_survives_kill_9(
    pki: Pki, hooks: SqliteHooks, tmp_path: Path
) -> None:
    server = ServerThread(pki.server_config(heartbeat_timeout=5.0), hooks)
    state = tmp_path / "state"
    host_id = f"host-{uuid.uuid4().hex[:8]}"
    enrolled_state(pki, state, host_id)
    sensor = start_sensor(state, server.endpoint)
    try:
        tag = f"edr-uplink-{uuid.uuid4().hex[:8]}"
        run_marked(tag)
        wait_for(lambda: execs_with(hooks, tag), 20, "the exec event at the controller")
        (ev,) = execs_with(hooks, tag)
        assert ev["host"]["id"] == host_id
        (stored_host,) = hooks._db.execute("SELECT host FROM batches LIMIT 1").fetchone()
        assert stored_host == host_id  # from the certificate, as the server saw it
        wait_for(
            lambda: (
                hooks._db.execute(
                    "SELECT heartbeats FROM hosts WHERE host=?", (host_id,)
                ).fetchone()
                is not None
            ),
            20,
            "the host registered by its hello",
        )
    finally:
        sensor.send_signal(signal.SIGINT)
        rc = sensor.wait(20)
        assert rc == 0, sensor.stderr.read() if sensor.stderr else rc

    # Controller away: events pile up in the outbox; the sensor is killed with -9.
    server.close()
    sensor = start_sensor(state, server.endpoint)
    tag2 = f"edr-uplink-{uuid.uuid4().hex[:8]}"
    time.sleep(1.5)  # started and polling
    run_marked(tag2)

    def sealed_batches() -> int:
        try:
            db = sqlite3.connect(f"file:{state / 'outbox.db'}?mode=ro", uri=True)
            try:
                return int(db.execute("SELECT COUNT(*) FROM batches").fetchone()[0])
            finally:
                db.close()
        except sqlite3.Error:
            return 0

    wait_for(lambda: sealed_batches() > 0, 15, "events sealed in the outbox")
    time.sleep(0.5)
    os.kill(sensor.pid, signal.SIGKILL)
    sensor.wait(10)

    # Controller back on the same endpoint, sensor restarted: the outbox is delivered.
    restarted = ServerThread(pki.server_config(server.endpoint, heartbeat_timeout=5.0), hooks)
    sensor = start_sensor(state, restarted.endpoint)
    try:
        wait_for(lambda: execs_with(hooks, tag2), 30, "the event captured while disconnected")
        assert len(execs_with(hooks, tag2)) == 1  # exactly once in the store
        assert len(execs_with(hooks, tag)) == 1
    finally:
        sensor.send_signal(signal.SIGINT)
        sensor.wait(20)
        restarted.close()
    stats_line = [
        line
        for line in (sensor.stderr.read() if sensor.stderr else "").splitlines()
        if line.startswith("edr-sensor stats:")
    ]
    assert stats_line and json.loads(stats_line[-1].split(":", 1)[1])["uplink"]["connects"] >= 1

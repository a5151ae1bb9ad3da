"""kill -9 of the controller or the sensor while events stream: nothing lost, nothing twice."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from bp_harness import Pki, wait_for
from bp_sqlite_hooks import SqliteHooks

HARNESS = str(Path(__file__).parent / "bp_harness.py")
pytestmark = pytest.mark.timeout(120)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def spawn(args: list[str], log: Path, prefix: list[str] | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [*(prefix or []), sys.executable, HARNESS, *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=log.open("a"),
        text=True,
        cwd=Path(__file__).parents[2],
    )


def read_json(proc: subprocess.Popen[str], key: str, timeout: float = 20) -> dict:
    deadline = time.monotonic() + timeout
    assert proc.stdout is not None
    os.set_blocking(proc.stdout.fileno(), True)
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            raise AssertionError(f"process exited before printing {key}")
        obj = json.loads(line)
        if key in obj:
            return obj
    raise AssertionError(f"timed out waiting for {key}")


def harness_sensor(pki: Pki, outbox: Path, endpoint: str, host: str, *args: str) -> list[str]:
    """bp_harness.py's ``sensor`` command: its identity, outbox and controller, then ``args``."""
    return [
        *("sensor", "--pki", str(pki.dir), "--outbox", str(outbox)),
        *("--endpoint", endpoint, "--host", host),
        *args,
    ]


def kill9(proc: subprocess.Popen[str]) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait(5)


def count(db: Path, sql: str) -> int:
    h = SqliteHooks(db)
    try:
        return int(h.query(sql)[0][0])
    finally:
        h.close()


@pytest.fixture
def procs():
    started: list[subprocess.Popen[str]] = []
    yield started
    for p in started:
        if p.poll() is None:
            p.kill()
            p.wait(5)


def test_controller_kill9_loses_nothing(tmp_path: Path, pki: Pki, procs: list) -> None:
    host = "c0ffee0000000001"
    pki.client(host)
    db, log = tmp_path / "store.db", tmp_path / "log.txt"
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    ctrl = ["controller", "--pki", str(pki.dir), "--db", str(db), "--endpoint", endpoint]
    c = spawn(ctrl, log)
    procs.append(c)
    read_json(c, "endpoint")
    total = 100_000
    sensor = harness_sensor(
        pki, tmp_path / "ob.db", endpoint, host, "--events", str(total), "--exit-when-empty"
    )
    s = spawn(sensor, log)
    procs.append(s)
    read_json(s, "started", timeout=60)
    # Kill the controller twice mid-stream.
    for _ in range(2):
        wait_for(
            lambda: db.exists() and count(db, "SELECT COUNT(*) FROM events") > 0,
            30,
            "events arriving",
        )
        time.sleep(0.3)
        kill9(c)
        c = spawn(ctrl, log)
        procs.append(c)
        read_json(c, "endpoint")
    read_json(s, "empty", timeout=90)
    assert count(db, "SELECT COUNT(*) FROM events") == total
    assert count(db, "SELECT COUNT(*) FROM (SELECT DISTINCT seq, idx FROM events)") == total
    # Each event carries its number: all present exactly once.
    h = SqliteHooks(db)
    try:
        import msgpack

        ns = sorted(msgpack.unpackb(b)["n"] for (b,) in h.query("SELECT body FROM events"))
    finally:
        h.close()
    assert ns == list(range(total))


def test_sensor_kill9_outbox_delivered_after_restart(tmp_path: Path, pki: Pki, procs: list) -> None:
    host = "c0ffee0000000002"
    pki.client(host)
    db, log = tmp_path / "store.db", tmp_path / "log.txt"
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    total = 20_000
    sensor = harness_sensor(
        pki, tmp_path / "ob.db", endpoint, host, "--events", str(total), "--exit-when-empty"
    )
    # The sensor writes its outbox while the controller is down, then dies.
    s = spawn(sensor, log)
    procs.append(s)
    read_json(s, "started", timeout=60)
    kill9(s)
    c = spawn(["controller", "--pki", str(pki.dir), "--db", str(db), "--endpoint", endpoint], log)
    procs.append(c)
    read_json(c, "endpoint")
    s = spawn(sensor, log)
    procs.append(s)
    # Kill it again mid-delivery, then let it finish.
    wait_for(
        lambda: db.exists() and count(db, "SELECT COUNT(*) FROM events") > 0, 30, "events arriving"
    )
    kill9(s)
    s = spawn(sensor, log)
    procs.append(s)
    read_json(s, "empty", timeout=60)
    assert count(db, "SELECT COUNT(*) FROM events") == total
    assert count(db, "SELECT COUNT(DISTINCT host || seq || ':' || idx) FROM events") == total

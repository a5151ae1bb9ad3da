"""A network partition between sensor and controller, inside namespaces the test creates.

Two network namespaces joined by a veth pair with a private /30 that exists only inside them.
Setting the sensor's link down cuts the path; events appended and a command queued during the
partition arrive afterwards, and every event is stored exactly once. The partition lasts
``EDR_PARTITION_SECONDS`` (default 60 s, as the acceptance criteria ask; lower it locally).
"""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
import time
from pathlib import Path

import pytest
from bp_harness import Pki, wait_for
from test_crash import count, harness_sensor, read_json, spawn

PARTITION = float(os.environ.get("EDR_PARTITION_SECONDS", "60"))
pytestmark = [pytest.mark.root, pytest.mark.timeout(120 + PARTITION)]


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=10)


@pytest.fixture
def netns():
    tag = secrets.token_hex(3)
    ctrl, sens = f"edrc-{tag}", f"edrs-{tag}"
    try:
        ip("netns", "add", ctrl)
        ip("netns", "add", sens)
    except (subprocess.CalledProcessError, FileNotFoundError) as exc:
        pytest.skip(f"cannot create network namespaces here: {exc}")
    try:
        ip(
            "link",
            "add",
            f"vc{tag}",
            "netns",
            ctrl,
            "type",
            "veth",
            "peer",
            "name",
            f"vs{tag}",
            "netns",
            sens,
        )
        ip("-n", ctrl, "addr", "add", "10.77.0.1/30", "dev", f"vc{tag}")
        ip("-n", sens, "addr", "add", "10.77.0.2/30", "dev", f"vs{tag}")
        for ns, dev in ((ctrl, f"vc{tag}"), (sens, f"vs{tag}")):
            ip("-n", ns, "link", "set", dev, "up")
            ip("-n", ns, "link", "set", "lo", "up")
        yield ctrl, sens, f"vs{tag}"
    finally:
        for ns in (ctrl, sens):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=10)


def test_partition_loses_nothing_and_command_arrives(
    tmp_path: Path, pki: Pki, netns: tuple[str, str, str]
) -> None:
    ctrl_ns, sens_ns, sens_dev = netns
    host = "ba5eba11c0ffee00"
    pki.client(host)
    db, log = tmp_path / "store.db", tmp_path / "log.txt"
    endpoint = "tcp://10.77.0.1:5555"
    started = []
    try:
        c = spawn(
            [
                "controller",
                "--pki",
                str(pki.dir),
                "--db",
                str(db),
                "--endpoint",
                endpoint,
                "--heartbeat-timeout",
                "3",
            ],
            log,
            prefix=["ip", "netns", "exec", ctrl_ns],
        )
        started.append(c)
        read_json(c, "endpoint")
        first = 5000
        s = spawn(
            harness_sensor(
                pki,
                tmp_path / "ob.db",
                endpoint,
                host,
                "--server-name",
                "10.77.0.1",
                "--events",
                str(first),
                "--dead-after",
                "3",
            ),
            log,
            prefix=["ip", "netns", "exec", sens_ns],
        )
        started.append(s)
        read_json(s, "started", timeout=30)
        wait_for(
            lambda: db.exists() and count(db, "SELECT COUNT(*) FROM events") == first,
            30,
            "events before the partition",
        )
        ip("-n", sens_ns, "link", "set", sens_dev, "down")
        t0 = time.monotonic()
        # During the partition: more events into the sensor's outbox, a command queued.
        extra = 3000
        sys.path.insert(0, str(Path(__file__).parent))
        from backplane.outbox import Outbox

        ob = Outbox(tmp_path / "ob.db", batch_events=500)
        ob.append({"n": first + i, "during": "partition"} for i in range(extra))
        ob.close()
        assert c.stdin is not None
        c.stdin.write(f"cmd {host} cmd-during-partition isolate\n")
        c.stdin.flush()
        time.sleep(max(0.0, PARTITION - (time.monotonic() - t0)))
        assert count(db, "SELECT COUNT(*) FROM events") == first
        ip("-n", sens_ns, "link", "set", sens_dev, "up")
        got = read_json(s, "command", timeout=60)
        assert got == {"command": "cmd-during-partition", "action": "isolate"}
        wait_for(
            lambda: count(db, "SELECT COUNT(*) FROM events") == first + extra,
            60,
            "events after the partition",
        )
        assert count(db, "SELECT COUNT(DISTINCT seq || ':' || idx) FROM events") == first + extra
        wait_for(
            lambda: count(db, "SELECT COUNT(*) FROM commands WHERE status='ok'") == 1,
            30,
            "command result",
        )
    finally:
        for p in started:
            p.kill()
            p.wait(5)
    print(f"partition of {PARTITION} s: {first + extra} events stored once", file=sys.stderr)

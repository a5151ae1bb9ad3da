"""Browser-test harness: a real controller (``create_app`` over HTTPS on 127.0.0.1, backplane
on the same loop) with real users, and the real sensor (``python -m sensor.cli run
--controller``, fallback tier) enrolled offline and streaming to it.

Also runnable as a script to get a console to look at by hand::

    .venv/bin/python tests/browser/browser_harness.py /tmp/edr-dev
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

from argon2 import PasswordHasher

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:  # when run as a script
    sys.path.insert(0, str(REPO))

sys.path.insert(0, str(REPO / "tests" / "controller_core"))  # the shared controller harness

import core_harness  # noqa: E402
from core_harness import wait_for  # noqa: E402

from controller.config import ControllerConfig  # noqa: E402
from controller.maintenance import Intervals  # noqa: E402
from tests.sensor_cmd import fallback_sensor  # noqa: E402

# Cheap argon2 parameters: verification reads them from the hash, so logins stay real.
FAST_HASHER = PasswordHasher(time_cost=1, memory_cost=1024, parallelism=1)
PASSWORD = "correct horse battery staple"  # noqa: S105 -- test users only
USERS = {"ada": "admin", "rex": "responder", "val": "viewer"}

# A rule the tests trigger on purpose: any exec whose command line carries this marker.
RULE_MARKER = "edr-browser-alert-marker"
TEST_RULE = f"""\
title: Browser Test Marker Executed
id: 6f0c1d3e-5b7a-4e21-9c1d-0b5e2f7a9d11
status: test
description: Fires when a process runs with the browser test's marker in its command line.
logsource:
  product: linux
  category: process_creation
detection:
  selection:
    CommandLine|contains: '{RULE_MARKER}'
  condition: selection
level: high
"""


class Controller(core_harness.Controller):
    """The core harness's controller with the browser tests' users and test rule.

    Args:
        state: directory for the controller's state and the test rule.
        backplane_host: the address the backplane binds (a free port is picked).
        netns: run the loop thread in this network namespace, so the backplane listens there
            while the console's HTTPS socket stays on the machine's loopback where the browser is.
    """

    def __init__(
        self, state: Path, backplane_host: str = "127.0.0.1", netns: str | None = None
    ) -> None:
        rules = state / "rules"
        rules.mkdir(parents=True, exist_ok=True)
        (rules / "browser_test_marker.yml").write_text(TEST_RULE)
        self.backplane_host = backplane_host
        config = ControllerConfig(
            state_dir=state / "controller",
            backplane=f"tcp://{backplane_host}:0",
            http_host="127.0.0.1",
            http_port=0,
            server_names=tuple(dict.fromkeys(("localhost", "127.0.0.1", backplane_host))),
            rule_dirs=(rules,),
        )
        super().__init__(
            config,
            netns=netns,
            intervals=Intervals(index_idle=0.2, checkpoint=1, commands=0.2, retention=5, crl=1),
        )
        for name, role in USERS.items():
            self.ctx.store.create_user(name, FAST_HASHER.hash(PASSWORD), role)

    @property
    def backplane_port(self) -> int:
        return int(str(self.ctx.backplane_endpoint).rsplit(":", 1)[1])

    @property
    def backplane_address(self) -> str:
        """What a sensor's ``--controller`` names (the certificate carries the name)."""
        host = "localhost" if self.backplane_host == "127.0.0.1" else self.backplane_host
        return f"{host}:{self.backplane_port}"


class SensorProcess:
    """The real sensor, enrolled offline (what ``edr-certs issue`` leaves), in the fallback tier."""

    def __init__(
        self, ctl: Controller, state: Path, hostname: str = "browser-host", netns: str | None = None
    ) -> None:
        self.host_id, cert, key = ctl.pki.issue_offline(hostname)
        state.mkdir(mode=0o700, parents=True, exist_ok=True)
        key_path = state / "sensor.key"
        key_path.touch(mode=0o600)
        key_path.write_bytes(key)
        (state / "sensor.pem").write_bytes(cert)
        (state / "ca.pem").write_bytes(ctl.pki.ca_path.read_bytes())
        (state / "host_id").write_text(self.host_id + "\n")
        self.log = state / "sensor.log"
        # `ip netns exec` execs the sensor itself, so the pid (and SIGINT) are the sensor's.
        prefix = ["ip", "netns", "exec", netns] if netns else []
        with self.log.open("w") as log:
            self.proc = subprocess.Popen(
                [
                    *prefix,
                    *fallback_sensor(
                        "--state-dir",
                        str(state),
                        "--stats-interval",
                        "0",
                        "--controller",
                        ctl.backplane_address,
                    ),
                ],
                cwd=REPO,
                stdout=subprocess.DEVNULL,
                stderr=log,
            )
        wait_for(
            lambda: "capturing " in self.log.read_text() or self.proc.poll() is not None,
            30,
            "the sensor to start capturing",
        )
        if self.proc.poll() is not None:
            raise AssertionError(f"sensor exited: {self.log.read_text()}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


def main() -> None:  # pragma: no cover - manual use
    state = Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/edr-browser-dev")
    state.mkdir(parents=True, exist_ok=True)
    ctl = Controller(state)
    sensor = SensorProcess(ctl, state / "sensor")
    print(
        f"console: {ctl.url}  users {', '.join(USERS)} / {PASSWORD!r}  host {sensor.host_id}",
        flush=True,
    )
    (state / "url").write_text(ctl.url)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        while not stop.wait(1):
            pass
    except KeyboardInterrupt:
        pass
    finally:
        sensor.stop()
        ctl.close()
        os._exit(0)


if __name__ == "__main__":
    main()

"""A real controller (``create_app`` over HTTPS, mTLS backplane) and real sensor processes
(``edr-sensor run --mode fallback --controller ...``) with identities issued offline into
their state directories."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

# One copy of the HTTPS/websocket harness: the controller core tests own it.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "controller_core"))

from core_harness import Controller, make_config

from tests.sensor_cmd import fallback_sensor

REPO = Path(__file__).resolve().parents[2]
CANARY = "edr-e2e-canary"
RULE_ID = "7d1c3a52-6f0e-4c59-9d55-0c2f3b8e6a11"
RULE = textwrap.dedent(f"""\
    title: E2E Canary Command Line
    id: {RULE_ID}
    level: high
    logsource: {{product: linux, category: process_creation}}
    detection:
      sel: {{CommandLine|contains: '{CANARY}'}}
      condition: sel
""")


@pytest.fixture
def controller(tmp_path: Path) -> Iterator[Controller]:
    rules = tmp_path / "rules"
    rules.mkdir()
    (rules / "canary.yml").write_text(RULE)
    ctl = Controller(make_config(tmp_path, rule_dirs=(rules,)))
    try:
        yield ctl
    finally:
        ctl.close()


class RealSensor:
    """``python -m sensor.cli run`` as a child process, enrolled offline."""

    def __init__(self, ctl: Controller, state: Path, hostname: str) -> None:
        self.ctl = ctl
        self.state = state
        self.host_id, cert, key = ctl.pki.issue_offline(hostname)
        state.mkdir(mode=0o700, parents=True, exist_ok=True)
        (state / "sensor.key").write_bytes(key)
        (state / "sensor.key").chmod(0o600)
        (state / "sensor.pem").write_bytes(cert)
        (state / "ca.pem").write_bytes(ctl.pki.ca_path.read_bytes())
        (state / "host_id").write_text(self.host_id + "\n")
        self.proc: subprocess.Popen[str] | None = None
        self.log: list[str] = []

    def start(self) -> RealSensor:
        port = self.ctl.backplane_endpoint.rsplit(":", 1)[1]
        self.proc = subprocess.Popen(
            fallback_sensor("--state-dir", str(self.state), "--controller", f"localhost:{port}"),
            cwd=REPO,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stderr is not None
        for line in self.proc.stderr:  # ends if the sensor exits; the test timeout bounds it
            self.log.append(line)
            if "capturing " in line:
                # Keep draining stderr so the sensor never blocks on a full pipe.
                threading.Thread(target=self._drain, daemon=True).start()
                return self
        raise AssertionError(f"sensor did not start: {''.join(self.log)}")

    def _drain(self) -> None:
        assert self.proc is not None and self.proc.stderr is not None
        for line in self.proc.stderr:
            self.log.append(line)

    def stop(self) -> None:
        if self.proc is None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=5)
        self.proc = None


@pytest.fixture
def real_sensor(controller: Controller, tmp_path: Path) -> Iterator[Callable[..., RealSensor]]:
    made: list[RealSensor] = []

    def make(hostname: str = "e2e-sensor") -> RealSensor:
        s = RealSensor(controller, tmp_path / f"sensor-{len(made)}", hostname)
        made.append(s)
        return s

    yield make
    for s in made:
        s.stop()

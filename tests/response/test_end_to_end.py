"""A command through the real mutual-TLS backplane reaches the real sensor; the result returns.

Also the local policy: with a hold pattern in the saved policy, a matching exec is stopped by
the sensor on its own and reported with the policy version and the exec → SIGSTOP latency.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests" / "backplane"))

from bp_harness import Pki, ServerThread, wait_for  # noqa: E402
from bp_sqlite_hooks import SqliteHooks  # noqa: E402

from sensor.process_table import ProcessTable  # noqa: E402
from sensor.response.process import read_stat  # noqa: E402

pytestmark = [pytest.mark.root, pytest.mark.timeout(120)]
# fallback by default (runs anywhere); EDR_TEST_MODE=tracepoint measures the BPF tier
MODE = os.environ.get("EDR_TEST_MODE", "fallback")


def start_sensor(state: Path, *extra: str) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "sensor.cli", "run", "--mode", MODE, "--families",
         "process", "--state-dir", str(state), *extra],
        cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert proc.stderr is not None
    seen = []
    for line in proc.stderr:
        seen.append(line)
        if "capturing " in line:
            return proc
    raise AssertionError(f"sensor did not start: {''.join(seen)}")


def stop_sensor(proc: subprocess.Popen[str]) -> None:
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


def test_command_over_backplane_reaches_sensor_and_result_returns(tmp_path: Path) -> None:
    pki = Pki(tmp_path / "pki")
    hooks = SqliteHooks(tmp_path / "store.db", pki.ca)
    server = ServerThread(pki.server_config(heartbeat_timeout=5.0), hooks)
    state = tmp_path / "state"
    host_id = f"host-{uuid.uuid4().hex[:8]}"
    cert, key = pki.ca.issue_client(host_id)
    state.mkdir(mode=0o700)
    (state / "sensor.key").write_bytes(key)
    (state / "sensor.key").chmod(0o600)
    (state / "sensor.pem").write_bytes(cert)
    (state / "ca.pem").write_bytes(pki.ca.cert_pem)
    (state / "host_id").write_text(host_id + "\n")
    victim = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    sensor = None
    try:
        port = server.endpoint.rsplit(":", 1)[1]
        sensor = start_sensor(state, "--controller", f"localhost:{port}")
        st = read_stat(victim.pid)
        assert st is not None
        entity = ProcessTable(host_id).entity_id(victim.pid, st.start_ticks)
        hooks.queue_command(host_id, "cmd-stale", "kill", {"pid": victim.pid, "entity_id": "x"})
        hooks.queue_command(host_id, "cmd-1", "kill", {"pid": victim.pid, "entity_id": entity})
        server.run(lambda: server.server.notify_command(host_id))

        def results() -> dict[str, tuple[str, dict]]:
            rows = hooks.query("SELECT id, status, output FROM commands WHERE status IS NOT NULL")
            return {r[0]: (r[1], json.loads(r[2])) for r in rows}

        wait_for(lambda: len(results()) == 2, 30, "both command results at the controller")
        got = results()
        assert got["cmd-stale"][0] == "refused"
        assert "another process" in got["cmd-stale"][1]["error"]
        assert got["cmd-1"][0] == "ok", got
        assert got["cmd-1"][1]["signal"] == "SIGKILL"
        assert victim.wait(5) == -signal.SIGKILL
    finally:
        if sensor is not None:
            stop_sensor(sensor)
        if victim.poll() is None:
            victim.kill()
        victim.wait(5)
        server.close()
        hooks.close()


def test_policy_holds_suspicious_exec_and_reports_it(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    tag = f"edr-hold-{uuid.uuid4().hex[:8]}"
    document = {
        "allow": {"command_lines": [f"*{tag}-safe*"]},
        "responses": {"hold_suspicious_exec": {"enabled": True, "patterns": [f"*{tag}*"]}},
    }
    (state / "policy.json").write_text(json.dumps({"version": 7, "document": document}))
    out = tmp_path / "events.ndjson"
    sensor = start_sensor(state, "--output", str(out))
    procs: list[subprocess.Popen[bytes]] = []
    try:
        time.sleep(0.5)
        for i in range(5):
            procs.append(subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)",
                                           f"{tag}-{i}"]))  # fmt: skip
        safe = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)",
                                 f"{tag}-safe"])  # fmt: skip
        procs.append(safe)

        def holds() -> list[dict]:
            if not out.exists():
                return []
            text = out.read_text()
            text = text[: text.rfind("\n") + 1]  # a last line still being written is skipped
            evs = [json.loads(line) for line in text.splitlines() if line]
            return [e for e in evs if e["event"]["action"] == "hold"]

        wait_for(lambda: len(holds()) >= 5, 20, "five hold events")
        for proc in procs[:5]:
            st = read_stat(proc.pid)
            assert st is not None and st.state == "T", f"{proc.pid} not held: {st}"
        time.sleep(0.5)
        assert read_stat(safe.pid).state != "T"  # allow-listed
        reported = holds()
        assert len(reported) == 5
        latencies = []
        for ev in reported:
            assert ev["event"]["outcome"] == "success"
            assert ev["edr"]["response"]["policy_version"] == 7
            assert ev["rule"] == {"ruleset": "policy", "version": "7"}
            latencies.append(ev["edr"]["response"]["latency_ms"])
        print(f"hold latency exec->SIGSTOP ({MODE} tier) ms: {sorted(latencies)}")
    finally:
        stop_sensor(sensor)
        for proc in procs:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(5)

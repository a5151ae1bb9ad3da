"""The issue's end-to-end cases with a real sensor process over the real backplane:
exec → stored event → rule → alert → websocket; a command queued while the sensor is
offline runs once it connects and its result is stored; a policy change reaches the sensor
and the version it applied is acknowledged."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "controller_core"))

from core_harness import Controller, Stream, wait_for

from controller.store import CommandStatus

pytestmark = [pytest.mark.root, pytest.mark.timeout(120)]

CANARY = "edr-e2e-canary"
RULE_ID = "7d1c3a52-6f0e-4c59-9d55-0c2f3b8e6a11"


def api(
    ctl: Controller,
    method: str,
    path: str,
    token: str,
    body: Any = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, Any]:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(ctl.url + path, data=data, method=method)  # noqa: S310
    req.add_header("Authorization", f"Bearer {token}")
    if data is not None:
        req.add_header("Content-Type", "application/json")
    for k, v in (headers or {}).items():
        req.add_header(k, v)
    ctx = ctl.ssl_context()
    ctx.check_hostname = False  # the certificate names localhost; we dial 127.0.0.1
    try:
        with urllib.request.urlopen(req, context=ctx, timeout=15) as resp:  # noqa: S310
            return resp.status, json.loads(resp.read() or b"null")
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"null")


def canary_exec(tag: str) -> None:
    """A real exec on the host whose command line carries the canary and a unique tag."""
    subprocess.run(
        [sys.executable, "-c", "import time; time.sleep(0.6)", CANARY, tag], check=True, timeout=10
    )


def test_exec_on_host_is_stored_alerted_and_streamed(
    controller: Controller, real_sensor: Any
) -> None:
    sensor = real_sensor().start()
    store = controller.ctx.store
    wait_for(
        lambda: any(h.host_id == sensor.host_id and h.online for h in store.list_hosts()),
        20,
        "sensor registered",
    )
    stream = Stream(
        controller, controller.api_token("viewer"), f"?kind=alert&host={sensor.host_id}"
    )
    try:
        tag = f"t-{uuid.uuid4().hex[:10]}"
        canary_exec(tag)
        msg = stream.next(
            lambda m: m["kind"] == "alert" and tag in m["data"]["event"]["process"].get("args", []),
            timeout=30,
        )
        alert = msg["data"]
        assert alert["rule_id"] == RULE_ID and alert["severity"] == "high"
        assert alert["host_id"] == sensor.host_id  # from the certificate
        stored = store.get_event(alert["event_id"])
        assert stored.host_id == sensor.host_id
        assert stored.event["event"]["action"] == "exec"
        assert tag in stored.event["process"]["args"]
        assert stored.event["process"]["executable"] == os.path.realpath(sys.executable)
        # The alert carries the process ancestry the sensor reported (this test's process).
        assert alert["ancestry"], alert
        # Stored and searchable through the API as well.
        status, body = api(
            controller, "GET", f"/api/v1/alerts/{alert['id']}", controller.api_token("viewer")
        )
        assert status == 200 and body["event_id"] == alert["event_id"]
    finally:
        stream.close()


def test_command_queued_offline_runs_after_connect(
    controller: Controller, real_sensor: Any
) -> None:
    sensor = real_sensor()
    store = controller.ctx.store
    sensor.start()  # registers the host, then goes offline
    wait_for(
        lambda: any(h.host_id == sensor.host_id for h in store.list_hosts()), 20, "host registered"
    )
    sensor.stop()  # the process is gone: its TLS session with it
    # Until the backplane has seen the session end, a new command would be sent to it.
    wait_for(lambda: controller.ctx.metrics.disconnects >= 1, 30, "backplane saw the sensor go")

    victim = subprocess.Popen(["sleep", "60"])
    try:
        token = controller.api_token("responder")
        status, cmd = api(
            controller,
            "POST",
            f"/api/v1/hosts/{sensor.host_id}/commands",
            token,
            {"action": "kill", "args": {"pid": victim.pid}},
            {"Idempotency-Key": f"e2e-{uuid.uuid4().hex}"},
        )
        assert status == 201, cmd
        assert cmd["status"] == "queued"
        time.sleep(0.5)
        assert store.get_command(cmd["id"]).status == CommandStatus.QUEUED  # nobody to send to

        sensor.start()
        final = wait_for(
            lambda: (
                (c := store.get_command(cmd["id"])).status
                in (CommandStatus.SUCCEEDED, CommandStatus.FAILED)
                and c
            ),
            30,
            "command result",
        )
        output = final.output
        # The sensor (root, with sensor/response) ran a real kill of the victim process.
        assert final.status == CommandStatus.SUCCEEDED, output
        assert output is not None and output["status"] == "ok", output
        assert output["pid"] == victim.pid and output["action"] == "kill", output
        assert victim.wait(timeout=10) == -9
        status, history = api(controller, "GET", f"/api/v1/hosts/{sensor.host_id}/commands", token)
        assert status == 200
        assert cmd["id"] in [c["id"] for c in history["commands"]]
    finally:
        if victim.poll() is None:
            victim.kill()
        victim.wait(timeout=5)


def test_policy_change_reaches_sensor_and_is_acknowledged(
    controller: Controller, real_sensor: Any
) -> None:
    sensor = real_sensor().start()
    store = controller.ctx.store
    wait_for(
        lambda: any(h.host_id == sensor.host_id and h.online for h in store.list_hosts()),
        20,
        "sensor registered",
    )
    admin = controller.api_token("admin")
    marker = f"/opt/e2e-{uuid.uuid4().hex[:8]}/payload"
    status, version = api(
        controller,
        "PUT",
        "/api/v1/policy",
        admin,
        {"document": {"deny": {"executables": [marker]}}, "comment": "e2e"},
    )
    assert status == 201, version
    v = version["version"]

    def applied() -> Any:
        st, body = api(controller, "GET", f"/api/v1/hosts/{sensor.host_id}/policy", admin)
        return st == 200 and body["policy_version"] == v and body

    body = wait_for(applied, 30, "policy version acknowledged")
    assert body["current"] is True
    saved = json.loads((sensor.state / "policy.json").read_text())
    assert saved["version"] == v
    assert marker in saved["document"]["deny"]["executables"]

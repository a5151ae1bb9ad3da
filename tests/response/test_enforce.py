"""The Enforcer on real files and processes: denied hash quarantined, holds, allow-list, policy."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import pytest

from backplane.schema import Action, Tier, new_event
from sensor.enforce import Enforcer
from sensor.response import Responder
from sensor.response.process import read_stat, wait_state

pytestmark = pytest.mark.timeout(30)
HOST = {"id": "test-host", "name": "test"}


def file_event(path: Path) -> dict:
    ev = new_event(Action.FILE_CREATE, host=HOST, tier=Tier.FALLBACK)
    ev["file"] = {"path": str(path)}
    return ev


def policy(deny: list[str], quarantine: bool = True) -> dict:
    return {"deny": {"hashes": deny}, "responses": {"quarantine_on_denied_hash": quarantine}}


def test_denied_hash_is_quarantined_and_reported(responder: Responder, tmp_path: Path) -> None:
    bad = tmp_path / "roots" / "bad.bin"
    bad.write_bytes(b"evil payload")
    good = tmp_path / "roots" / "good.bin"
    good.write_bytes(b"fine")
    digest = hashlib.sha256(b"evil payload").hexdigest()
    enforcer = Enforcer(responder, HOST, (3, policy([digest.upper()])))
    assert enforcer.inspect(file_event(good)) == [] and good.exists()
    (report,) = enforcer.inspect(file_event(bad))
    assert not bad.exists()
    assert report["event"]["action"] == "quarantine" and report["event"]["outcome"] == "success"
    assert report["edr"]["response"]["policy_version"] == 3
    assert report["file"]["hash"]["sha256"] == digest
    assert [e["path"] for e in responder.files.entries()] == [str(bad)]


def test_denied_hash_off_or_outside_roots(responder: Responder, tmp_path: Path) -> None:
    bad = tmp_path / "roots" / "bad.bin"
    bad.write_bytes(b"evil")
    digest = hashlib.sha256(b"evil").hexdigest()
    assert Enforcer(responder, HOST, (1, policy([digest], False))).inspect(file_event(bad)) == []
    assert bad.exists()
    outside = tmp_path / "bad.bin"
    outside.write_bytes(b"evil")
    (report,) = Enforcer(responder, HOST, (1, policy([digest]))).inspect(file_event(outside))
    assert report["event"]["outcome"] == "failure"
    assert "outside" in report["edr"]["response"]["error"]
    assert outside.exists()


def exec_event(proc: subprocess.Popen[bytes], table, args: list[str]) -> dict:
    ev = new_event(Action.EXEC, host=HOST, tier=Tier.FALLBACK)
    st = read_stat(proc.pid)
    ev["process"] = {"pid": proc.pid, "entity_id": table.entity_id(proc.pid, st.start_ticks),
                     "executable": sys.executable, "command_line": " ".join(args)}  # fmt: skip
    return ev


def test_hold_and_mark_safe(responder: Responder, table, spawn) -> None:
    doc = {"responses": {"hold_suspicious_exec": {"enabled": True, "patterns": ["*miner*"]}}}
    enforcer = Enforcer(responder, HOST, (5, doc))
    proc = spawn()
    (report,) = enforcer.inspect(exec_event(proc, table, ["xmrig-miner", "--pool"]))
    assert report["event"]["action"] == "hold" and report["edr"]["response"]["rule"] == "*miner*"
    assert report["edr"]["response"]["policy_version"] == 5
    assert wait_state(proc.pid, "T", 2) == "T"
    other = spawn()
    assert enforcer.inspect(exec_event(other, table, ["python", "job"])) == []
    # Mark safe: the analyst allow-lists the command line; version 6 stops the holds.
    doc["allow"] = {"command_lines": ["xmrig-miner *"]}
    enforcer.set_policy(6, doc)
    third = spawn()
    assert enforcer.inspect(exec_event(third, table, ["xmrig-miner", "--pool"])) == []
    assert read_stat(third.pid).state != "T"


def test_hold_refuses_protected_and_reports_failure(responder: Responder) -> None:
    doc = {"responses": {"hold_suspicious_exec": {"enabled": True, "patterns": ["*"]}}}
    ev = new_event(Action.EXEC, host=HOST, tier=Tier.FALLBACK)
    ev["process"] = {"pid": 1, "executable": "/sbin/init", "command_line": "/sbin/init"}
    (report,) = Enforcer(responder, HOST, (1, doc)).inspect(ev)
    assert report["event"]["outcome"] == "failure" and "pid 1" in report["edr"]["response"]["error"]


def test_the_actions_named_follow_the_policy(responder: Responder) -> None:
    enforcer = Enforcer(responder, HOST)
    assert enforcer.actions == frozenset()  # no policy: the pipeline calls nothing
    hold = {"hold_suspicious_exec": {"enabled": True, "patterns": ["*miner*"]}}
    enforcer.set_policy(2, {"responses": hold})
    assert enforcer.actions == {Action.EXEC}
    enforcer.set_policy(3, policy(["ab" * 32]))
    assert enforcer.actions == {Action.FILE_CREATE, Action.FILE_WRITE}
    enforcer.set_policy(4, policy(["ab" * 32], quarantine=False))
    assert enforcer.actions == frozenset()
    enforcer.set_policy(5, {"responses": {"hold_suspicious_exec": {"enabled": True}}})
    assert enforcer.actions == frozenset()  # enabled without patterns holds nothing

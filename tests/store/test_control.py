"""Hosts, commands, policy, alerts, users, tokens and the audit log."""

from __future__ import annotations

import sqlite3

import pytest

from controller.store import (
    AlertStatus,
    CommandStatus,
    Conflict,
    HostHello,
    InvalidInput,
    InvalidTransition,
    NotFound,
    Role,
    Severity,
    SQLiteStore,
    Store,
)

HELLO = HostHello("alpha", "Debian 12", "6.18.0", "0.1.0", {"process": "tracepoint"})


def test_sqlite_store_satisfies_the_protocol(store: SQLiteStore) -> None:
    assert isinstance(store, Store)


# -- hosts --------------------------------------------------------------------------------


def test_host_upsert_heartbeat_online(store: SQLiteStore, clock, t0: float) -> None:
    h = store.upsert_host("host-a", HELLO)
    assert (h.hostname, h.tiers, h.online, h.isolated) == (
        "alpha",
        {"process": "tracepoint"},
        True,
        False,
    )
    clock.now = t0 + 30
    newer = HostHello("alpha2", "Debian 12", "6.18.1", "0.2.0", {"process": "fallback"})
    h = store.upsert_host("host-a", newer)
    assert (h.hostname, h.kernel, h.sensor_version, h.tiers["process"]) == (
        "alpha2",
        "6.18.1",
        "0.2.0",
        "fallback",
    )
    assert h.first_seen == t0 and h.last_seen == t0 + 30
    store.record_heartbeat("host-a", {"cpu": 1.5, "rss": 1000}, {"ringbuf": 3}, 12, now=t0 + 60)
    h = store.get_host("host-a", now=t0 + 100)
    assert h.metrics == {"cpu": 1.5, "rss": 1000} and h.drops == {"ringbuf": 3}
    assert h.outbox_depth == 12 and h.online
    assert not store.get_host("host-a", now=t0 + 60 + 91).online  # offline after 90 s
    assert [x.host_id for x in store.list_hosts()] == ["host-a"]


def test_metrics_history_is_bounded(db_path, clock, t0: float) -> None:
    with SQLiteStore(db_path, clock=clock, metrics_history=5) as s:
        s.upsert_host("host-a", HELLO)
        s.upsert_host("host-b", HELLO)
        for i in range(12):
            s.record_heartbeat("host-a", {"i": i}, {}, i, now=t0 + i)
        s.record_heartbeat("host-b", {"i": 99}, {}, 0, now=t0)
        hist = s.metrics_history("host-a")
        assert [m.metrics["i"] for m in hist] == [7, 8, 9, 10, 11]  # oldest first
        assert [m.metrics["i"] for m in s.metrics_history("host-a", since=t0 + 10)] == [10, 11]
        assert [m.metrics["i"] for m in s.metrics_history("host-a", limit=2)] == [10, 11]
        assert len(s.metrics_history("host-b")) == 1  # other hosts untouched


def test_host_errors(store: SQLiteStore) -> None:
    with pytest.raises(NotFound):
        store.get_host("ghost")
    with pytest.raises(NotFound):
        store.record_heartbeat("ghost", {}, {}, 0)
    with pytest.raises(NotFound):
        store.set_isolation("ghost", True)
    with pytest.raises(NotFound):
        store.metrics_history("ghost")
    store.upsert_host("host-a", HELLO)
    with pytest.raises(InvalidInput):
        store.record_heartbeat("host-a", {}, {"x": -1}, 0)
    with pytest.raises(InvalidInput):
        store.record_heartbeat("host-a", {"bad": object()}, {}, 0)
    with pytest.raises(InvalidInput):
        store.upsert_host("host-a", HostHello("", "os", "k", "v", {}))
    with pytest.raises(InvalidInput):
        store.upsert_host("host-a", HostHello("h", "os", "k", "v", {"process": 3}))  # type: ignore[dict-item]
    with pytest.raises(InvalidInput):
        store.set_isolation("host-a", "yes")  # type: ignore[arg-type]
    assert store.get_host("host-a").hostname == "alpha"


def test_isolation_state(store: SQLiteStore, t0: float) -> None:
    store.upsert_host("host-a", HELLO)
    h = store.set_isolation("host-a", True, now=t0 + 5)
    assert h.isolated and h.isolation_changed_at == t0 + 5
    assert not store.set_isolation("host-a", False).isolated


# -- commands -----------------------------------------------------------------------------


def test_command_lifecycle(store: SQLiteStore, clock, t0: float) -> None:
    store.upsert_host("host-a", HELLO)
    cmd = store.queue_command("host-a", "kill", {"pid": 42}, "alice", "key-1", ttl=60)
    assert cmd.status is CommandStatus.QUEUED and cmd.expires_at == t0 + 60
    assert [c.id for c in store.pending_commands("host-a")] == [cmd.id]
    assert store.mark_sent(cmd.id).status is CommandStatus.SENT
    assert store.pending_commands("host-a") == []
    assert store.mark_acknowledged(cmd.id, now=t0 + 1).acknowledged_at == t0 + 1
    done = store.record_result(cmd.id, True, {"killed": [42]}, now=t0 + 2)
    assert done.status is CommandStatus.SUCCEEDED and done.output == {"killed": [42]}
    assert done.finished_at == t0 + 2
    with pytest.raises(InvalidTransition) as err:
        store.record_result(cmd.id, False, {})
    assert err.value.current == "succeeded"
    with pytest.raises(InvalidTransition):
        store.mark_sent(cmd.id)
    # failed, straight from sent (a result implies the ack)
    c2 = store.queue_command("host-a", "isolate", {}, "bob", "key-2", ttl=60)
    store.mark_sent(c2.id)
    failed = store.record_result(c2.id, False, {"error": "nft missing"})
    assert failed.status is CommandStatus.FAILED
    assert [c.id for c in store.command_history("host-a")] == [c2.id, cmd.id]
    assert store.get_command(cmd.id).status is CommandStatus.SUCCEEDED


def test_command_idempotency(store: SQLiteStore) -> None:
    store.upsert_host("host-a", HELLO)
    store.upsert_host("host-b", HELLO)
    a = store.queue_command("host-a", "kill", {"pid": 1}, "alice", "k", ttl=60)
    again = store.queue_command("host-a", "kill", {"pid": 1}, "alice", "k", ttl=600)
    assert again == a
    store.mark_sent(a.id)
    assert store.queue_command("host-a", "kill", {"pid": 1}, "bob", "k", ttl=60).id == a.id
    with pytest.raises(Conflict):
        store.queue_command("host-a", "kill", {"pid": 2}, "alice", "k", ttl=60)
    with pytest.raises(Conflict):
        store.queue_command("host-b", "kill", {"pid": 1}, "alice", "k", ttl=60)
    assert len(store.command_history("host-a")) == 1
    assert store.command_history("host-b") == []


def test_command_expiry_and_requeue(store: SQLiteStore, t0: float) -> None:
    store.upsert_host("host-a", HELLO)
    short = store.queue_command("host-a", "kill", {"pid": 1}, "a", "k1", ttl=10)
    sent = store.queue_command("host-a", "kill", {"pid": 2}, "a", "k2", ttl=10)
    acked = store.queue_command("host-a", "kill", {"pid": 3}, "a", "k3", ttl=10)
    long = store.queue_command("host-a", "kill", {"pid": 4}, "a", "k4", ttl=1000)
    store.mark_sent(sent.id)
    store.mark_sent(acked.id)
    store.mark_acknowledged(acked.id)
    # past its TTL a queued command is no longer pending, even before expire_commands runs
    assert [c.id for c in store.pending_commands("host-a", now=t0 + 11)] == [long.id]
    expired = store.expire_commands(t0 + 11)
    assert [c.id for c in expired] == [short.id, sent.id]
    assert all(c.status is CommandStatus.EXPIRED for c in expired)
    assert store.get_command(acked.id).status is CommandStatus.ACKNOWLEDGED  # running: kept
    assert store.expire_commands(t0 + 12) == []
    with pytest.raises(InvalidTransition):
        store.mark_sent(short.id)
    # a sent-but-unacked command goes back to the queue when its connection is gone
    store.mark_sent(long.id)
    assert store.requeue_unacknowledged("host-a") == 1
    got = store.get_command(long.id)
    assert got.status is CommandStatus.QUEUED and got.sent_at is None


def test_command_errors(store: SQLiteStore) -> None:
    with pytest.raises(NotFound):
        store.queue_command("ghost", "kill", {}, "a", "k", ttl=5)
    store.upsert_host("host-a", HELLO)
    for kwargs in (
        {"ttl": 0},
        {"ttl": float("inf")},
        {"args": []},
        {"args": {"x": object()}},
        {"idempotency_key": ""},
        {"action": ""},
    ):
        call = {
            "host_id": "host-a",
            "action": "kill",
            "args": {},
            "requested_by": "a",
            "idempotency_key": "k",
            "ttl": 5,
            **kwargs,
        }
        with pytest.raises(InvalidInput):
            store.queue_command(**call)
    with pytest.raises(NotFound):
        store.mark_sent(999)
    with pytest.raises(NotFound):
        store.get_command(999)
    with pytest.raises(InvalidInput):
        store.get_command(-1)
    c = store.queue_command("host-a", "kill", {}, "a", "k", ttl=5)
    with pytest.raises(InvalidTransition):
        store.record_result(c.id, True, {})  # never sent
    with pytest.raises(InvalidTransition):
        store.mark_acknowledged(c.id)
    with pytest.raises(InvalidInput):
        store.record_result(c.id, "yes", {})  # type: ignore[arg-type]
    assert store.command_history("host-a")[0].status is CommandStatus.QUEUED


# -- policy -------------------------------------------------------------------------------


def test_policy_versions(store: SQLiteStore, t0: float) -> None:
    assert store.current_policy() is None
    v1 = store.put_policy({"watch": ["/etc"]}, "alice", "first")
    v2 = store.put_policy({"watch": ["/etc", "/root"]}, "bob", now=t0 + 9)
    assert (v1.version, v2.version) == (1, 2)
    cur = store.current_policy()
    assert cur is not None and cur == v2 and cur.author == "bob" and cur.created_at == t0 + 9
    assert store.get_policy(1).document == {"watch": ["/etc"]}
    assert [p.version for p in store.policy_history()] == [2, 1]
    store.upsert_host("host-a", HELLO)
    store.policy_applied("host-a", 1, now=t0 + 20)
    h = store.get_host("host-a")
    assert (h.policy_version, h.policy_applied_at) == (1, t0 + 20)
    with pytest.raises(NotFound):
        store.policy_applied("host-a", 3)
    with pytest.raises(NotFound):
        store.policy_applied("ghost", 1)
    with pytest.raises(NotFound):
        store.get_policy(7)
    with pytest.raises(InvalidInput):
        store.put_policy(["not", "a", "mapping"], "alice")  # type: ignore[arg-type]
    with pytest.raises(InvalidInput):
        store.put_policy({}, "")
    assert len(store.policy_history()) == 2


# -- alerts -------------------------------------------------------------------------------


def _alert(store: SQLiteStore, **kw):
    args = {
        "rule_id": "r1",
        "rule_name": "Curl to pipe",
        "severity": "high",
        "host_id": "host-a",
        "event": {"process": {"pid": 1}},
        "ancestry": [{"entity_id": "p0"}],
        **kw,
    }
    return store.create_alert(**args)


def test_alert_triage(store: SQLiteStore, t0: float) -> None:
    a = _alert(store, event_id=5)
    assert a.status is AlertStatus.NEW and a.severity is Severity.HIGH and a.event_id == 5
    assert a.ancestry == [{"entity_id": "p0"}]
    a = store.triage_alert(a.id, status="acknowledged", assignee="bob", now=t0 + 1)
    assert (a.status, a.assignee, a.updated_at) == (AlertStatus.ACKNOWLEDGED, "bob", t0 + 1)
    c = store.add_alert_comment(a.id, "bob", "looking", now=t0 + 2)
    a = store.triage_alert(a.id, status=AlertStatus.RESOLVED)
    with pytest.raises(InvalidTransition):
        store.triage_alert(a.id, status="new")
    a = store.triage_alert(a.id, status="acknowledged")  # reopen
    a = store.triage_alert(a.id, status="false_positive", unassign=True)
    assert a.assignee is None
    full = store.get_alert(a.id)
    assert [x.text for x in full.comments] == ["looking"] and full.comments[0] == c
    # same status again is not a transition
    assert store.triage_alert(a.id, status="false_positive").status is AlertStatus.FALSE_POSITIVE


def test_alert_listing(store: SQLiteStore, t0: float) -> None:
    ids = [
        _alert(store, severity=s, host_id=h, now=t0 + i).id
        for i, (s, h) in enumerate(
            [("low", "host-a"), ("high", "host-b"), ("high", "host-a"), ("critical", "host-a")]
        )
    ]
    store.triage_alert(ids[0], status="resolved")
    assert [a.id for a in store.list_alerts()] == ids[::-1]
    assert [a.id for a in store.list_alerts(status="new")] == ids[:0:-1]
    assert [a.id for a in store.list_alerts(severity="high")] == [ids[2], ids[1]]
    assert [a.id for a in store.list_alerts(host_id="host-b")] == [ids[1]]
    assert [a.id for a in store.list_alerts(since=t0 + 2)] == [ids[3], ids[2]]
    page1 = store.list_alerts(limit=2)
    page2 = store.list_alerts(limit=2, before_id=page1[-1].id)
    assert [a.id for a in page1 + page2] == ids[::-1]


def test_alert_errors(store: SQLiteStore) -> None:
    with pytest.raises(NotFound):
        store.get_alert(1)
    with pytest.raises(NotFound):
        store.triage_alert(1, status="resolved")
    with pytest.raises(NotFound):
        store.add_alert_comment(1, "bob", "hi")
    with pytest.raises(InvalidInput, match="Severity"):
        _alert(store, severity="apocalyptic")
    with pytest.raises(InvalidInput):
        _alert(store, ancestry="p0")
    a = _alert(store)
    with pytest.raises(InvalidInput, match="AlertStatus"):
        store.triage_alert(a.id, status="closed")
    with pytest.raises(InvalidInput):
        store.triage_alert(a.id, assignee="bob", unassign=True)
    with pytest.raises(InvalidInput):
        store.add_alert_comment(a.id, "bob", "  ")
    with pytest.raises(InvalidInput):
        store.list_alerts(status="open")
    assert store.get_alert(a.id).status is AlertStatus.NEW


# -- users, tokens, audit -----------------------------------------------------------------


def test_users(store: SQLiteStore, t0: float) -> None:
    u = store.create_user("alice", "$argon2id$v=19$abc", "admin")
    assert u.role is Role.ADMIN and not u.disabled
    with pytest.raises(Conflict):
        store.create_user("alice", "$argon2id$v=19$def", "viewer")
    u = store.update_user("alice", role="viewer", disabled=True, password_hash="h2", now=t0 + 3)  # noqa: S106
    assert (u.role, u.disabled, u.password_hash, u.updated_at) == (Role.VIEWER, True, "h2", t0 + 3)
    assert store.get_user("alice") == u
    assert [x.username for x in store.list_users()] == ["alice"]
    with pytest.raises(NotFound):
        store.get_user("bob")
    with pytest.raises(NotFound):
        store.update_user("bob", disabled=True)
    with pytest.raises(InvalidInput, match="Role"):
        store.create_user("carol", "h", "root")
    with pytest.raises(InvalidInput):
        store.create_user("carol", "", "viewer")
    with pytest.raises(InvalidInput):
        store.create_user("a\x00b", "h", "viewer")


def test_api_tokens(store: SQLiteStore, t0: float) -> None:
    store.create_user("alice", "h", "admin")
    t = store.create_api_token("ci", "sha256:aaaa", "responder", owner="alice")
    assert store.find_api_token("sha256:aaaa") == t
    with pytest.raises(Conflict):
        store.create_api_token("dup", "sha256:aaaa", "viewer")
    with pytest.raises(NotFound) as err:
        store.find_api_token("sha256:bbbb")
    assert "bbbb" not in str(err.value)  # never echo credentials
    with pytest.raises(NotFound):
        store.create_api_token("x", "sha256:cccc", "viewer", owner="nobody")
    store.touch_api_token(t.id, now=t0 + 7)
    assert store.find_api_token("sha256:aaaa").last_used == t0 + 7
    assert store.revoke_api_token(t.id).revoked
    assert store.find_api_token("sha256:aaaa").revoked
    with pytest.raises(NotFound):
        store.revoke_api_token(99)
    assert [x.id for x in store.list_api_tokens()] == [t.id]


def test_audit_log_is_append_only(store: SQLiteStore, db_path, t0: float) -> None:
    e1 = store.append_audit("alice", "command.queue", "host-a", "10.0.0.9", {"action": "kill"})
    e2 = store.append_audit("bob", "alert.triage", "alert/1", "10.0.0.8", now=t0 + 1)
    assert [e.id for e in store.list_audit()] == [e2.id, e1.id]
    assert [e.id for e in store.list_audit(actor="alice")] == [e1.id]
    assert [e.id for e in store.list_audit(action="alert.triage")] == [e2.id]
    assert [e.id for e in store.list_audit(since=t0 + 1)] == [e2.id]
    assert [e.id for e in store.list_audit(before_id=e2.id)] == [e1.id]
    assert store.list_audit()[1].detail == {"action": "kill"}
    assert not hasattr(store, "delete_audit") and not hasattr(store, "update_audit")
    # even with raw SQL on another connection the database refuses changes
    with sqlite3.connect(db_path) as c:
        with pytest.raises(sqlite3.IntegrityError, match="append-only"):
            c.execute("UPDATE audit_log SET actor = 'mallory'")
        with pytest.raises(sqlite3.IntegrityError, match="append-only"):
            c.execute("DELETE FROM audit_log")
    assert [e.actor for e in store.list_audit()] == ["bob", "alice"]
    with pytest.raises(InvalidInput):
        store.append_audit("", "x", "y", "z")
    with pytest.raises(InvalidInput):
        store.append_audit("a", "x", "y", "z", detail=["no"])  # type: ignore[arg-type]

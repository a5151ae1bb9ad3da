"""Policy (get, put, history, applied versions) and alerts (list, get, triage, comment,
mark safe)."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.timeout(60)

HASH = "ab" * 32
EVENT = {
    "event": {"action": "exec", "category": ["process"]},
    "process": {
        "pid": 321,
        "entity_id": "E1",
        "executable": "/tmp/dropper",
        "command_line": "/tmp/dropper --run *",
        "hash": {"sha256": HASH.upper()},
    },
}


def test_policy_put_get_history_and_notify(api):
    api.add_host()
    api.add_host("host-2", "db-1")
    api.backplane.connected = {"host-3"}  # connected but not yet in the store: told too
    r = api.get("/api/v1/policy", user="val")
    assert r.status_code == 200 and r.json()["version"] is None
    doc = {
        "deny": {"hashes": [HASH.upper()], "executables": ["/tmp//x/./y"]},
        "watch_paths": ["/etc", "/etc"],
        "responses": {
            "quarantine_on_denied_hash": True,
            "hold_suspicious_exec": {"enabled": True, "patterns": ["*curl*|*sh"]},
        },
    }
    r = api.call("PUT", "/api/v1/policy", json={"document": doc, "comment": "first"})
    assert r.status_code == 201, r.text
    v1 = r.json()
    assert v1["version"] == 1 and v1["author"].endswith("ada-token")
    assert v1["document"]["deny"]["hashes"] == [HASH]
    assert v1["document"]["deny"]["executables"] == ["/tmp/x/y"]
    assert v1["document"]["watch_paths"] == ["/etc"]
    assert v1["document"]["allow"]["paths"] == []
    assert sorted(api.backplane.policies) == ["host-1", "host-2", "host-3"]
    assert api.get("/api/v1/policy", user="val").json()["version"] == 1
    r = api.call("PUT", "/api/v1/policy", json={"document": {}, "base_version": 1})
    assert r.status_code == 201
    stale = api.call("PUT", "/api/v1/policy", json={"document": {}, "base_version": 1})
    assert stale.status_code == 409 and stale.json()["current_version"] == 2
    hist = api.get("/api/v1/policy/history", user="val").json()["versions"]
    assert [v["version"] for v in hist] == [2, 1]
    assert api.get("/api/v1/policy/versions/1", user="val").json()["comment"] == "first"
    assert api.get("/api/v1/policy/versions/77", user="val").status_code == 404
    api.store.policy_applied("host-1", 2)
    applied = api.get("/api/v1/policy/hosts", user="val").json()
    assert applied["current_version"] == 2
    by_host = {h["host_id"]: h for h in applied["hosts"]}
    assert by_host["host-1"]["current"] and by_host["host-1"]["policy_version"] == 2
    assert not by_host["host-2"]["current"] and by_host["host-2"]["policy_version"] is None
    one = api.get("/api/v1/hosts/host-1/policy", user="val").json()
    assert one["policy_version"] == 2 and one["current"]
    assert api.get("/api/v1/hosts/ghost/policy", user="val").status_code == 404
    assert [e.action for e in api.store.list_audit(action="policy.update")] == [
        "policy.update",
        "policy.update",
    ]


@pytest.mark.parametrize(
    ("document", "message"),
    [
        ([], "document must be an object"),
        ({"allow": {"hashes": ["abc"]}}, "allow.hashes[0] must be a SHA-256 hash"),
        ({"deny": {"executables": ["bin/sh"]}}, "is not an absolute path"),
        ({"deny": {"paths": ["/etc/../root"]}}, "must not contain '..'"),
        ({"deny": {"paths": "/etc"}}, "deny.paths must be an array"),
        ({"deny": {"command_lines": ["ok", "bad\x00"]}}, "deny.command_lines[1] must not contain"),
        ({"deny": {"colours": []}}, "unknown key(s) colours"),
        ({"allowed": {}}, "unknown key(s) allowed"),
        ({"watch_paths": [""]}, "watch_paths[0] must be 1 to"),
        ({"responses": {"quarantine_on_denied_hash": "yes"}}, "must be true or false"),
        ({"responses": {"hold_suspicious_exec": {"enabled": True}}}, "has no patterns"),
        (
            {"responses": {"hold_suspicious_exec": {"patterns": [5]}}},
            "patterns[0] must be a string",
        ),
        ({"allow": {"paths": ["/x"] * 10_001}}, "the limit is 10000"),
    ],
)
def test_invalid_policy_is_400_and_stores_nothing(api, document, message):
    r = api.call("PUT", "/api/v1/policy", json={"document": document})
    assert r.status_code == 400, r.text
    assert message in r.json()["error"]
    assert api.store.current_policy() is None
    assert api.backplane.policies == []


def test_policy_put_needs_document(api):
    r = api.call("PUT", "/api/v1/policy", json={"comment": "x"})
    assert r.status_code == 400 and "document" in r.json()["error"]
    r = api.call("PUT", "/api/v1/policy", json={"document": {}, "base_version": "1"})
    assert r.status_code == 400


def _alert(api, **kw):
    api.add_host()
    return api.store.create_alert(
        rule_id=kw.get("rule_id", "r-1"),
        rule_name="Exec from /tmp",
        severity=kw.get("severity", "high"),
        host_id="host-1",
        event=kw.get("event", EVENT),
        ancestry=[{"executable": "/bin/bash", "pid": 300}],
    )


def test_alert_list_filter_get(api):
    a = _alert(api)
    b = _alert(api, rule_id="r-2", severity="low")
    listed = api.get("/api/v1/alerts", user="val").json()
    assert [x["id"] for x in listed["alerts"]] == [b.id, a.id]
    assert listed["next_before_id"] is None
    assert [
        x["id"] for x in api.get("/api/v1/alerts?severity=high", user="val").json()["alerts"]
    ] == [a.id]
    assert [x["id"] for x in api.get("/api/v1/alerts?rule=r-2", user="val").json()["alerts"]] == [
        b.id
    ]
    page = api.get("/api/v1/alerts?limit=1", user="val").json()
    assert page["next_before_id"] == b.id
    after = api.get(f"/api/v1/alerts?limit=1&before_id={b.id}", user="val").json()
    assert [x["id"] for x in after["alerts"]] == [a.id]
    one = api.get(f"/api/v1/alerts/{a.id}", user="val").json()
    assert one["event"]["process"]["executable"] == "/tmp/dropper"
    assert one["ancestry"][0]["executable"] == "/bin/bash"
    assert api.get("/api/v1/alerts/999", user="val").status_code == 404
    for bad in ("status=open", "severity=huge", "limit=0", "before_id=x", "since=yesterday"):
        r = api.get(f"/api/v1/alerts?{bad}", user="val")
        assert r.status_code == 400, bad


def test_alert_triage_and_comments(api):
    a = _alert(api)
    r = api.call(
        "PATCH",
        f"/api/v1/alerts/{a.id}",
        user="rex",
        json={"status": "acknowledged", "assignee": "rex"},
    )
    assert r.status_code == 200, r.text
    assert (r.json()["status"], r.json()["assignee"]) == ("acknowledged", "rex")
    assert api.live.items[-1][0] == "alert"
    r = api.call("PATCH", f"/api/v1/alerts/{a.id}", user="rex", json={"assignee": None})
    assert r.json()["assignee"] is None
    r = api.call("PATCH", f"/api/v1/alerts/{a.id}", user="rex", json={"status": "new"})
    assert r.status_code == 409  # never silently back to new
    for bad in ({"status": "done"}, {}, {"owner": "x"}, {"assignee": 5}):
        r = api.call("PATCH", f"/api/v1/alerts/{a.id}", user="rex", json=bad)
        assert r.status_code == 400, bad
    assert (
        api.call("PATCH", "/api/v1/alerts/999", user="rex", json={"status": "resolved"}).status_code
        == 404
    )
    r = api.post(f"/api/v1/alerts/{a.id}/comments", {"text": "looking"}, user="rex")
    assert r.status_code == 201 and r.json()["author"].endswith("rex-token")
    assert api.get(f"/api/v1/alerts/{a.id}").json()["comments"][0]["text"] == "looking"
    for bad in ({"text": ""}, {"text": "   "}, {}, {"text": 5}, {"text": "a\x00b"}):
        assert api.post(f"/api/v1/alerts/{a.id}/comments", bad, user="rex").status_code == 400
    assert api.post("/api/v1/alerts/999/comments", {"text": "x"}, user="rex").status_code == 404
    actions = [e.action for e in api.store.list_audit()]
    assert actions.count("alert.triage") == 2 and "alert.comment" in actions


def test_mark_safe_adds_allow_entry_as_a_new_version_and_closes_the_alert(api):
    a = _alert(api)
    api.call("PUT", "/api/v1/policy", json={"document": {"deny": {"paths": ["/etc/shadow"]}}})
    api.backplane.policies.clear()
    r = api.post(f"/api/v1/alerts/{a.id}/mark-safe", {"comment": "our build tool"})
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["policy_changed"] and out["policy_version"] == 2
    assert out["allowed"] == {"kind": "hash", "list": "allow.hashes", "value": HASH}
    assert out["alert"]["status"] == "false_positive"
    assert "marked safe" in out["alert"]["comments"][-1]["text"]
    v2 = api.store.current_policy()
    assert v2.version == 2 and v2.author.endswith("ada-token")
    assert v2.document["allow"]["hashes"] == [HASH]
    assert v2.document["deny"]["paths"] == ["/etc/shadow"]  # the rest is kept
    assert f"alert {a.id}" in v2.comment
    assert api.backplane.policies == ["host-1"]
    assert api.store.list_audit(action="alert.mark_safe")[0].detail["policy_version"] == 2
    # The same entry again: no new version, alert still closed.
    b = _alert(api)
    again = api.post(f"/api/v1/alerts/{b.id}/mark-safe").json()
    assert not again["policy_changed"] and again["policy_version"] == 2
    assert again["alert"]["status"] == "false_positive"


def test_mark_safe_kinds_and_failures(api):
    a = _alert(api)
    r = api.post(f"/api/v1/alerts/{a.id}/mark-safe", {"kind": "command_line"})
    assert r.status_code == 200, r.text
    assert r.json()["allowed"]["value"] == "/tmp/dropper --run [*]"  # a literal, not a glob
    b = _alert(api)
    r = api.post(f"/api/v1/alerts/{b.id}/mark-safe", {"kind": "executable", "value": "/opt//x"})
    assert r.json()["allowed"]["value"] == "/opt/x"
    c = _alert(api, event={"event": {"action": "connect"}})
    r = api.post(f"/api/v1/alerts/{c.id}/mark-safe")
    assert r.status_code == 400 and "give kind and value" in r.json()["error"]
    assert api.post(f"/api/v1/alerts/{c.id}/mark-safe", {"kind": "path"}).status_code == 400
    r = api.post(f"/api/v1/alerts/{c.id}/mark-safe", {"kind": "hash", "value": "xyz"})
    assert r.status_code == 400 and "SHA-256" in r.json()["error"]
    assert api.post(f"/api/v1/alerts/{c.id}/mark-safe", {"kind": "user"}).status_code == 400
    assert api.post(f"/api/v1/alerts/{c.id}/mark-safe", {"why": 1}).status_code == 400
    assert api.post("/api/v1/alerts/999/mark-safe").status_code == 404
    assert api.store.get_alert(c.id).status == "new"
    # A resolved alert is reopened on the way to false positive.
    api.store.triage_alert(c.id, status="resolved")
    r = api.post(f"/api/v1/alerts/{c.id}/mark-safe", {"kind": "path", "value": "/srv/ok"})
    assert r.status_code == 200 and r.json()["alert"]["status"] == "false_positive"

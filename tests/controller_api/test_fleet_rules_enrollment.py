"""Hosts, events and process trees, rules, and enrollment administration."""

from __future__ import annotations

import time

import pytest

from controller.store import NotFound

pytestmark = pytest.mark.timeout(60)

GOOD_RULE = """\
title: Test Rule Curl To Shell
id: 6f1c6a36-6b0e-4f57-9d0f-0d7e1c2b3a41
status: experimental
logsource:
  product: linux
  category: process_creation
detection:
  selection:
    CommandLine|contains: 'curl'
  condition: selection
level: high
"""


def _exec(pid, entity, parent, exe, ts):
    return {
        "@timestamp": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ts)) + ".000000Z",
        "event": {"kind": "event", "category": ["process"], "type": ["start"], "action": "exec"},
        "host": {"id": "host-1"},
        "process": {
            "pid": pid,
            "entity_id": entity,
            "executable": exe,
            "command_line": exe,
            "parent": {"pid": 1, "entity_id": parent},
        },
    }


def test_hosts_list_filter_sort_get_metrics(api):
    api.add_host("host-1", "web-1")
    api.add_host("host-2", "db-1")
    api.store.record_heartbeat("host-1", {"cpu": 12.5}, {"process": 3}, 7)
    api.backplane.connected = {"host-2"}
    hosts = api.get("/api/v1/hosts", user="val").json()
    assert [h["hostname"] for h in hosts["hosts"]] == ["db-1", "web-1"] and hosts["total"] == 2
    by_id = {h["host_id"]: h for h in hosts["hosts"]}
    assert by_id["host-2"]["connected"] and by_id["host-2"]["status"] == "online"
    assert by_id["host-1"]["metrics"] == {"cpu": 12.5}
    assert by_id["host-1"]["drops"] == {"process": 3}
    assert by_id["host-1"]["tiers"] == {"process": "tracepoint"}
    desc = api.get("/api/v1/hosts?sort=hostname&order=desc", user="val").json()["hosts"]
    assert [h["hostname"] for h in desc] == ["web-1", "db-1"]
    assert [h["host_id"] for h in api.get("/api/v1/hosts?q=WEB").json()["hosts"]] == ["host-1"]
    assert api.get("/api/v1/hosts?isolated=false").json()["total"] == 2
    assert api.get("/api/v1/hosts?isolated=true").json()["total"] == 0
    for bad in ("status=maybe", "sort=colour", "isolated=perhaps", "limit=-1"):
        assert api.get(f"/api/v1/hosts?{bad}").status_code == 400, bad
    one = api.get("/api/v1/hosts/host-1", user="val").json()
    assert one["hostname"] == "web-1" and one["outbox_depth"] == 7
    assert api.get("/api/v1/hosts/ghost").status_code == 404
    samples = api.get("/api/v1/hosts/host-1/metrics", user="val").json()["samples"]
    assert samples[0]["metrics"] == {"cpu": 12.5}
    assert api.get("/api/v1/hosts/ghost/metrics").status_code == 404
    assert api.get("/api/v1/hosts/host-1/metrics?since=soon").status_code == 400


def test_events_search_get_and_tree(api):
    api.add_host()
    now = int(time.time()) - 10  # whole seconds: the timestamps below carry no fraction
    events = [
        _exec(100, "P", "root", "/usr/bin/bash", now),
        _exec(101, "C1", "P", "/usr/bin/curl", now + 1),
        _exec(102, "C2", "P", "/usr/bin/nc", now + 2),
    ]
    assert api.store.ingest_batch("host-1", 1, events)
    api.store.index_pending()
    page = api.get("/api/v1/events?limit=2", user="val").json()
    assert [e["event"]["process"]["pid"] for e in page["events"]] == [102, 101]
    rest = api.get(f"/api/v1/events?limit=2&cursor={page['next_cursor']}").json()
    assert [e["event"]["process"]["pid"] for e in rest["events"]] == [100]
    assert rest["next_cursor"] is None
    hits = api.get("/api/v1/events?q=curl&host=host-1&action=exec").json()["events"]
    assert [e["event"]["process"]["pid"] for e in hits] == [101]
    assert len(api.get("/api/v1/events?pid=102").json()["events"]) == 1
    assert len(api.get("/api/v1/events?executable=/usr/bin/nc").json()["events"]) == 1
    assert (
        api.get(f"/api/v1/events?since={now + 1.5}").json()["events"][0]["event"]["process"]["pid"]
        == 102
    )
    for bad in (
        "pid=abc",
        "port=70000",
        "ip=not-an-ip",
        "since=later",
        f"since={now + 5}&until={now}",
        "cursor=garbage",
        "q=%22unbalanced",
        "limit=5000",
    ):
        r = api.get(f"/api/v1/events?{bad}")
        assert r.status_code == 400, (bad, r.text)
    event_id = hits[0]["id"]
    one = api.get(f"/api/v1/events/{event_id}", user="val").json()
    assert one["event"]["process"]["entity_id"] == "C1"
    assert api.get("/api/v1/events/999999").status_code == 404
    tree = api.get(f"/api/v1/events/{event_id}/tree").json()
    assert tree["process"]["entity_id"] == "C1"
    assert [a["entity_id"] for a in tree["ancestors"]][:1] == ["P"]
    parent = api.get("/api/v1/hosts/host-1/processes/P").json()
    assert sorted(c["entity_id"] for c in parent["children"]) == ["C1", "C2"]
    assert api.get("/api/v1/hosts/host-1/processes/nope").status_code == 404


def test_tree_of_a_process_just_ingested_is_found(api):
    """The maintenance loop folds the process table in batches, a second or so behind ingest;
    a tree request folds what is pending first, so a process just seen live is there."""
    api.add_host()
    now = int(time.time()) - 10
    assert api.store.ingest_batch("host-1", 1, [_exec(100, "P", "root", "/usr/bin/bash", now)])
    api.store.index_pending()
    # a child stored after the last fold: not in the process table yet
    assert api.store.ingest_batch("host-1", 2, [_exec(101, "C1", "P", "/usr/bin/curl", now + 1)])
    with pytest.raises(NotFound):
        api.store.process_tree("host-1", "C1")
    tree = api.get("/api/v1/hosts/host-1/processes/C1").json()
    assert tree["process"]["entity_id"] == "C1"
    assert [a["entity_id"] for a in tree["ancestors"]][:1] == ["P"]
    assert [
        c["entity_id"] for c in api.get("/api/v1/hosts/host-1/processes/P").json()["children"]
    ] == ["C1"]
    event_id = api.store.search_events(entity_id="C1").events[0].id
    assert api.store.ingest_batch("host-1", 3, [_exec(102, "C2", "C1", "/usr/bin/nc", now + 2)])
    children = api.get(f"/api/v1/events/{event_id}/tree").json()["children"]
    assert [c["entity_id"] for c in children] == ["C2"]


def test_rules_list_enable_disable_reload(api):
    rules = api.get("/api/v1/rules", user="val").json()
    assert rules["rules"] and all(r["enabled"] for r in rules["rules"])
    assert rules["problems"] == []
    rid = rules["rules"][0]["id"]
    r = api.post(f"/api/v1/rules/{rid}/disable")
    assert r.status_code == 200 and r.json()["enabled"] is False
    assert not next(i for i in api.engine.rules if i.id == rid).enabled
    assert api.post(f"/api/v1/rules/{rid}/enable").json()["enabled"] is True
    assert api.post("/api/v1/rules/no-such-rule/disable").status_code == 404
    (api.rule_dir / "broken.yml").write_text("title: [unclosed\n")
    report = api.post("/api/v1/rules/reload").json()
    assert any("broken.yml" in p["path"] for p in report["problems"])
    listed = api.get("/api/v1/rules").json()
    assert any("broken.yml" in p["path"] for p in listed["problems"])
    assert {e.action for e in api.store.list_audit()} >= {
        "rule.disable",
        "rule.enable",
        "rule.reload",
    }


def test_rule_upload(api):
    r = api.post("/api/v1/rules", {"yaml": GOOD_RULE, "filename": "curl-shell"})
    assert r.status_code == 201, r.text
    assert r.json()["filename"] == "curl-shell.yml"
    assert (api.rule_dir / "curl-shell.yml").read_text() == GOOD_RULE
    assert any(i.id == "6f1c6a36-6b0e-4f57-9d0f-0d7e1c2b3a41" for i in api.engine.rules)
    assert api.engine.match(
        {"event": {"action": "exec"}, "process": {"command_line": "curl x | sh"}}
    )
    again = api.post("/api/v1/rules", {"yaml": GOOD_RULE, "filename": "curl-shell"})
    assert again.status_code == 409 and "overwrite" in again.json()["error"]
    assert (
        api.post(
            "/api/v1/rules", {"yaml": GOOD_RULE, "filename": "curl-shell", "overwrite": True}
        ).status_code
        == 201
    )
    clash = api.post("/api/v1/rules", {"yaml": GOOD_RULE, "filename": "other"})
    assert clash.status_code == 409 and "already loaded" in clash.json()["error"]
    raw = GOOD_RULE.replace("6f1c6a36", "7f1c6a36").replace("Test Rule", "Raw Upload")
    r = api.call(
        "POST", "/api/v1/rules", content=raw.encode(), headers={"Content-Type": "application/yaml"}
    )
    assert r.status_code == 201, r.text
    assert r.json()["filename"] == "raw_upload_curl_to_shell.yml"


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"yaml": "title: [unclosed"}, "rule did not load"),
        (
            {
                "yaml": (
                    "title: x\nlogsource: {product: windows}\n"
                    "detection: {s: {a: 1}, condition: s}\n"
                )
            },
            "rule did not load",
        ),
        ({"yaml": "just: a mapping\n"}, "rule did not load"),
        ({"yaml": ""}, "must not be empty"),
        ({"yaml": GOOD_RULE, "filename": "../../etc/passwd"}, "filename must be"),
        ({"yaml": GOOD_RULE, "filename": "x.py"}, "filename must be"),
        ({"yaml": GOOD_RULE, "overwrite": "yes"}, "overwrite must be"),
        ({"rule": GOOD_RULE}, "unknown field"),
    ],
)
def test_bad_rule_uploads_are_400_and_write_nothing(api, body, message):
    r = api.post("/api/v1/rules", body)
    assert r.status_code == 400, r.text
    assert message in r.json()["error"]
    assert list(api.rule_dir.iterdir()) == []


def test_bad_rule_upload_lists_problems(api):
    bad = GOOD_RULE.replace("CommandLine|contains", "CommandLine|frobnicate")
    r = api.post("/api/v1/rules", {"yaml": bad})
    assert r.status_code == 400
    assert r.json()["problems"] and r.json()["problems"][0]["path"] == "upload"


def test_enrollment_tokens(api):
    r = api.post("/api/v1/enrollment/tokens", {"ttl": 600, "uses": 2, "comment": "rack 4"})
    assert r.status_code == 201, r.text
    created = r.json()
    assert created["token"].startswith(created["id"] + ".")
    assert created["status"] == "active" and created["uses_allowed"] == 2
    assert r.headers["cache-control"] == "no-store"
    assert api.pki.consume_token(created["token"]) == created["id"]  # a real, working token
    listed = api.get("/api/v1/enrollment/tokens").json()["tokens"]
    assert [t["id"] for t in listed] == [created["id"]]
    assert "token" not in listed[0]
    audit = api.store.list_audit(action="enrollment.token.create")[0]
    assert created["token"] not in str(audit)  # the secret never reaches the audit log
    r = api.post(f"/api/v1/enrollment/tokens/{created['id']}/revoke")
    assert r.status_code == 200 and r.json()["status"] == "revoked"
    assert api.post("/api/v1/enrollment/tokens/0badf00d/revoke").status_code == 404
    assert api.post("/api/v1/enrollment/tokens/not-hex/revoke").status_code == 400
    for bad in (
        {"ttl": 0},
        {"ttl": 10**9},
        {"uses": 0},
        {"uses": "2"},
        {"comment": "a\x01"},
        {"colour": 1},
    ):
        assert api.post("/api/v1/enrollment/tokens", bad).status_code == 400, bad


def test_certificates_list_and_revoke(api):
    host_id, _, _ = api.pki.issue_offline("web-9")
    certs = api.get("/api/v1/enrollment/certificates").json()["certificates"]
    assert [c["host_id"] for c in certs] == [host_id]
    assert certs[0]["effective_status"] == "active"
    assert isinstance(certs[0]["serial"], str)
    assert api.get(f"/api/v1/enrollment/certificates?host={host_id}").json()["certificates"]
    r = api.post(f"/api/v1/enrollment/certificates/{host_id}/revoke")
    assert r.status_code == 200, r.text
    assert r.json()["revoked_serials"] == [certs[0]["serial"]]
    assert api.pki.host_revoked(host_id)
    assert api.backplane.crl_reloads == 1
    listed = api.get("/api/v1/enrollment/certificates").json()["certificates"]
    assert listed[0]["status"] == "revoked"
    assert api.post("/api/v1/enrollment/certificates/web-9/revoke").status_code == 404
    assert api.post("/api/v1/enrollment/certificates/ghost/revoke").status_code == 404
    assert api.store.list_audit(action="enrollment.certificate.revoke")

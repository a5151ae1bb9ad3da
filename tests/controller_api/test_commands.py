"""Commands: validation per action, unknown host, idempotency, history, retry."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.timeout(60)

URL = "/api/v1/hosts/host-1/commands"

VALID = [
    ("kill", {"pid": 4242}, {"pid": 4242}),
    ("kill-tree", {"pid": 2, "entity_id": "AbC-_09="}, {"pid": 2, "entity_id": "AbC-_09="}),
    ("suspend", {"pid": 77}, {"pid": 77}),
    ("resume", {"pid": 77}, {"pid": 77}),
    ("quarantine", {"path": "/tmp//x/../evil"}, {"path": "/tmp/evil"}),
    ("restore", {"path": "/tmp/evil"}, {"path": "/tmp/evil"}),
    ("delete-file", {"path": "/var/tmp/a b"}, {"path": "/var/tmp/a b"}),
    ("block-ip", {"address": "203.0.113.7"}, {"address": "203.0.113.7"}),
    ("block-ip", {"address": "2001:DB8::1"}, {"address": "2001:db8::1"}),
    ("block-ip", {"address": "10.0.0.0/8"}, {"address": "10.0.0.0/8"}),
    ("block-port", {"port": 4444}, {"port": 4444, "protocol": "tcp"}),
    ("block-port", {"port": 53, "protocol": "udp"}, {"port": 53, "protocol": "udp"}),
    ("block-domain", {"domain": "Evil.Example.COM."}, {"domain": "evil.example.com"}),
    (
        "unblock",
        {"kind": "block-port", "port": 9},
        {"kind": "block-port", "port": 9, "protocol": "tcp"},
    ),
    ("isolate", {}, {}),
    ("unisolate", {}, {}),
]


@pytest.mark.parametrize(("action", "args", "stored"), VALID, ids=[v[0] for v in VALID])
def test_valid_commands_are_queued_and_notified(api, action, args, stored):
    api.add_host()
    r = api.post(URL, {"action": action, "args": args}, user="rex")
    assert r.status_code == 201, r.text
    doc = r.json()
    assert (doc["action"], doc["args"], doc["status"]) == (action, stored, "queued")
    assert doc["requested_by"].endswith("rex-token")  # the token principal
    assert api.backplane.commands == ["host-1"]
    assert api.live.items[-1][0] == "command"
    assert api.store.get_command(doc["id"]).args == stored
    entries = api.store.list_audit(action="command.queue")
    assert entries and entries[0].detail["command_id"] == doc["id"]


INVALID = [
    ("kill", {}, "missing argument(s) pid"),
    ("kill", {"pid": 0}, "pid 0 is never a valid target"),
    ("kill", {"pid": 1}, "pid 1 is never a valid target"),
    ("kill", {"pid": -5}, "pid must be from 2"),
    ("kill", {"pid": "12"}, "pid must be an integer"),
    ("kill", {"pid": True}, "pid must be an integer"),
    ("kill", {"pid": 10**9}, "pid must be from 2"),
    ("kill", {"pid": 5, "signal": 9}, "unknown argument(s) signal"),
    ("suspend", {"pid": 5, "entity_id": "bad id!"}, "entity_id must be"),
    ("quarantine", {"path": "relative/file"}, "path must be absolute"),
    ("quarantine", {"path": "/tmp/a\x00b"}, "must not contain NUL"),
    ("delete-file", {"path": "/"}, "not the root directory"),
    ("delete-file", {"path": "/" + "a" * 5000}, "the limit is 4096"),
    ("delete-file", {"path": "/" + "a" * 300}, "longer than 255 bytes"),
    ("restore", {"path": 5}, "path must be a string"),
    ("block-ip", {"address": "300.1.1.1"}, "is not an IP address or CIDR"),
    ("block-ip", {"address": "10.0.0.5/8"}, "has host bits set; the network is 10.0.0.0/8"),
    ("block-ip", {"address": "0.0.0.0/0"}, "use isolate"),
    ("block-ip", {"address": "evil.com"}, "is not an IP address"),
    ("block-port", {"port": 0}, "port must be an integer from 1 to 65535"),
    ("block-port", {"port": 65536}, "port must be an integer from 1 to 65535"),
    ("block-port", {"port": 80, "protocol": "icmp"}, "protocol must be tcp or udp"),
    ("block-domain", {"domain": "-bad.com"}, "not an RFC 1123 host name"),
    ("block-domain", {"domain": "a..b"}, "not an RFC 1123 host name"),
    ("block-domain", {"domain": "under_score.com"}, "not an RFC 1123 host name"),
    ("block-domain", {"domain": "a" * 64 + ".com"}, "not an RFC 1123 host name"),
    ("block-domain", {"domain": "1.2.3.4"}, "use block-ip"),
    ("unblock", {}, "give command_id, or kind"),
    ("unblock", {"command_id": 0}, "command_id must be a positive integer"),
    ("unblock", {"command_id": 999}, "command 999 does not exist"),
    ("unblock", {"kind": "block-ip", "address": "nope"}, "is not an IP address"),
    ("isolate", {"now": True}, "unknown argument(s) now"),
]


@pytest.mark.parametrize(
    ("action", "args", "message"), INVALID, ids=[f"{a}-{m[:20]}" for a, _, m in INVALID]
)
def test_invalid_arguments_are_400_with_a_clear_message(api, action, args, message):
    api.add_host()
    r = api.post(URL, {"action": action, "args": args}, user="rex")
    assert r.status_code == 400, r.text
    assert message in r.json()["error"]
    assert api.store.command_history("host-1") == []
    assert api.backplane.commands == []


def test_unknown_action_lists_the_known_ones(api):
    api.add_host()
    r = api.post(URL, {"action": "format-disk"}, user="rex")
    assert r.status_code == 400
    body = r.json()
    assert "unknown action 'format-disk'" in body["error"]
    assert "kill-tree" in body["error"] and "block-domain" in body["error"]
    assert "isolate" in body["actions"]


@pytest.mark.parametrize(
    "body",
    [
        {"args": {}},
        {"action": "kill", "args": [1]},
        {"action": "isolate", "extra": 1},
        {"action": "isolate", "ttl": 0},
        {"action": "isolate", "ttl": "60"},
        {"action": "isolate", "ttl": 10**9},
    ],
)
def test_malformed_bodies_are_400(api, body):
    api.add_host()
    r = api.post(URL, body, user="rex")
    assert r.status_code == 400, r.text


def test_unknown_host_is_404(api):
    r = api.post("/api/v1/hosts/ghost/commands", {"action": "isolate"}, user="rex")
    assert r.status_code == 404
    assert "ghost" in r.json()["error"]
    assert api.get("/api/v1/hosts/ghost/commands").status_code == 404


def test_ttl_sets_expiry(api):
    api.add_host()
    doc = api.post(URL, {"action": "isolate", "ttl": 30}, user="rex").json()
    assert doc["expires_at"] - doc["created_at"] == pytest.approx(30)


def test_idempotency_key_returns_the_first_command(api):
    api.add_host()
    hdr = {"Idempotency-Key": "retry-me-1"}
    body = {"action": "kill", "args": {"pid": 999}}
    first = api.post(URL, body, user="rex", headers=hdr)
    again = api.post(URL, body, user="rex", headers=hdr)
    assert first.status_code == 201 and again.status_code == 200
    assert again.headers["Idempotent-Replay"] == "true"
    assert again.json()["id"] == first.json()["id"]
    assert len(api.store.command_history("host-1")) == 1
    assert api.backplane.commands == ["host-1"]  # notified once
    assert len(api.store.list_audit(action="command.queue")) == 1


def test_idempotency_key_with_a_different_body_is_409(api):
    api.add_host()
    hdr = {"Idempotency-Key": "k-2"}
    assert (
        api.post(URL, {"action": "kill", "args": {"pid": 9}}, user="rex", headers=hdr).status_code
        == 201
    )
    r = api.post(URL, {"action": "kill", "args": {"pid": 10}}, user="rex", headers=hdr)
    assert r.status_code == 409
    assert "idempotency key" in r.json()["error"]
    assert len(api.store.command_history("host-1")) == 1


def test_idempotency_keys_are_per_user(api):
    api.add_host()
    hdr = {"Idempotency-Key": "shared"}
    body = {"action": "kill", "args": {"pid": 9}}
    a = api.post(URL, body, user="rex", headers=hdr).json()
    b = api.post(URL, body, user="ada", headers=hdr).json()
    assert a["id"] != b["id"]


def test_bad_idempotency_key_is_400(api):
    api.add_host()
    r = api.post(URL, {"action": "isolate"}, user="rex", headers={"Idempotency-Key": "x" * 200})
    assert r.status_code == 400
    assert "Idempotency-Key" in r.json()["error"]


def test_without_a_key_each_request_is_a_new_command(api):
    api.add_host()
    for _ in range(2):
        assert api.post(URL, {"action": "isolate"}, user="rex").status_code == 201
    assert len(api.store.command_history("host-1")) == 2


def test_unblock_by_command_id_resolves_the_block(api):
    api.add_host()
    api.add_host("host-2", "db-1")
    block = api.post(
        URL, {"action": "block-ip", "args": {"address": "198.51.100.0/24"}}, user="rex"
    ).json()
    r = api.post(URL, {"action": "unblock", "args": {"command_id": block["id"]}}, user="rex")
    assert r.status_code == 201, r.text
    assert r.json()["args"] == {
        "kind": "block-ip",
        "address": "198.51.100.0/24",
        "command_id": block["id"],
    }
    other = api.post(
        "/api/v1/hosts/host-2/commands",
        {"action": "unblock", "args": {"command_id": block["id"]}},
        user="rex",
    )
    assert other.status_code == 400
    assert "is not a block on host host-2" in other.json()["error"]
    kill = api.post(URL, {"action": "kill", "args": {"pid": 3}}, user="rex").json()
    r = api.post(URL, {"action": "unblock", "args": {"command_id": kill["id"]}}, user="rex")
    assert r.status_code == 400


def test_history_per_host_and_fleet(api):
    api.add_host()
    api.add_host("host-2", "db-1")
    ids = [
        api.post(URL, {"action": "kill", "args": {"pid": 5}}, user="rex").json()["id"],
        api.post("/api/v1/hosts/host-2/commands", {"action": "isolate"}, user="rex").json()["id"],
        api.post(URL, {"action": "isolate"}, user="rex").json()["id"],
    ]
    api.store.mark_sent(ids[0])
    api.store.record_result(ids[0], False, {"error": "no such process"})
    host = api.get("/api/v1/hosts/host-1/commands", user="val").json()["commands"]
    assert [c["id"] for c in host] == [ids[2], ids[0]]
    assert host[1]["status"] == "failed" and host[1]["output"] == {"error": "no such process"}
    fleet = api.get("/api/v1/commands", user="val").json()["commands"]
    assert [c["id"] for c in fleet] == ids[::-1]
    failed = api.get("/api/v1/commands?status=failed", user="val").json()["commands"]
    assert [c["id"] for c in failed] == [ids[0]]
    assert len(api.get("/api/v1/commands?limit=1", user="val").json()["commands"]) == 1
    only2 = api.get("/api/v1/commands?host=host-2", user="val").json()["commands"]
    assert [c["id"] for c in only2] == [ids[1]]
    assert api.get(f"/api/v1/commands/{ids[1]}", user="val").json()["host_id"] == "host-2"
    assert api.get("/api/v1/commands/424242", user="val").status_code == 404
    assert api.get("/api/v1/commands?status=weird", user="val").status_code == 400
    assert "idempotency_key" not in host[0]


def test_retry_failed_or_expired_creates_one_linked_command(api):
    api.add_host()
    first = api.post(URL, {"action": "kill", "args": {"pid": 5}}, user="rex").json()
    r = api.post(f"/api/v1/commands/{first['id']}/retry", user="rex")
    assert r.status_code == 409  # still queued
    assert "only failed or expired" in r.json()["error"]
    api.store.mark_sent(first["id"])
    api.store.record_result(first["id"], False, {"error": "timeout"})
    api.backplane.commands.clear()
    r = api.post(f"/api/v1/commands/{first['id']}/retry", user="rex")
    assert r.status_code == 201, r.text
    retry = r.json()
    assert retry["retry_of"] == first["id"] and retry["id"] != first["id"]
    assert (retry["action"], retry["args"], retry["status"]) == ("kill", {"pid": 5}, "queued")
    assert api.backplane.commands == ["host-1"]
    again = api.post(f"/api/v1/commands/{first['id']}/retry", user="rex")
    assert again.status_code == 200 and again.json()["id"] == retry["id"]
    assert api.post("/api/v1/commands/9999/retry", user="rex").status_code == 404
    expired = api.post(URL, {"action": "isolate", "ttl": 1}, user="rex").json()
    api.store.expire_commands(now=expired["expires_at"] + 1)
    r = api.post(f"/api/v1/commands/{expired['id']}/retry", {"ttl": 60}, user="rex")
    assert r.status_code == 201 and r.json()["retry_of"] == expired["id"]

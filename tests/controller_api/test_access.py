"""Every API endpoint: unauthenticated 401, too low a role 403, missing CSRF 403, bad JSON
400, oversized body 413, unknown route 404 as JSON."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.timeout(60)

RANK = {"viewer": 0, "responder": 1, "admin": 2}
USER_OF = {"viewer": "val", "responder": "rex", "admin": "ada"}

# (method, path, least role, takes a JSON body)
ENDPOINTS = [
    ("GET", "/api/v1/hosts", "viewer", False),
    ("GET", "/api/v1/hosts/host-1", "viewer", False),
    ("GET", "/api/v1/hosts/host-1/metrics", "viewer", False),
    ("GET", "/api/v1/events", "viewer", False),
    ("GET", "/api/v1/events/1", "viewer", False),
    ("GET", "/api/v1/events/1/tree", "viewer", False),
    ("GET", "/api/v1/hosts/host-1/processes/abc", "viewer", False),
    ("GET", "/api/v1/alerts", "viewer", False),
    ("GET", "/api/v1/alerts/1", "viewer", False),
    ("PATCH", "/api/v1/alerts/1", "responder", True),
    ("POST", "/api/v1/alerts/1/comments", "responder", True),
    ("POST", "/api/v1/alerts/1/mark-safe", "admin", True),
    ("POST", "/api/v1/hosts/host-1/commands", "responder", True),
    ("GET", "/api/v1/hosts/host-1/commands", "viewer", False),
    ("GET", "/api/v1/commands", "viewer", False),
    ("GET", "/api/v1/commands/1", "viewer", False),
    ("POST", "/api/v1/commands/1/retry", "responder", True),
    ("GET", "/api/v1/policy", "viewer", False),
    ("PUT", "/api/v1/policy", "admin", True),
    ("GET", "/api/v1/policy/history", "viewer", False),
    ("GET", "/api/v1/policy/versions/1", "viewer", False),
    ("GET", "/api/v1/policy/hosts", "viewer", False),
    ("GET", "/api/v1/hosts/host-1/policy", "viewer", False),
    ("GET", "/api/v1/rules", "viewer", False),
    ("POST", "/api/v1/rules", "admin", True),
    ("POST", "/api/v1/rules/some-id/enable", "admin", False),
    ("POST", "/api/v1/rules/some-id/disable", "admin", False),
    ("POST", "/api/v1/rules/reload", "admin", False),
    ("POST", "/api/v1/enrollment/tokens", "admin", True),
    ("GET", "/api/v1/enrollment/tokens", "admin", False),
    ("POST", "/api/v1/enrollment/tokens/0123abcd/revoke", "admin", False),
    ("GET", "/api/v1/enrollment/certificates", "admin", False),
    ("POST", "/api/v1/enrollment/certificates/host-1/revoke", "admin", False),
]
IDS = [f"{m} {p}" for m, p, _, _ in ENDPOINTS]


@pytest.mark.parametrize(("method", "path", "role", "body"), ENDPOINTS, ids=IDS)
def test_unauthenticated_is_401(api, method, path, role, body):
    r = api.call(method, path, user=None, json={} if body else None)
    assert r.status_code == 401, r.text
    assert r.json()["error"]


@pytest.mark.parametrize(("method", "path", "role", "body"), ENDPOINTS, ids=IDS)
def test_bad_bearer_token_is_401(api, method, path, role, body):
    r = api.call(method, path, user=None, headers={"Authorization": "Bearer edr_nope"})
    assert r.status_code == 401


@pytest.mark.parametrize(("method", "path", "role", "body"), ENDPOINTS, ids=IDS)
def test_lower_roles_are_403(api, method, path, role, body):
    lower = [r for r, rank in RANK.items() if rank < RANK[role]]
    for weaker in lower:
        r = api.call(method, path, user=USER_OF[weaker], json={} if body else None)
        assert r.status_code == 403, (weaker, r.text)
        assert "role" in r.json()["error"]


UNSAFE = [e for e in ENDPOINTS if e[0] != "GET"]


@pytest.mark.parametrize(
    ("method", "path", "role", "body"), UNSAFE, ids=[f"{m} {p}" for m, p, _, _ in UNSAFE]
)
def test_session_without_csrf_is_403(api, method, path, role, body):
    r = api.session_call(method, path, USER_OF[role], csrf=False, json={})
    assert r.status_code == 403, r.text
    assert "X-CSRF-Token" in r.json()["error"]
    wrong = api.login(USER_OF[role])
    r = api.http.request(
        method, path, json={}, headers={"Cookie": wrong.cookie, "X-CSRF-Token": "x" * 43}
    )
    assert r.status_code == 403


def test_session_with_csrf_passes(api):
    api.add_host()
    r = api.session_call("POST", "/api/v1/hosts/host-1/commands", "rex", json={"action": "isolate"})
    assert r.status_code == 201, r.text
    assert r.json()["requested_by"] == "rex"
    assert api.session_call("GET", "/api/v1/hosts", "val", csrf=False).status_code == 200


BODIES = [e for e in ENDPOINTS if e[3]]


@pytest.mark.parametrize(
    ("method", "path", "role", "body"), BODIES, ids=[f"{m} {p}" for m, p, _, _ in BODIES]
)
def test_bad_json_is_400(api, method, path, role, body):
    api.add_host()
    user = USER_OF[role]
    for raw in (b"{not json", b"[1, 2]", b'"text"'):
        r = api.call(
            method, path, user=user, content=raw, headers={"Content-Type": "application/json"}
        )
        assert r.status_code == 400, (raw, r.text)
        assert "JSON" in r.json()["error"]


@pytest.mark.parametrize(
    ("method", "path", "role", "body"), BODIES, ids=[f"{m} {p}" for m, p, _, _ in BODIES]
)
def test_oversized_body_is_413(api, method, path, role, body):
    api.add_host()
    big = b'{"x": "' + b"a" * (2 * 1024 * 1024) + b'"}'
    r = api.call(
        method, path, user=USER_OF[role], content=big, headers={"Content-Type": "application/json"}
    )
    assert r.status_code == 413, r.text[:200]
    assert r.json()["error"]


def test_endpoint_limit_below_app_limit_is_413(api):
    api.add_host()
    # 100 KiB fits the app's 1 MiB limit but not a command's 64 KiB.
    r = api.post(
        "/api/v1/hosts/host-1/commands",
        user="rex",
        json={"action": "isolate", "args": {"pad": "a" * 100_000}},
    )
    assert r.status_code == 413
    assert "65536" in r.json()["error"]


def test_non_json_content_type_is_415(api):
    api.add_host()
    r = api.call(
        "POST",
        "/api/v1/hosts/host-1/commands",
        user="rex",
        content=b'{"action": "isolate"}',
        headers={"Content-Type": "text/plain"},
    )
    assert r.status_code == 415


def test_unknown_query_parameter_is_400(api):
    r = api.get("/api/v1/hosts?colour=red")
    assert r.status_code == 400
    assert "colour" in r.json()["error"]
    r = api.get("/api/v1/events?limit=1&limit=2")
    assert r.status_code == 400


def test_unknown_route_is_json_404(api):
    r = api.get("/api/v1/nothing-here")
    assert r.status_code == 404
    assert r.json()["error"]

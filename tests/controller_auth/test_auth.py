"""Login, sessions, CSRF, roles, API tokens, users and audit over real HTTP."""

from __future__ import annotations

import json

import pytest
from argon2 import PasswordHasher

from controller import auth

from .conftest import FAST_HASHER, PASSWORDS, Api

pytestmark = pytest.mark.timeout(60)


def audit_rows(api: Api) -> list[dict]:
    return [
        {
            "actor": e.actor,
            "action": e.action,
            "target": e.target,
            "detail": e.detail,
            "source": e.source,
        }
        for e in api.store.list_audit(limit=1000)
    ]


# -- passwords ------------------------------------------------------------------------------


def test_hash_and_verify_with_rehash_on_parameter_change() -> None:
    h = auth.hash_password("correct horse battery", FAST_HASHER)
    assert h.startswith("$argon2id$")
    assert auth.verify_password(h, "correct horse battery", FAST_HASHER) == (True, None)
    assert auth.verify_password(h, "wrong horse battery", FAST_HASHER) == (False, None)
    stronger = PasswordHasher(time_cost=2, memory_cost=2048, parallelism=1)
    ok, new = auth.verify_password(h, "correct horse battery", stronger)
    assert ok and new is not None and new != h and not stronger.check_needs_rehash(new)
    assert auth.verify_password("not-a-hash", "x", FAST_HASHER) == (False, None)
    with pytest.raises(ValueError, match="at least 12"):
        auth.validate_password("short")


# -- login ----------------------------------------------------------------------------------


def test_login_sets_hardened_cookie_and_me_returns_csrf(api: Api) -> None:
    r = api.http.post(
        "/api/v1/auth/login", json={"username": "alice", "password": PASSWORDS["alice"]}
    )
    assert r.status_code == 200
    body = r.json()
    assert body["username"] == "alice" and body["role"] == "admin" and len(body["csrf_token"]) >= 43
    set_cookie = r.headers["set-cookie"]
    assert set_cookie.startswith(auth.COOKIE_FULL_NAME + "=")
    flags = {p.strip().split("=")[0].lower() for p in set_cookie.split(";")}
    assert {"httponly", "secure", "samesite", "path", "max-age"} <= flags
    assert "samesite=strict" in set_cookie.lower()
    sid = r.cookies[auth.COOKIE_FULL_NAME]
    assert len(sid) == 43  # 256 bits, url-safe base64
    # Stored hashed: the raw id appears nowhere in the database.
    rows = api.store._writer.execute("SELECT id_hash FROM sessions").fetchall()
    assert len(rows) == 1 and rows[0][0] != sid and sid not in rows[0][0]
    me = api.http.get("/api/v1/auth/me", headers={"Cookie": f"{auth.COOKIE_FULL_NAME}={sid}"})
    assert me.status_code == 200
    assert me.json()["csrf_token"] == body["csrf_token"] and me.json()["via"] == "session"


def test_plain_cookie_name_is_not_accepted(api: Api) -> None:
    s = api.login("alice")
    r = api.http.get("/api/v1/auth/me", headers={"Cookie": f"edr_session={s.cookie}"})
    assert r.status_code == 401


@pytest.mark.parametrize(
    ("payload", "status"),
    [
        ({"username": "alice", "password": "wrong-password-123"}, 401),
        ({"username": "nobody", "password": "whatever-password"}, 401),
        ({"username": "alice"}, 400),
        ({"username": "alice", "password": 5}, 400),
        ({"username": "alice", "password": "x", "extra": 1}, 400),
        (["alice"], 400),
    ],
)
def test_login_failures(api: Api, payload: object, status: int) -> None:
    r = api.http.post("/api/v1/auth/login", json=payload)
    assert r.status_code == status
    assert "error" in r.json()
    assert "set-cookie" not in r.headers


def test_unknown_and_wrong_password_look_the_same(api: Api) -> None:
    a = api.http.post(
        "/api/v1/auth/login", json={"username": "alice", "password": "nope-nope-nope"}
    )
    b = api.http.post(
        "/api/v1/auth/login", json={"username": "ghost", "password": "nope-nope-nope"}
    )
    assert a.status_code == b.status_code == 401
    assert a.json() == b.json()


def test_disabled_user_cannot_log_in(api: Api) -> None:
    api.store.update_user("vera", disabled=True)
    r = api.http.post(
        "/api/v1/auth/login", json={"username": "vera", "password": PASSWORDS["vera"]}
    )
    assert r.status_code == 401


def test_login_rate_limited_per_username_then_recovers(api: Api) -> None:
    for _ in range(5):
        r = api.http.post(
            "/api/v1/auth/login", json={"username": "rob", "password": "bad-password-1"}
        )
        assert r.status_code == 401
    # Even the right password is refused while throttled.
    r = api.http.post("/api/v1/auth/login", json={"username": "rob", "password": PASSWORDS["rob"]})
    assert r.status_code == 429
    assert 1 <= int(r.headers["Retry-After"]) <= 300
    assert r.json()["error"].startswith("too many")
    api.clock.advance(301)
    r = api.http.post("/api/v1/auth/login", json={"username": "rob", "password": PASSWORDS["rob"]})
    assert r.status_code == 200


def test_login_rate_limited_per_source_address(api: Api) -> None:
    for i in range(5):
        r = api.http.post(
            "/api/v1/auth/login", json={"username": f"u{i}", "password": "bad-password-1"}
        )
        assert r.status_code == 401
    # A different username from the same address is throttled too.
    r = api.http.post(
        "/api/v1/auth/login", json={"username": "alice", "password": PASSWORDS["alice"]}
    )
    assert r.status_code == 429


def test_limiter_bounds_keys() -> None:
    lim = auth.LoginLimiter(2, 10.0, max_keys=3)
    for k in "abcd":
        lim.fail(k, 0.0)
        lim.fail(k, 0.0)
    assert lim.retry_after("a", 1.0) is None  # evicted
    assert lim.retry_after("d", 1.0) == pytest.approx(9.0)
    assert lim.retry_after("d", 10.0) is None


# -- sessions -------------------------------------------------------------------------------


def test_session_idle_timeout_and_absolute_expiry(api: Api) -> None:
    api.login("vera")
    assert api.request("GET", "/api/v1/auth/me", as_user="vera").status_code == 200
    api.clock.advance(29 * 60)  # activity within the idle timeout keeps it alive
    assert api.request("GET", "/api/v1/auth/me", as_user="vera").status_code == 200
    api.clock.advance(31 * 60)
    r = api.request("GET", "/api/v1/auth/me", as_user="vera")
    assert r.status_code == 401 and "expired" in r.json()["error"]
    # Absolute expiry even with constant activity.
    api.login("vera")
    for _ in range(12 * 4 + 1):
        api.clock.advance(15 * 60)
        r = api.request("GET", "/api/v1/auth/me", as_user="vera")
    assert r.status_code == 401


def test_logout_invalidates_session(api: Api) -> None:
    s = api.login("vera")
    r = api.request("POST", "/api/v1/auth/logout", as_user="vera")
    assert r.status_code == 200
    assert auth.COOKIE_FULL_NAME in r.headers["set-cookie"]
    r = api.http.get("/api/v1/auth/me", headers={"Cookie": f"{auth.COOKIE_FULL_NAME}={s.cookie}"})
    assert r.status_code == 401


def test_garbage_session_cookie(api: Api) -> None:
    for value in ("x", "A" * 43, "é" * 10):
        r = api.http.get(
            "/api/v1/auth/me", headers={"Cookie": f"{auth.COOKIE_FULL_NAME}={value}".encode()}
        )
        assert r.status_code == 401, value


# -- CSRF -----------------------------------------------------------------------------------


@pytest.mark.parametrize("csrf", [False, "wrong", ""])
def test_state_change_without_right_csrf_is_refused(api: Api, csrf: str | bool) -> None:
    r = api.request(
        "POST",
        "/api/v1/users",
        as_user="alice",
        csrf=csrf,
        json={"username": "eve", "password": "eve-password-123", "role": "viewer"},
    )
    assert r.status_code == 403 and "CSRF" in r.json()["error"]
    assert all(u.username != "eve" for u in api.store.list_users())
    r = api.request("POST", "/api/v1/auth/logout", as_user="alice", csrf=csrf)
    assert r.status_code == 403


def test_safe_methods_need_no_csrf(api: Api) -> None:
    assert api.request("GET", "/api/v1/users", as_user="alice", csrf=False).status_code == 200


# -- roles ----------------------------------------------------------------------------------


def test_roles_enforced(api: Api) -> None:
    new = {"username": "eve", "password": "eve-password-123", "role": "viewer"}
    assert api.request("POST", "/api/v1/users", as_user="vera", json=new).status_code == 403
    assert api.request("GET", "/api/v1/users", as_user="rob").status_code == 403
    r = api.request(
        "POST", "/api/v1/api-tokens", as_user="rob", json={"name": "x", "role": "viewer"}
    )
    assert r.status_code == 403 and "admin" in r.json()["error"]
    assert api.request("GET", "/api/v1/audit", as_user="rob").status_code == 403
    assert api.request("GET", "/api/v1/users").status_code == 401
    assert api.request("POST", "/api/v1/users", as_user="alice", json=new).status_code == 201


def test_require_refuses_unknown_role() -> None:
    with pytest.raises(ValueError, match="unknown role"):
        auth.require("root")


def test_role_change_applies_to_live_session(api: Api) -> None:
    api.login("rob")
    assert api.request("GET", "/api/v1/users", as_user="rob").status_code == 403
    api.request("PATCH", "/api/v1/users/rob", as_user="alice", json={"role": "admin"})
    # Promotion does not end sessions; the role is read per request.
    assert api.request("GET", "/api/v1/users", as_user="rob").status_code == 200


# -- API tokens -----------------------------------------------------------------------------


def make_token(api: Api, role: str, name: str = "ci") -> dict:
    r = api.request(
        "POST", "/api/v1/api-tokens", as_user="alice", json={"name": name, "role": role}
    )
    assert r.status_code == 201, r.text
    return r.json()


def test_bearer_token_lifecycle(api: Api) -> None:
    tok = make_token(api, "viewer")
    secret = tok["token"]
    assert secret.startswith("edr_") and tok["role"] == "viewer"
    # Stored hashed and never listed.
    listed = api.request("GET", "/api/v1/api-tokens", as_user="alice").json()["tokens"]
    assert secret not in json.dumps(listed) and listed[0]["name"] == "ci"
    assert secret not in json.dumps([t.token_hash for t in api.store.list_api_tokens()])
    me = api.request("GET", "/api/v1/auth/me", token=secret).json()
    assert me["via"] == "token" and me["role"] == "viewer" and me["csrf_token"] is None
    # Bearer needs no CSRF, but the role still applies.
    r = api.request(
        "POST",
        "/api/v1/users",
        token=secret,
        json={"username": "eve", "password": "eve-password-123", "role": "viewer"},
    )
    assert r.status_code == 403
    assert api.store.list_api_tokens()[0].last_used is not None
    r = api.request("DELETE", f"/api/v1/api-tokens/{tok['id']}", as_user="alice")
    assert r.status_code == 200 and r.json()["revoked"] is True
    r = api.request("GET", "/api/v1/auth/me", token=secret)
    assert r.status_code == 401 and "revoked" in r.json()["error"]
    assert api.request("DELETE", "/api/v1/api-tokens/999", as_user="alice").status_code == 404


def test_admin_token_can_manage_without_csrf(api: Api) -> None:
    secret = make_token(api, "admin")["token"]
    r = api.request(
        "POST",
        "/api/v1/users",
        token=secret,
        json={"username": "eve", "password": "eve-password-123", "role": "viewer"},
    )
    assert r.status_code == 201
    actor = api.store.list_audit(action="user.create")[0].actor
    assert actor.startswith("token:")


@pytest.mark.parametrize("header", ["Bearer", "Basic abc", "Bearer nope", "Bearer " + "x" * 300])
def test_bad_authorization_headers(api: Api, header: str) -> None:
    r = api.http.get("/api/v1/auth/me", headers={"Authorization": header})
    assert r.status_code == 401
    assert r.headers["WWW-Authenticate"].startswith("Bearer")


def test_token_of_disabled_owner_stops_working(api: Api) -> None:
    api.request(
        "POST",
        "/api/v1/users",
        as_user="alice",
        json={"username": "ops", "password": "ops-password-123", "role": "admin"},
    )
    api.login("ops", "ops-password-123")
    secret = api.request(
        "POST", "/api/v1/api-tokens", as_user="ops", json={"name": "ops-ci", "role": "viewer"}
    ).json()["token"]
    assert api.request("GET", "/api/v1/auth/me", token=secret).status_code == 200
    api.request("PATCH", "/api/v1/users/ops", as_user="alice", json={"disabled": True})
    assert api.request("GET", "/api/v1/auth/me", token=secret).status_code == 401


# -- users ----------------------------------------------------------------------------------


def test_user_management(api: Api) -> None:
    new = {"username": "eve", "password": "eve-password-123", "role": "responder"}
    r = api.request("POST", "/api/v1/users", as_user="alice", json=new)
    assert r.status_code == 201 and "password" not in json.dumps(r.json())
    assert api.request("POST", "/api/v1/users", as_user="alice", json=new).status_code == 409
    bad = [
        {**new, "username": "bad name"},
        {**new, "username": "eve2", "password": "short"},
        {**new, "username": "eve3", "role": "root"},
    ]
    for body in bad:
        assert api.request("POST", "/api/v1/users", as_user="alice", json=body).status_code == 400
    users = api.request("GET", "/api/v1/users", as_user="alice").json()["users"]
    assert {u["username"] for u in users} == {"alice", "rob", "vera", "eve"}
    assert "$argon2" not in json.dumps(users)
    assert api.request("GET", "/api/v1/users/nobody", as_user="alice").status_code == 404
    api.login("eve", "eve-password-123")
    r = api.request("PATCH", "/api/v1/users/eve", as_user="alice", json={"disabled": True})
    assert r.status_code == 200 and r.json()["disabled"] is True
    assert api.request("GET", "/api/v1/auth/me", as_user="eve").status_code == 401
    assert api.request("PATCH", "/api/v1/users/eve", as_user="alice", json={}).status_code == 400
    r = api.request("PATCH", "/api/v1/users/ghost", as_user="alice", json={"role": "viewer"})
    assert r.status_code == 404


def test_last_admin_cannot_be_demoted_or_disabled(api: Api) -> None:
    for change in ({"role": "viewer"}, {"disabled": True}):
        r = api.request("PATCH", "/api/v1/users/alice", as_user="alice", json=change)
        assert r.status_code == 409 and "last admin" in r.json()["error"]
    assert api.store.get_user("alice").role == "admin"
    api.request("PATCH", "/api/v1/users/rob", as_user="alice", json={"role": "admin"})
    r = api.request("PATCH", "/api/v1/users/alice", as_user="alice", json={"role": "viewer"})
    assert r.status_code == 200
    # rob is now the last admin.
    r = api.request("PATCH", "/api/v1/users/rob", as_user="rob", json={"disabled": True})
    assert r.status_code == 409


def test_password_reset_and_own_change(api: Api) -> None:
    old = api.login("vera")
    r = api.request(
        "POST",
        "/api/v1/users/vera/password",
        as_user="alice",
        json={"password": "a-brand-new-password"},
    )
    assert r.status_code == 200
    r = api.http.get("/api/v1/auth/me", headers={"Cookie": f"{auth.COOKIE_FULL_NAME}={old.cookie}"})
    assert r.status_code == 401  # reset ends the user's sessions
    api.sessions.clear()
    api.login("vera", "a-brand-new-password")
    other = api.sessions["vera"]
    api.login("vera", "a-brand-new-password")  # a second session
    r = api.request(
        "POST",
        "/api/v1/auth/password",
        as_user="vera",
        json={"current_password": "wrong-password-x", "new_password": "whatever-new-pass"},
    )
    assert r.status_code == 403
    r = api.request(
        "POST",
        "/api/v1/auth/password",
        as_user="vera",
        json={"current_password": "a-brand-new-password", "new_password": "short"},
    )
    assert r.status_code == 400
    r = api.request(
        "POST",
        "/api/v1/auth/password",
        as_user="vera",
        json={"current_password": "a-brand-new-password", "new_password": "vera-third-password"},
    )
    assert r.status_code == 200 and r.json()["sessions_ended"] == 1
    assert api.request("GET", "/api/v1/auth/me", as_user="vera").status_code == 200
    r = api.http.get(
        "/api/v1/auth/me", headers={"Cookie": f"{auth.COOKIE_FULL_NAME}={other.cookie}"}
    )
    assert r.status_code == 401
    secret = make_token(api, "viewer")["token"]
    r = api.request(
        "POST",
        "/api/v1/auth/password",
        token=secret,
        json={"current_password": "x", "new_password": "y" * 12},
    )
    assert r.status_code == 400


# -- audit ----------------------------------------------------------------------------------


def test_every_change_is_audited_without_secrets(api: Api) -> None:
    api.http.post("/api/v1/auth/login", json={"username": "alice", "password": "wrong-pass-alice"})
    api.http.post("/api/v1/auth/login", json={"username": "Hunter2Secret!", "password": "x"})
    api.login("alice")
    api.request(
        "POST",
        "/api/v1/users",
        as_user="alice",
        json={"username": "eve", "password": "eve-password-123", "role": "viewer"},
    )
    api.request("PATCH", "/api/v1/users/eve", as_user="alice", json={"role": "responder"})
    api.request(
        "POST", "/api/v1/users/eve/password", as_user="alice", json={"password": "eve-password-456"}
    )
    tok = make_token(api, "viewer")
    api.request("DELETE", f"/api/v1/api-tokens/{tok['id']}", as_user="alice")
    api.request("POST", "/api/v1/auth/logout", as_user="alice")
    rows = audit_rows(api)
    actions = [r["action"] for r in reversed(rows)]
    assert actions == [
        "auth.login_failed",
        "auth.login_failed",
        "auth.login",
        "user.create",
        "user.update",
        "user.password_reset",
        "api_token.create",
        "api_token.revoke",
        "auth.logout",
    ]
    assert all(r["source"] == "127.0.0.1" for r in rows)
    by_action = {r["action"]: r for r in rows}
    assert (
        by_action["user.create"]["actor"] == "alice" and by_action["user.create"]["target"] == "eve"
    )
    assert by_action["user.update"]["detail"]["role"] == "responder"
    dump = json.dumps(rows)
    for secret in (
        "wrong-pass-alice",
        "Hunter2Secret!",
        "eve-password-123",
        "eve-password-456",
        tok["token"],
        PASSWORDS["alice"],
        api.sessions["alice"].cookie,
        api.sessions["alice"].csrf,
    ):
        assert secret not in dump


def test_audit_scrubs_secret_looking_details() -> None:
    scrubbed = auth._scrub({"a": 1, "new_password": "p", "nested": [{"api_token": "t"}]})
    assert scrubbed == {
        "a": 1,
        "new_password": "[redacted]",
        "nested": [{"api_token": "[redacted]"}],
    }


def test_audit_endpoint_filters_and_pages(api: Api) -> None:
    for i in range(5):
        api.request(
            "POST",
            "/api/v1/users",
            as_user="alice",
            json={"username": f"user{i}", "password": "user-password-123", "role": "viewer"},
        )
        api.clock.advance(10)
    r = api.request("GET", "/api/v1/audit?action=user.create&limit=2", as_user="alice")
    page = r.json()
    assert [e["target"] for e in page["entries"]] == ["user4", "user3"]
    r = api.request(
        "GET",
        f"/api/v1/audit?action=user.create&limit=2&before_id={page['next_before_id']}",
        as_user="alice",
    )
    assert [e["target"] for e in r.json()["entries"]] == ["user2", "user1"]
    since = api.clock.now - 25
    r = api.request("GET", f"/api/v1/audit?since={since}&action=user.create", as_user="alice")
    assert [e["target"] for e in r.json()["entries"]] == ["user4", "user3"]
    assert r.json()["next_before_id"] is None
    r = api.request("GET", "/api/v1/audit?actor=alice&action=auth.login", as_user="alice")
    assert len(r.json()["entries"]) == 1
    for bad in ("limit=0", "limit=x", "since=nan", "before_id=-1", "actor=%01"):
        r = api.request("GET", f"/api/v1/audit?{bad}", as_user="alice")
        assert r.status_code == 400, bad
        assert "error" in r.json()


def test_session_endpoint_answers_without_an_error_status(api: Api) -> None:
    """A console's first visit asks whether there is a session; "no" is not an error."""
    r = api.request("GET", "/api/v1/auth/session")
    assert r.status_code == 200 and r.json() == {"authenticated": False}
    forged = {"Cookie": f"{auth.COOKIE_FULL_NAME}=forged"}
    r = api.request("GET", "/api/v1/auth/session", headers=forged)
    assert r.status_code == 200 and r.json() == {"authenticated": False}
    r = api.request("GET", "/api/v1/auth/session", as_user="alice")
    body = r.json()
    assert r.status_code == 200 and body["authenticated"] is True
    assert body["username"] == "alice" and body["csrf_token"] == api.sessions["alice"].csrf

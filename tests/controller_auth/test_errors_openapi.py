"""JSON errors everywhere, the OpenAPI document's validity and completeness, and schemathesis
against AUTH's endpoints (no 5xx for any generated request)."""

from __future__ import annotations

import re
from pathlib import Path

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from openapi_spec_validator import validate
from sanic import Request

from controller import openapi
from controller.errors import ApiError, Field, json_body

from .conftest import MAX_BODY, Api, LiveServer, build_app

pytestmark = pytest.mark.timeout(120)


# -- errors ---------------------------------------------------------------------------------


def test_malformed_json_is_a_clear_400(api: Api) -> None:
    r = api.http.post(
        "/api/v1/auth/login",
        content=b'{"username": "al',
        headers={"Content-Type": "application/json"},
    )
    assert r.status_code == 400 and r.json()["error"].startswith("request body is not valid JSON")
    r = api.http.post(
        "/api/v1/auth/login", content=b"", headers={"Content-Type": "application/json"}
    )
    assert r.status_code == 400 and "empty" in r.json()["error"]


def test_non_json_content_type_is_415(api: Api) -> None:
    r = api.http.post("/api/v1/auth/login", data={"username": "alice", "password": "x"})
    assert r.status_code == 415 and "application/json" in r.json()["error"]


def test_oversized_body_is_413_json(api: Api) -> None:
    r = api.http.post(
        "/api/v1/auth/login",
        content=b"{" + b" " * (MAX_BODY + 10) + b"}",
        headers={"Content-Type": "application/json"},
    )
    assert r.status_code == 413 and "error" in r.json()


def test_unknown_route_and_wrong_method_are_json(api: Api) -> None:
    r = api.http.get("/api/v1/nothing-here")
    assert r.status_code == 404 and r.headers["content-type"].startswith("application/json")
    assert "error" in r.json()
    r = api.http.delete("/api/v1/auth/login")
    assert r.status_code == 405 and "error" in r.json()
    r = api.request("GET", "/api/v1/users/nobody", as_user="alice")
    assert r.status_code == 404 and "nobody" in r.json()["error"]


def test_unexpected_exception_is_json_500_without_details(tmp_path: Path, api: Api) -> None:
    from controller import auth

    app = build_app(api.store, auth.AuthSettings(clock=api.clock))

    @app.get("/boom")
    async def boom(request: Request) -> None:
        raise RuntimeError("secret internal detail")

    @app.post("/typed")
    async def typed(request: Request) -> None:
        await json_body(
            request,
            {
                "n": Field(int, minimum=1, maximum=5),
                "s": Field(str, required=False, choices=("a", "b")),
            },
        )
        raise ApiError(418, "teapot", headers={"X-Extra": "1"}, detail="more")

    server = LiveServer(app)
    server.start()
    try:
        with httpx.Client(base_url=server.url, timeout=10) as http:
            r = http.get("/boom")
            assert r.status_code == 500 and r.json() == {"error": "internal server error"}
            cases = [
                ({"n": True}, "n must be an integer"),
                ({"n": 9}, "n must be at most 5"),
                ({"n": 2, "s": "c"}, "s must be one of: a, b"),
                ({}, "n is required"),
            ]
            for body, message in cases:
                r = http.post("/typed", json=body)
                assert r.status_code == 400 and r.json()["error"] == message, body
            r = http.post("/typed", json={"n": 3})
            assert r.status_code == 418 and r.json() == {"error": "teapot", "detail": "more"}
            assert r.headers["X-Extra"] == "1"
    finally:
        server.stop()


# -- OpenAPI --------------------------------------------------------------------------------


def test_document_is_valid_openapi_and_served(api: Api) -> None:
    doc = api.http.get("/api/v1/openapi.json").json()
    validate(doc)
    assert doc == openapi.build_document()
    schemes = doc["components"]["securitySchemes"]
    assert schemes["sessionCookie"]["name"] == "__Host-edr_session"
    assert schemes["csrfHeader"]["name"] == "X-CSRF-Token"
    assert schemes["bearerToken"]["scheme"] == "bearer"


def _sanic_path(path: str) -> str:
    return "/" + re.sub(r"<([^:>]+)(:[^>]+)?>", r"{\1}", path.lstrip("/"))


def test_document_covers_every_mounted_route(tmp_path: Path) -> None:
    """Every route of the real app (controller.app.create_app) is documented, and nothing
    documented is missing from the app."""
    app_mod = pytest.importorskip("controller.app")
    from controller.config import ControllerConfig

    app = app_mod.create_app(ControllerConfig(state_dir=tmp_path / "state"))
    mounted: set[tuple[str, str]] = set()
    for route in app.router.routes:
        if route.name.endswith("webui") or "<__file_uri__" in route.path:
            continue
        for method in route.methods - {"HEAD", "OPTIONS"}:
            mounted.add((_sanic_path(route.path), method.lower()))
    doc = openapi.build_document()
    documented = {
        (path, method)
        for path, item in doc["paths"].items()
        for method in item
        if method in {"get", "post", "put", "patch", "delete"}
    }
    assert mounted - documented == set(), "routes missing from the OpenAPI document"
    assert documented - mounted == set(), "documented but not mounted"


# -- schemathesis ---------------------------------------------------------------------------

AUTH_PATHS = r"^/api/v1/(auth/|users|api-tokens|audit)"


def test_schemathesis_no_server_errors(api: Api) -> None:
    import schemathesis

    token = api.request(
        "POST", "/api/v1/api-tokens", as_user="alice", json={"name": "fuzz", "role": "admin"}
    ).json()["token"]
    schema = schemathesis.openapi.from_url(f"{api.server.url}/api/v1/openapi.json")
    schema = schema.include(path_regex=AUTH_PATHS)
    failures: list[str] = []
    count = 0
    for result in schema.get_all_operations():
        operation = result.ok()

        @given(case=operation.as_strategy())
        @settings(
            max_examples=40, deadline=None, database=None, suppress_health_check=list(HealthCheck)
        )
        def run(case: object) -> None:
            nonlocal count
            count += 1
            # The fuzzer may disable its own admin user or token: restore between cases.
            if api.store.get_user("alice").disabled or api.store.get_user("alice").role != "admin":
                api.store.update_user("alice", role="admin", disabled=False)
            response = case.call(  # type: ignore[attr-defined]
                base_url=api.server.url, headers={"Authorization": f"Bearer {token}"}
            )
            if response.status_code >= 500:
                failures.append(f"{case.method} {case.formatted_path}: {response.status_code}")  # type: ignore[attr-defined]
            ctype = response.headers.get("content-type") or [""]
            ctype = ctype[0] if isinstance(ctype, list) else ctype
            if response.status_code >= 400 and not ctype.startswith("application/json"):
                failures.append(f"{case.method} {case.formatted_path}: non-JSON error")  # type: ignore[attr-defined]

        run()
    assert count > 200
    assert failures == []

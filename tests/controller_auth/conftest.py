"""A fresh controller app per test, served over real HTTP on loopback.

The app is built the way ``controller.app.create_app`` mounts AUTH's parts (error handlers,
the auth blueprint, the OpenAPI blueprint) on a real ``SQLiteStore`` in a temporary
directory; the full ``create_app`` also starts the backplane and the PKI, which these tests
do not need. The server runs on its own event loop in a thread, so tests stay synchronous and
use a plain ``httpx.Client``. Session cookies carry ``Secure`` and httpx will not send them
over plain HTTP, so ``Api`` passes the cookie itself, as a browser on HTTPS would.
"""

from __future__ import annotations

import asyncio
import itertools
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
from argon2 import PasswordHasher
from sanic import Sanic

from controller import auth, errors, openapi
from controller.store import SQLiteStore

_names = itertools.count(1)
# Cheap argon2 parameters keep each login fast; the production defaults are tested on their own.
FAST_HASHER = PasswordHasher(time_cost=1, memory_cost=1024, parallelism=1)
PASSWORDS = {
    "alice": "alice-admin-password",
    "rob": "rob-responder-password",
    "vera": "vera-viewer-password",
}
ROLES = {"alice": "admin", "rob": "responder", "vera": "viewer"}
MAX_BODY = 64 * 1024


class Clock:
    """An injectable clock the test moves by hand."""

    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def build_app(store: SQLiteStore, settings: auth.AuthSettings) -> Sanic:
    app = Sanic(f"auth_test_{next(_names)}")
    # TouchUp rewrites Sanic's own modules once per process; a second app would break it.
    app.config.TOUCHUP = False
    errors.install_error_handlers(app, max_body=MAX_BODY)
    app.ctx.store = store
    app.ctx.auth_settings = settings
    app.blueprint(auth.create_blueprint())
    app.blueprint(openapi.create_blueprint())
    return app


class LiveServer:
    """Runs ``app`` on 127.0.0.1 (a free port) on its own loop in a daemon thread."""

    def __init__(self, app: Sanic) -> None:
        self.app = app
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        sock.close()
        self.loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._server: Any = None
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self._server = self.loop.run_until_complete(
                self.app.create_server(
                    host="127.0.0.1",
                    port=self.port,
                    return_asyncio_server=True,
                    access_log=False,
                )
            )
            self.loop.run_until_complete(self._server.startup())
            self.loop.run_until_complete(self._server.before_start())
            self.loop.run_until_complete(self._server.after_start())
        except BaseException as e:  # reported to the test thread
            self._error = e
            self._ready.set()
            return
        self._ready.set()
        self.loop.run_forever()

    def start(self) -> None:
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("test server did not start in 10 s")
        if self._error is not None:
            raise self._error

    def stop(self) -> None:
        async def _close() -> None:
            await self._server.before_stop()
            self._server.close()
            await self._server.wait_closed()
            await self._server.after_stop()

        asyncio.run_coroutine_threadsafe(_close(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@dataclass
class Session:
    cookie: str
    csrf: str
    role: str


@dataclass
class Api:
    """Requests against the live server, with a session cookie or a bearer token."""

    http: httpx.Client
    store: SQLiteStore
    clock: Clock
    server: LiveServer
    sessions: dict[str, Session] = field(default_factory=dict)

    def request(
        self,
        method: str,
        path: str,
        *,
        as_user: str | None = None,
        token: str | None = None,
        csrf: str | bool = True,
        json: Any = None,
        headers: dict[str, str] | None = None,
        **kw: Any,
    ) -> httpx.Response:
        hdrs = dict(headers or {})
        if as_user is not None:
            s = self.sessions.get(as_user) or self.login(as_user)
            hdrs["Cookie"] = f"{auth.COOKIE_FULL_NAME}={s.cookie}"
            if csrf is True:
                hdrs[auth.CSRF_HEADER] = s.csrf
            elif isinstance(csrf, str):
                hdrs[auth.CSRF_HEADER] = csrf
        if token is not None:
            hdrs["Authorization"] = f"Bearer {token}"
        return self.http.request(method, path, json=json, headers=hdrs, **kw)

    def login(self, username: str, password: str | None = None) -> Session:
        r = self.http.post(
            "/api/v1/auth/login",
            json={"username": username, "password": password or PASSWORDS[username]},
        )
        assert r.status_code == 200, r.text
        cookie = r.cookies.get(auth.COOKIE_FULL_NAME)
        assert cookie
        s = Session(cookie, r.json()["csrf_token"], r.json()["role"])
        self.sessions[username] = s
        return s


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def api(tmp_path: Any, clock: Clock) -> Iterator[Api]:
    store = SQLiteStore(tmp_path / "controller.db", clock=clock)
    for name, pw in PASSWORDS.items():
        store.create_user(name, auth.hash_password(pw, FAST_HASHER), ROLES[name])
    settings = auth.AuthSettings(clock=clock, hasher=FAST_HASHER)
    server = LiveServer(build_app(store, settings))
    server.start()
    try:
        with httpx.Client(base_url=server.url, timeout=10) as http:
            yield Api(http, store, clock, server)
    finally:
        server.stop()
        store.close()

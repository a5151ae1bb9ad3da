"""A fresh controller app per test with the API blueprints, served over real HTTP on loopback.

``controller.app.create_app`` also starts the backplane listener; these tests need only the
HTTP side, so the app is assembled here the way ``create_app`` mounts it: AUTH's error
handlers and auth blueprint plus every module in ``controller.api.BLUEPRINTS``, with a real
``SQLiteStore``, a real ``PKIStore`` and a real ``DetectionEngine`` on ``app.ctx``. The only
stand-in is ``FakeBackplane``, which records the notify calls (the real server is tested by
the backplane's own suite).

Callers authenticate as real users: API tokens stored through the store (hashed as auth
does) for most requests, and real logins (session cookie + CSRF token) for the CSRF cases.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import secrets
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from argon2 import PasswordHasher
from sanic import Sanic

import controller.api
from certs.store import PKIStore
from controller import auth, errors
from controller.detection import DetectionEngine
from controller.store import HostHello, SQLiteStore

_names = itertools.count(1)
FAST_HASHER = PasswordHasher(time_cost=1, memory_cost=1024, parallelism=1)
MAX_BODY = 1024 * 1024
USERS = {"ada": "admin", "rex": "responder", "val": "viewer"}
PASSWORD = "correct horse battery staple"  # noqa: S105 -- test users only


class FakeBackplane:
    """Records what the API asks of the backplane; ``connected`` is what it reports."""

    def __init__(self) -> None:
        self.connected: set[str] = set()
        self.commands: list[str] = []
        self.policies: list[str] = []
        self.crl_reloads = 0

    def notify_command(self, host_id: str) -> None:
        self.commands.append(host_id)

    def notify_policy(self, host_id: str) -> None:
        self.policies.append(host_id)

    def connected_hosts(self) -> set[str]:
        return set(self.connected)

    def reload_crl(self) -> int:
        self.crl_reloads += 1
        return 0


class LiveHub:
    """Collects what the API publishes for the live stream."""

    def __init__(self) -> None:
        self.items: list[tuple[str, dict[str, Any]]] = []

    def publish(self, kind: str, item: dict[str, Any]) -> None:
        self.items.append((kind, item))


class LiveServer:
    """Serves ``app`` on 127.0.0.1:<free port> from its own event loop in a thread."""

    def __init__(self, app: Sanic) -> None:
        self.app = app
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        self.error: BaseException | None = None
        self.server: Any = None
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.server = self.loop.run_until_complete(
                self.app.create_server(sock=self.sock, return_asyncio_server=True, access_log=False)
            )
            self.loop.run_until_complete(self.server.startup())
            self.loop.run_until_complete(self.server.before_start())
            self.loop.run_until_complete(self.server.after_start())
        except BaseException as e:  # handed to the test thread
            self.error = e
            self.ready.set()
            return
        self.ready.set()
        self.loop.run_forever()

    def start(self) -> None:
        self.thread.start()
        assert self.ready.wait(15), "test server did not start"
        if self.error is not None:
            raise self.error

    def stop(self) -> None:
        async def close() -> None:
            await self.server.before_stop()
            self.server.close()
            await self.server.wait_closed()
            await self.server.after_stop()

        asyncio.run_coroutine_threadsafe(close(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@dataclass
class Login:
    cookie: str
    csrf: str


@dataclass
class Api:
    """Requests to the live app as a named user (bearer token) or a logged-in session."""

    http: httpx.Client
    app: Sanic
    store: SQLiteStore
    pki: PKIStore
    engine: DetectionEngine
    backplane: FakeBackplane
    live: LiveHub
    rule_dir: Path
    tokens: dict[str, str] = field(default_factory=dict)
    logins: dict[str, Login] = field(default_factory=dict)

    def call(
        self,
        method: str,
        path: str,
        *,
        user: str | None = "ada",
        json: Any = None,
        headers: dict[str, str] | None = None,
        **kw: Any,
    ) -> httpx.Response:
        hdrs = dict(headers or {})
        if user is not None:
            hdrs.setdefault("Authorization", f"Bearer {self.tokens[user]}")
        return self.http.request(method, path, json=json, headers=hdrs, **kw)

    def get(self, path: str, **kw: Any) -> httpx.Response:
        return self.call("GET", path, **kw)

    def post(self, path: str, json: Any = None, **kw: Any) -> httpx.Response:
        return self.call("POST", path, json=json, **kw)

    def login(self, user: str) -> Login:
        """A real login; the cookie is sent by hand (it is ``Secure`` and this is HTTP)."""
        if user not in self.logins:
            r = self.http.post("/api/v1/auth/login", json={"username": user, "password": PASSWORD})
            assert r.status_code == 200, r.text
            cookie = r.headers["set-cookie"].split(";", 1)[0]
            self.logins[user] = Login(cookie, r.json()["csrf_token"])
        return self.logins[user]

    def session_call(
        self, method: str, path: str, user: str = "ada", *, csrf: bool = True, **kw: Any
    ) -> httpx.Response:
        login = self.login(user)
        headers = {"Cookie": login.cookie}
        if csrf:
            headers["X-CSRF-Token"] = login.csrf
        return self.http.request(method, path, headers=headers, **kw)

    def add_host(self, host_id: str = "host-1", hostname: str = "web-1") -> str:
        hello = HostHello(hostname, "Debian 12", "6.18.0", "0.1.0", {"process": "tracepoint"})
        self.store.upsert_host(host_id, hello)
        return host_id


def make_token(store: SQLiteStore, name: str, role: str) -> str:
    secret = "edr_" + secrets.token_urlsafe(32)
    store.create_api_token(name, hashlib.sha256(secret.encode()).hexdigest(), role)
    return secret


@pytest.fixture(scope="session")
def pki_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One initialised PKI directory, copied per test (key generation is the slow part)."""
    path = tmp_path_factory.mktemp("pki-template")
    PKIStore(path).init(["127.0.0.1", "localhost"])
    return path


@pytest.fixture
def api(tmp_path: Path, pki_template: Path) -> Iterator[Api]:
    import shutil

    store = SQLiteStore(tmp_path / "controller.db")
    pki_dir = tmp_path / "pki"
    shutil.copytree(pki_template, pki_dir)
    pki = PKIStore(pki_dir)
    rule_dir = tmp_path / "rules"
    rule_dir.mkdir()
    engine = DetectionEngine()
    report = engine.load([rule_dir])
    backplane = FakeBackplane()
    live = LiveHub()

    app = Sanic(f"api_test_{next(_names)}")
    app.config.TOUCHUP = False
    errors.install_error_handlers(app, max_body=MAX_BODY)
    app.ctx.store = store
    app.ctx.pki = pki
    app.ctx.detection = engine
    app.ctx.rules_report = report
    app.ctx.backplane = backplane
    app.ctx.live = live
    app.ctx.auth_settings = auth.AuthSettings(hasher=FAST_HASHER)
    app.blueprint(auth.create_blueprint())
    for module in controller.api.BLUEPRINTS:
        app.blueprint(module.create_blueprint())

    api = Api(
        httpx.Client(base_url="", timeout=20),
        app, store, pki, engine, backplane, live, rule_dir,
    )  # fmt: skip
    for name, role in USERS.items():
        store.create_user(name, FAST_HASHER.hash(PASSWORD), role)
        api.tokens[name] = make_token(store, f"{name}-token", role)

    server = LiveServer(app)
    server.start()
    api.http = httpx.Client(base_url=f"http://127.0.0.1:{server.port}", timeout=20)
    try:
        yield api
    finally:
        api.http.close()
        server.stop()
        store.close()

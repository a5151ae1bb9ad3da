"""Test harness: a real controller (Sanic over HTTPS + backplane on one loop in a thread), a real
sensor-side backplane client with its outbox, and a websocket reader."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import hashlib
import os
import queue
import secrets
import socket
import ssl
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import orjson
import websockets.sync.client as ws_client

from backplane.client import BackplaneClient, ClientConfig, write_credentials
from backplane.messages import PROTOCOL_VERSION, Command, CommandResult, Hello
from backplane.outbox import Outbox
from controller.app import create_app, ensure_pki
from controller.config import ControllerConfig
from controller.maintenance import Intervals


def wait_for(pred: Callable[[], Any], timeout: float, what: str, step: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(step)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


CLONE_NEWNET = 0x40000000


def enter_netns(name: str) -> None:
    """Move the calling thread (only: network namespaces are per thread) into ``name``."""
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(f"/run/netns/{name}", os.O_RDONLY | os.O_CLOEXEC)
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns into network namespace {name}: {os.strerror(err)}")
    finally:
        os.close(fd)


class Controller:
    """``create_app`` served for real over HTTPS on 127.0.0.1, on its own loop thread."""

    def __init__(
        self,
        config: ControllerConfig,
        *,
        intervals: Intervals | None = None,
        netns: str | None = None,
    ) -> None:
        """``netns``: run the loop thread in that network namespace, so the backplane listens
        there while the HTTPS socket (made here, before the thread starts) stays on the
        machine's loopback."""
        self.config = config
        self.pki = ensure_pki(config)
        self.app = create_app(
            config,
            intervals=intervals
            or Intervals(index_idle=0.2, checkpoint=1, commands=0.2, retention=1, crl=1),
        )
        # Sanic's touch-up rewrites class methods once per process; a second app in the same
        # process trips over it, so tests (many apps per process) turn it off.
        self.app.config.TOUCHUP = False
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.loop = asyncio.new_event_loop()
        entered: Future[None] = Future()
        self.thread = threading.Thread(target=self._run_loop, args=(netns, entered), daemon=True)
        self.thread.start()
        entered.result(10)
        self.server = self.call(self._start())

    def _run_loop(self, netns: str | None, entered: Future[None]) -> None:
        try:
            if netns is not None:
                enter_netns(netns)
        except OSError as exc:
            entered.set_exception(exc)
            return
        entered.set_result(None)
        self.loop.run_forever()

    async def _start(self) -> Any:
        server = await self.app.create_server(
            sock=self.sock,
            ssl={"cert": str(self.pki.server_cert_path), "key": str(self.pki.server_key_path)},
            return_asyncio_server=True,
            access_log=False,
        )
        assert server is not None
        await server.startup()
        await server.before_start()
        await server.after_start()
        self._serving = asyncio.ensure_future(server.serve_forever())
        return server

    async def _stop(self) -> None:
        await self.server.before_stop()
        self.server.close()
        await self.server.wait_closed()
        self._serving.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._serving  # awaited, not left pending for a finalizer to complain about
        await self.server.after_stop()

    def call(self, coro: Any, timeout: float = 30.0) -> Any:
        fut: Future[Any] = asyncio.run_coroutine_threadsafe(coro, self.loop)
        return fut.result(timeout)

    def run(self, fn: Callable[[], Any], timeout: float = 30.0) -> Any:
        """Run ``fn`` on the controller's loop (hub and hooks are loop-only)."""

        async def wrapper() -> Any:
            return fn()

        return self.call(wrapper(), timeout)

    @property
    def ctx(self) -> Any:
        return self.app.ctx

    @property
    def backplane_endpoint(self) -> str:
        return str(self.ctx.backplane_endpoint)

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    def ssl_context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(self.pki.ca_path))
        return ctx

    def api_token(self, role: str = "viewer") -> str:
        """An API token stored the way controller.auth checks it (SHA-256 of the secret)."""
        secret = "edr_" + secrets.token_urlsafe(32)
        digest = hashlib.sha256(secret.encode()).hexdigest()
        self.ctx.store.create_api_token(f"test-{role}-{secrets.token_hex(3)}", digest, role)
        return secret

    def close(self) -> None:
        try:
            self.call(self._stop())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)
            self.loop.close()
            self.sock.close()


class Sensor:
    """A real sensor-side ``BackplaneClient`` + durable ``Outbox``, enrolled offline."""

    def __init__(
        self, ctl: Controller, dir: Path, hostname: str = "sensor-01", policy_version: int = -1
    ) -> None:
        dir.mkdir(parents=True, exist_ok=True)
        self.host_id, cert, key = ctl.pki.issue_offline(hostname)
        self.cred = dir / "client.pem"
        write_credentials(self.cred, key, cert)
        self.outbox = Outbox(dir / "outbox.db", batch_events=100, batch_age=0.05)
        self.hostname = hostname
        self.policy_version = policy_version
        self.commands: list[Command] = []
        self.policies: list[tuple[int, dict[str, Any]]] = []
        cfg = ClientConfig(
            ctl.backplane_endpoint,
            "localhost",
            ctl.pki.ca_path,
            self.cred,
            heartbeat_interval=0.5,
            dead_after=5.0,
            backoff_min=0.05,
            backoff_max=0.5,
        )
        self.client = BackplaneClient(
            cfg,
            self.outbox,
            hello=self._hello,
            on_command=self._on_command,
            on_policy=self._on_policy,
        )

    def _hello(self) -> Hello:
        return Hello(
            PROTOCOL_VERSION,
            "0.1.0-test",
            self.hostname,
            "Debian 12",
            os.uname().release,
            {"process": "fallback"},
            ["kill"],
            self.policy_version,
        )

    def _on_command(self, cmd: Command) -> CommandResult:
        self.commands.append(cmd)
        return CommandResult(cmd.id, "ok", {"did": cmd.action, "args": cmd.args})

    def _on_policy(self, version: int, doc: dict[str, Any]) -> int:
        self.policies.append((version, doc))
        self.policy_version = version
        return version

    def start(self) -> Sensor:
        self.client.start()
        wait_for(self.client.connected.is_set, 15, "sensor connected")
        return self

    def stop(self) -> None:
        self.client.stop()
        self.outbox.close()


class Stream:
    """A websocket client of /api/v1/stream reading into a queue on its own thread."""

    def __init__(self, ctl: Controller, token: str, query: str = "") -> None:
        url = f"wss://127.0.0.1:{ctl.port}/api/v1/stream{query}"
        self.ws = ws_client.connect(
            url,
            ssl=ctl.ssl_context(),
            server_hostname="localhost",
            additional_headers={"Authorization": f"Bearer {token}"},
            open_timeout=10,
        )
        self.messages: queue.Queue[dict[str, Any]] = queue.Queue()
        hello = orjson.loads(self.ws.recv(timeout=10))
        assert hello["kind"] == "hello", hello
        self.hello = hello
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        try:
            for raw in self.ws:
                self.messages.put(orjson.loads(raw))
        except Exception:  # noqa: S110 - closed at the end of the test
            pass

    def next(self, pred: Callable[[dict[str, Any]], bool], timeout: float = 10.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError("no matching message on the stream")
            try:
                msg = self.messages.get(timeout=left)
            except queue.Empty:
                continue
            if pred(msg):
                return msg

    def close(self) -> None:
        self.ws.close()
        self.thread.join(5)


def make_config(tmp: Path, **kw: Any) -> ControllerConfig:
    kw.setdefault("backplane", "tcp://127.0.0.1:0")
    kw.setdefault("http_host", "127.0.0.1")
    kw.setdefault("http_port", 0)
    kw.setdefault("server_names", ("localhost", "127.0.0.1"))
    return ControllerConfig(state_dir=tmp / "state", **kw)

"""Test harness: per-test PKI on disk, a server on its own loop thread, client helpers.

Also a command-line entry (``python bp_harness.py controller|sensor ...``) so tests can run
the controller and the sensor as separate processes and ``kill -9`` them.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))

from bp_sqlite_hooks import SqliteHooks

from backplane.client import BackplaneClient, ClientConfig, write_credentials
from backplane.messages import PROTOCOL_VERSION, Command, CommandResult, Hello
from backplane.outbox import Outbox
from backplane.server import BackplaneServer, ServerConfig
from certs.pki import CertificateAuthority


def wait_for(pred: Callable[[], bool], timeout: float, what: str, step: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(step)


@dataclass
class Pki:
    """A CA and its files in one directory; keys are written 0600."""

    dir: Path
    # Created a year ago, so tests can issue certificates that have already expired.
    ca: CertificateAuthority = field(
        default_factory=lambda: CertificateAuthority.create(
            now=datetime.now(UTC) - timedelta(days=365)
        )
    )
    revoked: list[tuple[int, datetime]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        self.ca_file = self.dir / "ca.pem"
        self.ca_file.write_bytes(self.ca.cert_pem)
        self.crl_file = self.dir / "crl.pem"
        self.write_crl()
        self.server_file = self.server(["localhost", "127.0.0.1", "10.77.0.1"])

    def write_crl(self) -> None:
        tmp = self.crl_file.with_suffix(".tmp")
        tmp.write_bytes(self.ca.crl(self.revoked))
        os.replace(tmp, self.crl_file)

    def server(self, names: list[str], name: str = "server.pem", **kw: Any) -> Path:
        cert, key = self.ca.issue_server(names, **kw)
        path = self.dir / name
        write_credentials(path, key, cert)
        return path

    def client(self, host_id: str, **kw: Any) -> Path:
        cert, key = self.ca.issue_client(host_id, **kw)
        path = self.dir / f"client-{host_id}.pem"
        write_credentials(path, key, cert)
        return path

    def revoke(self, cred_file: Path) -> None:
        from backplane.client import load_certificate

        self.revoked.append((load_certificate(cred_file).serial_number, datetime.now(UTC)))
        # The file watch compares mtimes; make sure the new CRL does not share the old one's.
        time.sleep(0.01)
        self.write_crl()

    def server_config(self, endpoint: str = "tcp://127.0.0.1:0", **kw: Any) -> ServerConfig:
        return ServerConfig(endpoint, self.ca_file, self.server_file, None, self.crl_file, **kw)

    def client_config(
        self, endpoint: str, cred: Path, server_name: str = "localhost", **kw: Any
    ) -> ClientConfig:
        kw.setdefault("backoff_min", 0.05)
        kw.setdefault("backoff_max", 0.5)
        kw.setdefault("heartbeat_interval", 0.5)
        kw.setdefault("dead_after", 3.0)
        return ClientConfig(endpoint, server_name, self.ca_file, cred, **kw)


class ServerThread:
    """A BackplaneServer on its own asyncio loop in a thread, as inside the controller."""

    def __init__(self, config: ServerConfig, hooks: Any, **kw: Any) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.server = self.call(self._make(config, hooks, kw))
        self.endpoint: str = self.call(self.server.start())

    @staticmethod
    async def _make(config: ServerConfig, hooks: Any, kw: dict[str, Any]) -> BackplaneServer:
        return BackplaneServer(config, hooks, **kw)

    def call(self, coro: Any, timeout: float = 10.0) -> Any:
        fut: Future[Any] = asyncio.run_coroutine_threadsafe(coro, self.loop)
        return fut.result(timeout)

    def run(self, fn: Callable[[], Any], timeout: float = 10.0) -> Any:
        async def wrapper() -> Any:
            return fn()

        return self.call(wrapper(), timeout)

    def close(self) -> None:
        try:
            self.call(self.server.stop())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(5)
            self.loop.close()


def hello(host: str = "test-host", policy_version: int = -1) -> Hello:
    return Hello(
        PROTOCOL_VERSION,
        "0.1.0",
        host,
        "Debian 12",
        os.uname().release,
        {"process": "fallback"},
        ["kill"],
        policy_version,
    )


def make_event(i: int) -> dict[str, Any]:
    return {
        "@timestamp": "2026-01-01T00:00:00.000000Z",
        "event": {"action": "exec"},
        "process": {"pid": i, "name": f"p{i}"},
        "n": i,
    }


class Recorder:
    """Callbacks that record what the sensor was asked to do."""

    def __init__(self) -> None:
        self.commands: list[Command] = []
        self.policies: list[tuple[int, dict[str, Any]]] = []

    def on_command(self, cmd: Command) -> CommandResult:
        self.commands.append(cmd)
        return CommandResult(cmd.id, "ok", {"did": cmd.action})

    def on_policy(self, version: int, doc: dict[str, Any]) -> int:
        self.policies.append((version, doc))
        return version


def make_client(
    cfg: ClientConfig, outbox: Outbox, rec: Recorder | None = None, **kw: Any
) -> BackplaneClient:
    rec = rec or Recorder()
    return BackplaneClient(
        cfg, outbox, hello=hello, on_command=rec.on_command, on_policy=rec.on_policy, **kw
    )


# -- separate processes ----------------------------------------------------------------------
def _controller_main(args: argparse.Namespace) -> None:
    """Run a controller until killed. Reads commands from stdin: ``cmd <host> <id> <action>``."""
    pki_dir = Path(args.pki)
    cfg = ServerConfig(
        args.endpoint,
        pki_dir / "ca.pem",
        pki_dir / "server.pem",
        None,
        pki_dir / "crl.pem",
        heartbeat_timeout=args.heartbeat_timeout,
    )
    hooks = SqliteHooks(Path(args.db))

    async def main() -> None:
        server = BackplaneServer(cfg, hooks)
        endpoint = await server.start()
        print(json.dumps({"endpoint": endpoint}), flush=True)
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader()
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
        while line := await reader.readline():
            parts = line.decode().split()
            if len(parts) == 4 and parts[0] == "cmd":
                hooks.queue_command(parts[1], parts[2], parts[3])
                server.notify_command(parts[1])
        await asyncio.Event().wait()

    asyncio.run(main())


def _sensor_main(args: argparse.Namespace) -> None:
    """Append ``--events`` events (unless already done) and stream until stopped or killed."""
    pki_dir = Path(args.pki)
    outbox = Outbox(Path(args.outbox), batch_events=args.batch)
    marker = Path(args.outbox + ".appended")
    if args.events and not marker.exists():
        for start in range(0, args.events, 1000):
            outbox.append(make_event(i) for i in range(start, min(args.events, start + 1000)))
        outbox.flush()
        marker.write_text("done")
    cfg = ClientConfig(
        args.endpoint,
        args.server_name,
        pki_dir / "ca.pem",
        pki_dir / f"client-{args.host}.pem",
        backoff_min=0.05,
        backoff_max=0.5,
        heartbeat_interval=0.5,
        dead_after=args.dead_after,
    )
    rec = Recorder()

    def on_command(cmd: Command) -> CommandResult:
        print(json.dumps({"command": cmd.id, "action": cmd.action}), flush=True)
        return rec.on_command(cmd)

    client = BackplaneClient(
        cfg, outbox, hello=hello, on_command=on_command, on_policy=rec.on_policy
    )
    client.start()
    print(json.dumps({"started": True}), flush=True)
    while True:
        time.sleep(0.2)
        if args.exit_when_empty and outbox.depth == 0:
            client.stop()
            outbox.close()
            print(json.dumps({"empty": True}), flush=True)
            return


def main() -> None:
    logging.basicConfig(
        level=logging.INFO,
        stream=sys.stderr,
        format="%(asctime)s %(process)d %(levelname)s %(message)s",
    )
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="role", required=True)
    c = sub.add_parser("controller")
    c.add_argument("--pki", required=True)
    c.add_argument("--db", required=True)
    c.add_argument("--endpoint", required=True)
    c.add_argument("--heartbeat-timeout", type=float, default=5.0)
    s = sub.add_parser("sensor")
    s.add_argument("--pki", required=True)
    s.add_argument("--outbox", required=True)
    s.add_argument("--endpoint", required=True)
    s.add_argument("--host", required=True)
    s.add_argument("--server-name", default="localhost")
    s.add_argument("--events", type=int, default=0)
    s.add_argument("--batch", type=int, default=500)
    s.add_argument("--dead-after", type=float, default=3.0)
    s.add_argument("--exit-when-empty", action="store_true")
    args = p.parse_args()
    if args.role == "controller":
        _controller_main(args)
    else:
        _sensor_main(args)


if __name__ == "__main__":
    main()

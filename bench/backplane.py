"""Backplane benchmark: N simulated sensors → one controller → committed SQLite store.

Not a test. Sensors are real ``BackplaneClient`` threads (each with its own outbox) spread over
a few processes; the controller is a real ``BackplaneServer`` committing into the tests' SQLite
store. Outboxes are filled before the clock starts, so the figure is the backplane plus the
store: events/s from "go" until every event is committed, and p50/p99 batch ack latency.

The plain (no TLS) mode exists only here, to price TLS; it is injected through the private
``_session_factory`` argument and cannot be reached from any configuration.

    .venv/bin/python bench/backplane.py --sensors 100 --procs 4 --events 5000
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "backplane"))
sys.path.insert(0, str(ROOT))

from bp_harness import Pki, Recorder, hello, make_event  # noqa: E402
from bp_sqlite_hooks import SqliteHooks  # noqa: E402

from backplane.client import BackplaneClient, ClientConfig  # noqa: E402
from backplane.messages import FrameDecoder, Hello, Message, encode  # noqa: E402
from backplane.outbox import Outbox  # noqa: E402
from backplane.server import BackplaneServer, ServerConfig  # noqa: E402


class PlainSession:
    """The TlsSession interface without TLS. Benchmark only: identity from HELLO's hostname."""

    def __init__(self) -> None:
        self.state = "open"
        self.peer_host_id: str | None = None
        self.peer_cert = None
        self._dec = FrameDecoder()
        self._out = bytearray()

    def start(self) -> None:
        pass

    def receive(self, data: bytes) -> list[Message]:
        msgs = self._dec.feed(data)
        if self.peer_host_id is None and msgs and isinstance(msgs[0], Hello):
            self.peer_host_id = msgs[0].hostname
        return msgs

    def send(self, msg: Message) -> None:
        self._out += encode(msg)

    def outgoing(self) -> bytes:
        out, self._out = bytes(self._out), bytearray()
        return out

    def close(self) -> bytes:
        self.state = "closed"
        return b""

    def handshake_expired(self, now: float | None = None) -> bool:
        return False


class CountingHooks(SqliteHooks):
    def __init__(self, path: Path, expected: int) -> None:
        super().__init__(path, synchronous="NORMAL")
        self.expected = expected
        self.committed = 0
        self.done_at: float | None = None

    async def commit_batch(
        self, host_id: str, seq: int, events: list[dict[str, Any]], dropped: int
    ) -> bool:
        fresh = await super().commit_batch(host_id, seq, events, dropped)
        if fresh:
            self.committed += len(events)
            if self.committed >= self.expected and self.done_at is None:
                self.done_at = time.monotonic()
        return fresh


def controller(args: argparse.Namespace) -> None:
    pki = Path(args.pki)
    cfg = ServerConfig(
        "tcp://127.0.0.1:0",
        pki / "ca.pem",
        pki / "server.pem",
        None,
        pki / "crl.pem",
        heartbeat_timeout=60,
    )
    hooks = CountingHooks(Path(args.db), args.expected)

    async def main() -> None:
        factory = PlainSession if args.plain else None
        server = BackplaneServer(cfg, hooks, _session_factory=factory)
        print(json.dumps({"endpoint": await server.start()}), flush=True)
        loop = asyncio.get_running_loop()
        go = await loop.run_in_executor(None, sys.stdin.readline)
        start = float(json.loads(go)["go"])
        while hooks.done_at is None:
            await asyncio.sleep(0.01)
        # time.monotonic is system-wide on Linux, so the parent's "go" is comparable.
        print(json.dumps({"seconds": hooks.done_at - start, "events": hooks.committed}), flush=True)
        # Keep serving until told to stop: the last acks are still on their way.
        await loop.run_in_executor(None, sys.stdin.readline)
        await server.stop()

    asyncio.run(main())


def sensors(args: argparse.Namespace) -> None:
    pki = Path(args.pki)
    clients: list[BackplaneClient] = []
    outboxes: list[Outbox] = []
    for i in range(args.first, args.first + args.count):
        host = f"bench{i:04d}"
        ob = Outbox(Path(args.dir) / f"{host}.db", batch_events=args.batch)
        ob.append(make_event(n) for n in range(args.events))
        ob.flush()
        outboxes.append(ob)
        cfg = ClientConfig(
            args.endpoint,
            "localhost",
            pki / "ca.pem",
            pki / f"client-{host}.pem",
            window=args.window,
            heartbeat_interval=5,
            dead_after=60,
        )
        rec = Recorder()
        host_hello = functools.partial(hello, host)
        clients.append(
            BackplaneClient(
                cfg,
                ob,
                hello=host_hello,
                on_command=rec.on_command,
                on_policy=rec.on_policy,
                record_latency=True,
                _session_factory=PlainSession if args.plain else None,
            )
        )
    print(json.dumps({"ready": True}), flush=True)
    sys.stdin.readline()
    for c in clients:
        c.start()
    while any(ob.depth for ob in outboxes):
        time.sleep(0.05)
    lat = [x for c in clients for x in c.stats.ack_latencies]
    for c in clients:
        c.stop(timeout=1)
    print(json.dumps({"latencies": lat}), flush=True)


def _spawn(role: list[str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, __file__, *role],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )


def _line(p: subprocess.Popen[str], key: str) -> dict[str, Any]:
    assert p.stdout is not None
    while True:
        line = p.stdout.readline()
        if not line:
            raise RuntimeError(f"benchmark process exited before reporting {key}")
        obj = json.loads(line)
        if key in obj:
            return obj  # type: ignore[no-any-return]


def run(args: argparse.Namespace, plain: bool) -> dict[str, float]:
    with tempfile.TemporaryDirectory(prefix="edr-bench-") as tmp:
        pki = Pki(Path(tmp) / "pki")
        for i in range(args.sensors):
            pki.client(f"bench{i:04d}")
        total = args.sensors * args.events
        flag = ["--plain"] if plain else []
        ctrl = _spawn(
            [
                "controller",
                "--pki",
                str(pki.dir),
                "--db",
                f"{tmp}/store.db",
                "--expected",
                str(total),
                *flag,
            ]
        )
        endpoint = _line(ctrl, "endpoint")["endpoint"]
        per = -(-args.sensors // args.procs)
        procs = []
        for first in range(0, args.sensors, per):
            procs.append(
                _spawn(
                    [
                        "sensors",
                        "--pki",
                        str(pki.dir),
                        "--dir",
                        tmp,
                        "--endpoint",
                        endpoint,
                        "--first",
                        str(first),
                        "--events",
                        str(args.events),
                        "--count",
                        str(min(per, args.sensors - first)),
                        "--batch",
                        str(args.batch),
                        "--window",
                        str(args.window),
                        *flag,
                    ]
                )
            )
        for p in procs:
            _line(p, "ready")
        go = time.monotonic()
        assert ctrl.stdin is not None
        ctrl.stdin.write(json.dumps({"go": go}) + "\n")
        ctrl.stdin.flush()
        for p in procs:
            assert p.stdin is not None
            p.stdin.write("go\n")
            p.stdin.flush()
        done = _line(ctrl, "seconds")
        lat: list[float] = []
        for p in procs:
            lat += _line(p, "latencies")["latencies"]
        ctrl.stdin.write("stop\n")
        ctrl.stdin.flush()
        for p in [ctrl, *procs]:
            p.wait(30)
    qs = statistics.quantiles(lat, n=100)
    return {
        "events": done["events"],
        "seconds": done["seconds"],
        "events_per_s": done["events"] / done["seconds"],
        "p50_ms": qs[49] * 1000,
        "p99_ms": qs[98] * 1000,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="role")
    c = sub.add_parser("controller")
    c.add_argument("--pki")
    c.add_argument("--db")
    c.add_argument("--expected", type=int)
    c.add_argument("--plain", action="store_true")
    s = sub.add_parser("sensors")
    for name in ("--pki", "--dir", "--endpoint"):
        s.add_argument(name)
    for name in ("--first", "--count", "--events", "--batch", "--window"):
        s.add_argument(name, type=int)
    s.add_argument("--plain", action="store_true")
    p.add_argument("--sensors", type=int, default=100)
    p.add_argument("--procs", type=int, default=4)
    p.add_argument("--events", type=int, default=5000, help="events per sensor")
    p.add_argument("--batch", type=int, default=500)
    p.add_argument("--window", type=int, default=4)
    p.add_argument("--mode", choices=["tls", "plain", "both"], default="both")
    args = p.parse_args()
    if args.role == "controller":
        controller(args)
        return
    if args.role == "sensors":
        sensors(args)
        return
    results = {}
    for mode in ["tls", "plain"] if args.mode == "both" else [args.mode]:
        r = run(args, plain=mode == "plain")
        results[mode] = r
        print(
            f"{mode:5s}: {r['events']} events from {args.sensors} sensors in "
            f"{r['seconds']:.2f} s = {r['events_per_s']:,.0f} events/s; "
            f"ack latency p50 {r['p50_ms']:.1f} ms, p99 {r['p99_ms']:.1f} ms",
            flush=True,
        )
    if len(results) == 2:
        ratio = results["plain"]["events_per_s"] / results["tls"]["events_per_s"]
        print(
            f"TLS cost: plain/TLS throughput ratio {ratio:.2f} "
            f"({(1 - 1 / ratio) * 100:.0f}% slower with TLS)"
        )
    print(json.dumps({"cores": os.cpu_count(), **results}))


if __name__ == "__main__":
    main()

"""The whole sensor as an operator runs it: `edr-sensor run`, real activity, NDJSON out.

The same scenarios run in the tracepoint tier (root, real BPF) and in the fallback tier, both
as root (proc connector) and as the unprivileged user ``nobody`` (/proc polling), with the
expectations each tier can honestly meet.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
SENSOR = [sys.executable, "-m", "sensor.cli"]
AS_NOBODY = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", "--inh-caps=-all"]

Event = dict[str, Any]


@dataclass
class RunningSensor:
    proc: subprocess.Popen[str]
    output: Path
    stats_file: Path
    stderr: list[str] = field(default_factory=list)

    def events(self) -> list[Event]:
        try:
            text = self.output.read_text()
        except FileNotFoundError:
            return []
        # The sensor may be mid-write: a last line without its newline is not complete yet.
        complete = text[: text.rfind("\n") + 1]
        return [json.loads(line) for line in complete.splitlines() if line.strip()]

    def wait_for(self, predicate: Callable[[Event], bool], timeout: float = 10.0) -> Event:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for ev in self.events():
                if predicate(ev):
                    return ev
            assert self.proc.poll() is None, f"sensor exited: {''.join(self.stderr)}"
            time.sleep(0.1)
        raise AssertionError(
            f"no matching event within {timeout}s; stderr: {''.join(self.stderr)[-2000:]}"
        )

    def stop(self) -> dict[str, Any]:
        self.proc.send_signal(signal.SIGINT)
        rc = self.proc.wait(20)
        assert rc == 0, f"sensor exit code {rc}: {''.join(self.stderr)[-2000:]}"
        return json.loads(self.stats_file.read_text())


@pytest.fixture
def workdir() -> Iterator[Path]:
    """A directory every user (including nobody) can work in."""
    path = Path(tempfile.mkdtemp(prefix="edr-e2e-", dir="/tmp"))
    path.chmod(0o777)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def start_sensor(
    workdir: Path, mode: str, *, unprivileged: bool = False, start_timeout: float = 60.0
) -> RunningSensor:
    output, stats = workdir / "events.ndjson", workdir / "stats.json"
    watched = workdir / "watched"
    watched.mkdir(mode=0o777, exist_ok=True)
    watched.chmod(0o777)
    cmd = [
        *SENSOR,
        "run",
        "--mode",
        mode,
        "--output",
        str(output),
        "--stats-file",
        str(stats),
        "--state-dir",
        str(workdir / "state"),
        "--watch",
        str(watched),
    ]
    if unprivileged:
        cmd = [*AS_NOBODY, *cmd]
    proc = subprocess.Popen(
        cmd,
        cwd=REPO,
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
        env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"},
    )
    sensor = RunningSensor(proc, output, stats)
    ready = threading.Event()

    def pump() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            sensor.stderr.append(line)
            if "capturing " in line:
                ready.set()

    threading.Thread(target=pump, daemon=True).start()
    deadline = time.monotonic() + start_timeout
    while not ready.wait(0.2) and proc.poll() is None and time.monotonic() < deadline:
        pass
    if not ready.is_set():
        proc.kill()
        proc.wait(10)
        time.sleep(0.2)  # let the pump thread collect the last lines
        raise AssertionError(f"sensor did not start: {''.join(sensor.stderr)[-3000:]}")
    time.sleep(0.5)  # first poll cycles / ring buffer attach settle
    return sensor


def marker() -> str:
    return f"edr-marker-{uuid.uuid4().hex[:12]}"


def is_exec_with(arg: str) -> Callable[[Event], bool]:
    return lambda ev: (
        ev["event"]["action"] == "exec" and arg in ev.get("process", {}).get("args", [])
    )


def file_ops(directory: Path) -> tuple[Path, Path]:
    """create+write, rename, chmod, delete: returns (original, renamed) paths."""
    original, renamed = directory / "created.txt", directory / "renamed.txt"
    with open(original, "w") as f:
        f.write("hello")
    os.rename(original, renamed)
    os.chmod(renamed, 0o600)
    time.sleep(0.3)
    os.unlink(renamed)
    return original, renamed


def tcp_pair(family: socket.AddressFamily, host: str, hold: float) -> tuple[int, int]:
    """A real connect/accept on loopback, held open; returns (server port, client port)."""
    server = socket.socket(family, socket.SOCK_STREAM)
    server.bind((host, 0))
    server.listen(1)
    port = server.getsockname()[1]
    client = socket.create_connection((host, port), timeout=5)
    conn, _ = server.accept()
    client_port = client.getsockname()[1]
    time.sleep(hold)
    for s in (conn, client, server):
        s.close()
    return port, client_port


def has(ev: Event, action: str, **fields: Any) -> bool:
    if ev["event"]["action"] != action:
        return False
    for dotted, want in fields.items():
        node: Any = ev
        for part in dotted.split("__"):
            node = node.get(part) if isinstance(node, dict) else None
        if node != want:
            return False
    return True


def check_files(sensor: RunningSensor, directory: Path, *, with_process: bool) -> None:
    original, renamed = file_ops(directory)
    created = sensor.wait_for(lambda ev: has(ev, "create", file__path=str(original)))
    if with_process:
        assert created["process"]["pid"] == os.getpid()
    sensor.wait_for(lambda ev: has(ev, "write", file__path=str(original)))
    moved = sensor.wait_for(lambda ev: has(ev, "rename", file__path=str(renamed)))
    assert moved["file"]["Ext"]["original"]["path"] == str(original)
    sensor.wait_for(lambda ev: has(ev, "chmod", file__path=str(renamed)))
    sensor.wait_for(lambda ev: has(ev, "delete", file__path=str(renamed)))


def check_network(sensor: RunningSensor, *, hold: float, with_process: bool) -> None:
    for family, host in ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")):
        port, client_port = tcp_pair(family, host, hold)
        listen = sensor.wait_for(lambda ev, p=port: has(ev, "listen", destination__port=p))
        connect = sensor.wait_for(
            lambda ev, p=port, c=client_port: has(
                ev, "connect", destination__port=p, source__port=c
            )
        )
        accept = sensor.wait_for(
            lambda ev, p=port, c=client_port: has(ev, "accept", destination__port=p, source__port=c)
        )
        assert accept["source"]["ip"] == host
        assert connect["destination"]["ip"] == host
        assert connect["network"]["transport"] == "tcp"
        assert connect["network"]["type"] == ("ipv4" if family == socket.AF_INET else "ipv6")
        if with_process:
            for ev in (listen, connect, accept):
                assert ev["process"]["pid"] == os.getpid()


def check_stats(stats: dict[str, Any], tier: str) -> None:
    assert set(stats["tiers"].values()) == {tier}
    assert stats["dropped"] == 0
    assert all(src["submitted"] > 0 for src in stats["sources"].values())


@pytest.mark.root
@pytest.mark.bpf
def test_tracepoint_tier_end_to_end(workdir: Path) -> None:
    sensor = start_sensor(workdir, "tracepoint")
    try:
        tag = marker()
        subprocess.run(["/bin/true", tag], check=True)
        ev = sensor.wait_for(is_exec_with(tag))
        assert os.path.realpath(ev["process"]["executable"]) == os.path.realpath("/bin/true")
        assert ev["process"]["args"] == ["/bin/true", tag]
        assert ev["process"]["parent"]["pid"] == os.getpid()
        assert ev["process"]["hash"]["sha256"]
        assert ev["user"]["id"] == "0"
        assert ev["edr"]["tier"] == "tracepoint"
        exit_ev = sensor.wait_for(
            lambda e: has(e, "exit", process__entity_id=ev["process"]["entity_id"])
        )
        assert exit_ev["process"]["exit_code"] == 0
        check_files(sensor, workdir / "watched", with_process=True)
        check_network(sensor, hold=0.0, with_process=True)
        own = os.getpid()
        assert not any(
            e.get("process", {}).get("pid") == sensor.proc.pid for e in sensor.events()
        ), own
    finally:
        stats = sensor.stop()
    check_stats(stats, "tracepoint")


@pytest.mark.root
def test_fallback_tier_as_root_end_to_end(workdir: Path) -> None:
    sensor = start_sensor(workdir, "fallback")
    try:
        # The proc connector sees every exec and exit, even of a process too short-lived for
        # its argv to be read from /proc afterwards; a longer one is seen with its argv.
        short = subprocess.Popen(["/bin/sh", "-c", "exit 7"])
        short.wait()
        ev = sensor.wait_for(lambda e: has(e, "exec", process__pid=short.pid))
        assert ev["process"]["parent"]["pid"] == os.getpid()
        exit_ev = sensor.wait_for(lambda e: has(e, "exit", process__pid=short.pid))
        assert exit_ev["process"]["exit_code"] == 7
        tag = marker()
        subprocess.run([sys.executable, "-c", "import time; time.sleep(0.5)", tag], check=True)
        ev = sensor.wait_for(is_exec_with(tag))
        assert ev["process"]["parent"]["pid"] == os.getpid()
        check_files(sensor, workdir / "watched", with_process=False)
        check_network(sensor, hold=1.0, with_process=True)
    finally:
        stats = sensor.stop()
    check_stats(stats, "fallback")


@pytest.mark.root  # needs root only to drop to nobody
def test_fallback_tier_unprivileged_end_to_end(workdir: Path) -> None:
    sensor = start_sensor(workdir, "fallback", unprivileged=True)
    try:
        tag = marker()
        # Unprivileged, processes are found by polling /proc: one must live past the interval.
        subprocess.run([sys.executable, "-c", "import time; time.sleep(1.0)", tag], check=True)
        ev = sensor.wait_for(is_exec_with(tag))
        assert ev["edr"]["tier"] == "fallback"
        check_files(sensor, workdir / "watched", with_process=False)
        check_network(sensor, hold=1.0, with_process=False)
    finally:
        stats = sensor.stop()
    check_stats(stats, "fallback")
    assert "process" in stats["tiers"]


def test_forced_tier_unavailable_exits_3_with_reason() -> None:
    proc = subprocess.run(
        [*SENSOR, "run", "--mode", "kprobe", "--duration", "1"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 3
    assert "kprobe tier unavailable" in proc.stderr


def test_unknown_mode_is_a_usage_error() -> None:
    proc = subprocess.run(
        [*SENSOR, "run", "--mode", "turbo"], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 2
    assert "invalid choice: 'turbo'" in proc.stderr


def test_bad_config_file_is_one_line_and_exit_2(tmp_path: Path) -> None:
    config = tmp_path / "sensor.toml"
    config.write_text("[capture]\nmode = 'warp'\n")
    proc = subprocess.run(
        [*SENSOR, "run", "--config", str(config)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0
    assert "capture.mode: expected one of" in proc.stderr


def test_unreadable_config_file(tmp_path: Path) -> None:
    proc = subprocess.run(
        [*SENSOR, "run", "--config", str(tmp_path / "none.toml")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert "cannot read" in proc.stderr


@pytest.mark.root
def test_no_bpf_permission_falls_back_in_auto_and_fails_when_forced(workdir: Path) -> None:
    forced = subprocess.run(
        [
            *AS_NOBODY,
            *SENSOR,
            "run",
            "--mode",
            "tracepoint",
            "--duration",
            "1",
            "--state-dir",
            str(workdir / "state"),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert forced.returncode == 3, forced.stderr
    assert "tracepoint tier unavailable" in forced.stderr
    stats = workdir / "stats.json"
    auto = subprocess.run(
        [
            *AS_NOBODY,
            *SENSOR,
            "run",
            "--duration",
            "2",
            "--output",
            os.devnull,
            "--stats-file",
            str(stats),
            "--state-dir",
            str(workdir / "state"),
            "--watch",
            str(workdir),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert auto.returncode == 0, auto.stderr
    assert json.loads(stats.read_text())["tiers"] == {
        "file": "fallback",
        "network": "fallback",
        "process": "fallback",
    }
    assert "tracepoint tier not used" in auto.stderr


def test_probe_names_every_tier_per_family() -> None:
    proc = subprocess.run(
        [*SENSOR, "probe", "--json"], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert set(report) == {"process", "file", "network"}
    for tiers in report.values():
        assert set(tiers) == {"kprobe", "tracepoint", "fallback"}
        assert tiers["fallback"] is None
    if not Path("/sys/kernel/tracing/kprobe_events").exists():
        assert "kprobe" in (report["process"]["kprobe"] or "")

"""kill, kill-tree, suspend/resume on real processes; pid reuse and every process refusal."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from backplane.messages import Command
from sensor.process_table import ProcessTable
from sensor.response import Responder
from sensor.response.process import read_stat

pytestmark = pytest.mark.timeout(60)


def entity(table: ProcessTable, pid: int) -> str:
    st = read_stat(pid)
    assert st is not None
    return table.entity_id(pid, st.start_ticks)


def run(responder: Responder, action: str, **args: object) -> tuple[str, dict]:
    result = responder.handle(Command(f"c-{time.monotonic_ns()}", action, dict(args)))
    return result.status, result.output


def test_kill_with_entity_id(responder: Responder, table: ProcessTable, spawn) -> None:
    proc = spawn()
    status, out = run(responder, "kill", pid=proc.pid, entity_id=entity(table, proc.pid))
    assert status == "ok", out
    assert out["signal"] == "SIGKILL" and out["exited"] is True
    assert proc.wait(5) == -9


def test_kill_refuses_reused_pid(responder: Responder, table: ProcessTable, spawn) -> None:
    """An entity id from an earlier process with the same pid never hits the new one."""
    proc = spawn()
    st = read_stat(proc.pid)
    assert st is not None
    stale = table.entity_id(proc.pid, st.start_ticks - 1)  # same pid, another start time
    status, out = run(responder, "kill", pid=proc.pid, entity_id=stale)
    assert status == "refused" and "another process" in out["error"]
    assert proc.poll() is None


def test_suspend_resume_seen_in_proc_state(responder: Responder, spawn) -> None:
    proc = spawn("while True: pass")
    status, out = run(responder, "suspend", pid=proc.pid)
    assert status == "ok" and out["state"] == "T"
    assert read_stat(proc.pid).state == "T"
    status, out = run(responder, "resume", pid=proc.pid)
    assert status == "ok"
    deadline = time.monotonic() + 5
    while read_stat(proc.pid).state == "T":
        assert time.monotonic() < deadline, "process stayed stopped"
        time.sleep(0.01)
    assert read_stat(proc.pid).state in "RS"


FORK_BOMBLET = """
import os, sys, time
pids_file = sys.argv[1]
def grow(depth):
    for _ in range(2):
        pid = os.fork()
        if pid == 0:
            with open(pids_file, "a") as f:
                f.write(f"{os.getpid()}\\n")
            if depth < 3:
                grow(depth + 1)
            # leaves keep forking short-lived children so the tree is always changing
            while True:
                child = os.fork()
                if child == 0:
                    time.sleep(0.05)
                    os._exit(0)
                os.waitpid(child, 0)
    while True:
        time.sleep(1)
grow(1)
"""


def test_kill_tree_leaves_no_survivor(responder: Responder, tmp_path: Path) -> None:
    import subprocess
    import sys

    pids_file = tmp_path / "pids"
    script = tmp_path / "tree.py"
    script.write_text(FORK_BOMBLET)
    root = subprocess.Popen([sys.executable, str(script), str(pids_file)])
    try:
        deadline = time.monotonic() + 10
        while (len(pids_file.read_text().split()) if pids_file.exists() else 0) < 14:
            assert time.monotonic() < deadline, "tree did not grow"
            time.sleep(0.05)
        time.sleep(0.3)
        status, out = run(responder, "kill-tree", pid=root.pid)
        assert status == "ok", out
        assert out["survivors"] == []
        assert out["count"] >= 15
        root.wait(5)
        time.sleep(0.3)
        for pid in [int(p) for p in pids_file.read_text().split()]:
            st = read_stat(pid)
            assert st is None or st.state in "ZX", f"pid {pid} survived ({st})"
    finally:
        if root.poll() is None:
            root.kill()
            root.wait(5)


@pytest.mark.parametrize("action", ["kill", "kill-tree", "suspend", "resume"])
def test_refuses_pid_1(responder: Responder, action: str) -> None:
    status, out = run(responder, action, pid=1)
    assert status == "refused" and "pid 1" in out["error"]


def test_refuses_kernel_thread(responder: Responder) -> None:
    status, out = run(responder, "kill", pid=2)  # kthreadd
    assert status == "refused" and "kernel thread" in out["error"]
    kworker = next(
        p for p in (int(x) for x in os.listdir("/proc") if x.isdigit())
        if p > 2 and (st := read_stat(p)) is not None and st.ppid == 2
    )  # fmt: skip
    status, out = run(responder, "suspend", pid=kworker)
    assert status == "refused" and "kernel thread" in out["error"]


def test_refuses_sensor_and_ancestors(responder: Responder) -> None:
    status, out = run(responder, "kill", pid=os.getpid())
    assert status == "refused" and "sensor" in out["error"]
    status, out = run(responder, "kill-tree", pid=os.getppid())
    assert status == "refused" and "ancestors" in out["error"]


def test_missing_process_is_an_error(responder: Responder, spawn) -> None:
    proc = spawn("pass")
    proc.wait(5)
    status, out = run(responder, "kill", pid=proc.pid)
    assert status == "error" and "no process" in out["error"]


@pytest.mark.parametrize(
    "args",
    [{}, {"pid": "12"}, {"pid": True}, {"pid": 0}, {"pid": 5, "extra": 1},
     {"pid": 5, "entity_id": 7}],
)  # fmt: skip
def test_bad_arguments_refused(responder: Responder, args: dict) -> None:
    status, out = run(responder, "kill", **args)
    assert status == "refused", out


def test_unknown_action_refused(responder: Responder) -> None:
    status, out = run(responder, "reboot")
    assert status == "refused" and "unknown action" in out["error"]


def test_duplicate_in_flight_refused(responder: Responder, spawn) -> None:
    """The same command id, or another command on the same target, while one is running."""
    import threading

    proc = spawn()
    gate = threading.Event()
    release = threading.Event()
    real = responder.processes.suspend

    def slow(pid: int, entity: str | None = None) -> dict:
        gate.set()
        release.wait(10)
        return real(pid, entity)

    responder.processes.suspend = slow  # type: ignore[method-assign]
    results = []
    first = Command("first", "suspend", {"pid": proc.pid})
    t = threading.Thread(target=lambda: results.append(responder.handle(first)))
    t.start()
    try:
        assert gate.wait(10)
        again = responder.handle(Command("first", "suspend", {"pid": proc.pid}))
        other = responder.handle(Command("second", "kill", {"pid": proc.pid}))
        assert again.status == "refused" and "duplicate" in again.output["error"]
        assert other.status == "refused" and other.output["in_flight"] == "first"
        assert proc.poll() is None
    finally:
        release.set()
        t.join(10)
    assert results[0].status == "ok"
    # Once finished, the target is free again.
    assert responder.handle(Command("third", "resume", {"pid": proc.pid})).status == "ok"

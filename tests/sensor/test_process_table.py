"""The process table against real processes in /proc."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from sensor import procfs
from sensor.process_table import ProcessTable


def test_seed_sees_this_process_with_exact_start_time() -> None:
    table = ProcessTable("host-1")
    assert table.seed_from_proc() > 1
    me = table.get(os.getpid())
    assert me is not None
    assert me.ppid == os.getppid()
    assert me.executable == os.path.realpath(sys.executable)
    with open("/proc/self/cmdline", "rb") as f:
        assert me.args == [a.decode() for a in f.read().split(b"\0")[:-1]]
    assert me.start_ticks == procfs.stat(os.getpid())[2]
    assert me.uid == os.getuid()
    assert me.cwd == os.getcwd()


def test_entity_id_is_stable_and_unique() -> None:
    a, b = ProcessTable("host-1"), ProcessTable("host-1")
    assert a.entity_id(100, 5000) == b.entity_id(100, 5000)
    assert a.entity_id(100, 5000) != a.entity_id(100, 5001)  # pid reuse
    assert a.entity_id(100, 5000) != ProcessTable("host-2").entity_id(100, 5000)  # other host


def test_fork_exec_exit_of_a_real_child(tmp_path: Path) -> None:
    table = ProcessTable("host-1")
    table.seed_from_proc()
    child = subprocess.Popen(["/bin/sleep", "30"], cwd=tmp_path, stdout=subprocess.DEVNULL)
    try:
        forked = table.fork(os.getpid(), child.pid)
        assert forked.executable == table.get(os.getpid()).executable  # inherited until exec
        info = table.exec(child.pid, executable="/bin/sleep")
        assert info.entity_id == forked.entity_id  # same process across exec
        assert info.args == ["/bin/sleep", "30"]
        assert info.cwd == str(tmp_path)
        assert info.ppid == os.getpid()
        fields = table.ecs(info)
        assert fields["process"]["parent"]["pid"] == os.getpid()
        assert fields["process"]["command_line"] == "/bin/sleep 30"
        assert fields["process"]["parent"]["entity_id"] == table.get(os.getpid()).entity_id
        assert fields["user"]["id"] == str(os.getuid())
    finally:
        child.kill()
        child.wait()
    gone = table.exit(child.pid, exit_code=-9)
    assert gone.exit_code == -9
    assert child.pid not in table.live_pids()
    assert table.get(child.pid) is gone  # kept for late events


def test_lookup_of_a_vanished_pid_never_fails() -> None:
    table = ProcessTable("host-1")
    proc = subprocess.run(["/bin/true"], check=True)
    assert proc.returncode == 0
    info = table.lookup(2**22 + 12345)  # above pid_max: cannot exist
    assert info.pid == 2**22 + 12345
    assert info.executable is None
    assert info.entity_id


def test_chdir_updates_cwd() -> None:
    table = ProcessTable("host-1")
    table.seed_from_proc()
    table.chdir(os.getpid(), "/srv/x")
    assert table.get(os.getpid()).cwd == "/srv/x"


def test_ancestors_follow_parents_without_cycles() -> None:
    table = ProcessTable("host-1")
    table.seed_from_proc()
    chain = list(table.ancestors(os.getpid()))
    assert chain[0].pid == os.getppid()
    assert chain[-1].pid in (1, 0) or len(chain) == 16

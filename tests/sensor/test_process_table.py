"""The process table against real processes in /proc."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from sensor import procfs
from sensor.process_table import ProcessTable


def _wait_for_argv(pid: int) -> None:
    """Popen can return (vfork) before the kernel has set up the new image's argv."""
    deadline = time.monotonic() + 5
    while not procfs.cmdline(pid) or not procfs.cmdline(pid)[0]:
        assert time.monotonic() < deadline, "child never showed its argv"
        time.sleep(0.001)


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
        _wait_for_argv(child.pid)
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


def test_exec_without_refresh_keeps_the_tracked_cwd_and_inherited_loginuid(
    tmp_path: Path, monkeypatch
) -> None:
    table = ProcessTable("host-1")
    table.seed_from_proc()
    child = subprocess.Popen(["/bin/sleep", "30"], cwd=tmp_path, stdout=subprocess.DEVNULL)
    try:
        table.fork(os.getpid(), child.pid)
        table.chdir(child.pid, "/srv/then")  # what chdir events said before the exec
        parent = table.get(os.getpid())
        parent_loginuid = parent.loginuid
        reads: list[str] = []
        real_link = procfs.link

        def counting_link(pid: int, name: str) -> str | None:
            reads.append(name)
            return real_link(pid, name)

        monkeypatch.setattr(procfs, "link", counting_link)
        info = table.exec(child.pid, executable="/bin/sleep", args=["sleep", "30"], refresh=False)
        assert info.cwd == "/srv/then"  # not /proc's "now"
        assert "cwd" not in reads
        assert info.loginuid == parent_loginuid
        # unknown cwd: read from /proc even without refresh
        info.cwd = None
        assert table.exec(child.pid, executable="/bin/sleep", refresh=False).cwd == str(tmp_path)
    finally:
        child.kill()
        child.wait()


def test_container_id_is_resolved_once_per_cgroup_id(monkeypatch) -> None:
    table = ProcessTable("host-1")
    table._cgroup_ids_usable = True  # as on a cgroup v2 only host
    cid = "a" * 64
    reads: list[int] = []

    def fake_cgroups(pid: int) -> str | None:
        reads.append(pid)
        return f"0::/system.slice/docker-{cid}.scope\n" if pid != 999_999_999 else None

    me = os.getpid()
    table.lookup(me)  # known already, as the sensor's seed makes it
    monkeypatch.setattr(procfs, "cgroups", fake_cgroups)
    first = table.exec(me, executable="/bin/x", args=["x"], refresh=False, cgroup_id=77)
    assert first.container_id == cid
    again = table.exec(me, executable="/bin/y", args=["y"], refresh=False, cgroup_id=77)
    assert again.container_id == cid
    assert reads == [me]  # the second exec in the same cgroup read nothing
    assert table.ecs(again)["container"] == {"id": cid}
    # a process gone before /proc was read: nothing cached for its cgroup id
    gone = table.lookup(999_999_999)
    gone.container_id = "inherited"
    assert table._container_for(78, 999_999_999, gone.container_id) == "inherited"
    assert 78 not in table._containers


def test_container_id_is_read_per_exec_where_cgroup_ids_do_not_identify_it(
    monkeypatch,
) -> None:
    table = ProcessTable("host-1")
    table._cgroup_ids_usable = False  # cgroup v1 or hybrid: containers live in v1
    reads: list[int] = []

    def fake_cgroups(pid: int) -> str | None:
        reads.append(pid)
        return "4:memory:/docker/" + "b" * 64 + "\n0::/\n"

    me = os.getpid()
    table.lookup(me)  # known already, as the sensor's seed makes it
    monkeypatch.setattr(procfs, "cgroups", fake_cgroups)
    for _ in range(2):
        info = table.exec(me, executable="/bin/x", args=["x"], refresh=False, cgroup_id=1)
        assert info.container_id == "b" * 64
    assert reads == [me, me]


def test_reads_do_not_take_the_lock() -> None:
    table = ProcessTable("host-1")
    table.seed_from_proc()
    with table._lock:  # a writer holding the lock does not stall readers
        assert table.get(os.getpid()) is not None
        assert table.lookup(os.getpid()).pid == os.getpid()


def test_ecs_fragment_is_reused_but_follows_every_change() -> None:
    """The cached ECS fragment must never show stale state or leak one event's edits."""
    table = ProcessTable("host-1")
    parent = table.fork(0, 4_000_001, 10)
    table.exec(4_000_001, executable="/usr/bin/bash", args=["bash"], uid=0, gid=0, refresh=False)
    child = table.fork(4_000_001, 4_000_002, 11)
    table.exec(
        4_000_002, executable="/usr/bin/true", args=["true", "x"], uid=0, gid=0, refresh=False
    )
    first = table.ecs(child)
    assert first["process"]["command_line"] == "true x"
    assert first["process"]["parent"]["executable"] == "/usr/bin/bash"
    # consumers extend the dicts they get: that must not reach the next event
    first["process"]["thread"] = {"id": 1}
    second = table.ecs(child)
    assert "thread" not in second["process"]
    # the parent fragment is shared between the events of a process (read-only)
    assert second["process"]["parent"] is first["process"]["parent"]
    assert second["process"]["entity_id"] == first["process"]["entity_id"]
    # what changes outside exec: cwd, the hash, the exit code, the parent's image
    table.chdir(4_000_002, "/tmp")
    assert table.ecs(child)["process"]["working_directory"] == "/tmp"
    child.sha256 = "ab" * 32
    assert table.ecs(child)["process"]["hash"] == {"sha256": "ab" * 32}
    table.exec(4_000_001, executable="/usr/bin/python3", args=["python3"], refresh=False)
    assert parent.executable == "/usr/bin/python3"
    assert table.ecs(child)["process"]["parent"]["executable"] == "/usr/bin/python3"
    assert table.ecs(child)["process"]["parent"]["command_line"] == "python3"
    gone = table.exit(4_000_002, exit_code=3)
    fields = table.ecs(gone)
    assert fields["process"]["exit_code"] == 3
    assert fields["process"]["hash"] == {"sha256": "ab" * 32}
    # a new image clears the fragment: argv and ids come from the exec
    again = table.fork(4_000_001, 4_000_003, 12)
    assert table.ecs(again)["process"]["command_line"] == "python3"
    table.exec(4_000_003, executable="/usr/bin/id", args=["id"], uid=1000, gid=1000, refresh=False)
    fields = table.ecs(again)
    assert fields["process"]["command_line"] == "id"
    assert fields["user"]["id"] == "1000" and fields["group"] == {"id": "1000"}
    assert "exit_code" not in fields["process"]


def test_exec_of_a_gone_process_reads_nothing_more_and_keeps_inherited_context() -> None:
    table = ProcessTable("host-1")
    parent = table.fork(0, 4_000_010, 10)
    parent.uid, parent.loginuid, parent.container_id = 0, 1000, "c" * 64
    table.fork(4_000_010, 4_000_011, 11)
    info = table.exec(4_000_011, executable="/usr/bin/true", args=["true"], refresh=False)
    # the pid does not exist: nothing read from /proc overwrote what was inherited
    assert info.loginuid == 1000 and info.container_id == "c" * 64
    fields = table.ecs(info)
    assert fields["user"]["audit"] == {"id": "1000"}
    assert fields["container"] == {"id": "c" * 64}

"""The tracepoint tier against real processes, files and sockets (root, real BPF)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
import uuid
from pathlib import Path

import pytest

from sensor.capture import FilterConfig

from .conftest import start_source

pytestmark = [pytest.mark.root, pytest.mark.bpf, pytest.mark.timeout(120)]

TRUE = os.path.realpath("/bin/true")


def _pid_is(pid: int):
    return lambda e: e.get("process", {}).get("pid") == pid


def _action(pid: int, action: str):
    return lambda e: _pid_is(pid)(e) and e["event"]["action"] == action


def run_child(code: str, cwd: Path | None = None) -> tuple[int, dict]:
    """Run Python code in a child; it prints JSON on its last line. Returns (pid, that JSON)."""
    p = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=cwd,
        stdout=subprocess.PIPE,
        text=True,
    )
    out, _ = p.communicate(timeout=30)
    assert p.returncode == 0, out
    return p.pid, json.loads(out.strip().splitlines()[-1])


def test_exec_and_exit_of_true(sensor) -> None:
    marker = f"edr-marker-{uuid.uuid4().hex}"
    p = subprocess.run([TRUE, marker, "two words"], check=True)
    del p
    execs = sensor.wait_for(
        lambda e: e["event"]["action"] == "exec" and marker in e["process"].get("args", [])
    )
    assert len(execs) == 1
    ev = execs[0]
    pid = ev["process"]["pid"]
    assert ev["process"]["args"] == [TRUE, marker, "two words"]
    assert ev["process"]["executable"] == TRUE
    assert ev["process"]["parent"]["pid"] == os.getpid()
    assert ev["user"]["id"] == str(os.getuid())
    assert ev["edr"]["tier"] == "tracepoint"
    exits = sensor.wait_for(_action(pid, "exit"))
    assert exits and exits[0]["process"]["exit_code"] == 0
    assert exits[0]["process"]["entity_id"] == ev["process"]["entity_id"]
    forks = sensor.find(_action(pid, "fork"))
    assert forks and forks[0]["process"]["parent"]["pid"] == os.getpid()


def test_nonzero_exit_code(sensor) -> None:
    p = subprocess.run(["/bin/sh", "-c", "exit 7"], check=False)
    assert p.returncode == 7
    # the pid is the sh child: subprocess.run does not expose it, so match the argv
    exits = sensor.wait_for(
        lambda e: (
            e["event"]["action"] == "exit"
            and e["process"].get("args") == ["/bin/sh", "-c", "exit 7"]
        )
    )
    assert [e["process"]["exit_code"] for e in exits] == [7]


def test_sigkilled_process(sensor) -> None:
    p = subprocess.Popen(["/bin/sleep", "30"])
    sensor.wait_for(_action(p.pid, "exec"))
    p.send_signal(signal.SIGKILL)
    p.wait(timeout=10)
    exits = sensor.wait_for(_action(p.pid, "exit"))
    assert len(exits) == 1
    assert exits[0]["process"]["exit_code"] == -9
    assert exits[0]["edr"]["exit_signal"] == 9


def test_file_operations_with_relative_paths(sensor, tmp_path: Path) -> None:
    work = tmp_path / "work"
    work.mkdir()
    pid, _ = run_child(
        """
        import json, os
        with open("created.txt", "w") as f:      # relative: resolved against the cwd
            f.write("x")
        with open("created.txt", "r+") as f:     # write-open of an existing file
            f.write("y")
        os.rename("created.txt", "renamed.txt")
        os.chmod("renamed.txt", 0o600)
        os.chown("renamed.txt", 1234, -1)
        os.mkdir("sub")
        os.chdir("sub")                          # chdir keeps the table's cwd right
        open("deeper.txt", "w").close()
        os.unlink("deeper.txt")
        os.chdir("..")
        os.rmdir("sub")
        os.unlink("renamed.txt")
        try:
            open("/proc/self/comm", "w").write("renamed")   # excluded prefix
        except OSError:
            pass
        print(json.dumps({}))
        """,
        cwd=work,
    )
    mine = _pid_is(pid)
    events = sensor.wait_for(lambda e: mine(e) and "file" in e, count=10)
    got = [(e["event"]["action"], e["file"]["path"]) for e in events]
    w = str(work)
    assert got == [
        ("create", f"{w}/created.txt"),
        ("write", f"{w}/created.txt"),
        ("write", f"{w}/created.txt"),
        ("rename", f"{w}/renamed.txt"),
        ("chmod", f"{w}/renamed.txt"),
        ("chown", f"{w}/renamed.txt"),
        ("create", f"{w}/sub/deeper.txt"),
        ("delete", f"{w}/sub/deeper.txt"),
        ("delete", f"{w}/sub"),
        ("delete", f"{w}/renamed.txt"),
    ], got
    assert events[3]["file"]["Ext"]["original"]["path"] == f"{w}/created.txt"
    assert events[4]["file"]["mode"] == "600"
    assert events[5]["file"]["uid"] == "1234"
    assert all(e["event"].get("outcome", "success") == "success" for e in events)
    assert not sensor.find(
        lambda e: mine(e) and e.get("file", {}).get("path", "").startswith("/proc")
    )


def test_the_stash_hints_count_the_stash(sensor, tmp_path: Path) -> None:
    """file_stash_hint (file.bpf.c) must come back to the number of stashed operations: a
    hint left high only costs lookups, but one left low would skip an exit's event."""
    pid, _ = run_child(
        """
        import json, os, threading
        def work(n):
            for i in range(50):
                with open(f"f{n}-{i}", "w") as f:
                    f.write("x")
                os.rename(f"f{n}-{i}", f"g{n}-{i}")
                os.unlink(f"g{n}-{i}")
        threads = [threading.Thread(target=work, args=(n,)) for n in range(4)]
        for t in threads: t.start()
        for t in threads: t.join()
        print(json.dumps({}))
        """,
        cwd=tmp_path,
    )
    deletes = sensor.wait_for(_action(pid, "delete"), count=200)
    assert len(deletes) == 200
    assert sensor.wait_for(_action(pid, "exit"))
    bpf = sensor.source._bpf
    seen = []
    for _ in range(20):  # other processes' operations may be in flight at one reading
        hints = sum(v.value for v in bpf[b"file_stash_hint"].values())
        seen.append((hints, len(bpf[b"file_stash"].items())))
        if seen[-1][0] == seen[-1][1]:
            break
        time.sleep(0.1)
    assert seen[-1][0] == seen[-1][1], seen


def test_first_write_per_open(sensor, tmp_path: Path) -> None:
    existing = tmp_path / "existing.txt"
    existing.write_text("before")  # by the test process: ignored by the sensor
    pid, _ = run_child(
        """
        import json, os
        fd = os.open("created.txt", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        os.write(fd, b"x")                      # create, then write
        os.close(fd)
        fd = os.open("existing.txt", os.O_WRONLY)
        os.close(fd)                            # write-capable open, never written: nothing
        fd = os.open("twice.txt", os.O_RDWR | os.O_CREAT, 0o644)
        os.write(fd, b"a")
        os.pwrite(fd, b"b", 5)                  # second write on the same fd: no event
        os.writev(fd, [b"c"])
        os.close(fd)
        fd = os.open("twice.txt", os.O_WRONLY | os.O_APPEND)
        os.writev(fd, [b"d", b"e"])             # re-opened: a second write event
        os.close(fd)
        fd = os.open("dup.txt", os.O_WRONLY | os.O_CREAT, 0o644)
        os.dup2(fd, 9)                          # shell redirection: the watch follows dup2
        os.close(fd)
        os.write(9, b"f")
        os.close(9)
        open("marker.txt", "w").close()
        print(json.dumps({}))
        """,
        cwd=tmp_path,
    )
    mine = _pid_is(pid)
    marker = str(tmp_path / "marker.txt")
    assert sensor.wait_for(lambda e: mine(e) and e.get("file", {}).get("path") == marker)
    got = [
        (e["event"]["action"], e["file"]["path"].rpartition("/")[2])
        for e in sensor.find(lambda e: mine(e) and "file" in e)
    ]
    assert got == [
        ("create", "created.txt"),
        ("write", "created.txt"),
        ("create", "twice.txt"),
        ("write", "twice.txt"),
        ("write", "twice.txt"),
        ("create", "dup.txt"),
        ("write", "dup.txt"),
        ("create", "marker.txt"),
    ], got
    writes = sensor.find(lambda e: mine(e) and e["event"]["action"] == "write")
    assert all(e["file"]["directory"] == str(tmp_path) for e in writes)
    assert all(e["process"]["executable"] == os.path.realpath(sys.executable) for e in writes)


def _owner_bit(sensor, tgid: int) -> int:
    owners = sensor.source._bpf[b"watch_owners"]
    return owners[owners.Key(tgid >> 6)].value >> (tgid & 63) & 1


def test_watch_owner_bit_lives_as_long_as_the_process(sensor, tmp_path: Path) -> None:
    """close and the write-like calls skip write_watch for tgids whose bit in watch_owners
    (file.bpf.c) is clear: the bit must be set once the process has a watch, must still let
    close drop it (a read-only fd reusing the number writes nothing), and must go at exit."""
    child = subprocess.Popen(
        [
            sys.executable,
            "-c",
            textwrap.dedent(
                """
                import os, sys
                fd = os.open("w.txt", os.O_WRONLY | os.O_CREAT, 0o644)  # created, watched
                os.close(fd)                                # the close drops the watch
                again = os.open("/etc/hostname", os.O_RDONLY)
                assert again == fd                          # same number, read-only
                try:
                    os.write(again, b"x")                   # attempted: EBADF, no event
                except OSError:
                    pass
                os.close(again)
                open("marker.txt", "w").close()
                print("ready", flush=True)
                sys.stdin.readline()
                """
            ),
        ],
        cwd=tmp_path,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout.readline().strip() == "ready"
        marker = str(tmp_path / "marker.txt")
        mine = _pid_is(child.pid)
        assert sensor.wait_for(lambda e: mine(e) and e.get("file", {}).get("path") == marker)
        assert _owner_bit(sensor, child.pid) == 1
        child.stdin.write("\n")
        child.stdin.flush()
        assert child.wait(timeout=30) == 0
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert sensor.wait_for(_action(child.pid, "exit"))
    got = [
        (e["event"]["action"], e["file"]["path"].rpartition("/")[2])
        for e in sensor.find(lambda e: _pid_is(child.pid)(e) and "file" in e)
    ]
    assert got == [("create", "w.txt"), ("create", "marker.txt")], got
    assert _owner_bit(sensor, child.pid) == 0


def test_sensor_own_activity_is_filtered(sensor, tmp_path: Path) -> None:
    own = tmp_path / "own-write.txt"
    own.write_text("the sensor itself")
    own.unlink()
    # a marker from a child proves events after ours have been processed
    pid, _ = run_child(
        "import json; open('marker.txt', 'w').close(); print(json.dumps({}))", cwd=tmp_path
    )
    assert sensor.wait_for(lambda e: _pid_is(pid)(e) and "file" in e)
    assert not sensor.find(lambda e: e.get("file", {}).get("path") == str(own))
    assert not sensor.find(_pid_is(os.getpid()))


def test_read_only_opens_are_reported_only_under_sensitive_prefixes(sensor) -> None:
    """The kernel decides read-only opens by the sensitive-prefix trie alone (file.bpf.c)."""
    pid, _ = run_child(
        """
        import json, os
        open("/etc/shadow", "rb").close()  # a default sensitive prefix
        open("/etc/hostname", "rb").close()  # not sensitive: a read-only open is not reported
        os.close(os.open("/etc/shadow", os.O_RDONLY | os.O_CLOEXEC))  # other flags, same
        print(json.dumps({}))
        """
    )
    shadow = sensor.wait_for(
        lambda e: _pid_is(pid)(e) and e.get("file", {}).get("path") == "/etc/shadow"
    )
    assert shadow and {e["event"]["action"] for e in shadow} == {"open"}
    assert sensor.wait_for(_action(pid, "exit"))  # everything the child did is in by now
    assert not sensor.find(
        lambda e: _pid_is(pid)(e) and e.get("file", {}).get("path") == "/etc/hostname"
    )


def test_sensitive_prefixes_of_any_length_decide_read_only_opens() -> None:
    """Configured prefixes, one of the full 64 bytes: the kernel's short read and two-byte
    pre-filter (file.bpf.c edr_read_only_not_sensitive) must agree with the whole path."""
    base = Path(tempfile.mkdtemp(prefix="edr-sens-", dir="/tmp"))
    try:
        short = base / "s"
        long_dir = base / ("d" * (62 - len(str(base))))
        assert len(f"{long_dir}/") == 64
        for d in (short, long_dir):
            d.mkdir()
            (d / "secret").write_text("x")
        (base / "plain").write_text("x")  # same first bytes as the prefixes, not under them
        sibling = Path(f"{long_dir}x")  # differs from the long prefix in its 64th byte only
        sibling.write_text("x")
        filters = FilterConfig(sensitive_read_prefixes=(f"{short}/", f"{long_dir}/"))
        running = start_source(filters=filters)
        try:
            paths = [short / "secret", long_dir / "secret", base / "plain", sibling]
            pid, _ = run_child(
                f"""
                import json
                for p in {[str(p) for p in paths]!r}:
                    open(p, "rb").close()
                print(json.dumps({{}}))
                """
            )
            assert running.wait_for(_action(pid, "exit"))
            opened = {
                e["file"]["path"]
                for e in running.find(lambda e: _pid_is(pid)(e) and "file" in e)
                if e["event"]["action"] == "open"
            }
            assert opened == {str(short / "secret"), str(long_dir / "secret")}
        finally:
            running.halt()
    finally:
        shutil.rmtree(base)


NET_CHILD = """
import json, socket
fam = socket.AF_INET6 if "{host}" == "::1" else socket.AF_INET
srv = socket.socket(fam, socket.SOCK_STREAM)
srv.bind(("{host}", 0))
srv.listen(4)
port = srv.getsockname()[1]
cli = socket.create_connection(("{host}", port), timeout=5)
conn, peer = srv.accept()
udp = socket.socket(fam, socket.SOCK_DGRAM)
udp.connect(("{host}", 9))
print(json.dumps({{"port": port, "client_port": cli.getsockname()[1], "peer": list(peer)[:2]}}))
"""


@pytest.mark.parametrize("host", ["127.0.0.1", "::1"])
def test_tcp_listen_connect_accept_and_udp(sensor, host: str) -> None:
    pid, info = run_child(NET_CHILD.format(host=host))
    port, cport = info["port"], info["client_port"]
    mine = _pid_is(pid)
    listen = sensor.wait_for(lambda e: mine(e) and e["event"]["action"] == "listen")
    connects = sensor.wait_for(lambda e: mine(e) and e["event"]["action"] == "connect", count=2)
    accept = sensor.wait_for(lambda e: mine(e) and e["event"]["action"] == "accept")
    assert listen[0]["destination"] == {"ip": host, "port": port}
    tcp = [e for e in connects if e["network"]["transport"] == "tcp"]
    udp = [e for e in connects if e["network"]["transport"] == "udp"]
    assert len(tcp) == 1 and len(udp) == 1
    assert tcp[0]["source"] == {"ip": host, "port": cport}
    assert tcp[0]["destination"] == {"ip": host, "port": port}
    assert tcp[0]["event"]["outcome"] == "success"
    assert tcp[0]["network"]["type"] == ("ipv6" if ":" in host else "ipv4")
    assert accept[0]["source"] == {"ip": host, "port": cport}
    assert accept[0]["destination"] == {"ip": host, "port": port}
    assert udp[0]["destination"] == {"ip": host, "port": 9}


def test_refused_connect_is_a_failure(sensor) -> None:
    pid, info = run_child(
        """
        import json, socket
        s = socket.socket(); s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]; s.close()
        c = socket.socket()
        try:
            c.connect(("127.0.0.1", port))
        except ConnectionRefusedError:
            pass
        print(json.dumps({"port": port}))
        """
    )
    ev = sensor.wait_for(lambda e: _action(pid, "connect")(e))
    assert ev and ev[0]["event"]["outcome"] == "failure"
    assert ev[0]["destination"] == {"ip": "127.0.0.1", "port": info["port"]}


def test_counters_after_activity(sensor) -> None:
    subprocess.run([TRUE], check=True)
    time.sleep(0.3)
    c = sensor.source.counters()
    assert c["submitted"] > 0
    assert c["dropped"] == 0
    assert c["decode_errors"] == 0 and c["handler_errors"] == 0
    assert sensor.source.submitted == c["submitted"]


def _cgroup_root_for_test() -> Path:
    """A hierarchy where the test may create a cgroup: v2 itself, else v1's pids controller."""
    from sensor import procfs

    if procfs.cgroup_v2_only():
        return Path("/sys/fs/cgroup")
    for name in ("pids", "cpu", "memory", "unified"):
        root = Path("/sys/fs/cgroup") / name
        if (root / "cgroup.procs").exists():
            return root
    pytest.skip("no cgroup hierarchy to create a test cgroup in")


def test_login_uid_is_read_from_the_task(sensor, monkeypatch) -> None:
    from sensor import ebpf, procfs

    if not ebpf._task_offsets():
        pytest.skip("the kernel has no BTF with task_struct.loginuid: /proc is the source")
    # /proc must not be what answers: a wrong value there shows up if it is read
    monkeypatch.setattr(procfs, "loginuid", lambda pid: 1)
    marker = f"edr-marker-{uuid.uuid4().hex}"
    # pam_loginuid's step: set the login uid, then exec the session's program
    p = subprocess.run(
        ["/bin/sh", "-c", f"echo 4242 > /proc/self/loginuid && exec {TRUE} {marker}"],
        capture_output=True,
        text=True,
        check=False,
    )
    if p.returncode != 0:
        pytest.skip(f"cannot set a login uid here: {p.stderr.strip()}")
    execs = sensor.wait_for(
        lambda e: e["event"]["action"] == "exec" and marker in e["process"].get("args", [])
    )
    assert len(execs) == 1
    assert execs[0]["user"]["audit"] == {"id": "4242"}


def test_container_follows_a_cgroup_move(sensor) -> None:
    container = uuid.uuid4().hex + uuid.uuid4().hex
    cgroup = _cgroup_root_for_test() / f"edr-test-{os.getpid()}" / container
    cgroup.mkdir(parents=True)
    marker = f"edr-marker-{uuid.uuid4().hex}"
    p = subprocess.Popen(
        ["/bin/sh", "-c", f"read go; exec {TRUE} {marker}"], stdin=subprocess.PIPE, text=True
    )
    try:
        sensor.wait_for(_action(p.pid, "exec"))  # the shell itself: not in the container yet
        (cgroup / "cgroup.procs").write_text(str(p.pid))
        p.communicate("go\n", timeout=10)
        execs = sensor.wait_for(
            lambda e: e["event"]["action"] == "exec" and marker in e["process"].get("args", [])
        )
        assert len(execs) == 1
        assert execs[0].get("container") == {"id": container}
        shell = sensor.find(
            lambda e: _pid_is(p.pid)(e) and "read go" in " ".join(e["process"].get("args", []))
        )
        assert shell and "container" not in shell[0]
    finally:
        if p.poll() is None:
            p.kill()
        p.wait(timeout=10)
        cgroup.rmdir()
        cgroup.parent.rmdir()

"""Tests for the exec-storm benchmark: parsers, the C spawner, tracer protocols, real rounds."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest

from .conftest import REPO, load_script

es = load_script("exec_storm")

needs_cc = pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler")


# -- /proc parsing ------------------------------------------------------------------------


def _stat_line(comm: str, utime: int, stime: int) -> str:
    # pid (comm) state ppid pgrp session tty tpgid flags minflt cminflt majflt cmajflt utime stime
    return f"42 ({comm}) S 1 42 42 0 -1 4194560 10 0 0 0 {utime} {stime} 0 0 20 0 1 0 5\n"


def test_proc_stat_counts_from_last_paren() -> None:
    assert es.parse_proc_stat(_stat_line("a) b (c", 7, 5)) == 12
    assert es.parse_proc_stat(_stat_line("true", 0, 0)) == 0


@pytest.mark.parametrize(
    "text",
    ["no parens at all", "42 (x) S 1 2", _stat_line("x", 1, 2).replace(" 1 2 0 0", " a b 0 0")],
)
def test_proc_stat_rejects_malformed(text: str) -> None:
    with pytest.raises(es.BenchError):
        es.parse_proc_stat(text)


def test_cpu_ticks_grow_with_real_work() -> None:
    before = es.cpu_ticks(os.getpid())
    deadline = time.process_time() + 0.3
    while time.process_time() < deadline:
        pass
    assert es.cpu_ticks(os.getpid()) - before >= 0.2 * es.CLK_TCK


def test_cpu_ticks_of_missing_pid_is_clear_error() -> None:
    proc = subprocess.run(["true"], check=True)
    del proc
    with pytest.raises(es.BenchError, match="cannot read CPU time"):
        es.cpu_ticks(2**22 + 7)  # above pid_max's ceiling: never a live process


def test_find_kernel_thread() -> None:
    assert es.find_kernel_thread("no-such-thread-name") is None
    kthreadd = es.find_kernel_thread("kthreadd")
    if kthreadd is not None:  # absent inside some containers
        assert kthreadd == 2


# -- bpftrace, auditctl and audit log parsing -----------------------------------------------


def test_bpftrace_output() -> None:
    assert es.parse_bpftrace_output("Attaching 2 probes...\n@execs: 4856\n\n") == (4856, 0)
    assert es.parse_bpftrace_output("Attaching 2 probes...\n") == (0, 0)  # empty map
    lost = "Attaching 2 probes...\nLost 5 events\nLost 7 events\n@execs: 10\n"
    assert es.parse_bpftrace_output(lost) == (10, 12)
    with pytest.raises(es.BenchError, match="unreadable"):
        es.parse_bpftrace_output("@execs: lots\n")


AUDITCTL_S = """enabled 1
failure 1
pid 3171
rate_limit 0
backlog_limit 8192
lost 3
backlog 0
backlog_wait_time 15000
backlog_wait_time_actual 0
loginuid_immutable 0 unlocked
"""


def test_auditctl_status() -> None:
    status = es.parse_auditctl_status(AUDITCTL_S)
    assert status["pid"] == 3171 and status["lost"] == 3 and status["backlog_limit"] == 8192
    assert status["loginuid_immutable"] == 0
    with pytest.raises(es.BenchError, match="lost"):
        es.parse_auditctl_status(AUDITCTL_S.replace("lost 3\n", ""))


def _audit_event(serial: int, key: str, arg1: str) -> list[str]:
    head = f"msg=audit(1795274951.{serial:03d}:{serial})"
    return [
        f'type=SYSCALL {head}: arch=c000003e syscall=59 success=yes exit=0 comm="x" key="{key}"'
        if key
        else f"type=SYSCALL {head}: syscall=59 key=(null)",
        f'type=EXECVE {head}: argc=2 a0="/tmp/edrbench-true" a1={arg1}',
        f'type=PATH {head}: item=0 name="/tmp/edrbench-true"',
    ]


def test_audit_log_counts_key_and_marker_of_one_event() -> None:
    marker = "edrbench-ab12-r1-auditd-w1"
    lines = [
        *_audit_event(1, "edrbench", f'"{marker}"'),
        *_audit_event(2, "edrbench", f'"{marker}"'),
        *_audit_event(3, "other", f'"{marker}"'),  # another rule's key
        *_audit_event(4, "", f'"{marker}"'),  # no key
        *_audit_event(5, "edrbench", f'"{marker}0"'),  # a marker that only starts like ours
        *_audit_event(6, "edrbench", marker.encode().hex().upper()),  # hex-encoded argument
        "type=DAEMON_END msg=audit(1795274960.000:9): op=terminate",
        "garbage line",
    ]
    # An EXECVE record whose SYSCALL record was lost does not count.
    lines += [_audit_event(7, "edrbench", f'"{marker}"')[1]]
    assert es.count_audit_execs(lines, "edrbench", marker) == 3


# -- sensor stats -----------------------------------------------------------------------------


def test_sensor_stats_valid() -> None:
    text = json.dumps(
        {
            "events": {"exec": 10, "fork": 3},
            "sources": {"tracepoint:process": {"submitted": 20, "dropped": 2}, "b": {}},
            "cpu_seconds": 1.5,
        }
    )
    stats = es.parse_sensor_stats(text, "t")
    assert es.sensor_execs(stats) == 10 and es.sensor_drops(stats) == 2
    assert es.sensor_execs(es.parse_sensor_stats('{"events": {}, "sources": {}}', "t")) == 0


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("{not json", "not JSON"),
        ("[1, 2]", "expected an object"),
        ('{"sources": {}}', "'events'"),
        ('{"events": {"exec": "many"}, "sources": {}}', "'events'"),
        ('{"events": {}, "sources": []}', "'sources'"),
        ('{"events": {}, "sources": {"a": {"dropped": "x"}}}', "'sources'"),
    ],
)
def test_sensor_stats_rejects_bad_input(text: str, match: str) -> None:
    with pytest.raises(es.BenchError, match=match):
        es.parse_sensor_stats(text, "t")


def _ndjson(action: str, args: list[str]) -> str:
    return json.dumps({"event": {"action": action}, "process": {"pid": 1, "args": args}})


def test_sensor_output_counts_exec_events_with_marker() -> None:
    marker = "edrbench-x-r1-sensor-w2"
    lines = [
        _ndjson("exec", ["/tmp/edrbench-true", marker]),
        _ndjson("exec", ["/tmp/edrbench-true", marker]),
        _ndjson("exit", ["/tmp/edrbench-true", marker]),  # the same process's exit
        _ndjson("exec", ["/tmp/edrbench-true", marker + "0"]),  # another round's marker
        _ndjson("exec", ["/bin/echo", "x", marker]),  # marker elsewhere in argv
        _ndjson("exec", ["/bin/true"]),
        '{"event": {"action": "open"}, "file": {"path": "/etc/shadow"}}',
    ]
    assert es.count_sensor_execs(lines, marker) == 2
    with pytest.raises(es.BenchError, match="line 2 is not an event"):
        es.count_sensor_execs([lines[0], '{"event": "' + marker], marker)


# -- the summary table and targets ------------------------------------------------------------


def _m(tracer: str, workers: int, rnd: int, rate: float, **kw: object) -> object:
    return es.Measurement(
        tracer=tracer,
        workers=workers,
        round=rnd,
        spawned=int(rate * 10),
        failed=0,
        elapsed=10.0,
        rate=rate,
        workload_cpu=kw.pop("workload_cpu", rate * 10 * 500e-6),  # 500 us per spawn
        **kw,
    )


def test_summary_medians_and_per_round_slowdown() -> None:
    results = [
        _m("untraced", 2, 1, 2000.0),
        _m("sensor", 2, 1, 1950.0, captured=19500, drops=0, cpu_seconds=0.2, cpu_window=10.0),
        _m(
            "auditd",
            2,
            1,
            1500.0,
            captured=15000,
            drops=4,
            cpu_seconds=1.0,
            cpu_window=10.0,
            workload_cpu=15000 * 1000e-6,  # twice untraced's CPU per spawn
        ),
        _m("untraced", 2, 2, 1000.0),  # the machine got slower in round 2: ratios still hold
        _m("sensor", 2, 2, 980.0, captured=9800, drops=0, cpu_seconds=0.4, cpu_window=10.0),
        _m("auditd", 2, 2, 750.0, captured=7000, drops=6, cpu_seconds=1.2, cpu_window=10.0),
    ]
    rows = {r.tracer: r for r in es.summarize(results)}
    assert rows["untraced"].slowdown == 1.0 and rows["untraced"].captured_pct is None
    assert rows["sensor"].slowdown == pytest.approx((2000 / 1950 + 1000 / 980) / 2)
    assert rows["sensor"].captured_pct == 100.0 and rows["sensor"].drops == 0
    assert rows["sensor"].cpu_pct == pytest.approx(3.0)
    assert rows["auditd"].drops == 5 and rows["auditd"].slowdown == pytest.approx(4 / 3)
    assert rows["sensor"].cpu_per_spawn_us == pytest.approx(500.0)
    assert rows["sensor"].cpu_slowdown == pytest.approx(1.0)
    assert rows["auditd"].cpu_slowdown == pytest.approx((2.0 + 1.0) / 2)
    table = es.format_table(es.summarize(results))
    assert "spawns/s" in table and "1,950" not in table and "1,465" in table
    checks = es.check_targets(es.summarize(results))
    assert checks[0].startswith("PASS") and checks[1].startswith("PASS")
    assert checks[2].startswith("FAIL")  # 3.0% > 11.0% / 4


def test_targets_fail_on_loss_and_without_sensor() -> None:
    results = [
        _m("untraced", 2, 1, 2000.0),
        _m("sensor", 2, 1, 1000.0, captured=9999, drops=0, cpu_seconds=0.1, cpu_window=10.0),
    ]
    checks = es.check_targets(es.summarize(results))
    assert checks[0].startswith("FAIL") and checks[1].startswith("FAIL")
    assert checks[2].startswith("n/a")
    assert "not checked" in es.check_targets(es.summarize([_m("untraced", 1, 1, 5.0)]))[0]
    assert es.noise_warning(es.summarize(results)) is None
    noisy = es.noise_warning(es.summarize([*results, _m("bpftrace", 2, 1, 2200.0)]))
    assert noisy is not None and "bpftrace/2" in noisy and "sensor" not in noisy
    alone = es.check_targets(es.summarize([results[1]]))  # the sensor without untraced
    assert alone[1].startswith("n/a") and "untraced was not measured" in alone[1]


# -- command line -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--duration", "0"], "expected a number of seconds"),
        (["--duration", "x"], "not a number"),
        (["--rounds", "0"], "expected 1 to 100"),
        (["--workers", "1,a"], "expected e.g. 1,2"),
        (["--workers", "0"], "worker counts are 1 to 64"),
        (["--tracers", "sensor,strace"], "unknown tracer strace"),
    ],
)
def test_bad_arguments_are_refused(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        es.main(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_tracers_run_in_canonical_order() -> None:
    assert es.tracer_list("auditd,untraced,sensor") == ["untraced", "sensor", "auditd"]
    both = es.tracer_list("sensor-paused,sensor,untraced")
    assert both == ["untraced", "sensor", "sensor-paused"]
    # asked for by name only: a default-length storm would overflow its ring
    assert "sensor-paused" not in es.build_parser().parse_args([]).tracers


def test_refuses_without_root(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(es.os, "geteuid", lambda: 1000)
    assert es.main(["--quick"]) == 2
    assert "run as root" in capsys.readouterr().err


# -- the spawner ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def spawner(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if shutil.which("cc") is None:
        pytest.skip("no C compiler")
    return es.build_spawner(tmp_path_factory.mktemp("spawner"))


def _script(path: Path, body: str) -> Path:
    path.write_text("#!/bin/sh\n" + textwrap.dedent(body))
    path.chmod(0o755)
    return path


@needs_cc
def test_spawner_count_is_exact(spawner: Path, tmp_path: Path) -> None:
    log = tmp_path / "log"
    program = _script(tmp_path / "prog", f'echo "$1" >> {log}\n')
    result = es.run_spawner(spawner, 2, 0.5, "edrbench-mark", str(program))
    lines = log.read_text().splitlines()
    assert result.workers == 2 and result.failed == 0
    assert 0 < result.cpu < 2 * 2.0  # two workers cannot use more than two cores' time
    assert result.spawned == len(lines) > 10
    assert set(lines) == {"edrbench-mark"}
    assert 0.5 <= result.elapsed < 2.0


@needs_cc
def test_spawner_counts_failing_children_apart(spawner: Path, tmp_path: Path) -> None:
    program = _script(tmp_path / "fails", "exit 3\n")
    with pytest.raises(es.BenchError, match="did no work"):
        es.run_spawner(spawner, 1, 0.2, "m", str(program))
    raw = subprocess.run(
        [spawner, "1", "200", str(program), "m"], capture_output=True, text=True, check=True
    )
    data = json.loads(raw.stdout)
    assert data["spawned"] == 0 and data["failed"] > 0


@needs_cc
@pytest.mark.parametrize(
    "args",
    [
        [],
        ["0", "100", "/bin/true", "m"],
        ["65", "100", "/bin/true", "m"],
        ["1", "0", "/bin/true", "m"],
        ["1", "10x", "/bin/true", "m"],
        ["1", "100", "true", "m"],  # relative path
        ["1", "100", "/bin/true", ""],
    ],
)
def test_spawner_rejects_bad_usage(spawner: Path, args: list[str]) -> None:
    proc = subprocess.run([spawner, *args], capture_output=True, text=True, check=False)
    assert proc.returncode == 2 and "usage: spawner" in proc.stderr and not proc.stdout


def _gone(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat[stat.rfind(")") + 2] in "ZX"  # dead, waiting for a reaper


# A child that, like bpftrace 0.17 at times, lets the first SIGINT go by and stops on the next.
MISSES_FIRST_SIGINT = """
import signal, sys, time
seen = []
signal.signal(signal.SIGINT, lambda *_: seen.append(1))
print("ready", flush=True)
while len(seen) < 2:
    time.sleep(0.05)
print("stopped on", len(seen), flush=True)
"""


def test_stop_process_resends_the_signal_until_the_child_stops() -> None:
    proc = subprocess.Popen([sys.executable, "-c", MISSES_FIRST_SIGINT],
                            stdout=subprocess.PIPE, text=True)  # fmt: skip
    assert proc.stdout is not None and proc.stdout.readline() == "ready\n"
    t0 = time.monotonic()
    es._stop_process(proc, es.signal.SIGINT, 20, resend_every=0.2)
    assert proc.returncode == 0 and proc.stdout.read() == "stopped on 2\n"
    assert time.monotonic() - t0 < 10


def test_stop_process_kills_what_never_stops() -> None:
    proc = subprocess.Popen([sys.executable, "-c", MISSES_FIRST_SIGINT.replace("< 2", "< 99")],
                            stdout=subprocess.PIPE, text=True)  # fmt: skip
    assert proc.stdout is not None and proc.stdout.readline() == "ready\n"
    es._stop_process(proc, es.signal.SIGINT, 1.0, resend_every=0.2)
    assert proc.returncode == -9


@needs_cc
def test_spawner_workers_die_with_it(spawner: Path) -> None:
    proc = subprocess.Popen([spawner, "2", "20000", "/bin/true", "m"], stdout=subprocess.PIPE)
    try:
        children: list[int] = []
        deadline = time.monotonic() + 5
        while len(children) < 2 and time.monotonic() < deadline:
            text = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text()
            children = [int(c) for c in text.split()]
            time.sleep(0.05)
        assert len(children) == 2
    finally:
        proc.kill()
        proc.wait(5)
        if proc.stdout:
            proc.stdout.close()
    deadline = time.monotonic() + 5
    while not all(_gone(c) for c in children) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert all(_gone(c) for c in children)


@needs_cc
def test_spawner_rejects_missing_program(spawner: Path, tmp_path: Path) -> None:
    with pytest.raises(es.BenchError, match="is not executable"):
        es.run_spawner(spawner, 1, 0.1, "m", str(tmp_path / "missing"))


def test_build_reports_compiler_errors(tmp_path: Path) -> None:
    with pytest.raises(es.BenchError, match="compiling"):
        es.build_spawner(tmp_path, cc="/bin/false")


# -- the sensor protocol, against scripted stand-ins that break it ----------------------------


def _fake_sensor(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "fake-sensor"
    path.write_text(f"#!{sys.executable}\n" + textwrap.dedent(body))
    path.chmod(0o755)
    return path


def test_sensor_that_dies_at_start_is_reported(tmp_path: Path) -> None:
    fake = _fake_sensor(
        tmp_path,
        """
        import sys
        print("edr-sensor: tracepoint tier unavailable: no BPF here", file=sys.stderr)
        sys.exit(3)
        """,
    )
    tracer = es.SensorTracer([str(fake)], tmp_path)
    started = time.monotonic()
    with pytest.raises(es.BenchError, match=r"(?s)no stats.*no BPF here"):
        tracer.start("m")
    # Noticed when its output ends, not after the 180 s start-up timeout.
    assert time.monotonic() - started < 10
    tracer.abort()


def test_sensor_with_bad_stats_file_is_reported(tmp_path: Path) -> None:
    fake = _fake_sensor(
        tmp_path,
        """
        import json, signal, sys, time
        stats_file = sys.argv[sys.argv.index("--stats-file") + 1]
        stop = []
        signal.signal(signal.SIGINT, lambda *_: stop.append(1))
        n = 0
        while not stop:
            n += 1
            line = json.dumps({"events": {"exec": n}, "sources": {"s": {"dropped": 0}}})
            print("edr-sensor stats: not json", file=sys.stderr, flush=True)
            print("edr-sensor stats: " + line, file=sys.stderr, flush=True)
            time.sleep(0.1)
        open(stats_file, "w").write("{truncated")
        """,
    )
    tracer = es.SensorTracer([str(fake)], tmp_path, idle=0.3, interval=0.1, output_dir=tmp_path)
    tracer.start("m")
    tracer.begin()
    assert tracer._background_rate > 0  # the fake "execs" ten times a second
    assert tracer.output_file is not None and tracer.output_file.parent == tmp_path
    spawn = es.SpawnResult(workers=1, spawned=1, failed=0, elapsed=1.0)
    with pytest.raises(es.BenchError, match="not JSON"):
        tracer.finish(spawn)
    assert tracer.proc is None
    tracer.abort()
    assert not list(tmp_path.glob("*.ndjson"))  # the output file is cleaned up


def test_sensor_file_mode_counts_its_output(tmp_path: Path) -> None:
    fake = _fake_sensor(
        tmp_path,
        """
        import json, signal, sys, time
        if "--families=process" not in sys.argv:
            sys.exit("extra arguments were not passed on")
        out = sys.argv[sys.argv.index("--output") + 1]
        stats_file = sys.argv[sys.argv.index("--stats-file") + 1]
        stop = []
        signal.signal(signal.SIGINT, lambda *_: stop.append(1))
        stats = json.dumps({"events": {"exec": 0}, "sources": {"s": {"dropped": 0}}})
        while not stop:
            print("edr-sensor stats: " + stats, file=sys.stderr, flush=True)
            time.sleep(0.1)
        with open(out, "a") as fh:
            for marker in ["m1", "m1", "m2", "m1"]:
                ev = {"event": {"action": "exec"}, "process": {"args": ["/x", marker]}}
                fh.write(json.dumps(ev) + "\\n")
        open(stats_file, "w").write(stats)
        """,
    )
    tracer = es.SensorTracer(
        [str(fake)],
        tmp_path,
        idle=0.2,
        interval=0.1,
        output_dir=tmp_path,
        extra_args=["--families=process"],
    )
    tracer.start("m1")
    tracer.begin()
    capture = tracer.finish(es.SpawnResult(workers=1, spawned=3, failed=0, elapsed=1.0))
    assert (capture.captured, capture.drops) == (3, 0)
    assert "stats-based estimate 0" in capture.note
    assert not list(tmp_path.glob("*.ndjson"))


def test_sensor_counts_subtract_baseline_and_background(tmp_path: Path) -> None:
    # A stand-in that "sees" 5 background execs per stats tick, then 1000 storm execs when
    # told (SIGUSR1) and reports 2 drops: the tracer must report 1000 captured, 2 drops.
    fake = _fake_sensor(
        tmp_path,
        """
        import json, signal, sys, time
        stats_file = sys.argv[sys.argv.index("--stats-file") + 1]
        state = {"exec": 0, "drop": 0, "stop": False}
        def storm(*_):
            state["exec"] += 1000
            state["drop"] += 2
        signal.signal(signal.SIGUSR1, storm)
        signal.signal(signal.SIGINT, lambda *_: state.update(stop=True))
        def stats():
            return json.dumps({"events": {"exec": state["exec"]},
                               "sources": {"s": {"submitted": 0, "dropped": state["drop"]}}})
        while not state["stop"]:
            state["exec"] += 5
            print("edr-sensor stats: " + stats(), file=sys.stderr, flush=True)
            time.sleep(0.1)
        open(stats_file, "w").write(stats())
        """,
    )
    tracer = es.SensorTracer([str(fake)], tmp_path, idle=0.5, interval=0.1, output="devnull")
    tracer.start("m")
    tracer.begin()
    t0 = time.monotonic()
    os.kill(tracer.proc.pid, es.signal.SIGUSR1)
    time.sleep(0.5)
    capture = tracer.finish(es.SpawnResult(workers=1, spawned=1000, failed=0, elapsed=1.0))
    assert capture.drops == 2
    # Background is estimated, not known: allow one tick of timing slack either way.
    assert abs(capture.captured - 1000) <= 10, (capture, time.monotonic() - t0)


# -- real tracers (root) ------------------------------------------------------------------------


def _config(**kw: object) -> object:
    base = {
        "duration": 1.0,
        "rounds": 1,
        "workers": [1],
        "settle": 0.5,
        "tracers": ["untraced"],
        "sensor_command": [str(REPO / ".venv" / "bin" / "edr-sensor")],
    }
    base.update(kw)
    return es.Config(**base)


@pytest.fixture
def storm_program(tmp_path: Path) -> str:
    link = tmp_path / es.STORM_COMM
    link.symlink_to(es.TRUE)
    return str(link)


@pytest.mark.root
@pytest.mark.bpf
@pytest.mark.timeout(120)
@pytest.mark.skipif(shutil.which("bpftrace") is None, reason="bpftrace not installed")
def test_bpftrace_counts_every_storm_exec(
    spawner: Path, storm_program: str, tmp_path: Path
) -> None:
    m = es.measure(es.BpftraceTracer(), spawner, storm_program, 2, 1, _config(), "t")
    assert m.spawned > 100 and m.captured == m.spawned and m.drops == 0
    assert m.cpu_seconds is not None and m.cpu_window >= 1.0


def _audit_state() -> tuple[dict[str, int], str]:
    status = es.parse_auditctl_status(es._auditctl("-s"))
    return status, es._auditctl("-l")


@pytest.mark.root
@pytest.mark.timeout(120)
@pytest.mark.skipif(shutil.which("auditd") is None, reason="auditd not installed")
def test_auditd_counts_exactly_and_restores_audit_state(
    spawner: Path, storm_program: str, tmp_path: Path
) -> None:
    tracer = es.AuditdTracer(tmp_path)
    if reason := tracer.unavailable():
        pytest.skip(reason)
    before, rules_before = _audit_state()
    tracer.start("edrbench-test-marker")
    try:
        # While ours runs, a second audit daemon is refused with the reason.
        assert "already registered" in (es.AuditdTracer(tmp_path / "b").unavailable() or "")
        assert es.AUDIT_KEY in es._auditctl("-l")
        tracer.begin()
        spawn = es.run_spawner(spawner, 1, 1.0, "edrbench-test-marker", storm_program)
        time.sleep(0.5)
    except BaseException:
        tracer.abort()
        raise
    capture = tracer.finish(spawn)
    assert capture.captured + capture.drops >= spawn.spawned
    assert capture.captured <= spawn.spawned
    if capture.drops == 0:
        assert capture.captured == spawn.spawned
    after, rules_after = _audit_state()
    assert rules_after == rules_before and es.AUDIT_KEY not in rules_after
    assert after["pid"] == 0 and tracer.proc is None
    assert (after["enabled"], after["backlog_limit"]) == (
        before["enabled"],
        before["backlog_limit"],
    )


def _sensor_tracer(cls: Any, tmp_path: Path) -> Any:
    """The installed sensor as ``cls`` (SensorTracer or a subclass), or a skip saying why not."""
    tracer = cls(_config().sensor_command, tmp_path)
    if reason := tracer.unavailable():
        pytest.skip(reason)
    return tracer


@pytest.mark.root
@pytest.mark.bpf
@pytest.mark.timeout(200)
def test_sensor_captures_every_storm_exec(
    spawner: Path, storm_program: str, tmp_path: Path
) -> None:
    tracer = _sensor_tracer(es.SensorTracer, tmp_path)
    m = es.measure(tracer, spawner, storm_program, 2, 1, _config(), "t")
    assert m.drops == 0 and m.spawned > 100
    assert m.captured == m.spawned, m
    assert m.cpu_seconds is not None and m.cpu_seconds > 0


@pytest.mark.root
@pytest.mark.bpf
@pytest.mark.timeout(200)
def test_paused_sensor_holds_the_storm_in_its_ring(
    spawner: Path, storm_program: str, tmp_path: Path
) -> None:
    tracer = _sensor_tracer(es.PausedSensorTracer, tmp_path)
    assert tracer.cpu_pids() == []  # its work happens after the window
    marker = "edrbench-paused-test"
    tracer.start(marker)
    try:
        tracer.begin()
        assert tracer.proc is not None
        stat = Path(f"/proc/{tracer.proc.pid}/stat").read_text()
        assert stat.rsplit(")", 1)[1].split()[0] == "T"  # stopped for the storm
        spawn = es.run_spawner(spawner, 2, 1.0, marker, storm_program)
        capture = tracer.finish(spawn)
    except BaseException:
        tracer.abort()
        raise
    assert spawn.spawned > 100
    assert capture.drops == 0 and capture.captured == spawn.spawned, capture


@pytest.mark.root
@pytest.mark.bpf
@pytest.mark.timeout(120)
def test_execsnoop_needs_kprobes() -> None:
    if (
        Path("/sys/kernel/tracing/kprobe_events").exists()
        or shutil.which("execsnoop-bpfcc") is None
    ):
        pytest.skip("kprobes exist here, or no bcc tools: nothing to detect")
    assert "does not start on this kernel" in es.execsnoop_status()


@pytest.mark.root
@pytest.mark.bpf
@pytest.mark.timeout(120)
def test_quick_run_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "result.json"
    argv = ["--quick", "--duration", "1", "--workers", "1", "--tracers", "untraced,bpftrace"]
    code = es.main([*argv, "--no-execsnoop", "--json", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "spawns/s" in printed and "bpftrace" in printed
    data = json.loads(out.read_text())
    by = {m["tracer"]: m for m in data["measurements"]}
    assert set(by) == {"untraced", "bpftrace"}
    assert by["bpftrace"]["captured"] == by["bpftrace"]["spawned"]
    assert data["summary"][0]["slowdown"] == 1.0

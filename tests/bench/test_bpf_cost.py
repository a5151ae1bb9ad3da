"""Tests for bench/bpf_cost.py: fdinfo parsing, the per-spawn arithmetic, a real short run."""

from __future__ import annotations

from pathlib import Path

import pytest

from .conftest import load_script

bc = load_script("bpf_cost")

FDINFO = """pos:\t0
flags:\t02000002
mnt_id:\t16
ino:\t1057
prog_type:\t5
prog_jited:\t1
prog_tag:\t6b1e3e4f4e4bf8a6
memlock:\t4096
prog_id:\t311
run_time_ns:\t123456
run_cnt:\t789
recursion_misses:\t0
verified_insns:\t42
"""


def test_fdinfo_of_a_program() -> None:
    assert bc.parse_fdinfo(FDINFO) == bc.Sample(calls=789, ns=123456)


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("pos:\t0\nflags:\t02\n", "no run_cnt"),  # a plain file, or a kernel without stats
        (FDINFO.replace("run_time_ns:\t123456", "run_time_ns:\tmany"), "not integers"),
        ("", "no run_cnt"),
    ],
)
def test_fdinfo_errors_are_clear(text: str, match: str) -> None:
    with pytest.raises(bc.CostError, match=match):
        bc.parse_fdinfo(text)


def test_fdinfo_of_a_real_non_program_fd(tmp_path: Path) -> None:
    with (tmp_path / "plain").open("w") as f, pytest.raises(bc.CostError, match="BPF program"):
        bc.read_sample(f.fileno())


def test_program_names() -> None:
    assert bc.program_name(b"tracepoint__syscalls__sys_enter_openat") == (
        "syscalls:sys_enter_openat"
    )
    assert bc.program_name("kprobe__do_exit") == "kprobe__do_exit"


def test_per_spawn_deltas() -> None:
    before = {"a": bc.Sample(10, 1_000), "b": bc.Sample(5, 50)}
    after = {"a": bc.Sample(110, 11_000), "b": bc.Sample(5, 50), "c": bc.Sample(4, 400)}
    got = bc.per_spawn(before, after, spawned=50)
    assert got["a"] == (2.0, 100.0, 200.0)
    assert got["b"] == (0.0, None, 0.0)  # never ran: no ns per call
    assert got["c"] == (0.08, 100.0, 8.0)  # loaded after the first reading: counted from 0


def test_per_spawn_refuses_nonsense() -> None:
    with pytest.raises(bc.CostError, match="backwards"):
        bc.per_spawn({"a": bc.Sample(10, 100)}, {"a": bc.Sample(9, 100)}, spawned=1)
    with pytest.raises(bc.CostError, match="spawned nothing"):
        bc.per_spawn({}, {}, spawned=0)


def test_summary_takes_medians_and_sorts() -> None:
    rounds = [
        {"open": (30.0, 90.0, 2700.0), "exec": (1.0, 800.0, 800.0), bc.FLOOR: (30.0, 20.0, 600.0)},
        {"open": (30.0, 100.0, 3000.0), "exec": (1.0, 900.0, 900.0), bc.FLOOR: (30.0, 22.0, 660.0)},
        {"open": (30.0, 95.0, 2850.0), "exec": (1.0, 700.0, 700.0), bc.FLOOR: (30.0, 21.0, 630.0)},
    ]
    rounds[0]["unused"] = (0.0, None, 0.0)
    rows = bc.summarize(rounds)
    assert [r.name for r in rows] == ["open", "exec", bc.FLOOR]  # costliest first, floor last
    assert rows[0] == bc.Row("open", 30.0, 95.0, 2850.0)
    assert rows[1].ns_per_call == 800.0
    table = bc.format_table(rows)
    assert "unused" not in table
    total = table.splitlines()[-1]
    assert total.startswith("sensor total") and total.split()[-1] == "3650"  # floor not summed


def test_refuses_without_root(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(bc.os, "geteuid", lambda: 1000)
    assert bc.main(["--rounds", "1"]) == 2
    assert "run as root" in capsys.readouterr().err


@pytest.mark.root
@pytest.mark.bpf
@pytest.mark.timeout(300)
def test_real_run_names_the_open_hooks(capsys: pytest.CaptureFixture[str]) -> None:
    stats = Path("/proc/sys/kernel/bpf_stats_enabled")
    before = stats.read_text()
    assert bc.main(["--rounds", "1", "--duration", "1"]) == 0
    assert stats.read_text() == before  # the sysctl is put back
    lines = capsys.readouterr().out.splitlines()
    rows = {line.split()[0]: line.split()[1:] for line in lines[3:-1]}
    # /bin/true's dynamic loader opens and closes files: every spawn reaches these hooks
    for name in (
        "syscalls:sys_enter_openat",
        "syscalls:sys_exit_openat",
        "sched:sched_process_exec",
    ):
        calls, per_call, per_spawn = rows[name]
        assert float(calls) >= 1.0 and float(per_call) > 0 and float(per_spawn) > 0
    assert float(rows["sched:sched_process_exec"][0]) == pytest.approx(1.0, abs=0.05)
    assert float(rows[bc.FLOOR][0]) == float(rows["syscalls:sys_enter_openat"][0])
    assert lines[-1].startswith("sensor total") and float(lines[-1].split()[-1]) > 0

"""Exit statuses and argv, taken both ways the programs can take them (process.bpf.c).

With the running kernel's BTF the programs read the task's exit_code and the new image's argv
block; without it they gather the status from exit(2), exit_group(2) and signal delivery and
read argv from the caller at execve entry. Both builds run here against the same processes,
and must report the same.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import uuid
from collections.abc import Iterator

import pytest

from backplane.schema import Family
from sensor import ebpf

from .conftest import Running, start_source

pytestmark = [pytest.mark.root, pytest.mark.bpf, pytest.mark.timeout(120)]

TRUE = os.path.realpath("/bin/true")


@pytest.fixture(scope="module")
def with_btf() -> Iterator[Running]:
    if not ebpf._task_offsets().keys() >= {"EDR_TASK_EXIT_CODE_OFF", "EDR_TASK_MM_OFF"}:
        pytest.skip("this kernel's BTF lacks task_struct.exit_code or mm: one way only")
    running = start_source(frozenset({Family.PROCESS}))
    yield running
    running.halt()


@pytest.fixture(scope="module")
def without_btf() -> Iterator[Running]:
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ebpf, "_TASK_OFFSETS", {})  # as on a kernel without BTF
        running = start_source(frozenset({Family.PROCESS}))
    yield running
    running.halt()


@pytest.fixture(params=["with_btf", "without_btf"])
def sensor(request: pytest.FixtureRequest) -> Running:
    return request.getfixturevalue(request.param)


def _marked(sensor: Running, marker: str, action: str) -> list[dict]:
    def match(e: dict) -> bool:
        args = e.get("process", {}).get("args") or []
        return e["event"]["action"] == action and any(marker in a for a in args)

    return sensor.wait_for(match)


def _run_python(code: str, marker: str) -> int:
    p = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), marker], check=False, timeout=30
    )
    return p.returncode


@pytest.mark.parametrize(
    ("code", "exit_code", "sig"),
    [
        ("import sys; sys.exit(7)", 7, None),
        ("import sys; sys.exit(0)", 0, None),
        ("import os; os.kill(os.getpid(), 15)", -15, 15),
        ("import os; os.kill(os.getpid(), 9)", -9, 9),
        # exit_group(2) from a thread other than the leader, the leader blocked meanwhile
        (
            """
            import os, threading, time
            threading.Thread(target=lambda: os._exit(5)).start()
            time.sleep(30)
            """,
            5,
            None,
        ),
        # a handled signal is not a death: the process exits normally afterwards
        (
            """
            import os, signal, sys
            signal.signal(signal.SIGUSR1, lambda *_: None)
            os.kill(os.getpid(), signal.SIGUSR1)
            sys.exit(3)
            """,
            3,
            None,
        ),
    ],
)
def test_exit_status(
    request: pytest.FixtureRequest, sensor: Running, code: str, exit_code: int, sig: int | None
) -> None:
    if sig == 15 and "without_btf" in request.node.callspec.id:
        # The kernel turns a fatal signal into SIGKILL for every thread (complete_signal),
        # and SIGKILL is dequeued first: signal_deliver never sees the signal that was sent.
        reason = "without BTF, a death by a signal other than SIGKILL reads as SIGKILL"
        request.applymarker(pytest.mark.xfail(strict=True, reason=reason))
    marker = f"edr-marker-{uuid.uuid4().hex}"
    rc = _run_python(code, marker)
    assert rc == exit_code
    exits = _marked(sensor, marker, "exit")
    assert [e["process"]["exit_code"] for e in exits] == [exit_code]
    assert exits[0].get("edr", {}).get("exit_signal") == sig


def test_a_signal_death_keeps_the_signal_when_it_dumps_core(sensor: Running) -> None:
    marker = f"edr-marker-{uuid.uuid4().hex}"
    p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)", marker])
    _marked(sensor, marker, "exec")
    p.send_signal(signal.SIGQUIT)  # default action: core dump (0x80 in the wait status)
    assert p.wait(timeout=10) == -signal.SIGQUIT
    exits = _marked(sensor, marker, "exit")
    assert [e["process"]["exit_code"] for e in exits] == [-signal.SIGQUIT]


def test_argv_is_reported_as_given(sensor: Running) -> None:
    marker = f"edr-marker-{uuid.uuid4().hex}"
    argv = [TRUE, marker, "", "two words", "tab\there", "é"]
    subprocess.run(argv, check=True)
    execs = _marked(sensor, marker, "exec")
    assert len(execs) == 1
    assert execs[0]["process"]["args"] == argv
    assert execs[0]["process"]["args_count"] == len(argv)
    assert "args_truncated" not in execs[0]["process"]


def test_argv_bytes_that_are_not_utf8(sensor: Running) -> None:
    marker = f"edr-marker-{uuid.uuid4().hex}"
    subprocess.run([TRUE.encode(), marker.encode(), b"\xff\xfe"], check=True)
    execs = _marked(sensor, marker, "exec")
    assert execs[0]["process"]["args"] == [TRUE, marker, "\\xff\\xfe"]


def test_more_args_than_the_count_bound_are_cut_and_flagged(sensor: Running) -> None:
    marker = f"edr-marker-{uuid.uuid4().hex}"
    argv = [TRUE, marker, *(f"a{i}" for i in range(ebpf.ARGS_MAX_COUNT + 50))]
    subprocess.run(argv, check=True)
    execs = _marked(sensor, marker, "exec")
    assert execs[0]["process"]["args"] == argv[: ebpf.ARGS_MAX_COUNT]
    assert execs[0]["process"]["args_truncated"] is True


def test_more_bytes_than_the_byte_bound_are_cut_and_flagged(sensor: Running) -> None:
    marker = f"edr-marker-{uuid.uuid4().hex}"
    long = "x" * (ebpf.ARGS_MAX_BYTES + 100)
    subprocess.run([TRUE, marker, long], check=True)
    execs = _marked(sensor, marker, "exec")
    args = execs[0]["process"]["args"]
    assert args[:2] == [TRUE, marker]
    # what is kept of the long argument is a prefix of it, within the byte bound
    assert len(args) == 3 and long.startswith(args[2]) and 0 < len(args[2]) < len(long)
    assert sum(len(a) + 1 for a in args) - 1 <= ebpf.ARGS_MAX_BYTES  # the cut one has no NUL
    assert execs[0]["process"]["args_truncated"] is True

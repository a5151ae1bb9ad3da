#!/usr/bin/env python3
"""Exec-storm benchmark: what tracing exec costs, and whether every exec is seen.

A C spawner (``bench/spawner.c``, compiled here with the system ``cc``) runs
``/bin/true <marker>`` in fork + execve + waitpid loops, with one and with two workers, for a
fixed time. Each configuration runs untraced, under our sensor, under bpftrace and under
auditd, interleaved in rounds so that drift on the machine hits every tracer alike; the table
shows medians over the rounds.

Run as root from the repository root::

    .venv/bin/python bench/exec_storm.py            # 3 rounds x 10 s, ~5-6 minutes
    .venv/bin/python bench/exec_storm.py --quick    # 1 round x 3 s smoke run

How each tracer's numbers are taken is written next to its class below and in
``bench/README.md``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
SPAWNER_SOURCE = Path(__file__).resolve().parent / "spawner.c"
TRUE = "/bin/true"
# The storm execs /bin/true through a symlink of this name: the kernel names the task after
# the path it was given, so the storm's execs have a comm of their own ("true" is also run by
# other software on a busy machine, which would inflate bpftrace's count).
STORM_COMM = "edrbench-true"
AUDIT_KEY = "edrbench"
AUDIT_RULE = ("-F", "arch=b64", "-S", "execve", "-k", AUDIT_KEY)
# A stock Debian install loads "-b 8192" from /etc/audit/rules.d at service start; running
# auditd by hand skips that, so the benchmark sets it to compare against the usual set-up.
AUDIT_BACKLOG = 8192
GENERIC_HEADERS = Path("/usr/src/edr-bcc-headers")
CLK_TCK = os.sysconf("SC_CLK_TCK")

# BEGIN runs once every probe is attached: "edr-bench-ready" is the start signal ("Attaching N
# probes..." is printed before attaching).
BPFTRACE_READY = "edr-bench-ready"
BPFTRACE_SCRIPT = (
    f'BEGIN {{ printf("{BPFTRACE_READY}\\n"); }}\n'
    f'tracepoint:sched:sched_process_exec /comm == "{STORM_COMM}"/ {{ @execs = count(); }}\n'
    "END { print(@execs); }\n"
)

# Targets from the product brief, checked against the two-worker rows.
TARGET_SLOWDOWN = 1.05
TARGET_CPU_FRACTION_OF_AUDITD = 0.25


class BenchError(Exception):
    """A measurement could not be taken; the message says which and why."""


# --------------------------------------------------------------------------------------------
# Parsing helpers (pure, tested without root)


def parse_proc_stat(text: str) -> int:
    """utime + stime, in clock ticks, from the text of ``/proc/<pid>/stat``.

    The command name is in parentheses and may itself contain spaces and ')', so fields are
    counted from the last ')'.
    """
    end = text.rfind(")")
    if end < 0:
        raise BenchError(f"malformed /proc stat line: {text[:80]!r}")
    fields = text[end + 2 :].split()
    # After the comm come: state(3) ppid(4) ... utime(14) stime(15); index from field 3.
    if len(fields) < 13:
        raise BenchError(f"short /proc stat line: {text[:80]!r}")
    try:
        return int(fields[11]) + int(fields[12])
    except ValueError:
        raise BenchError(f"non-numeric utime/stime in /proc stat: {text[:80]!r}") from None


def cpu_ticks(pid: int) -> int:
    """CPU ticks (user + system, all threads) a process has used so far."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError as exc:
        raise BenchError(f"cannot read CPU time of pid {pid}: {exc.strerror}") from None
    return parse_proc_stat(text)


def find_kernel_thread(name: str) -> int | None:
    """The pid of a kernel thread by exact name (e.g. ``kauditd``), or ``None``."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if (entry / "comm").read_text().strip() == name:
                return int(entry.name)
        except OSError:
            continue  # exited while we looked
    return None


def parse_bpftrace_output(text: str) -> tuple[int, int]:
    """``(execs, lost)`` from bpftrace's output for ``BPFTRACE_SCRIPT``.

    bpftrace prints the map once from ``END``; an empty map prints nothing, which is zero.
    "Lost N events" lines are perf-buffer losses (none expected: ``count()`` aggregates in
    the kernel), reported as drops.
    """
    execs = 0
    match = re.search(r"^@execs: (\d+)$", text, re.MULTILINE)
    if match:
        execs = int(match.group(1))
    elif "@execs:" in text:
        raise BenchError(f"unreadable bpftrace count in: {text[-200:]!r}")
    lost = sum(int(n) for n in re.findall(r"Lost (\d+) events", text))
    return execs, lost


def parse_auditctl_status(text: str) -> dict[str, int]:
    """``auditctl -s`` as a dict of its numeric fields (``lost``, ``backlog_limit``, ...)."""
    status: dict[str, int] = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[1].lstrip("-").isdigit():
            status[parts[0]] = int(parts[1])
    for needed in ("enabled", "lost", "backlog_limit"):
        if needed not in status:
            raise BenchError(f"auditctl -s gave no {needed!r}: {text[:200]!r}")
    return status


_AUDIT_SERIAL = re.compile(r"msg=audit\(\d+\.\d+:(\d+)\)")


def count_audit_execs(lines: Iterator[str] | Sequence[str], key: str, marker: str) -> int:
    """How many exec audit events carry both our rule's ``key`` and ``marker`` as argv[1].

    The key is on the SYSCALL record, the arguments on the EXECVE record of the same event
    (same serial in ``msg=audit(time:serial)``); an event counts only when both are there.
    """
    key_field = f'key="{key}"'
    arg_field = f'a1="{marker}"'
    # auditd hex-encodes arguments that contain spaces or quotes; accept that spelling too.
    hex_field = f"a1={marker.encode().hex().upper()}"
    keyed: set[str] = set()
    marked: set[str] = set()
    for line in lines:
        if line.startswith("type=SYSCALL ") and key_field in line:
            match = _AUDIT_SERIAL.search(line)
            if match:
                keyed.add(match.group(1))
        elif line.startswith("type=EXECVE "):
            fields = line.split()
            if arg_field in fields or hex_field in fields:
                match = _AUDIT_SERIAL.search(line)
                if match:
                    marked.add(match.group(1))
    return len(keyed & marked)


def parse_sensor_stats(text: str, origin: str) -> dict[str, Any]:
    """Validate one sensor stats object: ``events`` counts and ``sources`` counters."""
    try:
        stats = json.loads(text)
    except json.JSONDecodeError as exc:
        raise BenchError(f"sensor stats from {origin} are not JSON: {exc}") from None
    if not isinstance(stats, dict):
        raise BenchError(f"sensor stats from {origin}: expected an object")
    events, sources = stats.get("events"), stats.get("sources")
    if not isinstance(events, dict) or not all(isinstance(v, int) for v in events.values()):
        raise BenchError(f"sensor stats from {origin}: 'events' is not a map of counts")
    if not isinstance(sources, dict) or not all(
        isinstance(s, dict) and isinstance(s.get("dropped", 0), int) for s in sources.values()
    ):
        raise BenchError(f"sensor stats from {origin}: 'sources' is not a map of counters")
    return stats


def count_sensor_execs(lines: Iterator[str] | Sequence[str], marker: str) -> int:
    """Exec events in the sensor's NDJSON output whose argv[1] is exactly ``marker``."""
    count = 0
    for number, line in enumerate(lines, 1):
        if marker not in line:
            continue  # cheap pre-filter: most lines are other events
        try:
            event = json.loads(line)
            action = event["event"]["action"]
            args = event.get("process", {}).get("args", [])
        except (ValueError, KeyError, TypeError, AttributeError):
            raise BenchError(
                f"sensor output line {number} is not an event: {line[:120]!r}"
            ) from None
        if action == "exec" and isinstance(args, list) and args[1:2] == [marker]:
            count += 1
    return count


def sensor_execs(stats: dict[str, Any]) -> int:
    return int(stats["events"].get("exec", 0))


def sensor_drops(stats: dict[str, Any]) -> int:
    return sum(int(s.get("dropped", 0)) for s in stats["sources"].values())


# --------------------------------------------------------------------------------------------
# The workload


@dataclass
class SpawnResult:
    workers: int
    spawned: int
    failed: int
    elapsed: float
    cpu: float = 0.0  # user + system seconds of the workers and all their children

    @property
    def rate(self) -> float:
        return self.spawned / self.elapsed


def build_spawner(workdir: Path, cc: str | None = None) -> Path:
    """Compile ``spawner.c`` into ``workdir``; a clear error when no C compiler is here."""
    compiler = cc or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise BenchError("no C compiler (cc) to build bench/spawner.c: apt-get install gcc")
    out = workdir / "spawner"
    proc = subprocess.run(
        [compiler, "-O2", "-Wall", "-Wextra", "-o", str(out), str(SPAWNER_SOURCE)],
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        raise BenchError(f"compiling {SPAWNER_SOURCE} failed:\n{proc.stderr.strip()}")
    return out


def run_spawner(
    spawner: Path, workers: int, duration: float, marker: str, program: str = TRUE
) -> SpawnResult:
    """Run the storm and return what it did; raises ``BenchError`` on any failure."""
    cmd = [str(spawner), str(workers), str(round(duration * 1000)), program, marker]
    try:
        proc = subprocess.run(
            cmd, capture_output=True, text=True, check=False, timeout=duration + 60
        )
    except subprocess.TimeoutExpired:
        raise BenchError(f"spawner did not finish within {duration + 60:.0f} s") from None
    if proc.returncode != 0:
        raise BenchError(f"spawner exited {proc.returncode}: {proc.stderr.strip()}")
    try:
        data = json.loads(proc.stdout)
        result = SpawnResult(
            workers=int(data["workers"]),
            spawned=int(data["spawned"]),
            failed=int(data["failed"]),
            elapsed=float(data["elapsed"]),
            cpu=float(data["cpu"]),
        )
    except (ValueError, KeyError, TypeError):
        raise BenchError(f"spawner printed an unreadable result: {proc.stdout!r}") from None
    if result.elapsed <= 0 or result.spawned <= 0:
        raise BenchError(f"spawner did no work: {proc.stdout.strip()}")
    return result


# --------------------------------------------------------------------------------------------
# Tracers. Each is started (and warmed up) before the storm, reports which pids burn CPU for
# it, and after the storm says how many of the marked execs it captured and what it dropped.


@dataclass
class Capture:
    captured: int | None  # None: this tracer does not count events (untraced)
    drops: int | None
    note: str = ""


class Tracer:
    name = "untraced"

    def unavailable(self) -> str | None:
        """Why this tracer cannot run here, or ``None``."""
        return None

    def start(self, marker: str) -> None:
        """Start and warm up; the storm begins as soon as this returns."""

    def begin(self) -> None:
        """Called right before the storm starts (after ``start``)."""

    def cpu_pids(self) -> list[int]:
        return []

    def finish(self, spawn: SpawnResult) -> Capture:
        """Stop and collect; always leaves nothing running behind."""
        return Capture(None, None)

    def abort(self) -> None:
        """Stop without collecting (after an error); must be safe to call at any point."""


def _bcc_env() -> dict[str, str]:
    """The environment BCC needs: generic headers when none match the running kernel."""
    env = dict(os.environ)
    build = Path(f"/lib/modules/{os.uname().release}/build")
    if "BCC_KERNEL_SOURCE" not in env and not build.exists() and GENERIC_HEADERS.is_dir():
        env["BCC_KERNEL_SOURCE"] = str(GENERIC_HEADERS)
    return env


class _LineReader:
    """Collects a child's output lines in a thread so its pipe never fills and blocks it."""

    def __init__(self, stream: Any, on_line: Callable[[str], None] | None = None) -> None:
        self.lines: list[str] = []
        self._on_line = on_line
        self._eof = False
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._run, args=(stream,), daemon=True)
        self._thread.start()

    def _run(self, stream: Any) -> None:
        for line in stream:
            with self._cond:
                self.lines.append(line.rstrip("\n"))
                if self._on_line is not None:
                    self._on_line(line)
                self._cond.notify_all()
        with self._cond:
            # A flag, not thread.is_alive(): the thread is still alive while it notifies.
            self._eof = True
            self._cond.notify_all()

    def wait_for(self, predicate: Callable[[list[str]], bool], timeout: float) -> bool:
        """Wait until ``predicate(lines)`` holds; ``False`` on timeout or end of output."""
        with self._cond:
            self._cond.wait_for(lambda: predicate(self.lines) or self._eof, timeout)
            return predicate(self.lines)

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)

    def text(self) -> str:
        with self._cond:
            return "\n".join(self.lines)


def _stop_process(
    proc: subprocess.Popen[str], sig: int, timeout: float, resend_every: float | None = None
) -> None:
    """Signal a child and wait; SIGKILL if it does not stop in time.

    ``resend_every``: signal again at this interval while it runs (for a child that can miss
    one, see ``BpftraceTracer.finish``).
    """
    deadline = time.monotonic() + timeout
    while proc.poll() is None:
        proc.send_signal(sig)
        left = deadline - time.monotonic()
        try:
            proc.wait(max(0.0, min(left, resend_every or left)))
            return
        except subprocess.TimeoutExpired:
            if time.monotonic() >= deadline:
                proc.kill()
                proc.wait(10)
                return


class SensorTracer(Tracer):
    """Our sensor, ``edr-sensor run --mode tracepoint --output OUT --stats-file F``.

    Two ways to count what it captured:

    * ``output="file"`` (default): OUT is a file on tmpfs; after the round the exec events
      whose argv carries the round's marker are counted. Exact, whatever else runs here.
    * ``output="devnull"``: OUT is /dev/null. The sensor prints its counters to stderr every
      ``interval`` seconds; the exec count printed just before the storm is the baseline, and
      an idle window measured right before it gives the rate of unrelated execs, subtracted.
      An estimate: other work on the machine that execs in bursts makes it wrong.

    The stats-based estimate is computed in both modes (shown in the round's log line). The
    final counters come from ``--stats-file`` after SIGINT; drops are the sources' ``dropped``
    counters over the round.
    """

    name = "sensor"
    PREFIX = "edr-sensor stats: "

    def __init__(
        self,
        command: Sequence[str],
        workdir: Path,
        idle: float = 2.0,
        interval: float = 0.5,
        output: str = "file",
        output_dir: Path | None = None,
        extra_args: Sequence[str] = (),
    ) -> None:
        if output not in ("file", "devnull"):
            raise ValueError(f"output must be 'file' or 'devnull', not {output!r}")
        self.command = list(command)
        self.extra_args = list(extra_args)
        self.workdir = workdir
        self.output = output
        # tmpfs keeps the sensor's writes off the disk: close to /dev/null in cost.
        shm = Path("/dev/shm")
        self.output_dir = output_dir or (shm if shm.is_dir() else workdir)
        self.output_file: Path | None = None
        self.marker = ""
        self.idle = idle
        self.interval = interval
        self.proc: subprocess.Popen[str] | None = None
        self.reader: _LineReader | None = None
        self.stats_file = workdir / "sensor-stats.json"
        self._snapshots: list[tuple[float, dict[str, Any]]] = []
        self._t0 = 0.0
        self._exec0 = 0
        self._drops0 = 0
        self._background_rate = 0.0

    def unavailable(self) -> str | None:
        exe = Path(self.command[0])
        if not exe.exists():
            return f"{exe} not found (run scripts/setup.sh)"
        probe = subprocess.run(
            [*self.command, "probe", "--json"],
            capture_output=True,
            text=True,
            check=False,
            env=_bcc_env(),
            timeout=120,
        )
        if probe.returncode != 0:
            return f"edr-sensor probe failed: {probe.stderr.strip()[-300:]}"
        try:
            report = json.loads(probe.stdout)
            reason = report["process"]["tracepoint"]
        except (ValueError, KeyError, TypeError):
            return f"edr-sensor probe printed unexpected output: {probe.stdout[:200]!r}"
        return None if reason is None else f"sensor tracepoint tier unavailable: {reason}"

    def _on_line(self, line: str) -> None:
        if line.startswith(self.PREFIX):
            try:
                stats = parse_sensor_stats(line[len(self.PREFIX) :], "its stderr")
            except BenchError:
                return  # a malformed line is left in the log; the next one will do
            self._snapshots.append((time.monotonic(), stats))

    def _next_snapshot(self, after: float, timeout: float) -> tuple[float, dict[str, Any]]:
        assert self.reader is not None
        got = self.reader.wait_for(
            lambda _lines: bool(self._snapshots) and self._snapshots[-1][0] > after, timeout
        )
        if not got:
            raise BenchError(f"sensor printed no stats within {timeout:.0f} s{self._tail()}")
        return self._snapshots[-1]

    def _tail(self) -> str:
        if self.reader is None:
            return ""
        lines = [ln for ln in self.reader.lines if not ln.startswith(self.PREFIX)]
        return (":\n  " + "\n  ".join(lines[-5:])) if lines else ""

    def start(self, marker: str) -> None:
        self.stats_file.unlink(missing_ok=True)
        self._snapshots.clear()
        self.marker = marker
        out = "/dev/null"
        if self.output == "file":
            fd, name = tempfile.mkstemp(
                prefix="edr-exec-storm-", suffix=".ndjson", dir=self.output_dir
            )
            os.close(fd)
            self.output_file = Path(name)
            out = name
        cmd = [
            *self.command,
            "run",
            "--mode",
            "tracepoint",
            "--output",
            out,
            "--stats-file",
            str(self.stats_file),
            "--stats-interval",
            str(self.interval),
            *self.extra_args,
        ]
        self.proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env=_bcc_env(),
        )
        self.reader = _LineReader(self.proc.stderr, self._on_line)
        # The first stats line comes after BPF is loaded and attached (BCC compiles first).
        first_t, first = self._next_snapshot(0.0, 180.0)
        # Let start-up work (compiling, /proc seeding) settle before measuring anything.
        time.sleep(1.0)
        a_t, a = self._next_snapshot(time.monotonic(), 10.0)
        time.sleep(self.idle)
        b_t, b = self._next_snapshot(time.monotonic(), 10.0)
        self._background_rate = max(0, sensor_execs(b) - sensor_execs(a)) / (b_t - a_t)
        del first_t, first

    def begin(self) -> None:
        t, stats = self._snapshots[-1]
        self._t0, self._exec0, self._drops0 = t, sensor_execs(stats), sensor_drops(stats)

    def cpu_pids(self) -> list[int]:
        return [self.proc.pid] if self.proc else []

    def finish(self, spawn: SpawnResult) -> Capture:
        assert self.proc is not None and self.reader is not None
        _stop_process(self.proc, signal.SIGINT, 60)
        t_end = time.monotonic()
        self.reader.join(5)
        code = self.proc.returncode
        self.proc = None
        if code != 0:
            raise BenchError(f"sensor exited {code}{self._tail()}")
        try:
            text = self.stats_file.read_text()
        except OSError as exc:
            raise BenchError(f"sensor wrote no stats file: {exc.strerror}") from None
        final = parse_sensor_stats(text, str(self.stats_file))
        background = round(self._background_rate * (t_end - self._t0))
        estimate = sensor_execs(final) - self._exec0 - background
        drops = sensor_drops(final) - self._drops0
        if self.output_file is None:
            return Capture(estimate, drops, f"background {background} subtracted")
        try:
            with self.output_file.open(encoding="utf-8", errors="replace") as fh:
                captured = count_sensor_execs(fh, self.marker)
        except OSError as exc:
            raise BenchError(f"cannot read the sensor's output: {exc.strerror}") from None
        finally:
            self._remove_output()
        return Capture(captured, drops, f"stats-based estimate {estimate}")

    def _remove_output(self) -> None:
        if self.output_file is not None:
            self.output_file.unlink(missing_ok=True)
            self.output_file = None

    def abort(self) -> None:
        if self.proc is not None:
            _stop_process(self.proc, signal.SIGINT, 30)
            self.proc = None
        self._remove_output()


class PausedSensorTracer(SensorTracer):
    """The sensor stopped with SIGSTOP for the storm, then resumed to drain the ring.

    Its BPF programs run and fill the ring while its user space does nothing, so this row's
    slowdown and CPU ratio are the in-kernel cost alone (hooks, programs, ring writes); the
    ``sensor`` row against this one is what the sensor's user space costs the workload. It
    is also a stall test: the 16 MiB ring must hold the whole storm (about 7 s at 4,600
    spawns/s here); a longer storm overflows it, and the overflow shows as drops and missed
    execs. Its tracer CPU is not measured: its work happens after the window.
    """

    name = "sensor-paused"

    def cpu_pids(self) -> list[int]:
        return []

    def begin(self) -> None:
        super().begin()
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGSTOP)
        # SIGSTOP is asynchronous: wait until every thread has stopped (reaps nothing)
        _, status = os.waitpid(self.proc.pid, os.WUNTRACED)
        if not os.WIFSTOPPED(status):
            self.proc = None  # reaped here: nothing left to stop
            raise BenchError(f"sensor ended instead of stopping (wait status {status})")

    def _resume(self) -> None:
        if self.proc is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, signal.SIGCONT)

    def finish(self, spawn: SpawnResult) -> Capture:
        self._resume()
        return super().finish(spawn)

    def abort(self) -> None:
        self._resume()
        super().abort()


class BpftraceTracer(Tracer):
    """bpftrace counting sched_process_exec whose comm is "true", printed at exit."""

    name = "bpftrace"

    def __init__(self) -> None:
        self.proc: subprocess.Popen[str] | None = None
        self.reader: _LineReader | None = None

    def unavailable(self) -> str | None:
        return (
            None
            if shutil.which("bpftrace")
            else "bpftrace not installed (apt-get install bpftrace)"
        )

    def start(self, marker: str) -> None:
        self.proc = subprocess.Popen(
            ["bpftrace", "-e", BPFTRACE_SCRIPT],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.reader = _LineReader(self.proc.stdout)
        if not self.reader.wait_for(
            lambda lines: any(ln.strip() == BPFTRACE_READY for ln in lines), 60
        ):
            self.abort()
            raise BenchError(f"bpftrace did not attach:\n{self.reader.text()[-500:]}")

    def cpu_pids(self) -> list[int]:
        return [self.proc.pid] if self.proc else []

    def finish(self, spawn: SpawnResult) -> Capture:
        assert self.proc is not None and self.reader is not None
        # bpftrace 0.17 checks for SIGINT only when epoll_wait returns: a SIGINT landing just
        # before it blocks is noticed at the next perf event, and this script sends none after
        # BEGIN (measured: 15 of 40 stops hung with one SIGINT; every one ended on a second).
        _stop_process(self.proc, signal.SIGINT, 30, resend_every=1.0)
        self.reader.join(5)
        code, self.proc = self.proc.returncode, None
        text = self.reader.text()
        if code != 0:
            raise BenchError(f"bpftrace exited {code}:\n{text[-500:]}")
        execs, lost = parse_bpftrace_output(text)
        return Capture(execs, lost)

    def abort(self) -> None:
        if self.proc is not None:
            _stop_process(self.proc, signal.SIGINT, 30)
            self.proc = None


AUDITD_CONF = """\
local_events = yes
write_logs = yes
log_file = {log}
log_group = root
log_format = {log_format}
flush = INCREMENTAL_ASYNC
freq = 50
max_log_file = 0
max_log_file_action = IGNORE
num_logs = 0
priority_boost = 4
name_format = NONE
space_left = 2
space_left_action = IGNORE
admin_space_left = 1
admin_space_left_action = IGNORE
disk_full_action = IGNORE
disk_error_action = IGNORE
use_libwrap = no
tcp_listen_queue = 5
tcp_max_per_addr = 1
tcp_client_max_idle = 0
transport = TCP
distribute_network = no
q_depth = 2000
overflow_action = SYSLOG
max_restarts = 10
plugin_dir = {plugins}
end_of_event_timeout = 2
"""


def _auditctl(*args: str) -> str:
    proc = subprocess.run(
        ["auditctl", *args], capture_output=True, text=True, check=False, timeout=30
    )
    if proc.returncode != 0:
        raise BenchError(f"auditctl {' '.join(args)} failed: {proc.stderr.strip()}")
    return proc.stdout


class AuditdTracer(Tracer):
    """auditd with one execve rule, run in the foreground (``auditd -n``) per round.

    It logs to a private file under the bench's temporary directory (Debian's own settings,
    log_format ENRICHED as shipped unless ``--auditd-format raw``, but no rotation and no
    plugins), so the count is exact: records with our key whose
    argv[1] is the round's marker. Lost events are the growth of ``lost`` in ``auditctl -s``.
    CPU is auditd's plus the kauditd kernel thread's. The kernel's audit state (enabled flag,
    backlog limit) is put back as it was after every round.
    """

    name = "auditd"

    def __init__(self, workdir: Path, log_format: str = "enriched") -> None:
        self.dir = workdir / "auditd"
        self.log_format = log_format
        self.log = self.dir / "audit.log"
        self.proc: subprocess.Popen[str] | None = None
        self.marker = ""
        self._saved: dict[str, int] = {}
        self._rule_added = False
        self._lost0 = 0

    def unavailable(self) -> str | None:
        missing = [t for t in ("auditd", "auditctl") if shutil.which(t) is None]
        if missing:
            return f"{', '.join(missing)} not installed (apt-get install auditd)"
        try:
            pid = parse_auditctl_status(_auditctl("-s")).get("pid", 0)
        except BenchError as exc:
            return str(exc)
        if pid:
            return (
                f"an audit daemon is already registered (pid {pid}); the kernel takes one: "
                "stop it (systemctl stop auditd) for this benchmark"
            )
        return None

    def start(self, marker: str) -> None:
        self.marker = marker
        if self.dir.exists():
            shutil.rmtree(self.dir)
        (self.dir / "plugins").mkdir(parents=True, mode=0o700)
        conf = self.dir / "auditd.conf"
        conf.write_text(
            AUDITD_CONF.format(
                log=self.log, plugins=self.dir / "plugins", log_format=self.log_format.upper()
            )
        )
        conf.chmod(0o600)  # auditd refuses a config others can write
        self._saved = parse_auditctl_status(_auditctl("-s"))
        self.proc = subprocess.Popen(
            ["auditd", "-n", "-c", str(self.dir)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        deadline = time.monotonic() + 15
        while True:
            if self.proc.poll() is not None:
                out = self.proc.stdout.read() if self.proc.stdout else ""
                self.proc = None
                raise BenchError(f"auditd exited at start-up: {out.strip()[-300:]}")
            status = parse_auditctl_status(_auditctl("-s"))
            if status.get("pid") == self.proc.pid:
                break
            if time.monotonic() > deadline:
                self.abort()
                raise BenchError("auditd did not register with the kernel within 15 s")
            time.sleep(0.1)
        _auditctl("-b", str(AUDIT_BACKLOG))
        _auditctl("-a", "always,exit", *AUDIT_RULE)
        self._rule_added = True
        time.sleep(0.5)

    def begin(self) -> None:
        self._lost0 = parse_auditctl_status(_auditctl("-s"))["lost"]

    def cpu_pids(self) -> list[int]:
        pids = [self.proc.pid] if self.proc else []
        kauditd = find_kernel_thread("kauditd")
        return pids + ([kauditd] if kauditd else [])

    def finish(self, spawn: SpawnResult) -> Capture:
        lost = parse_auditctl_status(_auditctl("-s"))["lost"] - self._lost0
        self.abort()  # remove the rule, stop auditd (it flushes its log on exit), restore
        try:
            with self.log.open(encoding="utf-8", errors="replace") as fh:
                captured = count_audit_execs(fh, AUDIT_KEY, self.marker)
        except OSError as exc:
            raise BenchError(f"cannot read auditd's log {self.log}: {exc.strerror}") from None
        return Capture(captured, lost)

    def abort(self) -> None:
        errors: list[str] = []
        if self._rule_added:
            try:
                _auditctl("-d", "always,exit", *AUDIT_RULE)
                self._rule_added = False
            except BenchError as exc:
                errors.append(str(exc))
        if self.proc is not None:
            _stop_process(self.proc, signal.SIGTERM, 30)
            self.proc = None
        if self._saved:
            for flag, key in (("-e", "enabled"), ("-b", "backlog_limit")):
                try:
                    _auditctl(flag, str(self._saved[key]))
                except BenchError as exc:
                    errors.append(str(exc))
            self._saved = {}
        if errors:
            raise BenchError("; ".join(errors))


def execsnoop_status() -> str:
    """Whether bcc's execsnoop can run here; on this kernel it needs kprobes, which are absent."""
    tool = shutil.which("execsnoop-bpfcc")
    if tool is None:
        return "execsnoop-bpfcc: not installed (bpfcc-tools)"
    try:
        proc = subprocess.run(
            [tool], capture_output=True, text=True, check=False, timeout=60, env=_bcc_env()
        )
    except subprocess.TimeoutExpired:
        return "execsnoop-bpfcc: starts here (kprobes present) but is not part of this benchmark"
    last = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
    return f"execsnoop-bpfcc: does not start on this kernel (exit {proc.returncode}): {last}"


# --------------------------------------------------------------------------------------------
# Running rounds and reporting


@dataclass
class Measurement:
    tracer: str
    workers: int
    round: int
    spawned: int
    failed: int
    elapsed: float
    rate: float
    workload_cpu: float = 0.0
    captured: int | None = None
    drops: int | None = None
    cpu_seconds: float | None = None
    cpu_window: float = 0.0
    note: str = ""

    @property
    def captured_pct(self) -> float | None:
        return None if self.captured is None else 100.0 * self.captured / self.spawned

    @property
    def cpu_per_spawn_us(self) -> float:
        return 1e6 * self.workload_cpu / self.spawned

    @property
    def cpu_pct(self) -> float | None:
        if self.cpu_seconds is None or self.cpu_window <= 0:
            return None
        return 100.0 * self.cpu_seconds / self.cpu_window


@dataclass
class Config:
    duration: float
    rounds: int
    workers: list[int]
    settle: float
    tracers: list[str]
    sensor_command: list[str]
    sensor_output: str = "file"
    sensor_args: list[str] = field(default_factory=list)
    json_path: Path | None = None
    auditd_format: str = "enriched"
    results: list[Measurement] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)


def measure(
    tracer: Tracer,
    spawner: Path,
    program: str,
    workers: int,
    round_no: int,
    config: Config,
    run_id: str,
) -> Measurement:
    """One storm under one tracer: start it, storm, let it drain, collect."""
    marker = f"edrbench-{run_id}-r{round_no}-{tracer.name}-w{workers}"
    try:
        tracer.start(marker)  # inside: a tracer that fails to warm up is still stopped
        pids = tracer.cpu_pids()
        tracer.begin()
        t0 = time.monotonic()
        ticks0 = sum(cpu_ticks(p) for p in pids)
        spawn = run_spawner(spawner, workers, config.duration, marker, program)
        # The tracer may still be working through a backlog; its drain counts as its cost.
        time.sleep(config.settle)
        ticks1 = sum(cpu_ticks(p) for p in pids)
        window = time.monotonic() - t0
        capture = tracer.finish(spawn)
    except BaseException:
        with contextlib.suppress(BenchError):
            tracer.abort()
        raise
    return Measurement(
        tracer=tracer.name,
        workers=workers,
        round=round_no,
        spawned=spawn.spawned,
        failed=spawn.failed,
        elapsed=spawn.elapsed,
        rate=spawn.rate,
        workload_cpu=spawn.cpu,
        captured=capture.captured,
        drops=capture.drops,
        cpu_seconds=(ticks1 - ticks0) / CLK_TCK if pids else None,
        cpu_window=window,
        note=capture.note,
    )


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


@dataclass
class Row:
    tracer: str
    workers: int
    rounds: int
    rate: float
    captured_pct: float | None
    drops: int | None
    slowdown: float | None
    cpu_pct: float | None
    cpu_per_spawn_us: float
    cpu_slowdown: float | None


def summarize(results: list[Measurement]) -> list[Row]:
    """Medians per (tracer, workers). Slowdown is the median of per-round ratios to the
    same round's untraced rate, so slow drift of the machine cancels out."""
    untraced = {(m.round, m.workers): m for m in results if m.tracer == "untraced"}
    order: list[tuple[str, int]] = []
    for m in results:
        if (m.tracer, m.workers) not in order:
            order.append((m.tracer, m.workers))
    rows = []
    for tracer, workers in sorted(order, key=lambda k: (k[1], order.index(k))):
        ms = [m for m in results if m.tracer == tracer and m.workers == workers]
        refs = [(untraced[(m.round, workers)], m) for m in ms if (m.round, workers) in untraced]
        ratios = [ref.rate / m.rate for ref, m in refs]
        cpu_ratios = [
            m.cpu_per_spawn_us / ref.cpu_per_spawn_us for ref, m in refs if ref.workload_cpu > 0
        ]
        caps = [m.captured_pct for m in ms if m.captured_pct is not None]
        drops = [m.drops for m in ms if m.drops is not None]
        cpus = [m.cpu_pct for m in ms if m.cpu_pct is not None]
        drop_median = _median([float(d) for d in drops])
        rows.append(
            Row(
                tracer=tracer,
                workers=workers,
                rounds=len(ms),
                rate=statistics.median(m.rate for m in ms),
                captured_pct=_median(caps),
                drops=None if drop_median is None else round(drop_median),
                slowdown=_median(ratios),
                cpu_pct=_median(cpus),
                cpu_per_spawn_us=statistics.median(m.cpu_per_spawn_us for m in ms),
                cpu_slowdown=_median(cpu_ratios),
            )
        )
    return rows


def _fmt(value: float | None, spec: str, suffix: str = "") -> str:
    return "-" if value is None else f"{value:{spec}}{suffix}"


def format_table(rows: list[Row]) -> str:
    header = (
        "tracer",
        "workers",
        "spawns/s",
        "captured",
        "drops",
        "slowdown",
        "tracer CPU",
        "CPU/spawn",
        "CPU ratio",
    )
    lines = [header]
    for r in rows:
        lines.append(
            (
                r.tracer,
                str(r.workers),
                f"{r.rate:,.0f}",
                _fmt(r.captured_pct, ".2f", "%"),
                _fmt(r.drops, "d"),
                _fmt(r.slowdown, ".3f", "x"),
                _fmt(r.cpu_pct, ".1f", "%"),
                f"{r.cpu_per_spawn_us:.0f} us",
                _fmt(r.cpu_slowdown, ".3f", "x"),
            )
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    out = []
    for n, line in enumerate(lines):
        cells = [line[0].ljust(widths[0])] + [
            c.rjust(w) for c, w in zip(line[1:], widths[1:], strict=True)
        ]
        out.append("  ".join(cells))
        if n == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)


def check_targets(rows: list[Row]) -> list[str]:
    """The brief's targets for the sensor at the highest worker count measured."""
    top = max((r.workers for r in rows), default=0)
    by = {r.tracer: r for r in rows if r.workers == top}
    sensor = by.get("sensor")
    if sensor is None:
        return [f"targets: not checked, the sensor was not measured at {top} workers"]
    out = []
    ok = sensor.captured_pct is not None and sensor.captured_pct >= 100.0 and sensor.drops == 0
    out.append(
        f"{'PASS' if ok else 'FAIL'}  100% captured with zero drops at {top} workers: "
        f"{_fmt(sensor.captured_pct, '.2f', '%')} captured, {_fmt(sensor.drops, 'd')} drops"
    )
    if sensor.slowdown is None:
        out.append(f"n/a   slowdown <= {TARGET_SLOWDOWN:.2f}x: untraced was not measured")
    else:
        ok = sensor.slowdown <= TARGET_SLOWDOWN
        out.append(
            f"{'PASS' if ok else 'FAIL'}  slowdown <= {TARGET_SLOWDOWN:.2f}x: "
            f"{sensor.slowdown:.3f}x"
        )
    auditd = by.get("auditd")
    if auditd is None or auditd.cpu_pct is None or sensor.cpu_pct is None:
        out.append("n/a   sensor CPU <= 1/4 of auditd's: auditd was not measured")
    else:
        limit = auditd.cpu_pct * TARGET_CPU_FRACTION_OF_AUDITD
        ok = sensor.cpu_pct <= limit
        out.append(
            f"{'PASS' if ok else 'FAIL'}  sensor CPU <= 1/4 of auditd's: {sensor.cpu_pct:.1f}% "
            f"vs limit {limit:.1f}% (auditd {auditd.cpu_pct:.1f}%)"
        )
    return out


def noise_warning(rows: list[Row]) -> str | None:
    """A warning when some traced run beat untraced by over 5%: no tracer makes exec faster,
    so the machine's other load moved the rates and the slowdown column is not to be trusted."""
    fast = [f"{r.tracer}/{r.workers}" for r in rows if r.slowdown is not None and r.slowdown < 0.95]
    if not fast:
        return None
    return (
        f"WARNING: traced faster than untraced ({', '.join(fast)}): other load on the machine "
        "moved the rates; use more rounds, a quiet machine, or read the CPU ratio column"
    )


def make_tracers(config: Config, workdir: Path) -> list[Tracer]:
    known: dict[str, Callable[[], Tracer]] = {
        "untraced": Tracer,
        "sensor": lambda: SensorTracer(
            config.sensor_command,
            workdir,
            output=config.sensor_output,
            extra_args=config.sensor_args,
        ),
        "sensor-paused": lambda: PausedSensorTracer(
            config.sensor_command,
            workdir,
            output=config.sensor_output,
            extra_args=config.sensor_args,
        ),
        "bpftrace": BpftraceTracer,
        "auditd": lambda: AuditdTracer(workdir, config.auditd_format),
    }
    return [known[name]() for name in config.tracers]


def run(config: Config, log: Callable[[str], None]) -> list[Measurement]:
    """The interleaved rounds; unavailable tracers are reported and skipped."""
    run_id = secrets.token_hex(4)
    with tempfile.TemporaryDirectory(prefix="edr-exec-storm-") as tmp:
        workdir = Path(tmp)
        spawner = build_spawner(workdir)
        program = workdir / STORM_COMM
        program.symlink_to(TRUE)
        tracers = []
        for tracer in make_tracers(config, workdir):
            reason = tracer.unavailable()
            if reason:
                log(f"skipping {tracer.name}: {reason}")
            else:
                tracers.append(tracer)
        results = config.results
        for round_no in range(1, config.rounds + 1):
            for workers in config.workers:
                for tracer in tracers:
                    try:
                        m = measure(
                            tracer, spawner, str(program), workers, round_no, config, run_id
                        )
                    except BenchError as exc:
                        # One failed storm loses that one measurement, not the whole run.
                        config.failures.append(f"round {round_no} {tracer.name}: {exc}")
                        log(f"round {round_no} workers {workers} {tracer.name}: FAILED: {exc}")
                        continue
                    results.append(m)
                    cap = "" if m.captured is None else f", captured {m.captured}/{m.spawned}"
                    cpu = "" if m.cpu_pct is None else f", tracer CPU {m.cpu_pct:.1f}%"
                    drops = "" if m.drops is None else f", drops {m.drops}"
                    note = f" ({m.note})" if m.note else ""
                    log(
                        f"round {round_no} workers {workers} {tracer.name:<8} "
                        f"{m.rate:,.0f} spawns/s, {m.cpu_per_spawn_us:.0f} us CPU/spawn"
                        f"{cap}{drops}{cpu}{note}"
                    )
        return results


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0 or value > 3600:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a number of seconds in (0, 3600]")
    return value


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if not 1 <= value <= 100:
        raise argparse.ArgumentTypeError(f"{text!r}: expected 1 to 100")
    return value


def worker_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected e.g. 1,2") from None
    if not values or any(not 1 <= v <= 64 for v in values):
        raise argparse.ArgumentTypeError(f"{text!r}: worker counts are 1 to 64")
    return sorted(set(values))


TRACERS = ("untraced", "sensor", "sensor-paused", "bpftrace", "auditd")
# sensor-paused is asked for by name: at the default 10 s a two-worker storm overflows the ring
DEFAULT_TRACERS = ("untraced", "sensor", "bpftrace", "auditd")


def tracer_list(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    bad = [n for n in names if n not in TRACERS]
    if bad or not names:
        raise argparse.ArgumentTypeError(
            f"unknown tracer {', '.join(bad) or '(none)'}: choose from {', '.join(TRACERS)}"
        )
    # Rounds always run in the canonical order; untraced is the reference for slowdown.
    return [n for n in TRACERS if n in names]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Exec-storm benchmark: our sensor vs bpftrace vs auditd (root)."
    )
    p.add_argument("--duration", type=positive_float, help="seconds per storm (default 10)")
    p.add_argument("--rounds", type=positive_int, help="interleaved rounds (default 3)")
    p.add_argument("--workers", type=worker_list, default=[1, 2], help="e.g. 1,2")
    p.add_argument(
        "--tracers",
        type=tracer_list,
        default=list(DEFAULT_TRACERS),
        help=f"{','.join(DEFAULT_TRACERS)} (default), and sensor-paused",
    )
    p.add_argument(
        "--settle", type=positive_float, default=1.0, help="seconds to let a tracer drain"
    )
    p.add_argument(
        "--quick", action="store_true", help="smoke run: 1 round of 3 s (unless set explicitly)"
    )
    p.add_argument(
        "--sensor",
        default=str(REPO / ".venv" / "bin" / "edr-sensor"),
        help="the edr-sensor executable",
    )
    p.add_argument(
        "--sensor-output",
        choices=("file", "devnull"),
        default="file",
        help="file: sensor writes to tmpfs, exact count by marker (default); devnull: "
        "--output /dev/null, count from its stats minus an idle-window baseline",
    )
    p.add_argument(
        "--sensor-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="extra argument for 'edr-sensor run', repeatable (--sensor-arg=--families=process)",
    )
    p.add_argument(
        "--auditd-format",
        choices=("enriched", "raw"),
        default="enriched",
        help="auditd's log_format: enriched is what Debian and Ubuntu ship (default); raw "
        "skips the uid/syscall name lookups",
    )
    p.add_argument("--json", type=Path, help="also write every measurement here as JSON")
    p.add_argument(
        "--no-execsnoop", action="store_true", help="skip the execsnoop-bpfcc start-up check"
    )
    return p


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if os.geteuid() != 0:
        print("exec_storm: run as root: tracers need BPF and the audit subsystem", file=sys.stderr)
        return 2
    default_duration, default_rounds = (3.0, 1) if args.quick else (10.0, 3)
    args.duration = args.duration or default_duration
    args.rounds = args.rounds or default_rounds
    config = Config(
        duration=args.duration,
        rounds=args.rounds,
        workers=args.workers,
        settle=args.settle,
        tracers=args.tracers,
        sensor_command=[args.sensor],
        sensor_output=args.sensor_output,
        sensor_args=args.sensor_arg,
        json_path=args.json,
        auditd_format=args.auditd_format,
    )

    def log(msg: str) -> None:
        print(f"exec_storm: {msg}", file=sys.stderr, flush=True)

    storms = config.rounds * len(config.workers) * len(config.tracers)
    log(
        f"{config.rounds} round(s) x {len(config.workers)} worker count(s) x "
        f"{len(config.tracers)} tracer(s) x {config.duration:g} s "
        f"= {storms * config.duration:.0f} s of storms plus start-up"
    )
    if not args.no_execsnoop:
        print(execsnoop_status())
    # SIGTERM unwinds like Ctrl-C so that every tracer's cleanup runs.
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        results = run(config, log)
    except BenchError as exc:
        print(f"exec_storm: {exc}", file=sys.stderr)
        results, code = config.results, 1
    except KeyboardInterrupt:
        print("exec_storm: interrupted; partial results follow", file=sys.stderr)
        results, code = config.results, 130
    else:
        code = 1 if config.failures else 0
    if results:
        rows = summarize(results)
        print()
        print(
            f"exec storm: /bin/true via fork+exec+wait, {config.duration:g} s per storm, "
            f"medians of {config.rounds} interleaved round(s), {os.cpu_count()} CPUs"
        )
        print(format_table(rows))
        print(
            "slowdown: untraced spawns/s over traced; CPU/spawn: user+system time of the storm's\n"
            "processes per spawn (in-kernel tracing cost lands here); CPU ratio: that over\n"
            "untraced, which other load on the machine disturbs far less than the rate."
        )
        print()
        warning = noise_warning(rows)
        if warning:
            print(warning)
        print("\n".join(check_targets(rows)))
        if config.json_path is not None:
            config.json_path.write_text(
                json.dumps(
                    {
                        "measurements": [
                            {**asdict(m), "captured_pct": m.captured_pct, "cpu_pct": m.cpu_pct}
                            for m in results
                        ],
                        "summary": [asdict(r) for r in rows],
                    },
                    indent=2,
                )
                + "\n"
            )
    return code


if __name__ == "__main__":
    sys.exit(main())

"""Run inside the test VM: one capture tier of the real sensor against real activity.

Starts ``edr-sensor run --mode <tier>`` the way tests/sensor/test_sensor_e2e.py does (its helpers
are imported, not copied), then runs each check on its own so one failure does not hide the
rest: exec (argv, parent, hash, user, tier), exit codes and a fatal signal, file create/write/
rename/chmod/delete, TCP listen/connect/accept over IPv4 and IPv6 loopback, the sensor's own
activity left out, and the drop counters. The kprobe tier adds what only it can see: its
kprobes registered in the kernel, and an accept() whose caller passed no address buffer (the
tracepoint tier reads the peer from that buffer, so it cannot report it).

Prints exactly one line ``EDR-VM-RESULT {json}`` on stdout (the serial console).
"""

from __future__ import annotations

import argparse
import ctypes
import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

REPO = Path(__file__).resolve().parents[2]
RESULT_PREFIX = "EDR-VM-RESULT "
KPROBE_LIST = Path("/sys/kernel/debug/kprobes/list")
# the functions kprobe.bpf.c hooks; each must show up in the kernel's list of kprobes.
# do_exit is hooked only on a kernel without BTF (with it the exit status is read from the
# task at sched_process_exit), and distribution kernels have BTF.
KPROBED_FUNCTIONS = ("inet_csk_accept",)


def load_e2e() -> ModuleType:
    """The end-to-end test module, imported by path (tests/ is not a package)."""
    path = REPO / "tests/sensor/test_sensor_e2e.py"
    spec = importlib.util.spec_from_file_location("edr_e2e_helpers", path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot import {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


def accept_without_address(e2e: ModuleType) -> tuple[int, int]:
    """A loopback connect whose accept(2) passes NULL for the peer address."""
    libc = ctypes.CDLL(None, use_errno=True)
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    port = server.getsockname()[1]
    client = socket.create_connection(("127.0.0.1", port), timeout=5)
    fd = libc.accept(server.fileno(), None, None)
    if fd < 0:
        raise OSError(ctypes.get_errno(), "accept(fd, NULL, NULL) failed")
    client_port = client.getsockname()[1]
    os.close(fd)
    client.close()
    server.close()
    return port, client_port


START_TIMEOUT = float(os.environ.get("EDR_VM_START_TIMEOUT", "600"))


class Checker:
    """Runs named checks against one running sensor and records each outcome."""

    def __init__(self, e2e: ModuleType, tier: str, workdir: Path) -> None:
        self.e2e = e2e
        self.tier = tier
        self.workdir = workdir
        self.sensor: Any = None
        self.results: list[dict[str, Any]] = []

    def run(self, name: str, fn: Callable[[], None]) -> bool:
        started = time.monotonic()
        entry: dict[str, Any] = {"name": name, "ok": True}
        try:
            fn()
        except Exception as exc:  # a failed check is data, not the end of the run
            entry["ok"] = False
            entry["error"] = f"{type(exc).__name__}: {exc}"[-1500:]
            entry["where"] = traceback.format_exc(limit=3)[-800:]
        entry["seconds"] = round(time.monotonic() - started, 2)
        self.results.append(entry)
        return bool(entry["ok"])

    # -- the checks ---------------------------------------------------------------------

    def start(self) -> None:
        # Under TCG (no usable KVM) BCC's compile of the kprobe programs alone takes over
        # a minute, past the 60 s the host-side tests allow.
        self.sensor = self.e2e.start_sensor(self.workdir, self.tier, start_timeout=START_TIMEOUT)

    def kprobes_registered(self) -> None:
        text = KPROBE_LIST.read_text()
        missing = [f for f in KPROBED_FUNCTIONS if f"{f}+0x0" not in text and f" {f}" not in text]
        assert not missing, f"not in {KPROBE_LIST}: {missing}; list: {text[-600:]}"

    def exec_event(self) -> None:
        e2e, sensor = self.e2e, self.sensor
        tag = e2e.marker()
        subprocess.run(["/bin/true", tag], check=True)
        ev = sensor.wait_for(e2e.is_exec_with(tag))
        assert os.path.realpath(ev["process"]["executable"]) == os.path.realpath("/bin/true")
        assert ev["process"]["args"] == ["/bin/true", tag], ev["process"]["args"]
        assert ev["process"]["parent"]["pid"] == os.getpid()
        assert ev["process"]["hash"]["sha256"]
        assert ev["user"]["id"] == "0"
        assert ev["edr"]["tier"] == self.tier, ev["edr"]
        done = sensor.wait_for(
            lambda e: e2e.has(e, "exit", process__entity_id=ev["process"]["entity_id"])
        )
        assert done["process"]["exit_code"] == 0, done["process"]

    def exit_code(self) -> None:
        e2e = self.e2e
        tag = e2e.marker()
        rc = subprocess.run(["/bin/sh", "-c", "exit 3", tag], check=False).returncode
        assert rc == 3
        ev = self.sensor.wait_for(e2e.is_exec_with(tag))
        done = self.sensor.wait_for(
            lambda e: e2e.has(e, "exit", process__entity_id=ev["process"]["entity_id"])
        )
        assert done["process"]["exit_code"] == 3, done["process"]

    def exit_signal(self) -> None:
        e2e = self.e2e
        tag = e2e.marker()
        # sh stays the parent of its sleep ("sleep 30 <tag>" would exit 1 at once: sleep
        # rejects the extra argument); the whole group is killed so no sleep is left behind
        proc = subprocess.Popen(["/bin/sh", "-c", "sleep 30; true", tag], start_new_session=True)
        ev = self.sensor.wait_for(e2e.is_exec_with(tag))
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
        done = self.sensor.wait_for(
            lambda e: e2e.has(e, "exit", process__entity_id=ev["process"]["entity_id"])
        )
        # killed by a signal: exit_code is -signal (see sensor/ebpf.py _on_exit)
        assert done["process"]["exit_code"] == -signal.SIGKILL, done

    def files(self) -> None:
        self.e2e.check_files(self.sensor, self.workdir / "watched", with_process=True)

    def network(self) -> None:
        self.e2e.check_network(self.sensor, hold=0.0, with_process=True)

    def accept_null_address(self) -> None:
        e2e = self.e2e
        port, client_port = accept_without_address(e2e)
        ev = self.sensor.wait_for(
            lambda e: e2e.has(e, "accept", destination__port=port, source__port=client_port)
        )
        assert ev["source"]["ip"] == "127.0.0.1", ev
        assert ev["process"]["pid"] == os.getpid(), ev["process"]

    def own_activity_ignored(self) -> None:
        own = self.sensor.proc.pid
        leaked = [e for e in self.sensor.events() if e.get("process", {}).get("pid") == own]
        assert not leaked, f"{len(leaked)} events of the sensor itself, first: {leaked[0]}"

    def stop_and_stats(self) -> None:
        sensor, self.sensor = self.sensor, None
        stats = sensor.stop()
        self.e2e.check_stats(stats, self.tier)


def check_tier(tier: str) -> dict[str, Any]:
    """All checks for one tier; the result is JSON-ready."""
    e2e = load_e2e()
    workdir = Path(tempfile.mkdtemp(prefix="edr-vm-", dir="/tmp"))
    workdir.chmod(0o777)
    checker = Checker(e2e, tier, workdir)
    stderr_tail = ""
    try:
        if checker.run("start", checker.start):
            if tier == "kprobe":
                checker.run("kprobes_registered", checker.kprobes_registered)
            checker.run("exec", checker.exec_event)
            checker.run("exit_code", checker.exit_code)
            checker.run("exit_signal", checker.exit_signal)
            checker.run("files", checker.files)
            checker.run("network", checker.network)
            if tier == "kprobe":
                checker.run("accept_null_address", checker.accept_null_address)
            checker.run("own_activity_ignored", checker.own_activity_ignored)
            stderr = checker.sensor.stderr
            checker.run("stop_and_stats", checker.stop_and_stats)
            stderr_tail = "".join(stderr)[-1500:]
        else:
            stderr_tail = checker.results[-1].get("error", "")
    finally:
        if checker.sensor is not None:
            checker.sensor.proc.kill()
            checker.sensor.proc.wait(10)
        shutil.rmtree(workdir, ignore_errors=True)
    failed = [r for r in checker.results if not r["ok"]]
    return {
        "kernel": os.uname().release,
        "tier": tier,
        "passed": not failed,
        "checks": checker.results,
        "stderr_tail": stderr_tail if failed else "",
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tier", choices=("kprobe", "tracepoint"), required=True)
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        parser.error("run as root inside the test VM")
    result = check_tier(args.tier)
    sys.stdout.write(RESULT_PREFIX + json.dumps(result, sort_keys=True) + "\n")
    sys.stdout.flush()
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())

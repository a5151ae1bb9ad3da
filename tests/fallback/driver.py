"""Runs one fallback source against real activity and prints what it captured as JSON.

The tests start this script in a subprocess, as root or as ``nobody`` (through ``setpriv``),
so the same scenario is exercised with and without privilege. Usage::

    python tests/fallback/driver.py <scenario> <json-args>

It prints one JSON document: ``{"events": [...], "counters": {...}, ...}``.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

sys.path.insert(0, os.getcwd())  # run from the repository root

from backplane.schema import Event, Family
from sensor.capture import CaptureContext, FilterConfig, Source, TierUnavailable
from sensor.fallback import (
    InotifyFileSource,
    ProcConnectorSource,
    ProcPollSource,
    TcpPollSource,
    choose_process_source,
)
from sensor.process_table import ProcessTable

ALL = frozenset(Family)


def make_ctx(events: list[Event], watch_paths: tuple[str, ...] = ()) -> CaptureContext:
    table = ProcessTable("test-host")
    table.seed_from_proc()
    lock = threading.Lock()

    def emit(ev: Event) -> None:
        with lock:
            events.append(ev)

    # Nothing ignored: the scenarios' own sockets must be reported.
    return CaptureContext(
        host={"id": "test-host", "name": "test"},
        table=table,
        emit=emit,
        filters=FilterConfig(watch_paths=watch_paths),
        ignored_pids=set(),
    )


@contextmanager
def running(src: Source) -> Iterator[dict[str, float]]:
    """open → run in a thread → (body) → stop → close; yields timing of the shutdown."""
    stop = threading.Event()
    src.open()
    errors: list[BaseException] = []

    def target() -> None:
        try:
            src.run(stop)
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    timing: dict[str, float] = {}
    try:
        yield timing
    finally:
        t0 = time.monotonic()
        stop.set()
        thread.join(5)
        timing["stop_s"] = time.monotonic() - t0
        src.close()
        src.close()  # idempotent
        if thread.is_alive():
            raise RuntimeError("run() did not return after stop")
        if errors:
            raise errors[0]


def wait_until(pred: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.02)
    return pred()


# -- scenarios ---------------------------------------------------------------------------------


def scenario_choose(_args: dict[str, Any]) -> dict[str, Any]:
    cls, reason = choose_process_source()
    out: dict[str, Any] = {"chosen": cls.__name__, "reason": reason}
    src = ProcConnectorSource(make_ctx([]), ALL)
    try:
        src.open()
        out["connector_open"] = "ok"
    except TierUnavailable as exc:
        out["connector_open"] = f"TierUnavailable: {exc}"
    finally:
        src.close()
    return out


def scenario_connector(args: dict[str, Any]) -> dict[str, Any]:
    events: list[Event] = []
    src = ProcConnectorSource(make_ctx(events), ALL)
    runs = []
    with running(src) as timing:
        # /bin/true lives well under a millisecond, often gone before /proc can be read (the
        # event then says so). Run it until one is caught with its argv, at most max_runs.
        for i in range(args.get("max_runs", 100)):
            marker = f"edr-fallback-marker-{i}"
            proc = subprocess.Popen(["/bin/true", marker, "--second-arg"])
            proc.wait()
            runs.append({"marker": marker, "pid": proc.pid, "returncode": proc.returncode})
            wait_until(lambda pid=proc.pid: _has_exit(events, pid), 2)
            if any(marker in e.get("process", {}).get("args", []) for e in events):
                break
        killed = subprocess.Popen(["/bin/sleep", "30"])
        time.sleep(0.05)
        killed.kill()
        killed.wait()
        failing = subprocess.Popen(["/bin/sh", "-c", "exit 7"])
        failing.wait()
        wait_until(lambda: _has_exit(events, killed.pid) and _has_exit(events, failing.pid), 3)
    return {
        "events": events,
        "counters": src.counters(),
        "timing": timing,
        "runs": runs,
        "me": os.getpid(),
        "killed_pid": killed.pid,
        "failing_pid": failing.pid,
    }


def _has_exit(events: list[Event], pid: Any) -> bool:
    return any(
        e["event"]["action"] == "exit" and e.get("process", {}).get("pid") == pid for e in events
    )


def scenario_poll(args: dict[str, Any]) -> dict[str, Any]:
    events: list[Event] = []
    interval = args.get("interval", 0.25)
    src = ProcPollSource(make_ctx(events), ALL, interval=interval)
    with running(src) as timing:
        # Lives 4 intervals: polling must see it start and end.
        long = subprocess.Popen(["/bin/sleep", str(interval * 4)])
        long.wait()
        # Each lives ~1 ms: polling is expected to miss (nearly) all of them.
        for _ in range(args.get("short_runs", 20)):
            subprocess.run(["/bin/true", "edr-short-lived"], check=True)
        time.sleep(interval * 3)
    short = [
        e
        for e in events
        if e["event"]["action"] == "exec" and "edr-short-lived" in e["process"].get("args", [])
    ]
    return {
        "events": events,
        "counters": src.counters(),
        "timing": timing,
        "long_pid": long.pid,
        "short_runs": args.get("short_runs", 20),
        "short_seen": len(short),
        "me": os.getpid(),
    }


def scenario_file(args: dict[str, Any]) -> dict[str, Any]:
    events: list[Event] = []
    root = args["dir"]
    watch = (root, *args.get("extra_watch", ()))
    src = InotifyFileSource(make_ctx(events, watch), ALL)
    outside = args["outside"]
    pause = 0.3  # lets each step be read separately, so attributes are compared in order

    def step() -> None:
        time.sleep(pause)

    with running(src) as timing:
        a = f"{root}/a.txt"
        with open(a, "w") as f:
            f.write("one")
            f.flush()
            f.write("two")
        step()
        os.chmod(a, 0o640)
        step()
        if os.geteuid() == 0:
            os.chown(a, 65534, 65534)
            step()
        os.rename(a, f"{root}/b.txt")
        step()
        os.mkdir(f"{root}/sub")
        step()
        with open(f"{root}/sub/c.txt", "w") as f:
            f.write("in a new directory")
        step()
        os.rename(f"{root}/sub/c.txt", f"{outside}/c.txt")  # moved out: delete
        step()
        with open(f"{outside}/d.txt", "w") as f:
            f.write("d")
        os.rename(f"{outside}/d.txt", f"{root}/d.txt")  # moved in: create
        step()
        os.unlink(f"{root}/b.txt")
        step()
    return {"events": events, "counters": src.counters(), "timing": timing}


def scenario_file_open(args: dict[str, Any]) -> dict[str, Any]:
    """Only open(): the watch-path failure cases."""
    if "watch_limit" in args:
        # Per user namespace since Linux 5.11: lowering it here touches nothing outside.
        with open("/proc/sys/user/max_inotify_watches", "w") as f:
            f.write(str(int(args["watch_limit"])))
    events: list[Event] = []
    src = InotifyFileSource(make_ctx(events, tuple(args["watch"])), ALL)
    try:
        src.open()
        result: dict[str, Any] = {"open": "ok"}
    except TierUnavailable as exc:
        result = {"open": f"TierUnavailable: {exc}"}
    finally:
        src.close()
    result["counters"] = src.counters()
    return result


def scenario_net(args: dict[str, Any]) -> dict[str, Any]:
    events: list[Event] = []
    interval = 0.2
    src = TcpPollSource(make_ctx(events), ALL, interval=interval, backend=args.get("backend"))
    held: list[socket.socket] = []
    ports: dict[str, int] = {}
    with running(src) as timing:
        for family, host in ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")):
            listener = socket.socket(family, socket.SOCK_STREAM)
            listener.bind((host, 0))
            listener.listen()
            held.append(listener)
            port = listener.getsockname()[1]
            ports[host] = port
            time.sleep(interval * 2)  # the listener is seen before its connections
            client = socket.create_connection((host, port))
            server, _ = listener.accept()
            held += [client, server]
            ports[f"{host} client"] = client.getsockname()[1]
        time.sleep(interval * 4)  # held open well past the poll interval
        for s in held:
            s.close()
    return {
        "events": events,
        "counters": src.counters(),
        "timing": timing,
        "backend": src.backend,
        "ports": ports,
        "me": os.getpid(),
    }


SCENARIOS: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
    "choose": scenario_choose,
    "connector": scenario_connector,
    "poll": scenario_poll,
    "file": scenario_file,
    "file_open": scenario_file_open,
    "net": scenario_net,
}


def main() -> None:
    name = sys.argv[1]
    args = json.loads(sys.argv[2]) if len(sys.argv) > 2 else {}
    result = SCENARIOS[name](args)
    result["euid"] = os.geteuid()
    json.dump(result, sys.stdout)


if __name__ == "__main__":
    main()

"""Fork records from task:task_newtask (process.bpf.c): processes yes, threads no.

The clone flags come with the tracepoint, so a thread (CLONE_THREAD) is told from a process
without a program on clone(2) or clone3(2); a fork from a non-leader thread is the process's.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator

import pytest

from backplane.schema import Family

from .conftest import Running, start_source

pytestmark = [pytest.mark.root, pytest.mark.bpf, pytest.mark.timeout(120)]

# Starts threads (Python's threading: clone3 with CLONE_THREAD), forks once from a
# non-leader thread, and prints the pids and thread ids involved.
_CHILD = textwrap.dedent(
    """
    import json, os, threading
    tids, kids = [], []
    ready = threading.Barrier(5)
    def worker(fork):
        tids.append(threading.get_native_id())
        if fork:
            pid = os.fork()
            if pid == 0:
                os._exit(0)
            os.waitpid(pid, 0)
            kids.append(pid)
        ready.wait()
    threads = [threading.Thread(target=worker, args=(i == 0,)) for i in range(4)]
    for t in threads:
        t.start()
    ready.wait()
    for t in threads:
        t.join()
    print(json.dumps({"pid": os.getpid(), "tids": tids, "kids": kids}))
    """
)


@pytest.fixture(scope="module")
def sensor() -> Iterator[Running]:
    running = start_source(frozenset({Family.PROCESS}))
    yield running
    running.halt()


def test_threads_are_not_forks_and_a_threads_fork_is_the_processs(sensor: Running) -> None:
    out = subprocess.run([sys.executable, "-c", _CHILD], capture_output=True, text=True,
                         check=True, timeout=30)  # fmt: skip
    info = json.loads(out.stdout)
    pid, tids, (kid,) = info["pid"], set(info["tids"]), info["kids"]
    assert len(tids) == 4 and pid not in tids

    def fork_of(p: int):
        return lambda e: e["event"]["action"] == "fork" and e["process"]["pid"] == p

    (child_fork,) = sensor.wait_for(fork_of(pid))  # the python child itself
    assert child_fork["process"]["parent"]["pid"] == os.getpid()
    (kid_fork,) = sensor.wait_for(fork_of(kid))
    assert kid_fork["process"]["parent"]["pid"] == pid  # the process, not the thread's id
    # One ring keeps the order of submission: once the child's exit is in, every record its
    # threads' creation made is in too.
    assert sensor.wait_for(lambda e: e["event"]["action"] == "exit" and e["process"]["pid"] == pid)
    assert [e for e in sensor.events if e["event"]["action"] == "fork"
            and e["process"]["pid"] in tids] == []  # fmt: skip

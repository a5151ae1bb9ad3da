"""Response-action fixtures: real processes, files under a per-test root, a Responder."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from sensor.process_table import ProcessTable
from sensor.response import Responder

HOST_ID = "test-host"


@pytest.fixture
def table() -> ProcessTable:
    return ProcessTable(HOST_ID)


@pytest.fixture
def responder(tmp_path: Path, table: ProcessTable) -> Iterator[Responder]:
    roots = tmp_path / "roots"
    roots.mkdir()
    r = Responder(tmp_path / "state", table.entity_id, allowed_roots=[str(roots)],
                  domain_refresh=0)  # fmt: skip
    yield r
    r.stop()


@pytest.fixture
def spawn() -> Iterator[object]:
    """Start real processes; every one still running at the end is killed."""
    procs: list[subprocess.Popen[bytes]] = []

    def start(code: str = "import time; time.sleep(60)") -> subprocess.Popen[bytes]:
        proc = subprocess.Popen([sys.executable, "-c", code])
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait(5)

"""Fixtures for the fallback tier: run a scenario driver as root or as ``nobody``."""

from __future__ import annotations

import json
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
DRIVER = Path(__file__).with_name("driver.py")
PYTHON = REPO / ".venv" / "bin" / "python"
NOBODY = pwd.getpwnam("nobody")
SETPRIV = [
    "setpriv",
    f"--reuid={NOBODY.pw_uid}",
    f"--regid={NOBODY.pw_gid}",
    "--clear-groups",
    "--inh-caps=-all",
]

RunDriver = Callable[..., dict[str, Any]]


def _python() -> str:
    return str(PYTHON) if PYTHON.exists() else sys.executable


def _command(user: str, argv: list[str]) -> list[str]:
    """``root``; ``nobody``; ``nobody-userns[-root]``: nobody inside a new user namespace."""
    if user == "root":
        return argv
    if user == "nobody":
        return [*SETPRIV, *argv]
    if user == "nobody-userns":
        return [*SETPRIV, "unshare", "--user", *argv]
    if user == "nobody-userns-root":  # mapped to root inside: may set that namespace's limits
        return [*SETPRIV, "unshare", "--user", "--map-root-user", *argv]
    raise ValueError(user)


@pytest.fixture(scope="session")
def nobody_ready() -> None:
    """Fail clearly when ``nobody`` cannot run the project from the venv."""
    if os.geteuid() != 0:
        pytest.skip("switching to nobody needs root")
    probe = subprocess.run(
        _command("nobody", [_python(), "-c", "import sensor.fallback, inotify_simple, pyroute2"]),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    if probe.returncode != 0:
        pytest.fail(
            "nobody cannot import the project from the venv (run `chmod -R a+rX .venv sensor "
            f"backplane` as scripts/setup.sh does): {probe.stderr.strip()[-500:]}"
        )


@pytest.fixture
def run_driver() -> RunDriver:
    """Run ``tests/fallback/driver.py <scenario>`` as ``user``; returns its JSON result."""

    def run(scenario: str, args: dict[str, Any] | None = None, *, user: str = "root") -> dict:
        argv = [_python(), str(DRIVER), scenario, json.dumps(args or {})]
        proc = subprocess.run(
            _command(user, argv),
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=90,
            check=False,
        )
        if proc.returncode != 0:
            raise AssertionError(f"driver {scenario} as {user} failed:\n{proc.stderr[-3000:]}")
        result = json.loads(proc.stdout)
        result["stderr"] = proc.stderr
        return result

    return run


@pytest.fixture
def shared_tmp() -> Iterator[Callable[[str], str]]:
    """Temp directories under /tmp that ``nobody`` owns (pytest's tmp_path is root-only)."""
    made: list[str] = []

    def make(owner: str = "nobody") -> str:
        path = tempfile.mkdtemp(prefix="edr-fallback-", dir="/tmp")
        made.append(path)
        if owner == "nobody" and os.geteuid() == 0:
            os.chown(path, NOBODY.pw_uid, NOBODY.pw_gid)
        return path

    yield make
    for path in made:
        shutil.rmtree(path, ignore_errors=True)

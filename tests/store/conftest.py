"""Fixtures for the store tests: a real SQLite file per test and ECS event builders."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from backplane.schema import Action, Event, Tier, new_event
from controller.store import SQLiteStore
from controller.store.migrations import PROCESS_FILE_SCHEMA, PROCESS_FILE_VERSION

HOST = {"id": "host-a", "name": "alpha"}
T0 = 1_700_000_000.0  # a fixed "now" for tests that control time


class Clock:
    """Injectable time: tests move it forward explicitly."""

    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "edr.db"


@pytest.fixture
def store(db_path: Path, clock: Clock) -> Iterator[SQLiteStore]:
    s = SQLiteStore(db_path, clock=clock)
    yield s
    s.close()


def ev(
    action: Action,
    at: float,
    *,
    host: str = "host-a",
    pid: int = 100,
    entity: str = "E100",
    exe: str = "/usr/bin/true",
    cmd: str | None = None,
    parent: tuple[int, str] | None = None,
    path: str | None = None,
    src: tuple[str, int] | None = None,
    dst: tuple[str, int] | None = None,
    user: str = "alice",
    **extra: Any,
) -> Event:
    """One ECS event as the sensor builds it, at ``at`` seconds since the epoch."""
    e = new_event(
        action, host={"id": host, "name": host}, tier=Tier.TRACEPOINT, epoch_ns=int(at * 1e9)
    )
    proc: dict[str, Any] = {"pid": pid, "entity_id": entity, "executable": exe}
    proc["command_line"] = cmd if cmd is not None else exe
    if parent is not None:
        proc["parent"] = {"pid": parent[0], "entity_id": parent[1]}
    proc.update(extra)
    e["process"] = proc
    e["user"] = {"id": "1000", "name": user}
    if path is not None:
        e["file"] = {"path": path}
    if src is not None:
        e["source"] = {"ip": src[0], "port": src[1]}
    if dst is not None:
        e["destination"] = {"ip": dst[0], "port": dst[1]}
    return e


@pytest.fixture
def make_ev() -> Any:
    """The ``ev`` builder (fixtures, since importlib mode cannot import conftest)."""
    return ev


@pytest.fixture
def t0() -> float:
    return T0


# What each migration added, undone: a file rolled back to version N has the layout a
# controller at schema N left (columns added by ALTER TABLE sit at the end, so dropping them
# restores the old table exactly).
_UNDO: dict[int, tuple[str, ...]] = {
    5: ("DELETE FROM store_state WHERE key = 'process_watermark'",),
    4: tuple(
        f"ALTER TABLE events DROP COLUMN {col}"
        for col in (
            "parent_entity_id",
            "ppid",
            "parent_executable",
            "parent_command_line",
            "exit_code",
        )
    ),
    3: ("DELETE FROM store_state WHERE key = 'detect_watermark'",),
}


def _undo_process_file(conn: sqlite3.Connection, path: Path) -> None:
    """Migration 6 undone: the process table and its watermark back in the store, and no
    process file next to it."""
    proc = Path(f"{path}-processes")
    conn.execute("ATTACH DATABASE ? AS proc", (str(proc),))
    for statement in PROCESS_FILE_SCHEMA[:3]:  # the table and indexes, as migration 1 made them
        conn.execute(statement.replace(" IF NOT EXISTS", ""))
    conn.execute("INSERT INTO main.processes SELECT * FROM proc.processes")
    conn.execute(
        "INSERT INTO store_state (key, value) SELECT 'process_watermark', value"
        " FROM proc.process_state WHERE key = 'process_watermark'"
    )
    conn.commit()
    conn.execute("DETACH DATABASE proc")
    for suffix in ("", "-wal", "-shm"):
        Path(f"{proc}{suffix}").unlink(missing_ok=True)


def roll_back(path: Path, version: int) -> None:
    """Turn the closed store file at ``path`` back into a schema ``version`` database."""
    conn = sqlite3.connect(path)
    try:
        current = conn.execute("SELECT max(version) FROM schema_version").fetchone()[0]
        for v in range(current, version, -1):
            if v == PROCESS_FILE_VERSION:
                _undo_process_file(conn, path)
            else:
                for statement in _UNDO[v]:
                    conn.execute(statement)
            conn.execute("DELETE FROM schema_version WHERE version = ?", (v,))
        conn.commit()
    finally:
        conn.close()


@pytest.fixture
def rolled_back() -> Any:
    """``roll_back`` (fixtures, since importlib mode cannot import conftest)."""
    return roll_back

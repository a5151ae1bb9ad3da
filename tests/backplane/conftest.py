"""Backplane fixtures: per-test PKI, a server on a loop thread, outboxes; all closed after."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from bp_harness import Pki, ServerThread
from bp_sqlite_hooks import SqliteHooks


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return Pki(tmp_path / "pki")


@pytest.fixture
def hooks(tmp_path: Path, pki: Pki) -> Iterator[SqliteHooks]:
    h = SqliteHooks(tmp_path / "store.db", pki.ca)
    yield h
    h.close()


@pytest.fixture
def server(pki: Pki, hooks: SqliteHooks) -> Iterator[ServerThread]:
    st = ServerThread(pki.server_config(heartbeat_timeout=5.0), hooks)
    yield st
    st.close()

"""Shared test fixtures. Area-specific fixtures live in each folder's own conftest.py."""

from __future__ import annotations

import builtins
import os
import threading

import pytest

# CPython 3.11 before 3.11.5 (Debian 12 ships 3.11.2) keeps the AST validator's recursion
# depth per interpreter, not per thread: two threads compiling at once (a test server thread
# finalising Sanic's router while the main thread imports or rewrites assertions) can fail with
# "SystemError: AST constructor recursion depth mismatch" and leave asyncio state broken for
# later tests. The suite serialises compile() to rule that interpreter bug out; production is
# unaffected (the controller compiles its router once, at start-up, in one thread).
_compile_lock = threading.RLock()
_compile = builtins.compile


def _serialised_compile(*args, **kwargs):  # type: ignore[no-untyped-def]
    with _compile_lock:
        return _compile(*args, **kwargs)


builtins.compile = _serialised_compile


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if os.geteuid() == 0:
        return
    skip = pytest.mark.skip(reason="needs root (run the suite with sudo scripts/test.sh)")
    for item in items:
        if "root" in item.keywords or "bpf" in item.keywords:
            item.add_marker(skip)

"""Shared test fixtures. Area-specific fixtures live in each folder's own conftest.py."""

from __future__ import annotations

import builtins
import gc
import os
import threading

import pytest

# CPython 3.11 before 3.11.5 (Debian 12 ships 3.11.2) keeps the AST constructor's recursion
# depth in per-interpreter state that one ast.parse resets on entry: a second ast.parse that
# starts while the first is still building objects (another thread, or the same thread through
# a garbage-collector finalizer, e.g. a leaked asyncio Task logging "Task was destroyed" with a
# traceback, which parses source for its caret markers) makes the first fail with
# "SystemError: AST constructor recursion depth mismatch". Test servers come and go hundreds of
# times here, so the suite serialises compile() and keeps the collector out of it. Production is
# unaffected in practice: the controller parses route sources once, at start-up.
_compile_lock = threading.RLock()
_compile = builtins.compile


def _serialised_compile(*args, **kwargs):  # type: ignore[no-untyped-def]
    with _compile_lock:
        collecting = gc.isenabled()
        gc.disable()
        try:
            return _compile(*args, **kwargs)
        finally:
            if collecting:
                gc.enable()


builtins.compile = _serialised_compile


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if os.geteuid() == 0:
        return
    skip = pytest.mark.skip(reason="needs root (run the suite with sudo scripts/test.sh)")
    for item in items:
        if "root" in item.keywords or "bpf" in item.keywords:
            item.add_marker(skip)

"""inotify file source: real files, as root and as nobody, and the watch-path failures."""

from __future__ import annotations

import os
import threading
import time
from typing import Any

import pytest

from backplane.schema import Event, Family
from sensor.capture import CaptureContext, FilterConfig, TierUnavailable
from sensor.fallback import InotifyFileSource
from sensor.process_table import ProcessTable

ALL = frozenset(Family)


def _actions(events: list[dict[str, Any]]) -> list[tuple[str, str]]:
    return [(e["event"]["action"], e["file"]["path"]) for e in events]


@pytest.mark.root
@pytest.mark.timeout(120)
@pytest.mark.parametrize("user", ["root", "nobody"])
def test_create_write_chmod_rename_move_delete(
    run_driver: Any, nobody_ready: None, shared_tmp: Any, user: str
) -> None:
    root, outside = shared_tmp(), shared_tmp()
    out = run_driver("file", {"dir": root, "outside": outside}, user=user)
    events = out["events"]
    a, b, sub = f"{root}/a.txt", f"{root}/b.txt", f"{root}/sub"
    expected = [
        ("create", a),
        ("write", a),  # two writes before close: one event
        ("chmod", a),
        *([("chown", a)] if user == "root" else []),
        ("rename", b),
        ("create", sub),
        ("create", f"{sub}/c.txt"),  # inside a directory created after the source opened
        ("write", f"{sub}/c.txt"),
        ("delete", f"{sub}/c.txt"),  # moved out of the watched tree
        ("create", f"{root}/d.txt"),  # moved in from outside
        ("delete", b),
    ]
    assert _actions(events) == expected
    by = {(e["event"]["action"], e["file"]["path"]): e for e in events}
    created_mode = int(by[("create", a)]["file"]["mode"], 8)
    chmod = by[("chmod", a)]["file"]
    assert chmod["mode"] == "640"
    assert chmod["Ext"]["original"]["mode"] == f"{created_mode:o}"
    assert by[("create", a)]["file"]["uid"] == str(out["euid"])
    if user == "root":
        chown = by[("chown", a)]["file"]
        assert (chown["uid"], chown["gid"]) == ("65534", "65534")
        assert chown["Ext"]["original"] == {"uid": "0", "gid": "0"}
    assert by[("rename", b)]["file"]["Ext"]["original"]["path"] == a
    for ev in events:
        assert "process" not in ev  # inotify cannot say who did it
        assert ev["edr"]["tier"] == "fallback"
    c = out["counters"]
    assert c["submitted"] == len(expected) and c["dropped"] == 0
    assert c["unpaired_moves"] == 2 and c["skipped_paths"] == 0
    assert out["timing"]["stop_s"] < 0.5


@pytest.mark.root
def test_missing_and_unreadable_paths_are_skipped_and_counted(
    run_driver: Any, nobody_ready: None, shared_tmp: Any
) -> None:
    readable = shared_tmp()
    locked = shared_tmp(owner="root")
    os.chmod(locked, 0o700)  # nobody may not read it
    missing = f"{readable}/does-not-exist"
    out = run_driver("file_open", {"watch": [readable, locked, missing]}, user="nobody")
    assert out["open"] == "ok"
    assert out["counters"]["skipped_paths"] == 2
    assert out["counters"]["watches"] == 1
    assert f"{missing} does not exist; skipped" in out["stderr"]
    assert f"{locked} cannot be watched (Permission denied); skipped" in out["stderr"]
    # Nothing watchable at all: the source refuses to open, with the reason.
    out = run_driver("file_open", {"watch": [locked, missing]}, user="nobody")
    assert out["open"].startswith("TierUnavailable: inotify: none of the watch paths")
    assert out["counters"]["skipped_paths"] == 2


@pytest.mark.root
def test_watch_limit_is_reported(run_driver: Any, nobody_ready: None, shared_tmp: Any) -> None:
    root = shared_tmp()
    deep = os.path.join(root, "a", "b", "c", "d", "e")
    os.makedirs(deep)
    for d in (root, *(os.path.join(root, *"abcde"[:i]) for i in range(1, 6))):
        os.chown(d, 65534, 65534)
    out = run_driver("file_open", {"watch": [root], "watch_limit": 3}, user="nobody-userns-root")
    assert out["open"] == "ok"  # what could be watched is watched
    assert out["counters"]["watches"] == 3
    assert out["counters"]["watch_limit_hits"] == 1
    assert "watch limit reached" in out["stderr"]


def _ctx(events: list[Event], watch: tuple[str, ...], **filters: Any) -> CaptureContext:
    return CaptureContext(
        host={"id": "h"},
        table=ProcessTable("h"),
        emit=events.append,
        filters=FilterConfig(watch_paths=watch, **filters),
    )


def test_missing_path_in_process(tmp_path: Any) -> None:
    src = InotifyFileSource(_ctx([], (str(tmp_path / "nope"),)), ALL)
    with pytest.raises(TierUnavailable, match="none of the watch paths"):
        src.open()
    src.close()
    src.close()
    with pytest.raises(RuntimeError, match="before open"):
        src.run(threading.Event())


def test_excluded_prefixes_are_not_reported_or_watched(tmp_path: Any) -> None:
    keep, skip = tmp_path / "keep", tmp_path / "skip"
    keep.mkdir()
    skip.mkdir()
    events: list[Event] = []
    src = InotifyFileSource(_ctx(events, (str(tmp_path),), exclude_prefixes=(f"{skip}/",)), ALL)
    src.open()
    stop = threading.Event()
    thread = threading.Thread(target=src.run, args=(stop,))
    thread.start()
    try:
        (skip / "x").write_text("hidden")
        (keep / "y").write_text("seen")
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline and len(events) < 2:
            time.sleep(0.02)
        time.sleep(0.2)
    finally:
        stop.set()
        thread.join(2)
        src.close()
    assert not thread.is_alive()
    assert _actions(events) == [("create", f"{keep}/y"), ("write", f"{keep}/y")]
    assert src.counters()["watches"] == 2  # tmp_path and keep, not skip


def test_a_file_as_watch_path(tmp_path: Any) -> None:
    target = tmp_path / "passwd"
    target.write_text("root:x:0:0")
    target.chmod(0o644)  # whatever the umask was, the chmod below is a real change
    events: list[Event] = []
    src = InotifyFileSource(_ctx(events, (str(target),)), ALL)
    src.open()
    stop = threading.Event()
    thread = threading.Thread(target=src.run, args=(stop,))
    thread.start()
    try:
        with open(target, "a") as f:
            f.write("\nmallory:x:0:0")
        time.sleep(0.3)
        os.chmod(target, 0o600)
        deadline = time.monotonic() + 10  # generous on a loaded machine; done when seen
        while time.monotonic() < deadline and ("chmod", str(target)) not in _actions(events):
            time.sleep(0.05)
    finally:
        stop.set()
        thread.join(2)
        src.close()
    assert _actions(events) == [("write", str(target)), ("chmod", str(target))]

"""File events from inotify on the configured watch paths: works for any user.

Each path in ``ctx.filters.watch_paths`` is watched recursively; directories created (or
moved in) later are watched as they appear, and files created inside a new directory before
its watch was in place are reported by scanning it once.

Reported: ``create``; ``write`` (the first IN_MODIFY of a file until its IN_CLOSE_WRITE, so a
long write is one event); ``delete``; ``rename`` (IN_MOVED_FROM and IN_MOVED_TO paired by
cookie; a move out of the watched trees becomes ``delete``, a move in becomes ``create``);
``chmod`` / ``chown`` (IN_ATTRIB, with the file stat-ed and compared to a small cache of
mode/uid/gid; previous values go to ``file.Ext.original``).

Limits, stated plainly:

* inotify says nothing about who did it: these events carry **no process context**.
* Only the watched trees are seen; a watch path that does not exist or cannot be read is
  skipped with a warning and counted (``skipped_paths``); unprivileged, that includes every
  directory the user cannot read.
* Each directory costs one watch; when ``fs.inotify.max_user_watches`` is reached the rest of
  the tree is not watched, which is logged and counted (``watch_limit_hits``).
* A queue overflow (IN_Q_OVERFLOW) loses events; it is counted in ``dropped``.
* Attributes are stat-ed when the event is processed, not when it happened: a chmod that
  follows a create within the same read batch shows up as the create's mode, not as a chmod.
* The sensor's own writes are reported too (no pid to filter on): keep its state directories
  out of the watch paths or in ``exclude_prefixes``.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import stat
import threading
import time
from collections import OrderedDict
from typing import Any, ClassVar

from inotify_simple import INotify
from inotify_simple import flags as IN

from backplane.schema import Action, Event, Family, Tier
from sensor.capture import CaptureContext, Source, TierUnavailable

log = logging.getLogger(__name__)

WATCH_MASK = (
    IN.CREATE
    | IN.MODIFY
    | IN.CLOSE_WRITE
    | IN.DELETE
    | IN.MOVED_FROM
    | IN.MOVED_TO
    | IN.ATTRIB
    | IN.MOVE_SELF
    | IN.DONT_FOLLOW
    | IN.EXCL_UNLINK
)
READ_TIMEOUT_MS = 200
# A MOVED_FROM whose MOVED_TO has not arrived by then was a move out of the watched trees.
MOVE_PAIR_S = 0.1
ATTR_CACHE_MAX = 16384

Attrs = tuple[int, int, int]  # mode, uid, gid


class InotifyFileSource(Source):
    """create/write/delete/rename/chmod/chown under the watch paths; no process context."""

    tier: ClassVar[Tier] = Tier.FALLBACK
    families: ClassVar[frozenset[Family]] = frozenset({Family.FILE})

    def __init__(self, ctx: CaptureContext, families: frozenset[Family]) -> None:
        super().__init__(ctx, families)
        self._ino: INotify | None = None
        self._dirs: dict[int, str] = {}  # wd -> watched path
        self._wds: dict[str, int] = {}
        self._file_roots: set[int] = set()  # watch paths that are files, not directories
        self._writing: set[str] = set()
        self._attrs: OrderedDict[str, Attrs] = OrderedDict()
        self._moves: dict[int, tuple[str, bool, float]] = {}
        self._limit_reported = False
        self._close_lock = threading.Lock()
        self.skipped_paths = 0
        self.watch_limit_hits = 0
        self.queue_overflows = 0
        self.unpaired_moves = 0

    @classmethod
    def unavailable(cls) -> str | None:
        try:
            INotify().close()
        except OSError as exc:
            return f"inotify unavailable: {exc}"
        return None

    # -- lifecycle ----------------------------------------------------------------------------

    def open(self) -> None:
        try:
            self._ino = INotify()
        except OSError as exc:
            raise TierUnavailable(f"inotify unavailable: {exc}") from exc
        for root in self.ctx.filters.watch_paths:
            self._add_tree(os.path.normpath(root), emit_found=False, is_root=True)
        if not self._dirs:
            self.close()
            raise TierUnavailable(
                "inotify: none of the watch paths could be watched "
                f"({', '.join(self.ctx.filters.watch_paths) or 'none configured'})"
            )

    def run(self, stop: threading.Event) -> None:
        ino = self._ino
        if ino is None:
            raise RuntimeError("InotifyFileSource.run called before open")
        while not stop.is_set():
            try:
                events = ino.read(timeout=READ_TIMEOUT_MS)
            except (OSError, ValueError):
                if self._ino is None:  # closed by close() while we were waiting
                    return
                raise
            for wd, mask, cookie, name in events:
                self._handle(wd, mask, cookie, name)
            self._expire_moves(time.monotonic() - MOVE_PAIR_S)
        self._expire_moves(float("inf"))

    def close(self) -> None:
        with self._close_lock:
            ino, self._ino = self._ino, None
        if ino is not None:
            ino.close()

    def counters(self) -> dict[str, int]:
        return {
            **super().counters(),
            "watches": len(self._dirs),
            "skipped_paths": self.skipped_paths,
            "watch_limit_hits": self.watch_limit_hits,
            "queue_overflows": self.queue_overflows,
            "unpaired_moves": self.unpaired_moves,
        }

    # -- watches --------------------------------------------------------------------------------

    def _add_tree(self, root: str, *, emit_found: bool, is_root: bool = False) -> None:
        """Watch ``root`` and every directory below it (symlinks are not followed)."""
        ino = self._ino
        if ino is None:
            return
        stack = [root]
        while stack:
            path = stack.pop()
            if not self.ctx.filters.wants(path.rstrip("/") + "/"):
                continue
            try:
                wd = ino.add_watch(path, WATCH_MASK)
            except OSError as exc:
                if exc.errno == errno.ENOSPC:
                    self._watch_limit(path)
                    return
                self._skip(path, exc, is_root=is_root and path == root)
                continue
            self._dirs[wd] = path
            self._wds[path] = wd
            try:
                st = os.lstat(path)
            except OSError:
                continue
            if not stat.S_ISDIR(st.st_mode):
                self._file_roots.add(wd)
                self._remember(path, st)
                continue
            try:
                with os.scandir(path) as it:
                    entries = list(it)
            except OSError as exc:
                self._skip(path, exc, is_root=False)
                continue
            for entry in entries:
                try:
                    if entry.is_dir(follow_symlinks=False):
                        stack.append(entry.path)
                        if emit_found:
                            self._emit(Action.FILE_CREATE, entry.path)
                        continue
                    est = entry.stat(follow_symlinks=False)
                except OSError:
                    continue  # removed while we looked
                if len(self._attrs) < ATTR_CACHE_MAX:
                    self._remember(entry.path, est)
                if emit_found:
                    self._emit(Action.FILE_CREATE, entry.path, attrs=_attrs(est))

    def _skip(self, path: str, exc: OSError, *, is_root: bool) -> None:
        self.skipped_paths += 1
        what = "watch path" if is_root else "directory"
        if exc.errno == errno.ENOENT:
            log.warning("inotify: %s %s does not exist; skipped", what, path)
        else:
            log.warning("inotify: %s %s cannot be watched (%s); skipped", what, path, exc.strerror)

    def _watch_limit(self, path: str) -> None:
        self.watch_limit_hits += 1
        if not self._limit_reported:
            self._limit_reported = True
            log.error(
                "inotify: watch limit reached at %s after %d watches; raise "
                "fs.inotify.max_user_watches to watch the rest",
                path,
                len(self._dirs),
            )

    def _unwatch_tree(self, prefix: str) -> None:
        for path in [p for p in self._wds if p == prefix or p.startswith(prefix + "/")]:
            wd = self._wds.pop(path)
            self._dirs.pop(wd, None)
            if self._ino is not None:
                with contextlib.suppress(OSError):  # already gone with its directory
                    self._ino.rm_watch(wd)

    def _rename_tree(self, old: str, new: str) -> None:
        for path in [p for p in self._wds if p == old or p.startswith(old + "/")]:
            wd = self._wds.pop(path)
            moved = new + path[len(old) :]
            self._wds[moved] = wd
            self._dirs[wd] = moved
        for path in [p for p in self._attrs if p.startswith(old + "/")]:
            self._attrs[new + path[len(old) :]] = self._attrs.pop(path)

    # -- events ---------------------------------------------------------------------------------

    def _handle(self, wd: int, mask: int, cookie: int, name: str) -> None:
        if mask & IN.Q_OVERFLOW:
            self.queue_overflows += 1
            self.dropped += 1
            self._writing.clear()  # their CLOSE_WRITE may be among the lost events
            log.warning("inotify: event queue overflowed, file events lost")
            return
        if mask & IN.IGNORED:
            path = self._dirs.pop(wd, None)
            if path is not None and self._wds.get(path) == wd:
                del self._wds[path]
            return
        base = self._dirs.get(wd)
        if base is None:
            return
        if not name and wd not in self._file_roots:
            # The directory's own IN_ATTRIB/IN_MOVE_SELF; its parent reports the same change.
            if mask & IN.MOVE_SELF and base in self.ctx.filters.watch_paths:
                log.warning("inotify: watch path %s was moved away; no longer watched", base)
                self._unwatch_tree(base)
            return
        path = f"{base}/{name}" if name else base
        isdir = bool(mask & IN.ISDIR)
        if mask & IN.CREATE:
            self._emit(Action.FILE_CREATE, path, attrs=self._stat(path))
            if isdir:
                self._add_tree(path, emit_found=True)
        if mask & IN.MODIFY and path not in self._writing:
            self._writing.add(path)
            self._emit(Action.FILE_WRITE, path)
        if mask & IN.CLOSE_WRITE:
            self._writing.discard(path)
            self._stat(path)
        if mask & IN.ATTRIB:
            self._attrib(path)
        if mask & IN.DELETE:
            self._writing.discard(path)
            self._attrs.pop(path, None)
            self._emit(Action.FILE_DELETE, path)
        if mask & IN.MOVED_FROM:
            self._moves[cookie] = (path, isdir, time.monotonic())
        if mask & IN.MOVED_TO:
            self._moved_to(path, cookie, isdir)

    def _moved_to(self, path: str, cookie: int, isdir: bool) -> None:
        pending = self._moves.pop(cookie, None)
        if pending is None:
            self.unpaired_moves += 1
            self._emit(Action.FILE_CREATE, path, attrs=self._stat(path))
            if isdir:
                self._add_tree(path, emit_found=False)
            return
        old = pending[0]
        if old in self._writing:
            self._writing.discard(old)
            self._writing.add(path)
        cached = self._attrs.pop(old, None)
        if cached is not None:
            self._attrs[path] = cached
        if isdir:
            self._rename_tree(old, path)
            if not self.ctx.filters.wants(path + "/"):
                self._unwatch_tree(path)
            elif path not in self._wds:
                self._add_tree(path, emit_found=False)
        if self.ctx.filters.wants(path) or self.ctx.filters.wants(old):
            self.submit(self.file_event(Action.FILE_RENAME, None, path, original_path=old))

    def _expire_moves(self, before: float) -> None:
        for cookie, (path, isdir, seen) in list(self._moves.items()):
            if seen <= before:
                del self._moves[cookie]
                self.unpaired_moves += 1
                self._writing.discard(path)
                self._attrs.pop(path, None)
                if isdir:
                    self._unwatch_tree(path)  # its paths outside our trees are unknown
                self._emit(Action.FILE_DELETE, path)

    def _attrib(self, path: str) -> None:
        old = self._attrs.get(path)
        new = self._stat(path)
        if new is None or old == new:
            return  # gone, or only timestamps / link count changed
        if old is None or old[0] != new[0]:
            ev = self.file_event(Action.FILE_CHMOD, None, path, mode=new[0], uid=new[1], gid=new[2])
            self._previous(ev, old, mode=True)
            self._submit_wanted(ev, path)
        if old is not None and old[1:] != new[1:]:
            ev = self.file_event(Action.FILE_CHOWN, None, path, mode=new[0], uid=new[1], gid=new[2])
            self._previous(ev, old, mode=False)
            self._submit_wanted(ev, path)

    @staticmethod
    def _previous(ev: Event, old: Attrs | None, *, mode: bool) -> None:
        if old is None:
            ev["edr"]["previous_attributes"] = "unknown"  # file not in the cache
            return
        original: dict[str, Any] = ev["file"].setdefault("Ext", {}).setdefault("original", {})
        if mode:
            original["mode"] = f"{old[0] & 0o7777:o}"
        else:
            original["uid"], original["gid"] = str(old[1]), str(old[2])

    def _stat(self, path: str) -> Attrs | None:
        """lstat ``path`` and refresh the cache; ``None`` when it is gone."""
        try:
            st = os.lstat(path)
        except OSError:
            return None
        return self._remember(path, st)

    def _remember(self, path: str, st: os.stat_result) -> Attrs:
        attrs = _attrs(st)
        self._attrs[path] = attrs
        self._attrs.move_to_end(path)
        while len(self._attrs) > ATTR_CACHE_MAX:
            self._attrs.popitem(last=False)
        return attrs

    def _emit(self, action: Action, path: str, *, attrs: Attrs | None = None) -> None:
        if attrs is None:
            ev = self.file_event(action, None, path)
        else:
            ev = self.file_event(action, None, path, mode=attrs[0], uid=attrs[1], gid=attrs[2])
        self._submit_wanted(ev, path)

    def _submit_wanted(self, ev: Event, path: str) -> None:
        if self.ctx.filters.wants(path):
            self.submit(ev)

    def submit(self, ev: Event) -> None:
        self.ctx.emit(ev)
        self.submitted += 1


def _attrs(st: os.stat_result) -> Attrs:
    return st.st_mode, st.st_uid, st.st_gid

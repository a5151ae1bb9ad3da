"""SHA-256 of executables, cached by file identity so each binary is read once.

The cache key is (device, inode, size, mtime): a binary replaced in place gets a new mtime or
inode and is hashed again. A cache hit costs one ``stat()`` of the path (no open); a miss opens
the file and keys the digest by what ``fstat()`` says of the open file. Hashing happens in the
pipeline's writer thread, never in a capture thread, and files above a size bound are skipped
(reported as such, not hashed partially).
"""

from __future__ import annotations

import hashlib
import os
import stat
from collections import OrderedDict

HASH_MAX_BYTES = 128 * 1024 * 1024
CACHE_ENTRIES = 8192
_CHUNK = 1024 * 1024
_S_IFMT, _S_IFREG = 0o170000, stat.S_IFREG  # stat.S_ISREG without a call


class ExecutableHasher:
    def __init__(self, max_bytes: int = HASH_MAX_BYTES, entries: int = CACHE_ENTRIES) -> None:
        self.max_bytes = max_bytes
        self._entries = entries
        self._cache: OrderedDict[tuple[int, int, int, int], str] = OrderedDict()
        self.hits = 0
        self.misses = 0
        self.skipped = 0

    def sha256(self, path: str) -> str | None:
        """Hash of the regular file at ``path``; None when it is gone, not regular or too big.

        The caller picks the path: the pipeline tries the executable's path, then the
        process's /proc/<pid>/exe (sensor/pipeline.py, ``_enrich``).
        """
        try:
            return self._hash(path)
        except OSError:
            return None

    def _hash(self, path: str) -> str | None:
        # A cache hit costs one stat(): the identity key comes from the path, no open().
        st = os.stat(path)
        if st.st_mode & _S_IFMT != _S_IFREG:
            return None
        key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
        cached = self._cache.get(key)
        if cached is not None:
            self._cache.move_to_end(key)
            self.hits += 1
            return cached
        # O_NONBLOCK: a path swapped for a FIFO after the exec must not hang the writer.
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
        try:
            # the key of what was opened, which may not be what was stat'ed a moment ago
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                return None
            key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
            if st.st_size > self.max_bytes:
                self.skipped += 1
                return None
            self.misses += 1
            h = hashlib.sha256()
            while chunk := os.read(fd, _CHUNK):
                h.update(chunk)
        finally:
            os.close(fd)
        digest = h.hexdigest()
        self._cache[key] = digest
        if len(self._cache) > self._entries:
            self._cache.popitem(last=False)
        return digest

    def counters(self) -> dict[str, int]:
        return {"hash_hits": self.hits, "hash_misses": self.misses, "hash_skipped": self.skipped}

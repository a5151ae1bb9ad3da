"""A BPF ring buffer read straight from its memory mapping, without a per-record callback.

BCC's reader calls back into Python once per record through ctypes (two Python frames and
argument conversion each time): at an exec storm's 10,000 records a second that was the
largest fixed cost of the capture path. The ring's layout is a stable kernel ABI
(kernel/bpf/ringbuf.c, the same one libbpf's ``ring_buffer__consume`` reads):

- page 0, mapped read-write: the consumer position (u64), which only the reader writes;
- page 1, read-only: the producer position (u64);
- then the data area, mapped twice in a row so a record that wraps is contiguous.

Each record starts with an 8-byte header: a u32 length with two flag bits (BUSY: still being
written; DISCARD: skipped by its writer) and a u32 page offset; records are 8-byte aligned.
The reader copies every committed record between the two positions, then publishes the new
consumer position so the kernel can reuse the space. The first BUSY record ends a pass:
records after it may be complete, but the consumer position cannot move past it.

Waiting is ``epoll`` on the map's fd: readable when the kernel has sent a wake-up (the
programs force one every few dozen events) or, with the timeout, on a timer.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import select
import struct
from collections.abc import Callable

try:  # the same loop in C (sensor/_hotpath.c), when built
    from sensor._hotpath import consume as _compiled_consume
except ImportError:
    _compiled_consume = None

BUSY_BIT = 1 << 31
DISCARD_BIT = 1 << 30
HEADER_SIZE = 8
_POS = struct.Struct("<Q")
_LEN = struct.Struct("<I")


class RingBufferError(OSError):
    """The ring could not be mapped or polled."""


class RingReader:
    """Consumer side of one BPF_MAP_TYPE_RINGBUF map, given its fd and data size."""

    def __init__(self, map_fd: int, data_size: int) -> None:
        if data_size <= 0 or data_size & (data_size - 1):
            raise ValueError(f"ring buffer size {data_size} is not a power of two")
        page = mmap.PAGESIZE
        self.size = data_size
        self._mask = data_size - 1
        self._data_off = page  # data starts one page into the read-only mapping
        try:
            self._consumer = mmap.mmap(
                map_fd, page, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE, offset=0
            )
            self._producer = mmap.mmap(
                map_fd, page + 2 * data_size, mmap.MAP_SHARED, mmap.PROT_READ, offset=page
            )
        except OSError as exc:
            raise RingBufferError(exc.errno, f"cannot map the ring buffer: {exc.strerror}") from exc
        self._fd = map_fd
        self._epoll: select.epoll | None = None  # made on the first wait
        self._compiled: Callable[..., int] | None = (
            _compiled_consume if os.environ.get("EDR_HOTPATH", "1") != "0" else None
        )

    def wait(self, timeout_s: float) -> None:
        """Block until the kernel wakes the reader or ``timeout_s`` passes."""
        if self._epoll is None:
            self._epoll = select.epoll()
            self._epoll.register(self._fd, select.EPOLLIN)
        self._epoll.poll(timeout_s)  # retried by Python on EINTR (PEP 475)

    def consume(self, out: list[bytes]) -> int:
        """Append a copy of every committed record to ``out``; returns how many."""
        if self._compiled is not None:
            return self._compiled(self._consumer, self._producer, self._data_off, self._mask, out)
        return self._consume(out)

    def _consume(self, out: list[bytes]) -> int:
        cons = _POS.unpack_from(self._consumer, 0)[0]
        prod = _POS.unpack_from(self._producer, 0)[0]
        if cons == prod:
            return 0
        before = len(out)
        data, mask, base = self._producer, self._mask, self._data_off
        unpack_len = _LEN.unpack_from
        append = out.append
        start = cons
        error: ValueError | None = None
        while cons < prod:
            off = base + (cons & mask)
            length = unpack_len(data, off)[0]
            if length & BUSY_BIT:
                break
            size = length & ~(BUSY_BIT | DISCARD_BIT)
            if off + HEADER_SIZE + size > len(data):
                error = ValueError(f"ring record of {size} bytes runs past the mapping")
                break
            if not length & DISCARD_BIT:
                append(data[off + HEADER_SIZE : off + HEADER_SIZE + size])
            cons += (size + HEADER_SIZE + 7) & ~7
        if cons != start:
            # the records are copied out: the kernel may reuse their space
            _POS.pack_into(self._consumer, 0, cons)
        if error is not None:
            raise error
        return len(out) - before

    def close(self) -> None:
        for resource in (self._epoll, self._consumer, self._producer):
            if resource is None:
                continue
            with contextlib.suppress(OSError, ValueError, BufferError):
                resource.close()

"""The ring-buffer reader against the kernel's layout, laid out by hand in a memfd (no root).

The real ring (a BPF map) is read by every tracepoint-tier test; these cover what a live
kernel rarely shows on demand: records still being written, discarded records, records
that end exactly at the producer, and the consumer position the reader publishes.
"""

from __future__ import annotations

import mmap
import os
import struct

import pytest

from sensor import ringbuf
from sensor.ringbuf import BUSY_BIT, DISCARD_BIT, RingReader

PAGE = mmap.PAGESIZE
SIZE = 4 * PAGE


@pytest.fixture(params=["compiled", "python"])
def ring(request):
    """Every test runs against both loops: C (sensor/_hotpath.c) and Python."""
    if request.param == "compiled":  # scripts/setup.sh builds it: missing is a failure
        assert ringbuf._compiled_consume is not None, "sensor/_hotpath is not built"
    fd = os.memfd_create("edr-ring-test")
    os.ftruncate(fd, PAGE + PAGE + 2 * SIZE)
    reader = RingReader(fd, SIZE)
    if request.param == "python":
        reader._compiled = None
    view = mmap.mmap(fd, PAGE + PAGE + 2 * SIZE)  # the kernel's side: writes anything
    state = {"prod": 0}

    def put(payload: bytes, flags: int = 0) -> None:
        pos = state["prod"]
        off = 2 * PAGE + pos
        struct.pack_into("<II", view, off, len(payload) | flags, 0)
        view[off + 8 : off + 8 + len(payload)] = payload
        state["prod"] = pos + ((len(payload) + 8 + 7) & ~7)
        struct.pack_into("<Q", view, PAGE, state["prod"])

    def consumer() -> int:
        return struct.unpack_from("<Q", view, 0)[0]

    def caught_up() -> bool:
        return consumer() == state["prod"]

    def set_len(pos: int, value: int) -> None:
        struct.pack_into("<I", view, 2 * PAGE + pos, value)

    yield reader, put, consumer, set_len, caught_up
    reader.close()
    view.close()
    os.close(fd)


def test_committed_records_are_copied_in_order_and_released(ring) -> None:
    reader, put, consumer, _, caught_up = ring
    put(b"first")
    put(b"second record, 8-byte aligned after")
    out: list[bytes] = []
    assert reader.consume(out) == 2
    assert out == [b"first", b"second record, 8-byte aligned after"]
    assert consumer() == 8 + 8 + 8 + 40  # both records with headers and padding
    assert caught_up()
    assert reader.consume(out) == 0


def test_discarded_records_are_skipped_but_released(ring) -> None:
    reader, put, _, _, caught_up = ring
    put(b"dropped by its writer", DISCARD_BIT)
    put(b"kept")
    out: list[bytes] = []
    assert reader.consume(out) == 1 and out == [b"kept"]
    assert caught_up()


def test_a_record_being_written_stops_the_pass_until_committed(ring) -> None:
    reader, put, consumer, set_len, caught_up = ring
    put(b"done")
    busy_at = 16
    put(b"in flight", BUSY_BIT)
    put(b"after it")
    out: list[bytes] = []
    assert reader.consume(out) == 1 and out == [b"done"]
    assert consumer() == busy_at  # the pass stopped at the busy record
    set_len(busy_at, len(b"in flight"))  # the writer commits
    assert reader.consume(out) == 2
    assert out == [b"done", b"in flight", b"after it"]
    assert caught_up()


def test_a_record_claiming_more_than_the_mapping_is_an_error(ring) -> None:
    reader, put, _, set_len, _ = ring
    put(b"x")
    set_len(0, 3 * SIZE)  # a corrupt length: past the end of the mapped data
    with pytest.raises(ValueError, match="runs past the mapping"):
        reader.consume([])


def test_sizes_that_are_not_a_power_of_two_are_refused() -> None:
    with pytest.raises(ValueError, match="power of two"):
        RingReader(-1, 3 * PAGE)


def test_an_fd_that_cannot_be_mapped_is_a_clear_error() -> None:
    r, w = os.pipe()
    try:
        with pytest.raises(OSError, match="cannot map the ring buffer"):
            RingReader(r, SIZE)
    finally:
        os.close(r)
        os.close(w)

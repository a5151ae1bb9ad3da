"""The compiled record path (sensor/_hotpath.c) against the Python one, on the same records.

Both paths get identical record sequences, each with its own process table; the events must
be byte-for-byte the same JSON (key order included), the error counters the same, and the
tables must end in the same state. Records come from the packing helpers of test_decode and
from hypothesis, which also makes malformed ones (short, out of bounds, non-UTF-8, absurd
clocks). No root and no BPF: pids are far above pid_max, so /proc never answers for them.
"""

from __future__ import annotations

import dataclasses
import io
import os
import struct
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from backplane.schema import Family
from sensor import ebpf
from sensor.capture import CaptureContext
from sensor.ebpf import EventType, FileOp, TracepointSource
from sensor.pipeline import EventPipeline, NdjsonSink
from sensor.process_table import ProcessTable
from tests.bpf.test_decode import (
    HDR,
    PARENT,
    PID,
    exec_record,
    file_record,
    fork_record,
    make_source,
)


def test_the_compiled_path_is_built() -> None:
    """scripts/setup.sh builds it. Not a skip: without it every test here would pass by
    testing Python against itself, or be skipped, while the sensor uses the C path."""
    assert ebpf._hotpath is not None, "sensor/_hotpath is not built: run scripts/setup.sh"


class Pair:
    """Three sources over three tables: the C path, the Python path, and the C path handing
    over encoded lines (ctx.lines, as for `edr-sensor run --output` with no exec policy).

    Each side's new events go through its own real EventPipeline (hashing with the real
    hasher, which also sets process.hash on later events) into an NDJSON sink after every
    feed; the three outputs must be the same bytes."""

    def __init__(self, *, emit_forks: bool = True, families: frozenset[Family] = frozenset(Family)):
        self.sides = [make_source(families, emit_forks=emit_forks) for _ in range(3)]
        self.sides[1][0]._hot = None  # the Python path
        self.sides[2][0].ctx.lines = lambda: True
        assert self.sides[0][0].compiled and not self.sides[1][0].compiled
        self.streams = [io.TextIOWrapper(io.BytesIO(), encoding="utf-8") for _ in self.sides]
        self.pipelines = [
            EventPipeline(NdjsonSink(stream), src.ctx.table)
            for stream, (src, _) in zip(self.streams, self.sides, strict=True)
        ]
        assert all(p.takes_lines() for p in self.pipelines)
        self.written = [0] * len(self.sides)

    def feed(self, records: list[bytes], *, batched: bool = True) -> None:
        for src, _ in self.sides:
            if batched:
                src._batch = list(records)
                src.process_batch()
            else:
                for raw in records:
                    src.handle_record(raw)
        for i, ((_, events), pipeline) in enumerate(zip(self.sides, self.pipelines, strict=True)):
            batch = events[self.written[i] :]
            self.written[i] = len(events)
            pipeline._count_and_enrich(batch)
            pipeline._sink.write(batch)

    def lines(self, side: int) -> list[bytes]:
        return self.streams[side].buffer.getvalue().splitlines(keepends=True)

    def encoded(self) -> int:
        """How many events the lines side handed over encoded."""
        return sum(sum(e[2].values()) for e in self.sides[2][1] if type(e) is tuple)

    def check(self) -> list[dict]:
        (c_src, c_events), (py_src, py_events), (line_src, _) = self.sides
        encode = NdjsonSink(io.StringIO()).encode  # orjson, or the fallback for surrogates
        assert [encode(e) for e in c_events] == [encode(e) for e in py_events]
        assert self.lines(2) == self.lines(0) == self.lines(1)
        counts = [p.by_action for p in self.pipelines]
        assert counts[2] == counts[0] == counts[1]
        for src in (py_src, line_src):
            for name in ("received", "decode_errors", "handler_errors"):
                assert getattr(c_src, name) == getattr(src, name), name
            # the C side answers fresh realpath hits itself and counts them in the same place
            assert (c_src._realpath.hits, c_src._realpath.misses) == (
                src._realpath.hits,
                src._realpath.misses,
            )
            c_table, table = c_src.ctx.table, src.ctx.table
            assert set(c_table._live) == set(table._live)
            assert list(c_table._exited) == list(table._exited)  # the same order too
            for pid in set(c_table._live) | set(c_table._exited):
                assert _state(c_table.get(pid)) == _state(table.get(pid)), pid
        return c_events


def _state(info) -> dict:
    names = [f.name for f in dataclasses.fields(info) if f.name not in ("ecs_cache", "ecs_line")]
    return {name: getattr(info, name) for name in names}


def exit_record(pid: int, code: int = 0, signal: int = 0, flags: int = 1, ktime=5_000_000_000):
    hdr = HDR.pack(EventType.EXIT, pid, pid, 1000, 1000, 0, ktime, b"prog")
    return hdr + struct.pack("<iiII", code, signal, flags, 0)


def test_a_spawn_gives_the_same_events_and_table() -> None:
    pair = Pair()
    args = b"/bin/true\0--marker\0two words\0"
    pair.feed(
        [
            fork_record(PARENT, PID),
            exec_record(PID, b"/bin/true", args, 3, loginuid=1000, flags=ebpf.EXEC_HAVE_LOGINUID),
            exit_record(PID, code=3),
        ]
    )
    pair.feed([exec_record(PID, b"/bin/true", args, 3)])  # a realpath cache hit
    events = pair.check()
    assert pair.sides[0][0]._realpath.hits == 1
    assert [e["event"]["action"] for e in events] == ["fork", "exec", "exit", "exec"]
    assert events[1]["process"]["args"] == ["/bin/true", "--marker", "two words"]
    assert events[1]["user"]["audit"] == {"id": "1000"}
    assert events[2]["process"]["exit_code"] == 3


def test_encoded_lines_carry_the_hash_and_fall_back_per_process() -> None:
    """The lines side hands process events over encoded, one chunk per batch: an exec cut
    where the writer's digest goes, an exit and a fork finished with the digest the writer
    found for the image, and a dict, after the lines before it, for a process whose fragment
    orjson refuses (a lone surrogate)."""
    import hashlib

    digest = hashlib.sha256(Path("/bin/true").read_bytes()).hexdigest()
    pair = Pair()
    pair.feed([fork_record(PARENT, PID), exec_record(PID, b"/bin/true", b"true\0", 1)])
    line_src, line_events = pair.sides[2]
    [(lines, cuts, counts)] = line_events
    assert counts == {"fork": 1, "exec": 1} and lines.count(b"\n") == 2
    offset, path, pid = cuts  # the exec's cut: the end of its process fields
    assert (path, pid) == (os.path.realpath("/bin/true"), PID)
    assert lines[offset:].startswith(b'},"user"')
    assert line_src.ctx.table.get(PID).sha256 == digest  # the writer set it
    pair.feed([fork_record(PID, PID + 1), exit_record(PID, code=7)])
    assert line_events[-1][1] == []  # no exec: nothing to cut
    for src, _ in pair.sides:  # as /proc gives it: a byte that is not UTF-8, escaped
        src.ctx.table.get(PID + 1).args = ["sh", "\udcff"]
    pair.feed([fork_record(PID + 1, PID + 2), exec_record(PID + 2, b"/bin/true", b"t\0", 1)])
    events = pair.check()
    # the child's fork and exec events carry that parent's argv: dicts
    assert pair.encoded() == 4 and [type(e) for e in line_events[-2:]] == [dict, dict]
    lines = pair.lines(2)
    assert b'"sh \\udcff"' in lines[-1]  # NdjsonSink's fallback encoder wrote it
    hash_field = f'"hash":{{"sha256":"{digest}"}}'.encode()
    assert [hash_field in line for line in lines] == [False, True, True, True, True, True]
    assert events[3]["process"]["exit_code"] == 7 and hash_field + b',"exit_code":7}' in lines[3]
    assert line_src.ctx.table.get(PID).ecs_line is None  # dropped with the exit line


def test_lines_keep_their_order_around_python_handled_records() -> None:
    """A record the Python handlers take (a file operation) goes after the lines before it and
    before the lines after it: the chunk is handed over first."""
    pair = Pair()
    pair.feed(
        [
            fork_record(PARENT, PID),
            exec_record(PID, b"/bin/true", b"true\0", 1),
            file_record(PID, FileOp.UNLINK, b"/tmp/edr-hot-z", ktime_ns=5_100_000_000),
            exit_record(PID),
        ]
    )
    pair.check()
    kinds = [type(e) for e in pair.sides[2][1]]
    assert kinds == [tuple, dict, tuple]


def test_the_parent_context_and_cache_invalidation_match() -> None:
    pair = Pair(emit_forks=False)
    child = PID + 1
    pair.feed(
        [
            fork_record(PARENT, PID),
            exec_record(PID, b"/usr/bin/bash", b"bash\0-c\0x\0", 3),
            fork_record(PID, child, ticks=99),
            exit_record(child, signal=9, flags=ebpf.EXIT_HAVE_SIGNAL),  # no exec: bash's image
            exec_record(PID, b"/usr/bin/env", b"env\0", 1),  # the parent execs: key changes
            fork_record(PID, child + 1),
            exec_record(child + 1, b"/usr/bin/id", b"id\0", 1),
            exit_record(child + 1),
            exit_record(PID),
        ]
    )
    events = pair.check()
    killed = events[1]
    assert killed["process"]["exit_code"] == -9 and killed["edr"]["exit_signal"] == 9
    assert events[-2]["process"]["parent"]["command_line"] == "env"


def test_shared_parent_and_user_dicts_follow_their_state(monkeypatch) -> None:
    """The C path shares one parent dict per parent state, one user dict per (uid, name,
    login uid) and one group dict per gid between processes; each event must still show its
    own process's state when that state changes between siblings."""
    from sensor import process_table

    monkeypatch.setitem(process_table._user_names, 1000, "alice")
    pair = Pair(emit_forks=False)
    LOGIN = ebpf.EXEC_HAVE_LOGINUID
    kids = [PID + 1, PID + 2, PID + 3, PID + 4]
    records = [
        fork_record(PARENT, PID),
        exec_record(PID, b"/usr/bin/bash", b"bash\0", 1),
        fork_record(PID, kids[0]),
        exec_record(kids[0], b"/bin/true", b"true\0", 1, loginuid=1000, flags=LOGIN),
        fork_record(PID, kids[1]),
        # another login session, same uid
        exec_record(kids[1], b"/bin/true", b"true\0", 1, loginuid=1001, flags=LOGIN),
    ]
    pair.feed(records)
    monkeypatch.setitem(process_table._user_names, 1000, "alice2")  # renamed
    pair.feed(
        [
            fork_record(PID, kids[2]),
            exec_record(kids[2], b"/bin/true", b"true\0", 1, loginuid=1000, flags=LOGIN),
            exec_record(PID, b"/usr/bin/env", b"env\0-i\0", 2),  # the parent changes
            fork_record(PID, kids[3]),
            exec_record(kids[3], b"/bin/true", b"true\0", 1, loginuid=1000, flags=LOGIN),
        ]
    )
    events = [e for e in pair.check() if e["process"]["pid"] in kids]
    assert [e["user"]["audit"]["id"] for e in events] == ["1000", "1001", "1000", "1000"]
    assert [e["user"]["name"] for e in events] == ["alice", "alice", "alice2", "alice2"]
    parents = [e["process"]["parent"]["command_line"] for e in events]
    assert parents == ["bash", "bash", "bash", "env -i"]


def test_one_by_one_and_batched_agree() -> None:
    records = [fork_record(PARENT, PID), exec_record(PID, b"/bin/true", b"true\0", 1)]
    pair = Pair()
    pair.feed(records, batched=False)
    pair.check()


def test_other_record_types_stay_in_order_with_process_records() -> None:
    """A file record between fork and exec is handled by Python, with the table as it is."""
    pair = Pair()
    pair.feed(
        [
            fork_record(PARENT, PID),
            file_record(PID, FileOp.UNLINK, b"/tmp/edr-hot-x", ktime_ns=5_100_000_000),
            exec_record(PID, b"/bin/true", b"true\0", 1),
            file_record(PID, FileOp.UNLINK, b"/tmp/edr-hot-y", ktime_ns=5_200_000_000),
            exit_record(PID),
        ]
    )
    events = pair.check()
    assert [e["event"]["action"] for e in events] == ["fork", "delete", "exec", "delete", "exit"]
    assert events[3]["process"]["name"] == "true"


def test_exec_of_a_thread_and_relative_and_unnormalised_paths() -> None:
    pair = Pair()
    thread_exec = exec_record(PID, b"/usr//bin/../bin/env", b"env\0", 1)
    thread_exec = thread_exec[:48] + struct.pack("<I", PID + 7) + thread_exec[52:]  # old_pid
    pair.feed([fork_record(PARENT, PID), thread_exec, exec_record(PID, b"./run", b"./run\0", 1)])
    for src, _ in pair.sides:
        src.ctx.table.chdir(PID, "/opt/tools")
    pair.feed([exec_record(PID, b"./run", b"./run\0", 1), exec_record(PID, b"", b"", 0)])
    events = pair.check()
    assert events[1]["process"]["thread"] == {"id": PID + 7}
    assert events[3]["process"]["executable"] == "/opt/tools/run"


def test_malformed_records_count_the_same() -> None:
    good = exec_record(PID, b"/bin/true", b"true\0", 1)
    pair = Pair()
    pair.feed(
        [
            b"",  # no type tag
            b"\x02\x00",
            struct.pack("<I", 99) + bytes(60),  # unknown type
            fork_record(PARENT, PID)[:60],  # short fork
            good[:100],  # short exec
            good[:56] + struct.pack("<I", 129) + good[60:],  # too many args
            good[:60] + struct.pack("<I", 5000) + good[64:],  # args beyond the bound
            good[:60] + struct.pack("<I", 50) + good[64:],  # args claimed, not there
            exit_record(PID)[:50],  # short exit
            exit_record(PID, ktime=2**64 - 1),  # a clock beyond datetime
            fork_record(PARENT, PID + 1, ticks=2**64 - 1),  # start beyond datetime
            exec_record(PID + 1, b"/bin/\xff\xfe", b"\xff\0ok\0", 2),  # not UTF-8
        ]
    )
    pair.check()
    src = pair.sides[0][0]
    assert src.decode_errors == 9 and src.handler_errors == 2


def test_argv_blocks_split_the_same() -> None:
    """EXEC_ARGS_BLOCK: the kernel copied the new image's argv without counting it."""
    block = ebpf.EXEC_ARGS_BLOCK
    many = b"".join(b"a%d\0" % i for i in range(ebpf.ARGS_MAX_COUNT + 20))
    pair = Pair()
    pair.feed(
        [
            exec_record(PID, b"/bin/true", many, 0, flags=block),  # more than the bound
            exec_record(PID + 1, b"/bin/true", b"", 0, flags=block),  # an empty argv
            exec_record(PID + 2, b"/bin/true", b"true\0\0cut", 0, flags=block | 1),
            exec_record(PID + 3, b"/bin/true", b"x\0", 0, flags=block | ebpf.EXEC_NO_ARGS),
        ]
    )
    events = pair.check()
    first = events[0]["process"]
    assert first["args"] == [f"a{i}" for i in range(ebpf.ARGS_MAX_COUNT)]
    assert first["args_truncated"] is True
    assert events[1]["process"].get("args", []) == []  # an empty argv is left out
    assert events[2]["process"]["args"] == ["true", "", "cut"]
    assert events[2]["process"]["args_truncated"] is True


def test_a_broken_emit_is_a_handler_error_on_both() -> None:
    pair = Pair()

    def broken(ev: dict) -> None:
        raise RuntimeError("downstream failed")

    for src, _ in pair.sides:
        src.ctx.emit = broken
    pair.feed([exit_record(PID)], batched=False)
    pair.check()
    assert pair.sides[0][0].handler_errors == 1


def test_keyboard_interrupt_is_not_swallowed() -> None:
    pair = Pair()
    src = pair.sides[0][0]

    def interrupted(ev: dict) -> None:
        raise KeyboardInterrupt

    src.ctx.emit = interrupted
    with pytest.raises(KeyboardInterrupt):
        src.handle_record(exit_record(PID))


def test_exited_processes_are_bounded_the_same(monkeypatch) -> None:
    pair = Pair(emit_forks=False)
    records = []
    for i in range(40):
        records += [fork_record(PARENT, PID + i), exit_record(PID + i)]
    from sensor import process_table

    monkeypatch.setattr(process_table, "EXITED_KEPT", 16)
    for src, _ in pair.sides:  # the C side reads the bound when it is made
        if src.compiled:
            src._hot = src._compiled_path()
    pair.feed(records)
    pair.check()
    assert len(pair.sides[0][0].ctx.table._exited) == 16


def test_the_python_path_is_used_when_asked(monkeypatch) -> None:
    ctx = CaptureContext(host={}, table=ProcessTable("h"), emit=lambda e: None)
    assert TracepointSource(ctx, frozenset({Family.PROCESS})).compiled
    monkeypatch.setenv("EDR_HOTPATH", "0")
    assert not TracepointSource(ctx, frozenset({Family.PROCESS})).compiled


def test_a_process_info_the_c_side_does_not_know_falls_back(monkeypatch) -> None:
    @dataclasses.dataclass(slots=True)
    class Other:
        pid: int

    monkeypatch.setattr(ebpf, "ProcessInfo", Other)
    src = TracepointSource(
        CaptureContext(host={}, table=ProcessTable("h"), emit=lambda e: None),
        frozenset({Family.PROCESS}),
    )
    assert not src.compiled


def test_timestamps_format_as_the_python_ones() -> None:
    import random

    from backplane.schema import iso_timestamp

    rng = random.Random(7)
    base = 1_700_000_000 * 10**9
    values = [0, 1, 10**9, base, base - 1, 2**64, 253402300799 * 10**9 + 999_999_999]
    values += [rng.randrange(0, 4_000_000_000 * 10**9) for _ in range(2000)]
    values += [base + i * 499_999_999 for i in range(300)]
    for ns in values:
        assert ebpf._hotpath.iso_timestamp(ns) == iso_timestamp(ns), ns
    for ns in (253402300800 * 10**9, 10**30, 2**200):  # beyond year 9999: an error, as datetime
        with pytest.raises((ValueError, OverflowError)):
            ebpf._hotpath.iso_timestamp(ns)


# -- random record streams --------------------------------------------------------------------

_pids = st.integers(min_value=PID, max_value=PID + 5)
_ticks = st.one_of(st.integers(0, 10**7), st.integers(10**11, 10**16), st.just(2**64 - 1))
_ktime = st.one_of(st.integers(0, 10**15), st.just(2**64 - 1))
_text = st.binary(max_size=40)


@st.composite
def _record(draw) -> bytes:
    kind = draw(st.sampled_from(["fork", "exec", "exit", "junk"]))
    if kind == "fork":
        raw = fork_record(
            draw(_pids), draw(_pids), draw(_ticks), draw(st.sampled_from([0, 0, 0, 1]))
        )
    elif kind == "exec":
        parts = draw(st.lists(_text, max_size=5))
        args = b"\0".join(parts) + draw(st.sampled_from([b"\0", b""]))
        filename = draw(st.sampled_from([b"/bin/true", b"/usr//bin/env", b"rel/x", b""]))
        raw = exec_record(
            draw(_pids),
            filename + draw(st.binary(max_size=4)),
            args,
            draw(st.integers(0, 8)),
            flags=draw(st.integers(0, 15)),  # 8: an uncounted argv block
            cgroup_id=draw(st.sampled_from([0, 5])),
            loginuid=draw(st.sampled_from([0, 1000, 0xFFFFFFFF])),
        )
        hdr = HDR.pack(EventType.EXEC, *struct.unpack_from("<I", raw, 4), 0, 0, 0, 0, 0, b"")
        raw = (
            hdr[:4]
            + raw[4:24]
            + struct.pack("<Q", draw(_ktime))
            + draw(
                st.sampled_from([b"prog".ljust(16, b"\0"), b"\xff\xfe".ljust(16, b"\0"), bytes(16)])
            )
            + raw[48:]
        )
    elif kind == "exit":
        raw = exit_record(
            draw(_pids),
            draw(st.integers(-(2**31), 2**31 - 1)),
            draw(st.integers(-(2**31), 2**31 - 1)),
            draw(st.integers(0, 3)),
            draw(_ktime),
        )
    else:
        raw = draw(st.binary(max_size=80))
    if draw(st.integers(0, 9)) == 0:
        raw = raw[: draw(st.integers(0, len(raw)))]
    return raw


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(_record(), max_size=25), st.booleans())
def test_random_record_streams_agree(records: list[bytes], emit_forks: bool) -> None:
    pair = Pair(emit_forks=emit_forks, families=frozenset({Family.PROCESS}))
    pair.feed(records)
    pair.check()

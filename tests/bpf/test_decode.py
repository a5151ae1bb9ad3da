"""Decoding of raw ring-buffer records, built with struct.pack (no root, no BPF)."""

from __future__ import annotations

import os
import re
import struct
from pathlib import Path

import pytest

from backplane.schema import Family, Tier
from sensor import ebpf
from sensor.capture import CaptureContext
from sensor.ebpf import EventType, FileOp, TracepointSource
from sensor.process_table import UNKNOWN, ProcessTable

HDR = ebpf.HEADER.struct
BOOT_EPOCH = 1_700_000_000 * 10**9


def header(
    kind: int, pid: int, *, uid: int = 1000, gid: int = 1000, comm: bytes = b"prog"
) -> bytes:
    return HDR.pack(kind, pid, pid, uid, gid, 0, 5_000_000_000, comm)


def exec_record(
    pid: int,
    filename: bytes,
    args: bytes,
    count: int,
    flags: int = 0,
    cgroup_id: int = 0,
    loginuid: int = 0xFFFFFFFF,
) -> bytes:
    fixed = struct.pack(
        "<IIIIQII256s", pid, flags, count, len(args), cgroup_id, loginuid, 0, filename
    )
    return header(EventType.EXEC, pid) + fixed + args


def fork_record(parent: int, child: int, ticks: int = 1234, flags: int = 0) -> bytes:
    return header(EventType.FORK, parent) + struct.pack("<IIQII", parent, child, ticks, flags, 0)


def file_record(
    pid: int,
    op: FileOp,
    path: bytes,
    *,
    flags: int = 0,
    dfd: int = -100,
    fd: int = -1,
    mode: int = 0,
    owner: tuple[int, int] = (0xFFFFFFFF, 0xFFFFFFFF),
    ret: int = 0,
    path2: bytes = b"",
    dfd2: int = -100,
    emit: int = ebpf.FILE_REPORT,
    ktime_ns: int = 5_000_000_000,
) -> bytes:
    body = struct.pack(
        "<IIiiiIIIIIq256s256s",
        op,
        flags,
        dfd,
        dfd2,
        fd,
        mode,
        owner[0],
        owner[1],
        emit,
        0,
        ret,
        path,
        path2,
    )
    return HDR.pack(EventType.FILE, pid, pid, 1000, 1000, 0, ktime_ns, b"prog") + body


def write_record(pid: int, fd: int, open_id: int, ktime_ns: int = 6_000_000_000) -> bytes:
    hdr = HDR.pack(EventType.FILE_WRITE, pid, pid, 1000, 1000, 0, ktime_ns, b"prog")
    return hdr + struct.pack("<iIQ", fd, 0, open_id)


def net_record(
    kind: EventType,
    pid: int,
    family: int,
    proto: int,
    local: tuple[bytes, int],
    remote: tuple[bytes, int],
    flags: int = 3,
    ret: int = 0,
) -> bytes:
    body = struct.pack(
        "<HHHH16s16siI", family, proto, local[1], remote[1], local[0], remote[0], ret, flags
    )
    return header(kind, pid) + body


def make_source(
    families: frozenset[Family] = frozenset(Family), *, emit_forks: bool = True
) -> tuple[TracepointSource, list[dict]]:
    """A source over a fresh table with a fixed boot epoch, and the list its events go to."""
    events: list[dict] = []
    table = ProcessTable("test-host", boot_ns_to_epoch_ns=BOOT_EPOCH)
    ctx = CaptureContext(
        host={"id": "test-host"},
        table=table,
        emit=events.append,
        ignored_pids={os.getpid()},
        emit_forks=emit_forks,
    )
    return TracepointSource(ctx, families), events


@pytest.fixture
def source() -> tuple[TracepointSource, list[dict]]:
    return make_source()


# pids far above pid_max so /proc never answers for them
PID, PARENT = 4_000_001, 4_000_000


def test_mirror_sizes_match_the_header_constants() -> None:
    assert ebpf.HEADER.size == 48
    assert ebpf.EXEC.size == 48 + 32 + 256 + 2 * 4096
    assert ebpf.FILE.size == 48 + 48 + 512
    assert ebpf.WRITE.size == 48 + 16
    assert ebpf.NET.size == 48 + 8 + 32 + 8


def test_event_type_enum_mirrors_events_h() -> None:
    text = (ebpf.BPF_DIR / "events.h").read_text()
    c_types = {m[0]: int(m[1]) for m in re.findall(r"EDR_EV_([A-Z_]+) = (\d+)", text)}
    assert c_types.pop("MAX") == ebpf.EVENT_TYPE_MAX
    assert c_types == {t.name: t.value for t in EventType}
    c_ops = {m[0]: int(m[1]) for m in re.findall(r"EDR_FILE_([A-Z]+) = (\d+)", text)}
    assert c_ops == {o.name: o.value for o in FileOp}


def test_fork_then_exec_then_exit(source) -> None:
    src, events = source
    src.handle_record(fork_record(PARENT, PID))
    args = b"/bin/true\0--marker\0two words\0"
    src.handle_record(exec_record(PID, b"/bin/true", args, 3))
    src.handle_record(header(EventType.EXIT, PID) + struct.pack("<iiII", 3, 0, 1, 0))
    assert [e["event"]["action"] for e in events] == ["fork", "exec", "exit"]
    fork, ex, exit_ = events
    assert fork["process"]["pid"] == PID and fork["process"]["parent"]["pid"] == PARENT
    assert ex["process"]["args"] == ["/bin/true", "--marker", "two words"]
    assert ex["process"]["executable"] == os.path.realpath("/bin/true")
    assert ex["process"]["entity_id"] == fork["process"]["entity_id"]
    assert ex["user"]["id"] == "1000"
    assert ex["@timestamp"].startswith("2023-11-14T22:13:25.000000")  # boot epoch + 5 s
    assert exit_["process"]["exit_code"] == 3
    assert src.decode_errors == 0


def test_truncated_argv_keeps_the_cut_string(source) -> None:
    src, events = source
    args = b"a" * 4000 + b"\0" + b"b" * 95  # cut at the 4096-byte bound, no final NUL
    src.handle_record(exec_record(PID, b"/usr/bin/x", args, 2, flags=ebpf.EXEC_ARGS_TRUNCATED))
    proc = events[0]["process"]
    assert proc["args"] == ["a" * 4000, "b" * 95]
    assert proc["args_truncated"] is True


def test_exec_without_stashed_args_reads_nothing_wrong(source) -> None:
    src, events = source
    src.handle_record(exec_record(PID, b"/usr/bin/x", b"", 0, flags=ebpf.EXEC_NO_ARGS))
    assert events[0]["process"]["executable"] == "/usr/bin/x"
    assert "args" not in events[0]["process"]  # the pid has no /proc entry to read


def test_relative_exec_resolves_against_cwd(source) -> None:
    src, events = source
    src.ctx.table.fork(PARENT, PID, 1)
    src.ctx.table.chdir(PID, "/opt/tools")
    src.handle_record(exec_record(PID, b"./run", b"./run\0", 1))
    assert events[0]["process"]["executable"] == "/opt/tools/run"


def test_killed_process_reports_the_signal(source) -> None:
    src, events = source
    src.handle_record(header(EventType.EXIT, PID) + struct.pack("<iiII", 0, 9, 2, 0))
    assert events[0]["process"]["exit_code"] == -9
    assert events[0]["edr"]["exit_signal"] == 9


def test_chdir_updates_cwd_for_relative_file_paths(source) -> None:
    src, events = source
    src.ctx.table.fork(PARENT, PID, 1)
    src.ctx.table.chdir(PID, "/srv")
    src.handle_record(header(EventType.CHDIR, PID) + struct.pack("<iI256s", -1, 0, b"data/../www"))
    assert src.ctx.table.get(PID).cwd == "/srv/www"
    src.handle_record(file_record(PID, FileOp.OPEN, b"index.html", flags=0o1101, mode=0o644))
    ev = events[0]
    assert ev["event"]["action"] == "create"
    assert ev["file"]["path"] == "/srv/www/index.html"
    assert ev["file"]["directory"] == "/srv/www"


@pytest.mark.parametrize(
    ("op", "flags", "action"),
    [
        (FileOp.OPEN, 0o1, "open"),  # reported only when sensitive; the write comes later
        (FileOp.OPEN, 0o1000, "write"),  # truncation is a write at open
        (FileOp.OPEN, 0o101, "create"),
        (FileOp.OPEN, 0o0, "open"),
        (FileOp.UNLINK, 0, "delete"),
        (FileOp.RMDIR, 0, "delete"),
    ],
)
def test_file_actions(source, op, flags, action) -> None:
    src, events = source
    src.handle_record(file_record(PID, op, b"/etc/thing", flags=flags))
    assert events[0]["event"]["action"] == action
    assert events[0]["event"]["outcome"] == "success"


def test_rename_chmod_chown_and_denied(source) -> None:
    src, events = source
    src.handle_record(file_record(PID, FileOp.RENAME, b"/tmp/a", path2=b"/tmp/b"))
    src.handle_record(file_record(PID, FileOp.CHMOD, b"/tmp/b", mode=0o104755))
    src.handle_record(file_record(PID, FileOp.CHOWN, b"/tmp/b", owner=(12, 0xFFFFFFFF)))
    src.handle_record(file_record(PID, FileOp.UNLINK, b"/etc/shadow", ret=-13))
    ren, chm, cho, den = events
    assert ren["file"]["path"] == "/tmp/b"
    assert ren["file"]["Ext"]["original"]["path"] == "/tmp/a"
    assert chm["file"]["mode"] == "4755"
    assert cho["file"]["uid"] == "12" and "gid" not in cho["file"]
    assert den["event"]["outcome"] == "failure" and den["edr"]["errno"] == 13


def test_unresolvable_dirfd_path_is_flagged(source) -> None:
    src, events = source
    src.handle_record(file_record(PID, FileOp.UNLINK, b"x.txt", dfd=7))
    assert events[0]["file"]["path"] == "x.txt"
    assert events[0]["edr"]["path_unresolved"] is True


def test_user_space_filters_apply_after_resolution(source) -> None:
    src, events = source
    src.ctx.table.fork(PARENT, PID, 1)
    src.ctx.table.chdir(PID, "/proc/self")
    src.handle_record(file_record(PID, FileOp.OPEN, b"comm", flags=1))
    src.handle_record(file_record(os.getpid(), FileOp.OPEN, b"/tmp/own", flags=1))
    assert events == []
    assert src.filtered == 1


WATCH = ebpf.FILE_WATCH
REPORT_WATCH = ebpf.FILE_REPORT | ebpf.FILE_WATCH
O_WRONLY_CREAT_TRUNC = 0o1101


def test_decode_write_record() -> None:
    r = ebpf.decode_write(write_record(PID, 7, 123_456))
    assert (r.h.type, r.h.pid, r.fd, r.open_id) == (EventType.FILE_WRITE, PID, 7, 123_456)
    assert r.h.ktime_ns == 6_000_000_000 and r.h.comm == "prog"
    with pytest.raises(ebpf.DecodeError):
        ebpf.decode_write(write_record(PID, 7, 1)[:-1])


def test_decode_file_record_emit_bits() -> None:
    r = ebpf.decode_file(file_record(PID, FileOp.OPEN, b"/tmp/f", flags=1, emit=WATCH, ret=3))
    assert r.emit == WATCH and r.ret == 3 and r.path == "/tmp/f"


def test_create_then_first_write(source) -> None:
    src, events = source
    src.handle_record(
        file_record(
            PID, FileOp.OPEN, b"/tmp/new", flags=O_WRONLY_CREAT_TRUNC, emit=REPORT_WATCH, ret=3
        )
    )
    src.handle_record(write_record(PID, 3, open_id=5_000_000_000))
    assert [(e["event"]["action"], e["file"]["path"]) for e in events] == [
        ("create", "/tmp/new"),
        ("write", "/tmp/new"),
    ]
    w = events[1]
    assert w["process"]["pid"] == PID
    assert w["@timestamp"] != events[0]["@timestamp"]  # the write's own time
    assert src.counters()["watched_writes"] == 0


def test_watch_only_open_emits_nothing_until_written(source) -> None:
    src, events = source
    src.handle_record(file_record(PID, FileOp.OPEN, b"/tmp/old", flags=0o2, emit=WATCH, ret=4))
    assert events == []
    src.handle_record(write_record(PID, 4, open_id=5_000_000_000))
    src.handle_record(write_record(PID, 4, open_id=5_000_000_000))  # a dup2'd copy, say
    assert [e["event"]["action"] for e in events] == ["write"]
    assert src.stale_writes == 1


def test_write_for_unknown_or_other_process_open_is_dropped(source) -> None:
    src, events = source
    src.handle_record(file_record(PID, FileOp.OPEN, b"/tmp/a", flags=1, emit=WATCH, ret=3))
    src.handle_record(write_record(PID + 1, 3, open_id=5_000_000_000))
    src.handle_record(write_record(PID, 3, open_id=1))
    assert events == [] and src.stale_writes == 2


def test_exit_and_cloexec_exec_forget_watched_opens(source) -> None:
    src, events = source
    cloexec = 0o2000000
    src.handle_record(
        file_record(PID, FileOp.OPEN, b"/tmp/c", flags=1 | cloexec, emit=WATCH, ktime_ns=1)
    )
    src.handle_record(file_record(PID, FileOp.OPEN, b"/tmp/k", flags=1, emit=WATCH, ktime_ns=2))
    src.handle_record(exec_record(PID, b"/bin/true", b"true\0", 1))
    src.handle_record(write_record(PID, 3, open_id=1))  # closed by exec: stale
    assert src.stale_writes == 1
    src.handle_record(header(EventType.EXIT, PID) + struct.pack("<iiII", 0, 0, 1, 0))
    src.handle_record(write_record(PID, 4, open_id=2))  # pid gone: stale
    assert src.stale_writes == 2
    assert not [e for e in events if e["event"]["action"] == "write"]
    assert src.counters()["watched_writes"] == 0


def test_watched_opens_are_bounded(source, monkeypatch) -> None:
    src, _events = source
    monkeypatch.setattr(ebpf, "WRITE_WATCH_ENTRIES", 3)
    for i in range(5):
        src.handle_record(
            file_record(PID, FileOp.OPEN, b"/tmp/b", flags=1, emit=WATCH, ktime_ns=i + 1)
        )
    assert list(src._writes) == [(PID, 3), (PID, 4), (PID, 5)]
    assert src._writes_by_pid == {PID: {3, 4, 5}}


def test_filtered_watch_is_not_remembered(source) -> None:
    src, events = source
    src.handle_record(file_record(PID, FileOp.OPEN, b"/proc/self/comm", flags=1, emit=WATCH))
    src.handle_record(write_record(PID, 3, open_id=5_000_000_000))
    assert events == [] and src.stale_writes == 1


def test_tcp_connect_ipv4(source) -> None:
    src, events = source
    rec = net_record(
        EventType.CONNECT,
        PID,
        2,
        6,
        (bytes([127, 0, 0, 1]) + bytes(12), 40000),
        (bytes([10, 1, 2, 3]) + bytes(12), 443),
    )
    src.handle_record(rec)
    ev = events[0]
    assert ev["event"]["action"] == "connect"
    assert ev["network"] == {"transport": "tcp", "type": "ipv4", "direction": "egress"}
    assert ev["source"] == {"ip": "127.0.0.1", "port": 40000}
    assert ev["destination"] == {"ip": "10.1.2.3", "port": 443}


def test_accept_ipv6_and_v4_mapped(source) -> None:
    src, events = source
    loop6 = bytes(15) + b"\x01"
    mapped = bytes(10) + b"\xff\xff" + bytes([192, 0, 2, 7])
    src.handle_record(net_record(EventType.ACCEPT, PID, 10, 6, (loop6, 8080), (loop6, 51000)))
    src.handle_record(net_record(EventType.ACCEPT, PID, 10, 6, (mapped, 8080), (mapped, 5)))
    v6, v4 = events
    assert v6["source"] == {"ip": "::1", "port": 51000}
    assert v6["destination"] == {"ip": "::1", "port": 8080}
    assert v6["network"]["type"] == "ipv6" and v6["network"]["direction"] == "ingress"
    assert v4["source"]["ip"] == "192.0.2.7" and v4["network"]["type"] == "ipv4"


def test_udp_connect_and_listen(source) -> None:
    src, events = source
    dst = bytes([8, 8, 8, 8]) + bytes(12)
    src.handle_record(
        net_record(
            EventType.CONNECT, PID, 2, 17, (bytes(16), 0), (dst, 53), flags=ebpf.NET_HAVE_PEER
        )
    )
    src.handle_record(
        net_record(
            EventType.LISTEN, PID, 2, 6, (bytes(16), 22), (bytes(16), 0), flags=ebpf.NET_HAVE_LOCAL
        )
    )
    udp, listen = events
    assert udp["network"]["transport"] == "udp" and "source" not in udp
    assert udp["destination"] == {"ip": "8.8.8.8", "port": 53}
    assert listen["event"]["action"] == "listen"
    assert listen["destination"] == {"ip": "0.0.0.0", "port": 22}


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"\x01\x00",
        struct.pack("<I", 99) + bytes(100),
        header(EventType.FORK, PID),  # body missing
        exec_record(PID, b"/x", b"abc\0", 1)[:-2],  # shorter than args_size says
        header(EventType.EXEC, PID) + struct.pack("<IIIIQ256s", PID, 0, 1, 9999, 0, b"/x"),
        file_record(PID, 42, b"/tmp/x"),  # type: ignore[arg-type]
        net_record(EventType.CONNECT, PID, 1, 6, (bytes(16), 1), (bytes(16), 2)),
        net_record(EventType.CONNECT, PID, 2, 99, (bytes(16), 1), (bytes(16), 2)),
    ],
)
def test_bad_records_are_counted_not_fatal(source, raw) -> None:
    src, events = source
    src.handle_record(raw)
    assert events == []
    assert src.decode_errors == 1
    # the source keeps working after a bad record
    src.handle_record(header(EventType.EXIT, PID) + struct.pack("<iiII", 0, 0, 1, 0))
    assert len(events) == 1


def test_handler_errors_are_counted(source) -> None:
    src, _events = source

    def broken_emit(ev: dict) -> None:
        raise RuntimeError("downstream failed")

    src.ctx.emit = broken_emit
    src.handle_record(header(EventType.EXIT, PID) + struct.pack("<iiII", 0, 0, 1, 0))
    assert src.handler_errors == 1


def test_duplicate_handler_is_refused() -> None:
    with pytest.raises(RuntimeError, match="two handlers for EXIT"):
        ebpf.handles(EventType.EXIT)(lambda src, raw: None)


def test_every_event_type_has_a_handler() -> None:
    assert all(ebpf.handler_for(t) is not None for t in EventType)


def test_source_text_inlines_families_and_names_them_in_cflags() -> None:
    text, cflags = ebpf.bpf_source_text({Family.FILE, Family.NETWORK}, Tier.TRACEPOINT)
    assert '#line 1 "file.bpf.c"' in text and '#line 1 "network.bpf.c"' in text
    assert "-DEDR_FILE=1" in cflags and "-DEDR_NETWORK=1" in cflags
    assert "-DEDR_PROCESS=1" not in cflags and "-DEDR_KPROBES=1" not in cflags
    assert f"-I{ebpf.BPF_DIR}" in cflags
    assert not re.search(r'^#include "\w+\.bpf\.c"', text, re.MULTILINE)
    _, kcflags = ebpf.bpf_source_text({Family.PROCESS}, Tier.KPROBE)
    assert "-DEDR_KPROBES=1" in kcflags


def test_source_text_refuses_bad_requests() -> None:
    with pytest.raises(ValueError, match="no BPF programs"):
        ebpf.bpf_source_text({Family.PROCESS}, Tier.FALLBACK)
    with pytest.raises(ValueError, match="non-empty"):
        ebpf.bpf_source_text(set(), Tier.TRACEPOINT)


def test_every_bpf_file_opens_with_a_header_comment() -> None:
    for path in Path(ebpf.BPF_DIR).glob("*.bpf.c"):
        assert path.read_text().startswith(f"/* {path.name}:"), path


def test_bad_prefix_is_refused() -> None:
    class Trie:
        Key = Leaf = None

    with pytest.raises(ebpf.TierUnavailable, match="absolute"):
        TracepointSource._fill_prefixes(Trie(), ["relative/"])


def test_head_words_set_exactly_the_bits_of_the_heads() -> None:
    """file.bpf.c reads bit ``h & 63`` of word ``h >> 6`` (u64 words of a 65,536-bit map)."""
    heads = ebpf.prefix_heads(["/etc/shadow", "/root/.ssh/", "/x"])
    words = ebpf.head_words(heads)
    assert all(0 <= i < 1024 and 0 < w < 1 << 64 for i, w in words.items())
    decoded = {i << 6 | b for i, w in words.items() for b in range(64) if w >> b & 1}
    assert decoded == heads
    etc = ord("e") << 8 | ord("t")
    assert words[etc >> 6] >> (etc & 63) & 1
    full = ebpf.head_words(ebpf.prefix_heads(["/"]))
    assert len(full) == 1024 and set(full.values()) == {(1 << 64) - 1}
    assert ebpf.head_words(set()) == {}


def test_prefix_heads_admit_every_path_a_prefix_can_match() -> None:
    """The kernel's pre-filter index (bytes 1 and 2 of a path) must never rule out a match."""
    heads = ebpf.prefix_heads(["/etc/shadow", "/root/.ssh/"])
    assert heads == {ord("e") << 8 | ord("t"), ord("r") << 8 | ord("o")}
    two = ebpf.prefix_heads(["/x"])
    assert len(two) == 256 and all(h >> 8 == ord("x") for h in two)
    assert ebpf.prefix_heads(["/"]) == set(range(1 << 16))
    assert ebpf.prefix_heads([]) == set()
    for prefix in ("/etc/shadow", "/x", "/"):
        for path in (prefix, prefix + "/more", prefix + "x"):
            data = path.encode() + b"\0\0"
            assert data[1] << 8 | data[2] in ebpf.prefix_heads([prefix]) or len(path) < 2


def test_fork_events_are_tracked_but_not_emitted_by_default() -> None:
    events: list[dict] = []
    table = ProcessTable("test-host", boot_ns_to_epoch_ns=BOOT_EPOCH)
    ctx = CaptureContext(host={"id": "test-host"}, table=table, emit=events.append)
    assert ctx.emit_forks is False
    src = TracepointSource(ctx, frozenset(Family))
    src.handle_record(fork_record(PARENT, PID))
    assert events == []
    assert table.get(PID) is not None and table.get(PID).ppid == PARENT  # still tracked
    src.handle_record(exec_record(PID, b"/bin/true", b"true\0", 1))
    (ex,) = events
    assert ex["event"]["action"] == "exec" and ex["process"]["parent"]["pid"] == PARENT
    assert ex["process"]["entity_id"] == table.entity_id(PID, 1234)


def test_exec_record_carries_the_cgroup_id() -> None:
    r = ebpf.decode_exec(exec_record(PID, b"/bin/true", b"true\0", 1, cgroup_id=0x1234_5678_9A))
    assert r.cgroup_id == 0x1234_5678_9A
    assert r.filename == "/bin/true" and r.args == ["true"]
    assert ebpf.EXEC.offsets()["cgroup_id"] == 64 and ebpf.EXEC.offsets()["filename"] == 80


def test_a_ring_batch_is_handed_over_as_one_batch() -> None:
    batches: list[list[dict]] = []
    singles: list[dict] = []
    table = ProcessTable("test-host", boot_ns_to_epoch_ns=BOOT_EPOCH)
    ctx = CaptureContext(
        host={"id": "test-host"}, table=table, emit=singles.append, emit_many=batches.append
    )
    src = TracepointSource(ctx, frozenset(Family))
    src._batch = [
        exec_record(PID, b"/bin/true", b"true\0", 1),
        header(EventType.EXIT, PID) + struct.pack("<iiII", 0, 0, 1, 0),
        b"\x01",  # undecodable: counted, the batch still goes out
    ]
    assert src.process_batch() == 3
    assert singles == [] and len(batches) == 1
    assert [e["event"]["action"] for e in batches[0]] == ["exec", "exit"]
    assert src.decode_errors == 1
    assert src.process_batch() == 0 and len(batches) == 1  # nothing new, no empty batch


def test_realpath_cache_expires_so_a_swapped_symlink_is_noticed(tmp_path: Path) -> None:
    (tmp_path / "a").write_text("a")
    (tmp_path / "b").write_text("b")
    link = tmp_path / "tool"
    link.symlink_to(tmp_path / "a")
    now = [100.0]
    cache = ebpf.RealpathCache(ttl=2.0, entries=4, clock=lambda: now[0])
    assert cache(str(link)) == str(tmp_path / "a")
    link.unlink()
    link.symlink_to(tmp_path / "b")
    assert cache(str(link)) == str(tmp_path / "a")  # within the TTL: the cached target
    assert (cache.hits, cache.misses) == (1, 1)
    now[0] += 2.5
    assert cache(str(link)) == str(tmp_path / "b")  # noticed once the entry expired
    for i in range(10):  # bounded
        cache(str(tmp_path / f"missing{i}"))
    assert len(cache._cache) <= 4


def test_exec_record_login_uid_only_with_its_flag() -> None:
    have = ebpf.EXEC_HAVE_LOGINUID
    read = ebpf.decode_exec(exec_record(PID, b"/x", b"", 0, flags=have, loginuid=1000))
    assert read.loginuid == 1000
    assert ebpf.decode_exec(exec_record(PID, b"/x", b"", 0, flags=have)).loginuid is None
    # no flag: the kernel could not read it, whatever the bytes say
    assert ebpf.decode_exec(exec_record(PID, b"/x", b"", 0, loginuid=5)).loginuid is UNKNOWN


def test_kernel_login_uid_reaches_the_event_without_proc(source, monkeypatch) -> None:
    src, events = source
    reads: list[int] = []
    monkeypatch.setattr(ebpf.procfs, "loginuid", lambda pid: reads.append(pid) or 1)
    src.ctx.table.fork(PARENT, PID, 1)
    src.handle_record(
        exec_record(PID, b"/bin/true", b"true\0", 1, flags=ebpf.EXEC_HAVE_LOGINUID, loginuid=1000)
    )
    assert events[-1]["user"]["audit"] == {"id": "1000"}
    # unset in the kernel: no audit id, and still no /proc read
    src.ctx.table.fork(PARENT, PID + 1, 1)
    src.handle_record(
        exec_record(PID + 1, b"/bin/true", b"true\0", 1, flags=ebpf.EXEC_HAVE_LOGINUID)
    )
    assert "audit" not in events[-1]["user"]
    assert reads == []


def test_cgroup_move_and_clone_into_cgroup_refresh_the_container(source, monkeypatch) -> None:
    src, events = source
    container = "ab" * 32
    listing = {PID: f"0::/system.slice/docker-{container}.scope\n"}
    monkeypatch.setattr(ebpf.procfs, "cgroups", lambda pid: listing.get(pid))
    src.ctx.table.fork(PARENT, PID, 1)
    src.handle_record(exec_record(PID, b"/bin/sh", b"sh\0", 1))
    assert "container" not in events[-1]  # inherited: the parent was in none
    path = f"/system.slice/docker-{container}.scope".encode()
    src.handle_record(header(EventType.CGROUP, 1) + struct.pack("<Ii256s", PID, 0, path))
    src.handle_record(exec_record(PID, b"/bin/true", b"true\0", 1))
    assert events[-1]["container"] == {"id": container}
    # clone3(CLONE_INTO_CGROUP): the child is read once at fork, then inherits as usual
    listing[PID + 1] = listing.pop(PID)
    src.handle_record(fork_record(PARENT, PID + 1, flags=ebpf.FORK_INTO_CGROUP))
    src.handle_record(exec_record(PID + 1, b"/bin/true", b"true\0", 1))
    assert events[-1]["container"] == {"id": container}
    # a record for a process the table does not know, or one already gone: nothing happens
    src.handle_record(header(EventType.CGROUP, 1) + struct.pack("<Ii256s", 4_100_000, 0, path))
    assert src.decode_errors == 0 and src.handler_errors == 0


def test_truncated_cgroup_record_is_counted(source) -> None:
    src, _ = source
    src.handle_record(header(EventType.CGROUP, 1) + b"\0" * 8)
    assert src.decode_errors == 1

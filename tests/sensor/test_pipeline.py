"""The pipeline: hashing off the capture path, back-pressure instead of loss, NDJSON out."""

from __future__ import annotations

import copy
import hashlib
import io
import json
import os
import threading
import time
from pathlib import Path

from backplane.schema import Action, Tier, new_event
from sensor.hashing import ExecutableHasher
from sensor.pipeline import EventPipeline, NdjsonSink
from sensor.process_table import ProcessTable


def exec_event(path: str, pid: int = 4242) -> dict:
    ev = new_event(Action.EXEC, host={"id": "h"}, tier=Tier.FALLBACK)
    ev["process"] = {"pid": pid, "executable": path}
    return ev


def test_hasher_caches_by_identity_and_rehashes_on_change(tmp_path: Path) -> None:
    binary = tmp_path / "tool"
    binary.write_bytes(b"version 1")
    hasher = ExecutableHasher()
    assert hasher.sha256(str(binary)) == hashlib.sha256(b"version 1").hexdigest()
    assert hasher.sha256(str(binary)) == hashlib.sha256(b"version 1").hexdigest()
    assert (hasher.hits, hasher.misses) == (1, 1)
    binary.write_bytes(b"version 2!")
    assert hasher.sha256(str(binary)) == hashlib.sha256(b"version 2!").hexdigest()
    assert hasher.misses == 2


def test_hasher_skips_large_files_and_fifos(tmp_path: Path) -> None:
    big = tmp_path / "big"
    big.write_bytes(b"x" * 2048)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    hasher = ExecutableHasher(max_bytes=1024)
    assert hasher.sha256(str(big)) is None
    assert hasher.skipped == 1
    assert hasher.sha256(str(fifo)) is None  # must not block
    assert hasher.sha256(str(tmp_path / "missing")) is None


def test_exec_events_get_the_hash_and_the_table_keeps_it(tmp_path: Path) -> None:
    binary = tmp_path / "tool"
    binary.write_bytes(b"payload")
    out = io.StringIO()
    table = ProcessTable("h")
    info = table.lookup(4242)
    info.executable = str(binary)
    pipeline = EventPipeline(NdjsonSink(out), table)
    pipeline.start()
    pipeline.emit(exec_event(str(binary)))
    pipeline.close()
    (line,) = out.getvalue().splitlines()
    assert json.loads(line)["process"]["hash"]["sha256"] == hashlib.sha256(b"payload").hexdigest()
    assert info.sha256 == hashlib.sha256(b"payload").hexdigest()
    assert pipeline.counters()["events"] == {"exec": 1}


def test_a_batch_hashes_each_path_once_and_falls_back_per_process(tmp_path: Path) -> None:
    binary = tmp_path / "tool"
    binary.write_bytes(b"payload")
    out = io.StringIO()
    hasher = ExecutableHasher()
    pipeline = EventPipeline(NdjsonSink(out), ProcessTable("h"), hasher=hasher)
    gone = str(tmp_path / "deleted-after-exec")
    pipeline.emit_many(
        [
            exec_event(str(binary), pid=4_000_001),
            exec_event(str(binary), pid=4_000_002),
            exec_event(gone, pid=os.getpid()),  # falls back to /proc/<pid>/exe
            exec_event(gone, pid=4_000_003),  # no such process: no hash
        ]
    )
    pipeline.start()
    pipeline.close()
    events = [json.loads(line) for line in out.getvalue().splitlines()]
    hashes = [ev["process"].get("hash", {}).get("sha256") for ev in events]
    with open(f"/proc/{os.getpid()}/exe", "rb") as exe:
        own = hashlib.sha256(exe.read()).hexdigest()
    assert hashes == [hashlib.sha256(b"payload").hexdigest()] * 2 + [own, None]
    assert hasher.misses == 2 and hasher.hits == 0  # the second exec of the tool: memoised


class SlowSink:
    def __init__(self) -> None:
        self.events: list[dict] = []
        self.release = threading.Event()

    def write(self, events: list[dict]) -> None:
        self.release.wait(10)
        self.events.extend(events)

    def close(self) -> None:
        pass


def test_full_queue_blocks_the_producer_and_loses_nothing() -> None:
    sink = SlowSink()
    pipeline = EventPipeline(sink, ProcessTable("h"), maxsize=10, batch=4)
    pipeline.start()
    done = threading.Event()

    def produce() -> None:
        for i in range(100):
            ev = new_event(Action.FILE_WRITE, host={"id": "h"}, tier=Tier.FALLBACK)
            ev["seq"] = i
            pipeline.emit(ev)
        done.set()

    producer = threading.Thread(target=produce)
    producer.start()
    time.sleep(0.3)
    assert not done.is_set()  # held back by the full queue, not dropping
    assert pipeline.blocked >= 1
    sink.release.set()
    producer.join(10)
    pipeline.close()
    assert [ev["seq"] for ev in sink.events] == list(range(100))


def test_broken_output_is_reported_not_swallowed() -> None:
    stream = io.StringIO()
    stream.close()
    pipeline = EventPipeline(NdjsonSink(stream), ProcessTable("h"))
    pipeline.start()
    pipeline.emit(new_event(Action.FILE_WRITE, host={"id": "h"}, tier=Tier.FALLBACK))
    deadline = time.monotonic() + 5
    while pipeline.failed is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert pipeline.failed is not None and "output failed" in pipeline.failed


def test_full_queue_blocks_batches_too_and_loses_nothing() -> None:
    sink = SlowSink()
    pipeline = EventPipeline(sink, ProcessTable("h"), maxsize=3, batch=4)
    pipeline.start()
    done = threading.Event()

    def produce() -> None:
        for start in range(0, 100, 10):
            batch = []
            for i in range(start, start + 10):
                ev = new_event(Action.FILE_WRITE, host={"id": "h"}, tier=Tier.FALLBACK)
                ev["seq"] = i
                batch.append(ev)
            pipeline.emit_many(batch)
        done.set()

    producer = threading.Thread(target=produce)
    producer.start()
    time.sleep(0.3)
    assert not done.is_set()  # the bound counts batches: held back, not dropping
    assert pipeline.blocked >= 1
    sink.release.set()
    producer.join(10)
    pipeline.close()
    assert [ev["seq"] for ev in sink.events] == list(range(100))
    assert pipeline.counters()["events"] == {"write": 100}


def test_capture_context_finds_the_pipelines_emit_many() -> None:
    from sensor.capture import CaptureContext

    pipeline = EventPipeline(SlowSink(), ProcessTable("h"))
    ctx = CaptureContext(host={"id": "h"}, table=ProcessTable("h"), emit=pipeline.emit)
    assert ctx.emit_many == pipeline.emit_many
    assert not ctx.emit_forks
    seen: list[dict] = []
    plain = CaptureContext(host={"id": "h"}, table=ProcessTable("h"), emit=seen.append)
    assert plain.emit_many is None
    plain.emit_batch([{"a": 1}, {"b": 2}])
    assert seen == [{"a": 1}, {"b": 2}]


def test_ndjson_falls_back_per_event_for_lone_surrogates() -> None:
    odd_arg = b"\xff\xfeabc".decode("utf-8", "surrogateescape")  # not UTF-8 argv bytes
    good = exec_event("/usr/bin/caf\u00e9")
    bad = exec_event("/usr/bin/x")
    bad["process"]["args"] = ["x", odd_arg]
    out = io.StringIO()
    sink = NdjsonSink(out)
    sink.write([good, bad, good])
    lines = out.getvalue().splitlines()
    assert len(lines) == 3 and sink.fallbacks == 1
    assert [json.loads(line) for line in lines] == [good, bad, good]  # exact strings back
    assert json.loads(lines[1])["process"]["args"][1] == odd_arg
    assert "caf\u00e9" in lines[0]  # UTF-8, not escaped, on the fast path


def test_ndjson_writes_bytes_to_a_binary_backed_stream(tmp_path: Path) -> None:
    path = tmp_path / "out.ndjson"
    with open(path, "w", encoding="utf-8") as stream:
        stream.write("")
        sink = NdjsonSink(stream)
        sink.write([exec_event("/bin/a"), exec_event("/bin/b")])
    lines = path.read_text(encoding="utf-8").splitlines()
    assert [json.loads(line)["process"]["executable"] for line in lines] == ["/bin/a", "/bin/b"]


def test_ndjson_matches_the_stdlib_encoding() -> None:
    ev = exec_event("/bin/true")
    ev["process"]["args"] = ["a b", 'quote"', "tab\t", "\u2603"]
    ev["n"] = [1, 2.5, None, True, -7]
    out = io.StringIO()
    NdjsonSink(out).write([ev])
    expected = json.dumps(ev, separators=(",", ":"), ensure_ascii=False) + "\n"
    assert json.loads(out.getvalue()) == json.loads(expected)


def test_iso_timestamp_matches_datetime_formatting() -> None:
    import random
    from datetime import UTC, datetime

    from backplane.schema import iso_timestamp

    def reference(ns: int) -> str:
        dt = datetime.fromtimestamp(ns // 1_000_000_000, tz=UTC)
        return dt.strftime("%Y-%m-%dT%H:%M:%S") + f".{(ns // 1000) % 1_000_000:06d}Z"

    rng = random.Random(1234)
    base = 1_700_000_000 * 10**9
    values = [0, 1, 999_999_999, 10**9, base, base - 1, base + 999_999_999]
    values += [rng.randrange(0, 4_000_000_000 * 10**9) for _ in range(3000)]
    values += [base + rng.randrange(0, 5 * 10**9) for _ in range(3000)]  # same few seconds
    values += [base + i * 499_999_999 for i in range(600)]  # seconds boundaries, in order
    for ns in values:
        assert iso_timestamp(ns) == reference(ns), ns
    now = iso_timestamp()
    assert now.endswith("Z") and len(now) == len("2023-11-14T22:13:20.000000Z")


def test_hasher_cache_hit_does_not_open_and_notices_a_replaced_file(
    tmp_path: Path, monkeypatch
) -> None:
    binary = tmp_path / "tool"
    binary.write_bytes(b"one")
    hasher = ExecutableHasher()
    assert hasher.sha256(str(binary)) == hashlib.sha256(b"one").hexdigest()
    opened: list[str] = []
    real_open = os.open

    def counting_open(path, *args, **kwargs):
        opened.append(path)
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", counting_open)
    assert hasher.sha256(str(binary)) == hashlib.sha256(b"one").hexdigest()
    assert opened == [] and hasher.hits == 1
    # replaced by rename (new inode), same size and mtime: still noticed
    st = binary.stat()
    fresh = tmp_path / "tool.new"
    fresh.write_bytes(b"two")
    os.utime(fresh, ns=(st.st_atime_ns, st.st_mtime_ns))
    os.replace(fresh, binary)
    assert hasher.sha256(str(binary)) == hashlib.sha256(b"two").hexdigest()
    assert hasher.misses == 2


class _Inspector:
    """Acts on exec events only: a report per exec, and a record of what it was shown."""

    actions = frozenset({Action.EXEC})

    def __init__(self) -> None:
        self.seen: list[str] = []

    def inspect(self, event: dict) -> list[dict]:
        self.seen.append(event["event"]["action"])
        report = new_event(Action.HOLD, host={"id": "h"}, tier=Tier.FALLBACK)
        report["process"] = {"pid": event["process"]["pid"], "hash": event["process"].get("hash")}
        return [report]


def test_the_policy_sees_only_its_actions_after_hashing_and_its_reports_follow(
    tmp_path: Path,
) -> None:
    binary = tmp_path / "tool"
    binary.write_bytes(b"payload")
    out = io.StringIO()
    inspector = _Inspector()
    pipeline = EventPipeline(NdjsonSink(out), ProcessTable("h"), inspector=inspector)
    pipeline.start()
    exit_event = new_event(Action.EXIT, host={"id": "h"}, tier=Tier.FALLBACK)
    exit_event["process"] = {"pid": 7}
    pipeline.emit_many([exec_event(str(binary), pid=7), exit_event])
    pipeline.close()
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [e["event"]["action"] for e in lines] == ["exec", "exit", "hold"]
    assert inspector.seen == ["exec"]  # the exit never reached it
    digest = hashlib.sha256(b"payload").hexdigest()
    assert lines[2]["process"] == {"pid": 7, "hash": {"sha256": digest}}
    assert pipeline.by_action == {"exec": 1, "exit": 1}  # reports are not counted as captured


def _encoded(events: list[dict]) -> tuple:
    """Events as the compiled path hands them over (sensor/_hotpath.c, emit_line): their
    lines in one chunk, each exec cut where process.hash goes. Here process is each event's
    last key, so an exec's cut is before its line's final "}}"."""
    lines, cuts, counts = b"", [], {}
    for event in events:
        line = NdjsonSink(io.StringIO()).encode(event)
        action = event["event"]["action"]
        counts[action] = counts.get(action, 0) + 1
        if action == "exec":
            cuts += (len(lines) + len(line) - 3, event["process"]["executable"])
            cuts.append(event["process"]["pid"])
        lines += line
    return lines, cuts, counts


def test_encoded_execs_are_counted_and_hashed_as_their_dicts(tmp_path: Path) -> None:
    binary = tmp_path / "tool"
    binary.write_bytes(b"payload")
    gone = str(tmp_path / "deleted-after-exec")
    exit_event = new_event(Action.EXIT, host={"id": "h"}, tier=Tier.FALLBACK)
    exit_event["process"] = {"pid": 7}
    template = [
        exec_event(str(binary), pid=4_000_001),
        exec_event(str(binary), pid=4_000_002),
        exec_event(gone, pid=os.getpid()),  # falls back to /proc/<pid>/exe
        exec_event(gone, pid=4_000_003),  # no such process: no hash
    ]
    outputs, counts = [], []
    for encoded in (False, True):
        execs = copy.deepcopy(template)  # the dict path adds the hash in place
        items: list = [*execs[:3], exit_event, execs[3], exit_event]
        if encoded:  # two chunks around a dict
            items = [_encoded(execs[:3]), exit_event, _encoded([execs[3], exit_event])]
        out = io.StringIO()
        table = ProcessTable("h")
        pipeline = EventPipeline(NdjsonSink(out), table)
        assert pipeline.takes_lines()
        pipeline.emit_many(items)
        pipeline.start()
        pipeline.close()
        outputs.append(out.getvalue())
        counts.append(dict(pipeline.by_action))
    assert outputs[0] == outputs[1]
    assert counts[0] == counts[1] == {"exec": 4, "exit": 2}
    hashes = [json.loads(line)["process"].get("hash") for line in outputs[1].splitlines()]
    assert [bool(h) for h in hashes] == [True, True, True, False, False, False]


def test_only_a_line_sink_without_a_process_policy_takes_encoded_events() -> None:
    from sensor.pipeline import TeeSink

    table = ProcessTable("h")
    assert EventPipeline(NdjsonSink(io.StringIO()), table).takes_lines()
    inspector = _Inspector()  # acts on execs
    pipeline = EventPipeline(NdjsonSink(io.StringIO()), table, inspector=inspector)
    assert not pipeline.takes_lines()
    inspector.actions = frozenset({Action.FILE_CREATE})  # a policy change: asked per batch
    assert pipeline.takes_lines()
    assert not EventPipeline(TeeSink([NdjsonSink(io.StringIO())]), table).takes_lines()
    assert not EventPipeline(SlowSink(), table).takes_lines()


def test_an_encoded_exec_the_policy_came_to_want_is_decoded_for_it(tmp_path: Path) -> None:
    """Capture asks once per batch; a policy that starts holding execs in between still sees
    each exec, decoded from its line with the hash the writer added."""
    binary = tmp_path / "tool"
    binary.write_bytes(b"payload")
    out = io.StringIO()
    inspector = _Inspector()
    pipeline = EventPipeline(NdjsonSink(out), ProcessTable("h"), inspector=inspector)
    pipeline.emit_many([_encoded([exec_event(str(binary), pid=7)])])
    pipeline.start()
    pipeline.close()
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [e["event"]["action"] for e in lines] == ["exec", "hold"]
    assert inspector.seen == ["exec"]
    digest = hashlib.sha256(b"payload").hexdigest()
    assert lines[1]["process"] == {"pid": 7, "hash": {"sha256": digest}}

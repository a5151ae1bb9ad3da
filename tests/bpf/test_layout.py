"""The Python mirrors against what BCC compiles (root): struct drift fails here."""

from __future__ import annotations

import ctypes

import pytest

from backplane.schema import Family, Tier
from sensor import ebpf

pytestmark = [pytest.mark.root, pytest.mark.bpf, pytest.mark.timeout(120)]

MAPS = {
    "layout_header": ebpf.HEADER,
    "layout_fork": ebpf.FORK,
    "layout_exec": ebpf.EXEC,
    "layout_exit": ebpf.EXIT,
    "layout_chdir": ebpf.CHDIR,
    "layout_file": ebpf.FILE,
    "layout_write": ebpf.WRITE,
    "layout_net": ebpf.NET,
    "layout_cgroup": ebpf.CGROUP,
}


@pytest.fixture(scope="module")
def compiled():
    reason = ebpf.TracepointSource.unavailable()
    if reason:
        pytest.skip(reason)
    from bcc import BPF

    text, cflags = ebpf.bpf_source_text(set(Family), Tier.TRACEPOINT)
    bpf = BPF(text=text.encode(), cflags=[*cflags, "-DEDR_LAYOUT_CHECK=1"])
    yield bpf
    bpf.cleanup()


@pytest.mark.parametrize("map_name", sorted(MAPS))
def test_mirror_matches_bcc(compiled, map_name: str) -> None:
    mirror = MAPS[map_name]
    leaf = compiled[map_name.encode()].Leaf
    assert ctypes.sizeof(leaf) == mirror.size, mirror.c_name
    c_fields = [name for name, *_ in leaf._fields_]
    assert c_fields == [name for name, _ in mirror.fields], mirror.c_name
    for name, offset in mirror.offsets().items():
        assert getattr(leaf, name).offset == offset, f"{mirror.c_name}.{name}"
    if "h" in c_fields:
        assert ctypes.sizeof(dict(leaf._fields_)["h"]) == ebpf.HEADER.size


def test_counter_struct(compiled) -> None:
    leaf = compiled[b"counters"].sLeaf  # per CPU: Leaf is an array of these
    assert [n for n, *_ in leaf._fields_] == ["submitted", "dropped"]
    assert ctypes.sizeof(leaf) == 16

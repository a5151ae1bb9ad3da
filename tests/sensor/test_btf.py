"""sensor/btf.py: member offsets from BTF blobs built here, and the running kernel's own."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from sensor import btf
from sensor.btf import Btf, BtfError, task_offsets


class Blob:
    """A little-endian BTF blob assembled type by type (ids from 1, as the kernel numbers)."""

    def __init__(self) -> None:
        self.types = b""
        self.strings = b"\0"
        self.count = 0

    def name(self, text: str) -> int:
        off = len(self.strings)
        self.strings += text.encode() + b"\0"
        return off

    def add(
        self,
        name: str,
        kind: int,
        vlen: int,
        size_or_type: int,
        extra: bytes = b"",
        kind_flag: bool = False,
    ) -> int:
        info = (int(kind_flag) << 31) | (kind << 24) | vlen
        self.types += struct.pack("<III", self.name(name) if name else 0, info, size_or_type)
        self.types += extra
        self.count += 1
        return self.count

    def int_(self, name: str, size: int) -> int:
        return self.add(name, btf.KIND_INT, 0, size, struct.pack("<I", size * 8))

    def struct_(
        self, name: str, size: int, members: list[tuple[str, int, int]], kind: int = btf.KIND_STRUCT
    ) -> int:
        extra = b"".join(
            struct.pack("<III", self.name(m) if m else 0, t, bits) for m, t, bits in members
        )
        return self.add(name, kind, len(members), size, extra)

    def bytes(self, magic: int = btf.BTF_MAGIC, version: int = 1) -> bytes:
        hdr = struct.pack(
            "<HBBIIIII",
            magic,
            version,
            0,
            24,
            0,
            len(self.types),
            len(self.types),
            len(self.strings),
        )
        return hdr + self.types + self.strings


def task_like() -> Blob:
    b = Blob()
    u32 = b.int_("unsigned int", 4)
    kuid = b.struct_("", 4, [("val", u32, 0)])
    kuid_t = b.add("kuid_t", btf.KIND_TYPEDEF, 0, kuid)
    anon = b.struct_("", 8, [("tgid", u32, 0), ("pid", u32, 32)], kind=btf.KIND_UNION)
    b.struct_(
        "task_struct",
        64,
        [
            ("state", u32, 0),
            ("", anon, 64),  # an anonymous union: its members count as the struct's own
            ("loginuid", kuid_t, 8 * 40),
            ("sessionid", u32, 8 * 44),
        ],
    )
    return b


def test_offsets_follow_typedefs_and_anonymous_members(tmp_path: Path) -> None:
    t = Btf(task_like().bytes())
    assert t.member("task_struct", "loginuid") == (40, 4)
    assert t.member("task_struct", "loginuid.val") == (40, 4)
    assert t.member("task_struct", "tgid") == (8, 4)
    path = tmp_path / "vmlinux"
    path.write_bytes(task_like().bytes())
    assert task_offsets(path) == {"EDR_TASK_LOGINUID_OFF": 40}


@pytest.mark.parametrize(
    ("blob", "message"),
    [
        (b"\x9f\xeb", "shorter than its header"),
        (task_like().bytes(magic=0x9FEB), "bad BTF magic"),
        (task_like().bytes(version=2), "version 2"),
        (task_like().bytes()[:-8], "run past the end"),
    ],
)
def test_malformed_blobs_are_refused(blob: bytes, message: str) -> None:
    with pytest.raises(BtfError, match=message):
        Btf(blob)


def test_unknown_kinds_and_missing_members_are_errors(tmp_path: Path) -> None:
    b = task_like()
    b.add("future", 31, 0, 0)
    with pytest.raises(BtfError, match="unknown BTF kind 31"):
        Btf(b.bytes())
    t = Btf(task_like().bytes())
    with pytest.raises(BtfError, match="no member audit"):
        t.member("task_struct", "audit")
    with pytest.raises(BtfError, match="no struct mm_struct"):
        t.member("mm_struct", "pgd")
    # without the members the programs need, the loader gets no offsets (user space reads
    # /proc instead), whether the file is missing, garbage or lacks CONFIG_AUDIT's fields
    assert task_offsets(tmp_path / "absent") == {}
    (tmp_path / "garbage").write_bytes(b"\0" * 100)
    assert task_offsets(tmp_path / "garbage") == {}
    no_audit = Blob()
    no_audit.struct_("task_struct", 8, [("state", no_audit.int_("int", 4), 0)])
    (tmp_path / "no-audit").write_bytes(no_audit.bytes())
    assert task_offsets(tmp_path / "no-audit") == {}


def test_each_offset_group_is_all_or_nothing(tmp_path: Path) -> None:
    """exit_code and the argv block (task_struct.mm, mm_struct.arg_start/arg_end) come as
    groups: a group with a member missing or of another size gives none of its constants."""

    def blob(arg_end_size: int, with_mm: bool = True) -> bytes:
        b = Blob()
        u32 = b.int_("unsigned int", 4)
        s32 = b.int_("int", 4)
        u64 = b.int_("long unsigned int", 8)
        odd = b.int_("short unsigned int", arg_end_size)
        mm = b.struct_("mm_struct", 64, [("arg_start", u64, 8 * 16), ("arg_end", odd, 8 * 24)])
        mm_ptr = b.add("", btf.KIND_PTR, 0, mm)
        members = [("state", u32, 0), ("exit_code", s32, 8 * 12), ("loginuid", u32, 8 * 40)]
        if with_mm:
            members.append(("mm", mm_ptr, 8 * 48))
        b.struct_("task_struct", 64, members)
        return b.bytes()

    whole = tmp_path / "whole"
    whole.write_bytes(blob(8))
    assert task_offsets(whole) == {
        "EDR_TASK_LOGINUID_OFF": 40,
        "EDR_TASK_EXIT_CODE_OFF": 12,
        "EDR_TASK_MM_OFF": 48,
        "EDR_MM_ARG_START_OFF": 16,
        "EDR_MM_ARG_END_OFF": 24,
    }
    for name, data in (("resized", blob(2)), ("no-mm", blob(8, with_mm=False))):
        path = tmp_path / name
        path.write_bytes(data)
        assert task_offsets(path) == {"EDR_TASK_LOGINUID_OFF": 40, "EDR_TASK_EXIT_CODE_OFF": 12}


@pytest.mark.skipif(not btf.VMLINUX_BTF.exists(), reason="this kernel exposes no BTF")
def test_the_running_kernel_has_every_offset_group() -> None:
    btf_here = Btf.from_file()
    loginuid = btf_here.member("task_struct", "loginuid")
    assert task_offsets() == {
        "EDR_TASK_LOGINUID_OFF": loginuid[0],
        "EDR_TASK_EXIT_CODE_OFF": btf_here.member("task_struct", "exit_code")[0],
        "EDR_TASK_MM_OFF": btf_here.member("task_struct", "mm")[0],
        "EDR_MM_ARG_START_OFF": btf_here.member("mm_struct", "arg_start")[0],
        "EDR_MM_ARG_END_OFF": btf_here.member("mm_struct", "arg_end")[0],
    }
    assert (
        btf_here.member("mm_struct", "arg_end")[0]
        == btf_here.member("mm_struct", "arg_start")[0] + 8
    )  # adjacent in every kernel: a cross-check of the walk
    # sessionid follows loginuid in every kernel that has both: a cross-check of the walk
    assert btf_here.member("task_struct", "sessionid") == (loginuid[0] + 4, 4)

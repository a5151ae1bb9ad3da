"""Kernel struct member offsets from the running kernel's BTF (``/sys/kernel/btf/vmlinux``).

The tracepoint tier compiles against generic headers that need not match the running kernel,
so it cannot dereference ``struct task_struct`` fields by name: the offsets would be the
headers', not the kernel's. BTF describes the running kernel's own layout. This module reads
it (the format is in the kernel's Documentation/bpf/btf.rst) and returns byte offsets that
the BPF programs receive as ``-D`` constants and use with ``bpf_probe_read_kernel``: the same
idea as libbpf's CO-RE relocations, done once at start-up.

Only what the sensor needs is decoded: type records are walked by size, and members are read
for the one struct asked for. Unknown type kinds stop the walk (a newer format than this code
knows): the caller then behaves as if there were no BTF.
"""

from __future__ import annotations

import struct
from pathlib import Path

VMLINUX_BTF = Path("/sys/kernel/btf/vmlinux")

BTF_MAGIC = 0xEB9F
_HEADER = struct.Struct("<HBBIIIII")  # magic, version, flags, hdr_len, type/str off+len
_TYPE = struct.Struct("<III")  # name_off, info, size_or_type
_MEMBER = struct.Struct("<III")  # name_off, type, offset

# kind -> bytes that follow struct btf_type: fixed, plus per-vlen-entry
KIND_INT, KIND_PTR, KIND_ARRAY, KIND_STRUCT, KIND_UNION, KIND_ENUM, KIND_FWD = 1, 2, 3, 4, 5, 6, 7
KIND_TYPEDEF, KIND_VOLATILE, KIND_CONST, KIND_RESTRICT = 8, 9, 10, 11
KIND_FLOAT, KIND_TYPE_TAG, KIND_ENUM64 = 16, 18, 19
_EXTRA: dict[int, tuple[int, int]] = {
    1: (4, 0),  # INT: encoding word
    2: (0, 0),  # PTR
    3: (12, 0),  # ARRAY: struct btf_array
    4: (0, 12),  # STRUCT: members
    5: (0, 12),  # UNION: members
    6: (0, 8),  # ENUM: name + value
    7: (0, 0),  # FWD
    8: (0, 0),  # TYPEDEF
    9: (0, 0),  # VOLATILE
    10: (0, 0),  # CONST
    11: (0, 0),  # RESTRICT
    12: (0, 0),  # FUNC
    13: (0, 8),  # FUNC_PROTO: params
    14: (4, 0),  # VAR: linkage
    15: (0, 12),  # DATASEC: var secinfo
    16: (0, 0),  # FLOAT
    17: (4, 0),  # DECL_TAG: component index
    18: (0, 0),  # TYPE_TAG
    19: (0, 12),  # ENUM64
}
_QUALIFIERS = {KIND_TYPEDEF, KIND_VOLATILE, KIND_CONST, KIND_RESTRICT, KIND_TYPE_TAG}


class BtfError(ValueError):
    """The BTF blob is malformed, of an unknown version, or lacks what was asked for."""


class Btf:
    """A parsed BTF blob. Start-up cost matters (the sensor reads the kernel's ~130,000
    types once): the walk only records where each type starts; types are decoded when a
    lookup reaches them."""

    def __init__(self, data: bytes) -> None:
        if len(data) < _HEADER.size:
            raise BtfError(f"BTF blob of {len(data)} bytes is shorter than its header")
        magic, version, _flags, hdr_len, type_off, type_len, str_off, str_len = _HEADER.unpack_from(
            data
        )
        if magic != BTF_MAGIC:
            raise BtfError(f"bad BTF magic {magic:#x} (big-endian or not BTF)")
        if version != 1:
            raise BtfError(f"BTF version {version} is not supported")
        end = hdr_len + max(type_off + type_len, str_off + str_len)
        if hdr_len < _HEADER.size or end > len(data):
            raise BtfError("BTF sections run past the end of the blob")
        self._types_raw = memoryview(data)[hdr_len + type_off : hdr_len + type_off + type_len]
        self._strings = bytes(data[hdr_len + str_off : hdr_len + str_off + str_len])
        self._starts = self._walk()  # type id - 1 -> offset of its record

    @classmethod
    def from_file(cls, path: Path = VMLINUX_BTF) -> Btf:
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise BtfError(f"cannot read {path}: {exc.strerror}") from None
        return cls(data)

    def _walk(self) -> list[int]:
        raw, pos, n = self._types_raw, 0, len(self._types_raw)
        unpack, starts = _TYPE.unpack_from, []
        while pos < n:
            if pos + _TYPE.size > n:
                raise BtfError("truncated type record")
            info = unpack(raw, pos)[1]
            extra = _EXTRA.get((info >> 24) & 0x1F)
            if extra is None:
                kind = (info >> 24) & 0x1F
                raise BtfError(f"unknown BTF kind {kind} (type id {len(starts) + 1})")
            starts.append(pos)
            pos += _TYPE.size + extra[0] + extra[1] * (info & 0xFFFF)
        if pos != n:
            raise BtfError("type section does not end on a record boundary")
        return starts

    def _name(self, off: int) -> str:
        if off >= len(self._strings):
            raise BtfError(f"string offset {off} outside the string section")
        end = self._strings.find(b"\0", off)
        return self._strings[off : end if end >= 0 else None].decode("utf-8", "replace")

    def _type(self, type_id: int) -> tuple[int, int, int, bool, int]:
        """(kind, vlen, size or referenced type, kind_flag, offset of its member data)."""
        if not 0 < type_id <= len(self._starts):
            raise BtfError(f"type id {type_id} out of range")
        pos = self._starts[type_id - 1]
        _name_off, info, size_or_type = _TYPE.unpack_from(self._types_raw, pos)
        return (info >> 24) & 0x1F, info & 0xFFFF, size_or_type, bool(info >> 31), pos + 12

    def _struct_id(self, name: str) -> int:
        wanted = name.encode() + b"\0"
        for type_id, pos in enumerate(self._starts, 1):
            name_off, info, _ = _TYPE.unpack_from(self._types_raw, pos)
            if (
                (info >> 24) & 0x1F == KIND_STRUCT
                and name_off
                and self._strings.startswith(wanted, name_off)
            ):
                return type_id
        raise BtfError(f"no struct {name} in this kernel's BTF")

    def _strip(self, type_id: int) -> int:
        """Follow typedefs and qualifiers to the underlying type."""
        for _ in range(32):
            kind, _, ref, _, _ = self._type(type_id)
            if kind not in _QUALIFIERS:
                return type_id
            type_id = ref
        raise BtfError("typedef chain too long")

    def _find(self, type_id: int, member: str, depth: int = 0) -> tuple[int, int] | None:
        """Bit offset and type id of ``member``, looking into anonymous structs and unions."""
        kind, vlen, _, kind_flag, data = self._type(type_id)
        if kind not in (KIND_STRUCT, KIND_UNION) or depth > 8:
            return None
        anonymous = []
        for i in range(vlen):
            name_off, member_type, offset = _MEMBER.unpack_from(self._types_raw, data + 12 * i)
            bits = offset & 0xFFFFFF if kind_flag else offset
            if not name_off:
                anonymous.append((member_type, bits))
            elif self._name(name_off) == member:
                return bits, member_type
        for member_type, bits in anonymous:
            found = self._find(self._strip(member_type), member, depth + 1)
            if found:
                return bits + found[0], found[1]
        return None

    def member(self, struct_name: str, path: str) -> tuple[int, int]:
        """Byte offset and size of ``a.b.c`` inside ``struct struct_name``."""
        type_id, total = self._strip(self._struct_id(struct_name)), 0
        for part in path.split("."):
            found = self._find(type_id, part)
            if found is None:
                raise BtfError(f"struct {struct_name} has no member {path}")
            bits, type_id = found
            if bits % 8:
                raise BtfError(f"{struct_name}.{path} is a bitfield")
            total += bits // 8
            type_id = self._strip(type_id)
        kind, _, size, _, _ = self._type(type_id)
        if kind == KIND_PTR:
            size = 8
        elif kind not in (KIND_INT, KIND_STRUCT, KIND_UNION, KIND_ENUM, KIND_FLOAT, KIND_ENUM64):
            raise BtfError(f"{struct_name}.{path} has no fixed size (kind {kind})")
        return total, size


# -D constant -> (struct, member, size). Each group is all or nothing: a program reads the
# fields of a group only when every one of them was found with the expected size.
OFFSET_GROUPS: dict[str, tuple[tuple[str, str, str, int], ...]] = {
    # the audit login uid (CONFIG_AUDIT); without it user space reads /proc
    "loginuid": (("EDR_TASK_LOGINUID_OFF", "task_struct", "loginuid", 4),),
    # the wait status do_exit stores before sched_process_exit fires; without it the exit
    # status is gathered from exit(2), exit_group(2) and signal delivery
    "exit_code": (("EDR_TASK_EXIT_CODE_OFF", "task_struct", "exit_code", 4),),
    # argv as the kernel laid it out in the new image; without it argv is read from the
    # caller's memory at execve entry
    "args": (
        ("EDR_TASK_MM_OFF", "task_struct", "mm", 8),
        ("EDR_MM_ARG_START_OFF", "mm_struct", "arg_start", 8),
        ("EDR_MM_ARG_END_OFF", "mm_struct", "arg_end", 8),
    ),
}


def task_offsets(path: Path = VMLINUX_BTF) -> dict[str, int]:
    """``-D`` constants for the BPF programs: where the running kernel keeps the task fields
    of ``OFFSET_GROUPS``.

    A group missing from the result (no BTF, no ``CONFIG_AUDIT``, a member renamed or
    resized) leaves the programs on their way that needs no kernel struct.
    """
    try:
        btf = Btf.from_file(path)
    except BtfError:
        return {}
    out: dict[str, int] = {}
    for members in OFFSET_GROUPS.values():
        found: dict[str, int] = {}
        for name, struct_name, member, want in members:
            try:
                offset, size = btf.member(struct_name, member)
            except BtfError:
                break
            if size != want:
                break
            found[name] = offset
        else:
            out.update(found)
    return out

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
from dataclasses import dataclass
from pathlib import Path

VMLINUX_BTF = Path("/sys/kernel/btf/vmlinux")

BTF_MAGIC = 0xEB9F
_HEADER = struct.Struct("<HBBIIIII")  # magic, version, flags, hdr_len, type/str off+len
_TYPE = struct.Struct("<III")  # name_off, info, size_or_type
_MEMBER = struct.Struct("<III")  # name_off, type, offset

# kind -> bytes that follow struct btf_type: fixed, plus per-vlen-entry
KIND_INT, KIND_PTR, KIND_ARRAY, KIND_STRUCT, KIND_UNION, KIND_ENUM, KIND_FWD = 1, 2, 3, 4, 5, 6, 7
KIND_TYPEDEF, KIND_VOLATILE, KIND_CONST, KIND_RESTRICT = 8, 9, 10, 11
KIND_TYPE_TAG = 18
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


@dataclass(frozen=True, slots=True)
class _Type:
    kind: int
    name: str
    vlen: int
    kind_flag: bool
    size_or_type: int
    pos: int  # offset of the kind-specific data in the type section


class Btf:
    """A parsed BTF blob: types by id and by (kind, name)."""

    def __init__(self, data: bytes) -> None:
        if len(data) < _HEADER.size:
            raise BtfError(f"BTF blob of {len(data)} bytes is shorter than its header")
        magic, version, _flags, hdr_len, type_off, type_len, str_off, str_len = (
            _HEADER.unpack_from(data)
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
        self._types: list[_Type | None] = [None]  # id 0 is void
        self._by_name: dict[tuple[int, str], int] = {}
        self._walk()

    @classmethod
    def from_file(cls, path: Path = VMLINUX_BTF) -> Btf:
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise BtfError(f"cannot read {path}: {exc.strerror}") from None
        return cls(data)

    def _name(self, off: int) -> str:
        if off >= len(self._strings):
            raise BtfError(f"string offset {off} outside the string section")
        end = self._strings.find(b"\0", off)
        return self._strings[off : end if end >= 0 else None].decode("utf-8", "replace")

    def _walk(self) -> None:
        raw, pos, n = self._types_raw, 0, len(self._types_raw)
        unpack = _TYPE.unpack_from
        while pos < n:
            if pos + _TYPE.size > n:
                raise BtfError("truncated type record")
            name_off, info, size_or_type = unpack(raw, pos)
            kind, vlen = (info >> 24) & 0x1F, info & 0xFFFF
            extra = _EXTRA.get(kind)
            if extra is None:
                raise BtfError(f"unknown BTF kind {kind} (type id {len(self._types)})")
            data_pos = pos + _TYPE.size
            pos = data_pos + extra[0] + extra[1] * vlen
            # names are decoded lazily except for the kinds looked up by name
            name = self._name(name_off) if kind in (KIND_STRUCT, KIND_UNION) and name_off else ""
            t = _Type(kind, name, vlen, bool(info >> 31), size_or_type, data_pos)
            if name:
                self._by_name.setdefault((kind, name), len(self._types))
            self._types.append(t)
        if pos != n:
            raise BtfError("type section does not end on a record boundary")

    def _type(self, type_id: int) -> _Type:
        if not 0 < type_id < len(self._types):
            raise BtfError(f"type id {type_id} out of range")
        t = self._types[type_id]
        assert t is not None
        return t

    def _strip(self, type_id: int) -> tuple[int, _Type]:
        """Follow typedefs and qualifiers to the underlying type."""
        for _ in range(32):
            t = self._type(type_id)
            if t.kind not in _QUALIFIERS:
                return type_id, t
            type_id = t.size_or_type
        raise BtfError("typedef chain too long")

    def _members(self, t: _Type) -> list[tuple[str, int, int]]:
        """(name, type id, bit offset) of a struct or union's members."""
        out = []
        for i in range(t.vlen):
            name_off, type_id, offset = _MEMBER.unpack_from(self._types_raw, t.pos + 12 * i)
            bit_off = offset & 0xFFFFFF if t.kind_flag else offset
            out.append((self._name(name_off) if name_off else "", type_id, bit_off))
        return out

    def _find(self, t: _Type, member: str, base_bits: int, depth: int) -> tuple[int, int] | None:
        """Bit offset and type id of ``member``, looking into anonymous structs and unions."""
        if depth > 8:
            return None
        anonymous = []
        for name, type_id, bit_off in self._members(t):
            if name == member:
                return base_bits + bit_off, type_id
            if not name:
                anonymous.append((type_id, bit_off))
        for type_id, bit_off in anonymous:
            _, inner = self._strip(type_id)
            if inner.kind in (KIND_STRUCT, KIND_UNION):
                found = self._find(inner, member, base_bits + bit_off, depth + 1)
                if found:
                    return found
        return None

    def offset(self, struct_name: str, path: str) -> int:
        """Byte offset of ``a.b.c`` inside ``struct struct_name`` (members of embedded structs)."""
        type_id = self._by_name.get((KIND_STRUCT, struct_name))
        if type_id is None:
            raise BtfError(f"no struct {struct_name} in this kernel's BTF")
        _, t = self._strip(type_id)
        total = 0
        for part in path.split("."):
            if t.kind not in (KIND_STRUCT, KIND_UNION):
                raise BtfError(f"{struct_name}.{path}: {part!r} is not inside a struct")
            found = self._find(t, part, 0, 0)
            if found is None:
                raise BtfError(f"struct {struct_name} has no member {path}")
            bits, member_type = found
            if bits % 8:
                raise BtfError(f"{struct_name}.{path} is a bitfield")
            total += bits // 8
            _, t = self._strip(member_type)
        return total

    def size_of(self, struct_name: str, path: str) -> int:
        """Size in bytes of the member at ``path`` (ints, structs, unions, enums, pointers)."""
        type_id = self._by_name.get((KIND_STRUCT, struct_name))
        if type_id is None:
            raise BtfError(f"no struct {struct_name} in this kernel's BTF")
        _, t = self._strip(type_id)
        for part in path.split("."):
            found = self._find(t, part, 0, 0)
            if found is None:
                raise BtfError(f"struct {struct_name} has no member {path}")
            _, t = self._strip(found[1])
        if t.kind == KIND_PTR:
            return 8
        if t.kind in (KIND_INT, KIND_STRUCT, KIND_UNION, 6, 16, 19):
            return t.size_or_type
        raise BtfError(f"{struct_name}.{path} has no fixed scalar size (kind {t.kind})")


def task_offsets(path: Path = VMLINUX_BTF) -> dict[str, int]:
    """``-D`` constants for the BPF programs: where task_struct keeps the audit ids.

    Empty when the kernel has no BTF or no audit support (``CONFIG_AUDIT`` unset): the
    programs then leave the login uid to user space, which reads /proc.
    """
    try:
        btf = Btf.from_file(path)
        out = {}
        for const, member in (("LOGINUID", "loginuid"), ("SESSIONID", "sessionid")):
            if btf.size_of("task_struct", member) != 4:
                return {}
            out[f"EDR_TASK_{const}_OFF"] = btf.offset("task_struct", member)
        return out
    except BtfError:
        return {}

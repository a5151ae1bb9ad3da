"""Small, exact readers for /proc/<pid>/*, shared by every capture tier.

psutil is convenient for bulk scans, but the process table needs exact values (start time in
clock ticks for the entity id, the raw argv, login uid) and must tolerate the process vanishing
between two reads, so these read the files directly and return ``None`` when they cannot.
"""

from __future__ import annotations

import os
import re

CLK_TCK = os.sysconf("SC_CLK_TCK")
_CONTAINER_ID = re.compile(r"([0-9a-f]{64})")
_NO_LOGINUID = 4294967295


def _read(path: str) -> bytes | None:
    # os.open/os.read: a third of the cost of open() with a Python file object, and these
    # files are read per event by some tiers
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        chunks = []
        while chunk := os.read(fd, 65536):
            chunks.append(chunk)
        return b"".join(chunks)
    except OSError:
        return None
    finally:
        os.close(fd)


def stat(pid: int) -> tuple[str, int, int] | None:
    """``(comm, ppid, start_ticks)`` from /proc/<pid>/stat."""
    raw = _read(f"/proc/{pid}/stat")
    if raw is None:
        return None
    # comm may contain spaces and parentheses: split at the last ')'.
    lpar, rpar = raw.find(b"("), raw.rfind(b")")
    if lpar < 0 or rpar < 0:
        return None
    comm = raw[lpar + 1 : rpar].decode("utf-8", "replace")
    rest = raw[rpar + 2 :].split()
    try:
        return comm, int(rest[1]), int(rest[19])
    except (IndexError, ValueError):
        return None


def cmdline(pid: int, max_args: int = 128, max_bytes: int = 4096) -> tuple[list[str], bool] | None:
    """argv and whether it was truncated to the same bounds the BPF tier uses."""
    raw = _read(f"/proc/{pid}/cmdline")
    if raw is None:
        return None
    truncated = len(raw) > max_bytes
    parts = raw[:max_bytes].split(b"\0")
    if parts and parts[-1] == b"":
        parts.pop()
    if len(parts) > max_args:
        parts, truncated = parts[:max_args], True
    return [p.decode("utf-8", "backslashreplace") for p in parts], truncated


def printable(text: str) -> str:
    """``text`` as valid Unicode: undecodable bytes (surrogate escapes) become ``\\xNN``.

    Paths from the OS may hold bytes that are not UTF-8; events travel as JSON and msgpack,
    which carry only valid Unicode, so one such path must not make a whole batch unencodable.
    """
    if text.isascii():
        return text
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    return text


def link(pid: int, name: str) -> str | None:
    try:
        target = os.readlink(f"/proc/{pid}/{name}")
    except OSError:
        return None
    return printable(target.removesuffix(" (deleted)"))


def ids(pid: int) -> tuple[int, int] | None:
    """Real ``(uid, gid)`` from /proc/<pid>/status."""
    raw = _read(f"/proc/{pid}/status")
    if raw is None:
        return None
    uid = gid = None
    for line in raw.splitlines():
        if line.startswith(b"Uid:"):
            uid = int(line.split()[1])
        elif line.startswith(b"Gid:"):
            gid = int(line.split()[1])
    if uid is None or gid is None:
        return None
    return uid, gid


def loginuid(pid: int) -> int | None:
    raw = _read(f"/proc/{pid}/loginuid")
    if raw is None:
        return None
    try:
        value = int(raw)
    except ValueError:
        return None
    return None if value == _NO_LOGINUID else value


def cgroups(pid: int) -> str | None:
    """The text of /proc/<pid>/cgroup, or ``None`` when the process is gone."""
    raw = _read(f"/proc/{pid}/cgroup")
    return None if raw is None else raw.decode("ascii", "replace")


def container_id_in(cgroup_text: str) -> str | None:
    """The 64-hex container id in a cgroup listing (docker, containerd, podman, CRI-O)."""
    match = _CONTAINER_ID.search(cgroup_text)
    return match.group(1) if match else None


def container_id(pid: int) -> str | None:
    """The 64-hex container id from the cgroup path (docker, containerd, podman, CRI-O)."""
    text = cgroups(pid)
    return None if text is None else container_id_in(text)


def cgroup_v2_only() -> bool:
    """True when processes are only in the unified (v2) hierarchy, as /proc/self/cgroup shows.

    Only then does the v2 cgroup id (``bpf_get_current_cgroup_id()``) identify a process's
    cgroups, and so its container; on v1 and hybrid hosts containers live in v1 hierarchies.
    """
    raw = _read("/proc/self/cgroup")
    if not raw:
        return False
    return all(line.startswith(b"0::") for line in raw.splitlines() if line)


def pids() -> list[int]:
    return [int(name) for name in os.listdir("/proc") if name.isdigit()]


def boot_id() -> str:
    raw = _read("/proc/sys/kernel/random/boot_id")
    return raw.decode().strip() if raw else "unknown-boot"

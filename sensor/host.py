"""This host's identity and description, as carried in every event's ``host`` fields."""

from __future__ import annotations

import hashlib
import os
import platform
import secrets
import socket
from pathlib import Path
from typing import Any


def _os_release() -> dict[str, str]:
    fields: dict[str, str] = {}
    try:
        text = Path("/etc/os-release").read_text()
    except OSError:
        return fields
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep:
            fields[key] = value.strip().strip('"')
    return fields


def host_id(state_dir: Path) -> str:
    """The id the controller assigned at enrollment, else one derived from the machine id.

    The machine id is hashed with an application key (as systemd recommends) so the raw id,
    which other software treats as confidential, never leaves the host.
    """
    assigned = state_dir / "host_id"
    try:
        return assigned.read_text().strip()
    except OSError:
        pass
    try:
        machine = Path("/etc/machine-id").read_text().strip()
    except OSError:
        machine = ""
    if machine:
        return hashlib.sha256(f"edr-host:{machine}".encode()).hexdigest()[:32]
    generated = state_dir / "generated_host_id"
    try:
        return generated.read_text().strip()
    except OSError:
        value = secrets.token_hex(16)
        try:
            state_dir.mkdir(parents=True, exist_ok=True)
            generated.write_text(value)
        except OSError:
            pass  # not persisted (read-only or unprivileged): still unique for this run
        return value


def host_fields(state_dir: Path) -> dict[str, Any]:
    release = _os_release()
    hostname = socket.gethostname()
    return {
        "id": host_id(state_dir),
        "name": hostname,
        "hostname": hostname,
        "architecture": platform.machine(),
        "os": {
            "type": "linux",
            "kernel": os.uname().release,
            "name": release.get("NAME", "Linux"),
            "version": release.get("VERSION_ID", ""),
        },
    }

"""sd_notify: the daemons tell systemd (Type=notify) when they are ready and stopping."""

from __future__ import annotations

import os
import socket
import subprocess
import uuid
from pathlib import Path

import pytest

from backplane.systemd import notify
from tests.sensor_cmd import fallback_sensor

REPO = Path(__file__).resolve().parents[2]


def test_notify_without_systemd_does_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert notify("READY=1") is False


def test_notify_to_an_abstract_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    name = f"edr-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(5)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert notify("READY=1", "STATUS=ok") is True
        assert sock.recv(4096) == b"READY=1\nSTATUS=ok"


def test_notify_to_a_missing_socket_is_not_fatal(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "gone.sock"))
    assert notify("READY=1") is False


def test_sensor_reports_ready_then_stopping(tmp_path: Path) -> None:
    path = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        sock.settimeout(60)
        proc = subprocess.Popen(
            fallback_sensor(
                "--duration", "2", "--output", os.devnull, "--state-dir", str(tmp_path / "state")
            ),
            cwd=REPO,
            env={**os.environ, "NOTIFY_SOCKET": str(path)},
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            first = sock.recv(4096).decode()
            second = sock.recv(4096).decode()
        finally:
            _, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
    assert first.startswith("READY=1")
    assert second == "STOPPING=1"

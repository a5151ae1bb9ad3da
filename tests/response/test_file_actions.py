"""quarantine/restore round trip, no exec from the store, delete-file hash, path refusals."""

from __future__ import annotations

import hashlib
import os
import stat
import subprocess
from pathlib import Path

import pytest

from backplane.messages import Command
from sensor.response import Responder

pytestmark = pytest.mark.timeout(60)


def run(responder: Responder, action: str, **args: object) -> tuple[str, dict]:
    result = responder.handle(Command(f"c-{action}", action, dict(args)))
    return result.status, result.output


def make_file(root: Path, name: str = "payload.sh", mode: int = 0o4751) -> Path:
    path = root / name
    path.write_bytes(b"#!/bin/sh\necho hi\nexit 0\n" + os.urandom(3000))
    os.chown(path, 1234, 2345)
    os.chmod(path, mode)
    os.utime(path, ns=(1_600_000_000_123_456_789, 1_500_000_000_987_654_321))
    return path


@pytest.mark.root
def test_quarantine_restore_round_trip(responder: Responder, tmp_path: Path) -> None:
    path = make_file(tmp_path / "roots")
    data, before = path.read_bytes(), os.stat(path)
    status, out = run(responder, "quarantine", path=str(path))
    assert status == "ok", out
    assert not path.exists()
    assert out["sha256"] == hashlib.sha256(data).hexdigest()
    assert (out["uid"], out["gid"], out["mode"]) == (1234, 2345, 0o4751)
    store = responder.files.store
    assert stat.S_IMODE(store.stat().st_mode) == 0o700
    blob = store / f"{out['id']}.bin"
    assert stat.S_IMODE(blob.stat().st_mode) == 0  # nobody may execute (or read) it

    status, out = run(responder, "restore", path=str(path))
    assert status == "ok", out
    after = os.stat(path)
    assert path.read_bytes() == data
    assert (after.st_uid, after.st_gid) == (1234, 2345)
    assert stat.S_IMODE(after.st_mode) == 0o4751
    assert after.st_mtime_ns == before.st_mtime_ns
    assert after.st_atime_ns == before.st_atime_ns
    assert not blob.exists() and list(store.iterdir()) == []


@pytest.mark.root
def test_quarantined_file_cannot_be_executed(responder: Responder, tmp_path: Path) -> None:
    path = make_file(tmp_path / "roots", mode=0o755)
    assert subprocess.run([str(path)], capture_output=True).returncode == 0
    status, out = run(responder, "quarantine", path=str(path))
    assert status == "ok"
    blob = responder.files.store / f"{out['id']}.bin"
    with pytest.raises(PermissionError):  # even as root: no execute bit at all
        subprocess.run([str(blob)], capture_output=True)


def test_delete_file_result_carries_hash(responder: Responder, tmp_path: Path) -> None:
    path = tmp_path / "roots" / "dropped.bin"
    path.write_bytes(b"malware" * 100)
    status, out = run(responder, "delete-file", path=str(path))
    assert status == "ok", out
    assert out["sha256"] == hashlib.sha256(b"malware" * 100).hexdigest()
    assert out["size"] == 700 and out["path"] == str(path)
    assert not path.exists()


@pytest.mark.parametrize("action", ["quarantine", "delete-file", "restore"])
def test_refuses_paths_outside_allowed_roots(
    responder: Responder, tmp_path: Path, action: str
) -> None:
    outside = tmp_path / "elsewhere.txt"
    outside.write_text("keep me")
    status, out = run(responder, action, path=str(outside))
    assert status == "refused" and "outside the allowed roots" in out["error"]
    assert outside.read_text() == "keep me"


def test_refuses_escape_through_symlinked_directory(responder: Responder, tmp_path: Path) -> None:
    outside = tmp_path / "secret"
    outside.mkdir()
    (outside / "f").write_text("keep me")
    (tmp_path / "roots" / "link").symlink_to(outside)
    status, out = run(responder, "delete-file", path=str(tmp_path / "roots" / "link" / "f"))
    assert status == "refused" and "outside the allowed roots" in out["error"]
    status, out = run(responder, "quarantine", path=str(tmp_path / "roots" / ".." / "secret" / "f"))
    assert status == "refused"
    assert (outside / "f").read_text() == "keep me"


def test_refuses_symlink_and_non_regular(responder: Responder, tmp_path: Path) -> None:
    roots = tmp_path / "roots"
    (roots / "target").write_text("x")
    (roots / "sym").symlink_to(roots / "target")
    (roots / "dir").mkdir()
    assert run(responder, "quarantine", path=str(roots / "sym"))[0] == "refused"
    assert run(responder, "delete-file", path=str(roots / "dir"))[0] == "refused"
    assert (roots / "target").read_text() == "x" and (roots / "sym").is_symlink()


def test_missing_file_and_bad_paths(responder: Responder, tmp_path: Path) -> None:
    status, out = run(responder, "quarantine", path=str(tmp_path / "roots" / "nope"))
    assert status == "error" and "does not exist" in out["error"]
    status, out = run(responder, "restore", path=str(tmp_path / "roots" / "nope"))
    assert status == "error" and "nothing" in out["error"]
    for bad in ("relative/path", "/tmp/a\x00b", 42):
        assert run(responder, "delete-file", path=bad)[0] == "refused"
    assert run(responder, "delete-file")[0] == "refused"


def test_restore_refuses_to_overwrite(responder: Responder, tmp_path: Path) -> None:
    path = tmp_path / "roots" / "f"
    path.write_text("original")
    assert run(responder, "quarantine", path=str(path))[0] == "ok"
    path.write_text("newcomer")
    status, out = run(responder, "restore", path=str(path))
    assert status == "refused" and "exists" in out["error"]
    assert path.read_text() == "newcomer"
    path.unlink()
    assert run(responder, "restore", path=str(path))[0] == "ok"
    assert path.read_text() == "original"


def test_damaged_quarantine_copy_is_not_restored(responder: Responder, tmp_path: Path) -> None:
    path = tmp_path / "roots" / "f"
    path.write_text("original")
    status, out = run(responder, "quarantine", path=str(path))
    blob = responder.files.store / f"{out['id']}.bin"
    os.chmod(blob, 0o600)
    blob.write_text("tampered")
    status, out = run(responder, "restore", path=str(path))
    assert status == "error" and "hash mismatch" in out["error"]
    assert not path.exists()

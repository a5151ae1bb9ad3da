"""File actions: quarantine, restore and delete, confined to allowed roots.

The store is a root-only directory (0700) in the sensor's state directory. Each quarantined
file is kept as ``<id>.bin`` with mode 0, so nobody, root included, can execute it (the kernel
refuses ``execve`` on a file with no execute bit for every user), next to ``<id>.json`` with
its SHA-256, original path, owner, mode and timestamps. Restore writes the bytes back and puts
owner, mode and times back exactly, after checking the hash.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import time
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from backplane.files import write_json_atomic
from sensor.response.errors import ActionFailed, ActionRefused

# Where dropped malware usually lands; system directories (/usr, /etc, ...) need an explicit root.
DEFAULT_ALLOWED_ROOTS = ("/tmp", "/var/tmp", "/dev/shm", "/home", "/root", "/opt", "/srv")  # noqa: S108
CHUNK = 1 << 20


def _normal(path: str) -> str:
    if not isinstance(path, str) or not path.startswith("/") or "\x00" in path:
        raise ActionRefused(f"path must be an absolute path without NUL, not {path!r}")
    return os.path.normpath(path)


def _under(path: str, root: str) -> bool:
    root = root.rstrip("/") or "/"
    return path == root or path.startswith(root + "/") or root == "/"


def file_metadata(st: os.stat_result) -> dict[str, Any]:
    return {
        "size": st.st_size,
        "uid": st.st_uid,
        "gid": st.st_gid,
        "mode": stat.S_IMODE(st.st_mode),
        "atime_ns": st.st_atime_ns,
        "mtime_ns": st.st_mtime_ns,
        "ctime_ns": st.st_ctime_ns,
    }


class FileActions:
    """Quarantine, restore and delete under ``allowed_roots`` only.

    Args:
        store: the quarantine directory (created 0700).
        allowed_roots: directories whose files may be touched; anything else is refused.
    """

    def __init__(self, store: Path, allowed_roots: Iterable[str] = DEFAULT_ALLOWED_ROOTS) -> None:
        self.store = store
        self.allowed_roots = tuple(os.path.normpath(r) for r in allowed_roots)
        store.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(store, 0o700)  # an existing directory may have been created looser

    def check_path(self, path: str) -> str:
        """The path, normalised, if its real directory lies under an allowed root."""
        path = _normal(path)
        # Resolve the directory (symlinks in it could point anywhere) but not the file itself:
        # a symlink as the target is opened with O_NOFOLLOW and refused.
        real = os.path.join(os.path.realpath(os.path.dirname(path)), os.path.basename(path))
        store = os.path.realpath(self.store)
        if _under(real, store):
            raise ActionRefused(f"{path} is inside the quarantine store", path=path)
        if not any(_under(real, os.path.realpath(root)) for root in self.allowed_roots):
            raise ActionRefused(
                f"{path} is outside the allowed roots ({', '.join(self.allowed_roots)})",
                path=path,
            )
        return real

    def _open_regular(self, path: str) -> tuple[int, os.stat_result]:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except FileNotFoundError:
            raise ActionFailed(f"{path} does not exist", path=path) from None
        except OSError as exc:
            if exc.errno == 40:  # ELOOP: the last component is a symlink
                raise ActionRefused(f"{path} is a symbolic link", path=path) from None
            raise ActionFailed(f"cannot open {path}: {exc.strerror}", path=path) from None
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            os.close(fd)
            raise ActionRefused(f"{path} is not a regular file", path=path)
        return fd, st

    def quarantine(self, path: str) -> dict[str, Any]:
        real = self.check_path(path)
        fd, st = self._open_regular(real)
        qid = uuid.uuid4().hex
        blob = self.store / f"{qid}.bin"
        digest = hashlib.sha256()
        try:
            out = os.open(blob, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0)
            try:
                while chunk := os.read(fd, CHUNK):
                    digest.update(chunk)
                    os.write(out, chunk)
                os.fsync(out)
            finally:
                os.close(out)
        except OSError as exc:
            blob.unlink(missing_ok=True)
            raise ActionFailed(f"cannot copy {real} to quarantine: {exc.strerror}") from None
        finally:
            os.close(fd)
        record = {
            "id": qid,
            "path": real,
            "sha256": digest.hexdigest(),
            "quarantined_at": time.time(),
            **file_metadata(st),
        }
        _write_json(self.store / f"{qid}.json", record)
        try:
            # Unlink only if the name still refers to the file we copied.
            now = os.lstat(real)
            if (now.st_dev, now.st_ino) != (st.st_dev, st.st_ino):
                raise ActionFailed(f"{real} was replaced while it was being quarantined")
            os.unlink(real)
        except (OSError, ActionFailed) as exc:
            blob.unlink(missing_ok=True)
            (self.store / f"{qid}.json").unlink(missing_ok=True)
            if isinstance(exc, ActionFailed):
                raise
            raise ActionFailed(f"cannot remove {real}: {exc.strerror}", path=real) from None
        return record

    def entries(self) -> list[dict[str, Any]]:
        out = []
        for meta in self.store.glob("*.json"):
            try:
                out.append(json.loads(meta.read_text()))
            except (OSError, ValueError):
                continue
        return sorted(out, key=lambda r: r.get("quarantined_at", 0))

    def restore(self, path: str) -> dict[str, Any]:
        """Put back the newest quarantined copy of ``path``."""
        real = self.check_path(path)
        matches = [r for r in self.entries() if r.get("path") in (real, _normal(path))]
        if not matches:
            raise ActionFailed(f"nothing from {path} is in quarantine", path=path)
        record = matches[-1]
        blob = self.store / f"{record['id']}.bin"
        with open(blob, "rb") as f:
            data = f.read()
        if hashlib.sha256(data).hexdigest() != record["sha256"]:
            raise ActionFailed(f"the quarantined copy of {path} is damaged (hash mismatch)")
        try:
            fd = os.open(real, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0)
        except FileExistsError:
            raise ActionRefused(f"{real} exists; move it away first", path=real) from None
        except OSError as exc:
            raise ActionFailed(f"cannot create {real}: {exc.strerror}", path=real) from None
        try:
            os.write(fd, data)
            os.fchown(fd, record["uid"], record["gid"])
            os.fchmod(fd, record["mode"])  # after chown, which clears setuid bits
            os.fsync(fd)
            os.utime(fd, ns=(record["atime_ns"], record["mtime_ns"]))
        except OSError as exc:
            os.close(fd)
            os.unlink(real)
            raise ActionFailed(f"cannot restore {real}: {exc.strerror}", path=real) from None
        os.close(fd)
        blob.unlink()
        (self.store / f"{record['id']}.json").unlink()
        return {**record, "restored_at": time.time()}

    def delete(self, path: str) -> dict[str, Any]:
        real = self.check_path(path)
        fd, st = self._open_regular(real)
        digest = hashlib.sha256()
        try:
            while chunk := os.read(fd, CHUNK):
                digest.update(chunk)
        finally:
            os.close(fd)
        now = os.lstat(real)
        if (now.st_dev, now.st_ino) != (st.st_dev, st.st_ino):
            raise ActionFailed(f"{real} was replaced while it was being hashed")
        try:
            os.unlink(real)
        except OSError as exc:
            raise ActionFailed(f"cannot delete {real}: {exc.strerror}", path=real) from None
        return {"path": real, "sha256": digest.hexdigest(), "deleted_at": time.time(),
                **file_metadata(st)}  # fmt: skip


def _write_json(path: Path, doc: dict[str, Any]) -> None:
    write_json_atomic(path, doc)

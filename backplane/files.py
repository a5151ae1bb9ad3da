"""Durable, atomic file replacement: the one implementation every component uses.

Keys, certificates, the CRL, policy, response state and uploaded rules are all replaced this
way: a temporary file in the same directory, created 0600 and given its final mode
before any byte lands, fsynced, renamed over the target, and the directory fsynced so the
rename itself survives a crash. Readers see the old or the new content, never a mix.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any


def write_atomic(path: Path, data: bytes, mode: int = 0o600) -> None:
    # mkstemp creates the file 0600 whatever the umask; the umask is process-wide, so changing
    # it here would race with every other thread creating files.
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as fh:
            os.fchmod(fh.fileno(), mode)
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def write_json_atomic(path: Path, document: Any, mode: int = 0o600) -> None:
    write_atomic(path, json.dumps(document).encode(), mode)

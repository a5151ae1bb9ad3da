"""Bytes that are not UTF-8 (in paths, argv) reach events as visible escapes, never as lone
surrogates that JSON and msgpack cannot carry."""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import msgpack
import orjson

from sensor import procfs


def test_printable_keeps_valid_text_and_escapes_bad_bytes() -> None:
    assert procfs.printable("/usr/bin/true") == "/usr/bin/true"
    assert procfs.printable("/tmp/caf\u00e9") == "/tmp/caf\u00e9"
    raw = os.fsdecode(b"/tmp/\xff\xfe-name")
    out = procfs.printable(raw)
    assert out == "/tmp/\\xff\\xfe-name"
    orjson.dumps(out)
    msgpack.packb(out)


def test_readlink_of_a_non_utf8_cwd_is_printable() -> None:
    base = Path(tempfile.mkdtemp())
    odd = os.path.join(os.fsencode(base), b"dir-\xff")
    os.mkdir(odd)
    old = os.getcwd()
    try:
        os.chdir(odd)
        cwd = procfs.link(os.getpid(), "cwd")
    finally:
        os.chdir(old)
        os.rmdir(odd)
        base.rmdir()
    assert cwd == f"{base}/dir-\\xff"


def test_cmdline_with_non_utf8_argv_is_printable() -> None:
    import subprocess

    # A process that stays alive with the odd argument (sleep would reject it and exit).
    child = subprocess.Popen(
        [os.fsencode(sys.executable), b"-c", b"import time; time.sleep(5)", b"\xffarg"]
    )
    try:
        for _ in range(500):
            argv = procfs.cmdline(child.pid)
            if argv and len(argv[0]) == 4:
                break
            import time

            time.sleep(0.01)
        assert argv is not None
        assert argv[0][3] == "\\xffarg"
        msgpack.packb(argv[0])
    finally:
        child.kill()
        child.wait()

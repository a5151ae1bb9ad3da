"""Build sensor/_hotpath.c, the compiled fork/exec/exit path, next to its source.

Run with the venv's Python, ``python -m sensor.build_hotpath`` (scripts/setup.sh and
scripts/install.sh do): it compiles against that interpreter's headers and names the module
with its extension suffix. Rebuilds only when the source or bpf/events.h is newer than the
module. Exits non-zero with the compiler's message on failure; the sensor itself runs without
the module (pure-Python path), just slower.

Needs a C compiler, the Python headers (python3-dev) and OpenSSL's (libssl-dev).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

SENSOR = Path(__file__).resolve().parent
SOURCES = (SENSOR / "_hotpath.c", SENSOR / "bpf" / "events.h")


def target() -> Path:
    return SENSOR / f"_hotpath{sysconfig.get_config_var('EXT_SUFFIX')}"


def stale(out: Path) -> bool:
    if not out.exists():
        return True
    built = out.stat().st_mtime_ns
    return any(src.stat().st_mtime_ns > built for src in SOURCES)


def build(out: Path) -> None:
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        raise SystemExit("build_hotpath: no C compiler (install gcc)")
    include = sysconfig.get_paths()["include"]
    if not (Path(include) / "Python.h").exists():
        raise SystemExit(f"build_hotpath: no {include}/Python.h (install python3-dev)")
    tmp = out.with_name(out.name + ".tmp")
    cmd = [
        cc,
        "-O2",
        "-shared",
        "-fPIC",
        "-Wall",
        "-Wextra",
        "-Wno-unused-parameter",
        "-Wno-missing-field-initializers",
        "-Werror",
        f"-I{include}",
        f"-I{SENSOR}",
        str(SOURCES[0]),
        "-o",
        str(tmp),
        "-lcrypto",
    ]
    result = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        tmp.unlink(missing_ok=True)
        raise SystemExit(f"build_hotpath: {' '.join(cmd)}\n{result.stderr}")
    tmp.chmod(0o755)
    tmp.replace(out)  # atomic: a running sensor keeps the module it loaded


def main() -> int:
    out = target()
    if "--force" in sys.argv or stale(out):
        build(out)
        print(f"build_hotpath: built {out.name}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The systemd units: `systemd-analyze verify` and `security --offline`, the hardening the
issue asks for, and (as root, with BPF) the sensor capturing with exactly the unit's
capability bounding set."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
UNITS = ROOT / "systemd"
VENV_BIN = Path(sys.executable).parent
ANALYZE = shutil.which("systemd-analyze")
needs_analyze = pytest.mark.skipif(ANALYZE is None, reason="systemd-analyze is not installed")

CONTROLLER_MAX_EXPOSURE = 3.0
# The sensor keeps root with BPF, perf, net-admin, ptrace, kill and DAC capabilities and must
# see the host's /tmp, /dev/shm and homes; 3.9 is what remains (see the unit's header). Fail if
# a change loosens it.
SENSOR_MAX_EXPOSURE = 3.9


def directives(unit: Path) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in unit.read_text().splitlines():
        if line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            out.setdefault(key.strip(), []).append(value.strip())
    return out


def localized(unit: Path, dest: Path) -> Path:
    """A copy whose ExecStart points at this checkout's venv, so verify finds the binaries."""
    dest.write_text(unit.read_text().replace("/opt/edr/venv/bin/", f"{VENV_BIN}/"))
    return dest


def verify(path: Path) -> str:
    proc = subprocess.run(
        [ANALYZE, "verify", str(path)], capture_output=True, text=True, timeout=60
    )
    # verify exits 0 on many problems and only prints them: any output is a finding.
    return (f"exit {proc.returncode}\n" if proc.returncode else "") + proc.stdout + proc.stderr


def exposure(path: Path) -> float:
    proc = subprocess.run(
        [ANALYZE, "security", "--offline=true", "--no-pager", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    m = re.search(r"Overall exposure level for \S+: ([0-9.]+)", proc.stdout)
    assert m, proc.stdout + proc.stderr
    return float(m.group(1))


@needs_analyze
@pytest.mark.parametrize("name", ["edr-sensor.service", "edr-controller.service"])
def test_units_pass_verify(name: str, tmp_path: Path) -> None:
    assert verify(localized(UNITS / name, tmp_path / name)) == ""


@needs_analyze
def test_verify_catches_a_broken_unit(tmp_path: Path) -> None:
    unit = localized(UNITS / "edr-controller.service", tmp_path / "edr-controller.service")
    unit.write_text(unit.read_text().replace("ProtectSystem=strict", "ProtectSystem=bogus"))
    assert "bogus" in verify(unit)


@needs_analyze
def test_security_exposure(tmp_path: Path) -> None:
    controller = exposure(UNITS / "edr-controller.service")
    sensor = exposure(UNITS / "edr-sensor.service")
    print(f"exposure: controller {controller}, sensor {sensor}")
    assert controller <= CONTROLLER_MAX_EXPOSURE
    assert sensor <= SENSOR_MAX_EXPOSURE
    # and the measure reacts: without hardening the same service rates far worse
    bare = tmp_path / "bare.service"
    bare.write_text("[Service]\nExecStart=/bin/true\n")
    assert exposure(bare) > 9


@pytest.mark.parametrize("name", ["edr-sensor.service", "edr-controller.service"])
def test_hardening_directives(name: str) -> None:
    d = directives(UNITS / name)
    for key, value in {
        "Restart": "on-failure",
        "ProtectSystem": "strict",
        "NoNewPrivileges": "yes",
        "StateDirectory": f"edr/{name.removeprefix('edr-').removesuffix('.service')}",
        "ConfigurationDirectory": "edr",
        "SystemCallArchitectures": "native",
    }.items():
        assert d.get(key) == [value], key
    if name == "edr-controller.service":
        assert d["PrivateTmp"] == ["yes"]
        assert d["ProtectHome"][0] in ("yes", "read-only")
    else:
        # The sensor must see the host's /tmp, /dev/shm and homes (hash, watch, quarantine).
        assert d["PrivateTmp"] == ["no"] and d["ProtectHome"] == ["no"]
        assert "/dev/shm" in d["ReadWritePaths"][0]
    assert d["LogsDirectory"]
    assert d["SystemCallFilter"][0].startswith("@system-service")
    assert "AF_PACKET" not in d["RestrictAddressFamilies"][0]
    assert d["WantedBy"] == ["multi-user.target"]


def test_controller_runs_unprivileged() -> None:
    d = directives(UNITS / "edr-controller.service")
    assert d["User"] == ["edr-controller"]
    assert d["CapabilityBoundingSet"] == [""]
    assert d["AmbientCapabilities"] == [""]


def bounding_set() -> list[str]:
    (value,) = directives(UNITS / "edr-sensor.service")["CapabilityBoundingSet"]
    return value.split()


def test_sensor_capabilities_are_the_needed_ones() -> None:
    caps = set(bounding_set())
    assert {"CAP_BPF", "CAP_PERFMON", "CAP_NET_ADMIN", "CAP_KILL", "CAP_SYS_PTRACE"} <= caps
    # never: modules, raw I/O, reboot, changing uids
    assert not caps & {"CAP_SYS_MODULE", "CAP_SYS_RAWIO", "CAP_SYS_BOOT", "CAP_SETUID"}


def _run_sensor_with(caps: list[str], tmp_path: Path, marker: str) -> tuple[int, str, str]:
    """Run the sensor (tracepoint tier) as root with ``caps`` as its bounding set; exec
    ``marker`` once it captures. Returns exit code, stderr and the NDJSON output."""
    spec = "-all," + ",".join("+" + c.removeprefix("CAP_").lower() for c in caps)
    out = tmp_path / "events.ndjson"
    env = {
        **os.environ,
        "BCC_KERNEL_SOURCE": os.environ.get("BCC_KERNEL_SOURCE", "/usr/src/edr-bcc-headers"),
    }
    env = {k: v for k, v in env.items() if not k.startswith("EDR_SENSOR_")}
    proc = subprocess.Popen(
        [
            "setpriv",
            "--bounding-set",
            spec,
            "--",
            str(VENV_BIN / "edr-sensor"),
            "run",
            "--mode",
            "tracepoint",
            "--families",
            "process",
            "--output",
            str(out),
            "--state-dir",
            str(tmp_path / "state"),
            "--duration",
            "90",
        ],
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    assert proc.stderr is not None
    lines: list[str] = []
    deadline = time.monotonic() + 90
    for line in proc.stderr:
        lines.append(line)
        if "capturing" in line or time.monotonic() > deadline:
            break
    if proc.poll() is None and any("capturing" in x for x in lines):
        time.sleep(0.5)
        subprocess.run(["/bin/sh", "-c", f"exec /bin/true {marker}"], check=True, timeout=10)
        time.sleep(1.5)
        proc.terminate()
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    rest = proc.stderr.read()
    text = out.read_text() if out.exists() else ""
    return proc.returncode, "".join(lines) + rest, text


@pytest.mark.root
@pytest.mark.bpf
@pytest.mark.timeout(200)
def test_sensor_captures_with_exactly_the_unit_capabilities(tmp_path: Path) -> None:
    if not shutil.which("setpriv"):
        pytest.skip("setpriv (util-linux) is not installed")
    marker = f"edr-ops-marker-{os.getpid()}"
    code, err, events = _run_sensor_with(bounding_set(), tmp_path, marker)
    assert code == 0, err
    assert marker in events, err
    # The check can fail: without CAP_BPF the tracepoint tier cannot load.
    fewer = [c for c in bounding_set() if c != "CAP_BPF"]
    code, err, _ = _run_sensor_with(fewer, tmp_path / "x", marker)
    assert code == 3, err

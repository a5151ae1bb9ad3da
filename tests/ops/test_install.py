"""scripts/install.sh and scripts/uninstall.sh into a staging root (--root): the files they
write, their modes, the enabled units (systemctl --root), the installed venv, idempotence, and
the removal of the nftables table inside a network namespace made here. What needs systemd as
PID 1 (starting the services, the sandbox at run time) is left to the VM harness."""

from __future__ import annotations

import shutil
import stat
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
INSTALL = ROOT / "scripts" / "install.sh"
UNINSTALL = ROOT / "scripts" / "uninstall.sh"

pytestmark = [pytest.mark.root, pytest.mark.timeout(280)]


def run(*args: str | Path, timeout: int = 240) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(a) for a in args], capture_output=True, text=True, timeout=timeout, check=False
    )


@pytest.fixture(scope="module")
def staged(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    root = tmp_path_factory.mktemp("edr-root")
    proc = run(INSTALL, "--root", root, "--controller-address", "ctl.example:7443")
    assert proc.returncode == 0, proc.stderr
    assert "edr-sensor enroll --controller" in proc.stderr
    yield root
    shutil.rmtree(root, ignore_errors=True)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_files_and_modes(staged: Path) -> None:
    etc = staged / "etc/edr"
    assert mode(etc / "sensor.toml") == 0o600
    assert mode(etc / "sensor.env") == 0o600
    assert mode(etc / "controller.toml") == 0o640
    assert "EDR_SENSOR_CONTROLLER=ctl.example:7443\n" in (etc / "sensor.env").read_text()
    for unit in ("edr-sensor.service", "edr-controller.service"):
        installed = staged / "etc/systemd/system" / unit
        assert installed.read_text() == (ROOT / "systemd" / unit).read_text()
        link = staged / "etc/systemd/system/multi-user.target.wants" / unit
        assert link.is_symlink() and str(link.readlink()) == f"/etc/systemd/system/{unit}"
    for tool in ("edr-sensor", "edr-controller", "edr-certs"):
        assert str((staged / "usr/local/bin" / tool).readlink()) == f"/opt/edr/venv/bin/{tool}"
    # the venv is not writable by anyone but root
    assert not mode(staged / "opt/edr/venv/bin/python3").__and__(0o022)


def test_installed_venv_runs_and_serves_its_webui(staged: Path, tmp_path: Path) -> None:
    py = staged / "opt/edr/venv/bin/python"
    proc = subprocess.run(
        [
            str(py),
            "-c",
            "import controller.app as a, sensor.config as c; print(a.WEBUI_DIR); print(c.__file__)",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
        check=True,
    )
    webui, config = proc.stdout.split()
    assert webui == f"{staged}/opt/edr/src/webui" and Path(webui, "index.html").exists()
    assert config.startswith(f"{staged}/opt/edr/src/")
    # the installed sensor accepts the installed configuration and environment file
    env = dict(
        line.split("=", 1)
        for line in (staged / "etc/edr/sensor.env").read_text().splitlines()
        if line and not line.startswith("#")
    )
    out = subprocess.run(
        [
            str(py),
            "-c",
            "import sys; from sensor.config import load; from pathlib import Path;"
            "print(load(Path(sys.argv[1])).controller)",
            str(staged / "etc/edr/sensor.toml"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
        env=env,
        check=True,
    )
    assert out.stdout.strip() == "ctl.example:7443"


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze")
def test_installed_units_verify(staged: Path, tmp_path: Path) -> None:
    for unit in ("edr-sensor.service", "edr-controller.service"):
        text = (staged / "etc/systemd/system" / unit).read_text()
        local = tmp_path / unit
        local.write_text(text.replace("/opt/edr/", f"{staged}/opt/edr/"))
        proc = run("systemd-analyze", "verify", local, timeout=60)
        assert proc.returncode == 0 and proc.stdout + proc.stderr == "", proc.stderr


def test_rerun_keeps_config_and_uninstall(staged: Path) -> None:
    env_file = staged / "etc/edr/sensor.toml"
    env_file.write_text(env_file.read_text() + "\n# edited by the operator\n")
    proc = run(INSTALL, "--root", staged, "--sensor")
    assert proc.returncode == 0, proc.stderr
    assert env_file.read_text().endswith("# edited by the operator\n")
    assert "EDR_SENSOR_CONTROLLER=ctl.example:7443" in (staged / "etc/edr/sensor.env").read_text()

    ns = f"edrops-{uuid.uuid4().hex[:8]}"
    assert run("ip", "netns", "add", ns).returncode == 0
    try:
        assert run("ip", "netns", "exec", ns, "nft", "add", "table", "inet", "edr").returncode == 0
        proc = run("ip", "netns", "exec", ns, UNINSTALL, "--root", staged, "--nftables")
        assert proc.returncode == 0, proc.stderr
        tables = run("ip", "netns", "exec", ns, "nft", "list", "tables").stdout
        assert "edr" not in tables
        # again: nothing left to remove is not an error
        again = run("ip", "netns", "exec", ns, UNINSTALL, "--root", staged, "--nftables")
        assert again.returncode == 0, again.stderr
    finally:
        run("ip", "netns", "del", ns)
    assert not (staged / "opt/edr").exists()
    assert not list((staged / "etc/systemd/system").rglob("edr-*.service"))
    assert not (staged / "usr/local/bin/edr-sensor").is_symlink()
    assert (staged / "etc/edr/sensor.toml").exists()  # config kept without --purge
    assert run(UNINSTALL, "--root", staged, "--purge").returncode == 0
    assert not (staged / "etc/edr").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--controller-address", "a b"], "expected HOST[:PORT]"),
        (["--controller-address", "x\nEVIL=1"], "expected HOST[:PORT]"),
        (["--controller-address"], "needs HOST[:PORT]"),
        (["--bogus"], "unknown option --bogus"),
        (["--root"], "--root needs a directory"),
    ],
)
def test_install_rejects_bad_arguments(args: list[str], message: str, tmp_path: Path) -> None:
    proc = run(INSTALL, "--root", tmp_path / "r", *args, timeout=30)
    assert proc.returncode != 0
    assert message in proc.stderr
    assert not (tmp_path / "r" / "opt").exists()


def test_uninstall_rejects_bad_arguments(tmp_path: Path) -> None:
    proc = run(UNINSTALL, "--root", tmp_path / "missing", timeout=30)
    assert proc.returncode != 0 and "no such directory" in proc.stderr
    proc = run(UNINSTALL, "--wipe-everything", timeout=30)
    assert proc.returncode != 0 and "unknown option" in proc.stderr


def test_install_refuses_non_root_without_root_prefix() -> None:
    proc = run(
        "setpriv",
        "--reuid=65534",
        "--regid=65534",
        "--clear-groups",
        INSTALL,
        "--sensor",
        timeout=30,
    )
    assert proc.returncode != 0 and "run as root" in proc.stderr

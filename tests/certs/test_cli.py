"""edr-certs: every subcommand run as a real subprocess on a temporary state directory."""

from __future__ import annotations

import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography import x509

from certs import pki
from certs.store import PKIStore

pytestmark = pytest.mark.timeout(120)


def run(*args: str, state: Path | None = None, env_dir: Path | None = None):
    cmd = [sys.executable, "-m", "certs.cli", *args]
    if state is not None:
        cmd += ["--state-dir", str(state)]
    env = {k: v for k, v in os.environ.items() if k != "EDR_PKI_DIR"}
    if env_dir is not None:
        env["EDR_PKI_DIR"] = str(env_dir)
    return subprocess.run(
        cmd,
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        cwd=Path(__file__).resolve().parents[2],
    )


def ok(*args: str, state: Path) -> str:
    proc = run(*args, state=state)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def fail(*args: str, state: Path | None, code: int = 1) -> str:
    proc = run(*args, state=state)
    assert proc.returncode == code, (proc.stdout, proc.stderr)
    assert proc.stderr.strip(), "an error must say what went wrong"
    if code == 1:
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("edr-certs: error: "), proc.stderr
        assert "Traceback" not in proc.stderr
    return proc.stderr


@pytest.fixture
def state(tmp_path: Path) -> Path:
    return tmp_path / "pki"


def test_console_script_installed() -> None:
    script = Path(sys.executable).with_name("edr-certs")
    assert script.exists()
    proc = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0 and "token" in proc.stdout


def test_init_fingerprint_and_refusals(state: Path) -> None:
    fail("fingerprint", state=state)  # not initialised yet
    out = ok("init", "--names", "ctl.example", "127.0.0.1", state=state)
    fp = ok("fingerprint", state=state).strip()
    assert re.fullmatch(r"[0-9a-f]{64}", fp) and fp in out
    assert fp == pki.fingerprint((state / "ca.pem").read_bytes())
    assert stat.S_IMODE((state / "ca.key").stat().st_mode) == 0o600
    err = fail("init", state=state)
    assert "refusing to overwrite" in err
    assert ok("fingerprint", state=state).strip() == fp
    ok("init", "--force", "--names", "ctl.example", state=state)
    assert ok("fingerprint", state=state).strip() != fp


def test_init_bad_name(state: Path) -> None:
    assert "invalid server name" in fail("init", "--names", "bad name", state=state)
    assert not (state / "ca.pem").exists()


def test_state_dir_from_environment_and_position(tmp_path: Path) -> None:
    env_dir = tmp_path / "env-pki"
    proc = run("init", "--names", "localhost", env_dir=env_dir)
    assert proc.returncode == 0, proc.stderr
    assert (env_dir / "ca.pem").exists()
    # --state-dir before the subcommand works as well as after it.
    other = tmp_path / "other"
    cmd = [sys.executable, "-m", "certs.cli", "--state-dir", str(other), "init", "--names", "x"]
    assert subprocess.run(cmd, capture_output=True, timeout=60).returncode == 0
    assert (other / "ca.pem").exists()


def test_tokens(state: Path) -> None:
    ok("init", "--names", "localhost", state=state)
    assert "no tokens" in ok("token", "list", state=state)
    proc = run("token", "create", "--ttl", "2h", "--uses", "3", "--comment", "lab", state=state)
    assert proc.returncode == 0, proc.stderr
    token = proc.stdout.strip()
    assert re.fullmatch(r"[0-9a-f]{8}\.[A-Za-z0-9_-]{43}", token)
    assert "not be shown again" in proc.stderr
    token_id, secret = token.split(".")
    listing = ok("token", "list", state=state)
    assert token_id in listing and "0/3" in listing and "active" in listing and "lab" in listing
    assert secret not in listing
    PKIStore(state).consume_token(token)
    assert "1/3" in ok("token", "list", state=state)
    ok("token", "revoke", token_id, state=state)
    assert "revoked" in ok("token", "list", state=state)
    assert "no token with id" in fail("token", "revoke", "00000000", state=state)
    assert "8 hex" in fail("token", "revoke", "nope", state=state)


@pytest.mark.parametrize(
    "args",
    [
        ["token", "create", "--ttl", "abc"],
        ["token", "create", "--ttl", "0h"],
        ["token", "create", "--uses", "0"],
        ["token", "create", "--uses", "x"],
        ["token"],
        ["issue", "h"],  # --out missing
        ["bogus"],
    ],
)
def test_usage_errors(state: Path, args: list[str]) -> None:
    fail(*args, state=state, code=2)


def test_token_ttl_too_long(state: Path) -> None:
    ok("init", "--names", "localhost", state=state)
    assert "at most 30 days" in fail("token", "create", "--ttl", "31d", state=state)


def test_issue_list_revoke_crl(state: Path, tmp_path: Path) -> None:
    ok("init", "--names", "localhost", state=state)
    assert "no certificates" in ok("list", state=state)
    out = tmp_path / "airgap"
    ok("issue", "vault-01", "--out", str(out), state=state)
    assert stat.S_IMODE((out / "sensor.key").stat().st_mode) == 0o600
    host_id = (out / "host_id").read_text().strip()
    cert = x509.load_pem_x509_certificate((out / "sensor.pem").read_bytes())
    assert pki.host_id_of(cert) == host_id
    assert (out / "ca.pem").read_bytes() == (state / "ca.pem").read_bytes()
    assert "already holds a sensor key" in fail("issue", "vault-01", "--out", str(out), state=state)
    assert "invalid hostname" in fail(
        "issue", "bad/host", "--out", str(tmp_path / "x"), state=state
    )
    listing = ok("list", state=state)
    assert host_id in listing and "vault-01" in listing and "active" in listing

    crl_before = ok("crl", state=state)
    assert str(state / "crl.pem") in crl_before and re.search(r"revoked:\s+0", crl_before)
    assert "revoked host" in ok("revoke", "vault-01", state=state)
    crl = x509.load_pem_x509_crl((state / "crl.pem").read_bytes())
    assert crl.get_revoked_certificate_by_serial_number(cert.serial_number) is not None
    assert re.search(r"revoked:\s+1", ok("crl", state=state))
    assert "revoked" in ok("list", state=state)
    assert "already revoked" in ok("revoke", host_id, state=state)
    assert "no certificate was issued" in fail("revoke", "ghost", state=state)
    assert re.search(r"revoked:\s+1", ok("crl", "--refresh", state=state))


def test_crl_broken_file(state: Path) -> None:
    ok("init", "--names", "localhost", state=state)
    (state / "crl.pem").write_text("junk")
    assert "not a valid CRL" in fail("crl", state=state)
    ok("crl", "--refresh", state=state)


@pytest.mark.parametrize(
    "cmd",
    [
        ["list"],
        ["revoke", "x"],
        ["crl"],
        ["token", "list"],
        ["token", "create"],
        ["issue", "h", "--out", "OUT"],
    ],
)
def test_uninitialised_errors(state: Path, tmp_path: Path, cmd: list[str]) -> None:
    out = tmp_path / "out"
    cmd = [str(out) if c == "OUT" else c for c in cmd]
    assert "edr-certs init" in fail(*cmd, state=state)
    assert not state.exists() and not out.exists()


def test_unreadable_ca_key(state: Path) -> None:
    ok("init", "--names", "localhost", state=state)
    (state / "ca.key").write_text("garbage")
    assert "unusable" in fail("issue", "h", "--out", str(state.parent / "o"), state=state)

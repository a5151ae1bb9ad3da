"""Configuration errors, and the edr-controller command as a real subprocess."""

from __future__ import annotations

import os
import signal
import ssl
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from core_harness import free_port, wait_for

from controller.config import ConfigError, ControllerConfig, load_config
from controller.store import SQLiteStore

EXE = Path(sys.executable).parent / "edr-controller"
pytestmark = pytest.mark.timeout(90)


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "controller.toml"
    p.write_text(text)
    return p


def test_defaults_and_file_and_env_overrides(tmp_path):
    cfg = load_config(env={})
    assert cfg.state_dir == Path("/var/lib/edr/controller")
    assert cfg.pki_dir == Path("/var/lib/edr/controller/pki")
    assert (cfg.http_host, cfg.http_port, cfg.backplane) == ("0.0.0.0", 8443, "tcp://0.0.0.0:7443")
    assert "localhost" in cfg.server_names and "127.0.0.1" in cfg.server_names
    f = write(
        tmp_path,
        'state_dir = "/srv/edr"\nhttp_port = 9443\nrule_dirs = ["/r1"]\n'
        "retention_max_age = 0\nretention_max_bytes = 1000\ncommand_ttl = 60\n",
    )
    cfg = load_config(
        f,
        env={
            "EDR_CONTROLLER_HTTP_PORT": "10443",
            "EDR_CONTROLLER_RULE_DIRS": "/a, /b",
            "EDR_CONTROLLER_SERVER_NAMES": "edr.example.org,10.0.0.1",
            "OTHER": "x",
        },
    )
    assert cfg.state_dir == Path("/srv/edr") and cfg.http_port == 10443
    assert cfg.rule_dirs == (Path("/a"), Path("/b"))
    assert cfg.retention_max_age is None and cfg.retention_max_bytes == 1000
    assert cfg.command_ttl == 60.0
    assert cfg.server_names == ("edr.example.org", "10.0.0.1")
    assert load_config(f, env={}, state_dir=tmp_path).state_dir == tmp_path


@pytest.mark.parametrize(
    ("text", "env", "message"),
    [
        ("http_port = 70000\n", {}, "http_port: 70000 is not a port"),
        ('http_port = "x"\n', {}, "http_port (in "),
        ("bogus = 1\n", {}, "unknown key 'bogus'"),
        ("http_port = \n", {}, "invalid TOML"),
        ('backplane = "udp://x"\n', {}, "backplane: 'udp://x' must be a tcp://"),
        ("command_ttl = -5\n", {}, "command_ttl"),
        ("rule_dirs = [1]\n", {}, "rule_dirs"),
        ("", {"EDR_CONTROLLER_HTTP_PORT": "many"}, "environment EDR_CONTROLLER_HTTP_PORT"),
        ("", {"EDR_CONTROLLER_NOPE": "1"}, "unknown setting 'nope'"),
        ("", {"EDR_CONTROLLER_COMMAND_TTL": "0"}, "command_ttl: must be a positive"),
        ("server_names = []\n", {}, "server_names"),
        ('server_names = ["a b"]\n', {}, "is not a host name"),
    ],
)
def test_invalid_config_is_one_clear_line(tmp_path, text, env, message):
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, text), env=env)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(tmp_path / "absent.toml", env={})


def test_dataclass_validates_too():
    with pytest.raises(ConfigError, match="live_queue"):
        ControllerConfig(live_queue=0)


def run_cli(
    *args: str, input: str | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(EXE), *args],
        input=input,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **(env or {})},
    )


def test_cli_config_error_exits_2(tmp_path):
    r = run_cli("user", "list", "--config", str(write(tmp_path, "http_port = -1\n")))
    assert r.returncode == 2
    assert r.stderr.startswith("edr-controller: configuration error: http_port")


def test_user_add_and_list(tmp_path):
    state = str(tmp_path / "state")
    r = run_cli(
        "user",
        "add",
        "alice",
        "--role",
        "admin",
        "--state-dir",
        state,
        input="correct horse battery staple\n",
    )
    assert r.returncode == 0, r.stderr
    assert "user alice created with role admin" in r.stdout
    again = run_cli(
        "user",
        "add",
        "alice",
        "--role",
        "viewer",
        "--state-dir",
        state,
        input="correct horse battery staple\n",
    )
    assert again.returncode == 1 and "already exists" in again.stderr
    short = run_cli("user", "add", "bob", "--role", "viewer", "--state-dir", state, input="short\n")
    assert short.returncode == 1 and "at least 12" in short.stderr
    bad_name = run_cli(
        "user",
        "add",
        "",
        "--role",
        "viewer",
        "--state-dir",
        state,
        input="correct horse battery staple\n",
    )
    assert bad_name.returncode == 1
    listing = run_cli("user", "list", "--state-dir", state)
    assert listing.returncode == 0
    assert "alice" in listing.stdout and "admin" in listing.stdout and "bob" not in listing.stdout
    store = SQLiteStore(Path(state) / "controller.db")
    try:
        user = store.get_user("alice")
        assert user.password_hash.startswith("$argon2id$")  # never the password itself
        assert [a.action for a in store.list_audit()] == ["user.create"]
    finally:
        store.close()


def test_serve_starts_serves_metrics_and_stops_on_sigterm(tmp_path):
    port = free_port()
    state = tmp_path / "state"
    env = {
        "EDR_CONTROLLER_HTTP_HOST": "127.0.0.1",
        "EDR_CONTROLLER_HTTP_PORT": str(port),
        "EDR_CONTROLLER_BACKPLANE": f"tcp://127.0.0.1:{free_port()}",
        "EDR_CONTROLLER_SERVER_NAMES": "localhost,127.0.0.1",
    }
    proc = subprocess.Popen(
        [str(EXE), "serve", "--state-dir", str(state)],
        env={**os.environ, **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        ca = state / "pki" / "ca.pem"
        wait_for(ca.exists, 20, "PKI created on first run")
        ctx = ssl.create_default_context(cafile=str(ca))

        def scrape() -> str | None:
            try:
                with urllib.request.urlopen(
                    f"https://localhost:{port}/metrics", context=ctx, timeout=2
                ) as resp:
                    return str(resp.read().decode())
            except OSError:
                return None

        body = wait_for(scrape, 30, "/metrics over HTTPS")
        assert "edr_ingest_events_total 0" in body
        assert "edr_backplane_sessions 0" in body
        time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=20)
        assert proc.returncode == 0, out
        assert "no users yet" in out and "edr-controller user add" in out
        assert "12 rules loaded" in out
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_create_app_mounts_every_area(tmp_path):
    from controller.app import create_app

    app = create_app(ControllerConfig(state_dir=str(tmp_path), rule_dirs=[str(tmp_path)]))
    assert app.ctx.config.state_dir == tmp_path and app.ctx.config.rule_dirs == (tmp_path,)
    paths = {r.path for r in app.router.routes}
    for path in (
        "metrics",
        "api/v1/stream",
        "api/v1/openapi.json",
        "api/v1/enroll/ca",
        "api/v1/auth/login",
        "api/v1/hosts",
        "api/v1/alerts",
        "api/v1/policy",
        "api/v1/rules",
    ):
        assert path in paths, path

"""Daemon configuration for the services: EDR_SENSOR_<KEY> overrides, the documented example
files in packaging/, and one clear line on bad configuration at start."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from backplane.schema import Family
from controller.config import _KINDS as CONTROLLER_KEYS
from controller.config import load_config
from sensor.config import CAPTURE_KEYS, SENSOR_KEYS, ConfigError, load

ROOT = Path(__file__).resolve().parents[2]
PACKAGING = ROOT / "packaging"
VENV_BIN = Path(sys.executable).parent


def _uncommented(text: str) -> str:
    """The example file with every `# key = value` (and `# [table]`) line switched on."""
    out = []
    for line in text.splitlines():
        m = re.match(r"^# (\[[a-z.]+\]|[a-z_]+ = .*)$", line)
        out.append(m.group(1) if m else line)
    return "\n".join(out) + "\n"


def test_every_key_is_overridable_from_the_environment(tmp_path: Path) -> None:
    env = {
        "EDR_SENSOR_STATE_DIR": "/srv/edr",
        "EDR_SENSOR_QUEUE_SIZE": "4096",
        "EDR_SENSOR_CONTROLLER": "ctl.example:7443",
        "EDR_SENSOR_MODE": "tracepoint",
        "EDR_SENSOR_MODES": "file=fallback, network = auto",
        "EDR_SENSOR_FAMILIES": "process,file",
        "EDR_SENSOR_POLL_INTERVAL": "0.5",
        "EDR_SENSOR_HASH_MAX_BYTES": "0",
        "EDR_SENSOR_EXCLUDE_PREFIXES": "/proc/,/var/cache/",
        "EDR_SENSOR_INCLUDE_PREFIXES": "/home/,/etc/",
        "EDR_SENSOR_SENSITIVE_READ_PREFIXES": "/etc/shadow",
        "EDR_SENSOR_WATCH_PATHS": "/srv",
        "PATH": "/usr/bin",  # other variables are ignored
    }
    assert {k.removeprefix("EDR_SENSOR_").lower() for k in env if k.startswith("EDR_")} == {
        *SENSOR_KEYS,
        *CAPTURE_KEYS,
    }
    config = load(None, env=env)
    assert config.state_dir == Path("/srv/edr")
    assert config.queue_size == 4096
    assert config.controller == "ctl.example:7443"
    assert config.modes == {
        Family.PROCESS: "tracepoint",
        Family.FILE: "fallback",
        Family.NETWORK: "auto",
    }
    assert config.families == {Family.PROCESS, Family.FILE}
    assert config.poll_interval == 0.5
    assert config.hash_max_bytes == 0
    assert config.filters.exclude_prefixes == ("/proc/", "/var/cache/")
    assert config.filters.include_prefixes == ("/home/", "/etc/")
    assert config.filters.sensitive_read_prefixes == ("/etc/shadow",)
    assert config.filters.watch_paths == ("/srv",)


def test_environment_overrides_the_file(tmp_path: Path) -> None:
    path = tmp_path / "sensor.toml"
    path.write_text('[sensor]\nqueue_size = 10\ncontroller = "a:1"\n[capture]\nmode = "fallback"\n')
    config = load(path, env={"EDR_SENSOR_QUEUE_SIZE": "20"})
    assert config.queue_size == 20
    assert config.controller == "a:1"
    assert config.modes[Family.PROCESS] == "fallback"
    # an empty controller variable (as sensor.env ships) unsets it
    assert load(path, env={"EDR_SENSOR_CONTROLLER": " "}).controller is None


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"EDR_SENSOR_TURBO": "1"}, "environment EDR_SENSOR_TURBO: unknown setting"),
        ({"EDR_SENSOR_QUEUE_SIZE": "many"}, "EDR_SENSOR_QUEUE_SIZE: expected an integer"),
        ({"EDR_SENSOR_QUEUE_SIZE": "0"}, "EDR_SENSOR_QUEUE_SIZE: expected a positive integer"),
        ({"EDR_SENSOR_POLL_INTERVAL": "fast"}, "EDR_SENSOR_POLL_INTERVAL: expected a number"),
        ({"EDR_SENSOR_POLL_INTERVAL": "100"}, "expected seconds in 0.01..60"),
        ({"EDR_SENSOR_HASH_MAX_BYTES": "-1"}, "EDR_SENSOR_HASH_MAX_BYTES: expected a byte count"),
        ({"EDR_SENSOR_MODE": "turbo"}, "EDR_SENSOR_MODE: expected one of auto"),
        ({"EDR_SENSOR_MODES": "process"}, "EDR_SENSOR_MODES: expected family=mode pairs"),
        ({"EDR_SENSOR_MODES": "dns=auto"}, "EDR_SENSOR_MODES.dns: unknown family"),
        ({"EDR_SENSOR_MODES": "file=kernel"}, "EDR_SENSOR_MODES.file: expected one of"),
        ({"EDR_SENSOR_FAMILIES": "process,dns"}, "unknown family 'dns'"),
        ({"EDR_SENSOR_FAMILIES": ","}, "at least one family"),
        ({"EDR_SENSOR_WATCH_PATHS": "tmp"}, "'tmp' is not an absolute path"),
        ({"EDR_SENSOR_STATE_DIR": "relative"}, "EDR_SENSOR_STATE_DIR: expected an absolute path"),
        ({"EDR_SENSOR_CONTROLLER": "a b"}, "EDR_SENSOR_CONTROLLER: expected HOST[:PORT]"),
    ],
)
def test_bad_environment_is_one_clear_error(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        load(None, env=env)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_bad_controller_key_in_file(tmp_path: Path) -> None:
    path = tmp_path / "s.toml"
    path.write_text("[sensor]\ncontroller = 7443\n")
    with pytest.raises(ConfigError, match=r"sensor.controller: expected HOST\[:PORT\]"):
        load(path, env={})


def test_sensor_example_documents_every_key_and_loads() -> None:
    text = (PACKAGING / "sensor.toml").read_text()
    for key in (*SENSOR_KEYS, *CAPTURE_KEYS):
        assert re.search(rf"^# {key} = |^# \[capture\.{key}\]", text, re.M), key
        assert f"EDR_SENSOR_{key.upper()}" in text, key
    assert load(PACKAGING / "sensor.toml", env={}) == load(None, env={})  # all commented
    switched = Path(os.environ.get("TMPDIR", "/tmp")) / f"edr-ops-sensor-{os.getpid()}.toml"
    try:
        switched.write_text(_uncommented(text))
        config = load(switched, env={})
    finally:
        switched.unlink(missing_ok=True)
    defaults = load(None, env={})
    # the shown values are the defaults, except the example controller address
    assert config.controller == "edr.example.org:7443"
    config.controller = None
    assert config == defaults


def test_controller_example_documents_every_key_and_loads(tmp_path: Path) -> None:
    text = (PACKAGING / "controller.toml").read_text()
    for key in CONTROLLER_KEYS:
        assert re.search(rf"^# {key} = ", text, re.M), key
        assert f"EDR_CONTROLLER_{key.upper()}" in text, key
    assert load_config(PACKAGING / "controller.toml", env={}).http_port == 8443
    switched = tmp_path / "controller.toml"
    switched.write_text(_uncommented(text))
    config = load_config(switched, env={})
    assert config.server_names == ("edr.example.org", "localhost", "127.0.0.1")
    assert config.retention_max_bytes is None and config.max_body == 1048576


def test_env_examples_are_valid() -> None:
    """The shipped EnvironmentFiles only hold variables the daemons accept."""
    for name, prefix, loader in (
        ("sensor.env", "EDR_SENSOR_", lambda env: load(None, env=env)),
        ("controller.env", "EDR_CONTROLLER_", lambda env: load_config(None, env=env)),
    ):
        env = {}
        for line in (PACKAGING / name).read_text().splitlines():
            if line and not line.startswith("#"):
                key, _, value = line.partition("=")
                assert key.startswith(prefix)
                env[key] = value
        loader(env)


def _run(cmd: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        cmd, env={"PATH": "/usr/bin:/bin", **env}, capture_output=True, text=True, timeout=60
    )


def test_sensor_fails_at_start_with_one_line(tmp_path: Path) -> None:
    proc = _run(
        [str(VENV_BIN / "edr-sensor"), "run", "--mode", "fallback", "--duration", "1"],
        {"EDR_SENSOR_QUEUE_SIZE": "lots"},
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "edr-sensor: environment EDR_SENSOR_QUEUE_SIZE: expected an integer, got 'lots'"
    ]
    bad = tmp_path / "sensor.toml"
    bad.write_text("[capture]\nmode = 'warp'\n")
    proc = _run([str(VENV_BIN / "edr-sensor"), "run", "--config", str(bad)], {})
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1
    assert f"{bad}: capture.mode: expected one of" in proc.stderr


def test_controller_fails_at_start_with_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "controller.toml"
    bad.write_text("http_port = 70000\n")
    proc = _run(
        [
            str(VENV_BIN / "edr-controller"),
            "serve",
            "--config",
            str(bad),
            "--state-dir",
            str(tmp_path / "state"),
        ],
        {},
    )
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1
    assert "http_port" in proc.stderr
    assert not (tmp_path / "state").exists()

"""Configuration: every bad input is one clear error naming the file and key."""

from __future__ import annotations

from pathlib import Path

import pytest

from backplane.schema import Family
from sensor.config import ConfigError, load


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "sensor.toml"
    path.write_text(text)
    return path


def test_defaults_without_a_file() -> None:
    config = load(None)
    assert config.modes == {f: "auto" for f in Family}
    assert config.families == frozenset(Family)
    assert "/proc/" in config.filters.exclude_prefixes


def test_full_file_is_applied(tmp_path: Path) -> None:
    config = load(
        write(
            tmp_path,
            """
[sensor]
state_dir = "/var/lib/edr-test"
queue_size = 1024
[capture]
mode = "tracepoint"
families = ["process", "file"]
poll_interval = 0.5
exclude_prefixes = ["/var/cache/"]
watch_paths = ["/srv"]
[capture.modes]
file = "fallback"
""",
        )
    )
    assert config.state_dir == Path("/var/lib/edr-test")
    assert config.queue_size == 1024
    assert config.modes[Family.PROCESS] == "tracepoint"
    assert config.modes[Family.FILE] == "fallback"
    assert config.families == {Family.PROCESS, Family.FILE}
    assert config.poll_interval == 0.5
    assert config.filters.exclude_prefixes == ("/var/cache/",)
    assert config.filters.watch_paths == ("/srv",)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[capture\n", "invalid TOML"),
        ("capture = 3\n", "capture: expected a [table]"),
        ("[bogus]\n", "[bogus]: unknown section"),
        ("[capture]\nmode = 'turbo'\n", "capture.mode: expected one of auto"),
        ("[capture]\nfamilies = ['process', 'dns']\n", "unknown family 'dns'"),
        ("[capture]\nfamilies = []\n", "at least one family"),
        ("[capture]\nwatch_paths = ['tmp']\n", "'tmp' is not an absolute path"),
        ("[capture]\nwatch_paths = '/tmp'\n", "expected a list of strings"),
        ("[capture]\npoll_interval = 0\n", "expected seconds"),
        ("[capture.modes]\nfile = 'kernel'\n", "capture.modes.file: expected one of"),
        ("[capture.modes]\ndns = 'auto'\n", "capture.modes.dns: unknown family"),
        ("[capture]\nturbo = true\n", "capture.turbo: unknown key"),
        ("[sensor]\nstate_dir = 'relative'\n", "sensor.state_dir: expected an absolute path"),
        ("[sensor]\nqueue_size = -1\n", "sensor.queue_size: expected a positive integer"),
    ],
)
def test_bad_config_is_one_clear_error(tmp_path: Path, text: str, message: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load(path)
    assert message in str(info.value)
    assert str(path) in str(info.value)
    assert "\n" not in str(info.value)


def test_unreadable_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read: No such file"):
        load(tmp_path / "missing.toml")


def test_binary_file(tmp_path: Path) -> None:
    path = tmp_path / "sensor.toml"
    path.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(ConfigError, match="invalid TOML"):
        load(path)

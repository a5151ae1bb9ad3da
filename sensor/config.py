"""Sensor configuration: a TOML file, overridden by command-line flags.

Every problem is reported as one ``ConfigError`` line naming the file and key, so the daemon
can fail at start with a message an operator can act on.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from backplane.schema import Family, Tier
from sensor.capture import FilterConfig

MODES = ("auto", *(t.value for t in Tier))
DEFAULT_STATE_DIR = Path("/var/lib/edr/sensor")


class ConfigError(Exception):
    """Invalid configuration; the message is one line meant for the operator."""


@dataclass
class SensorConfig:
    modes: dict[Family, str] = field(default_factory=lambda: {f: "auto" for f in Family})
    families: frozenset[Family] = frozenset(Family)
    filters: FilterConfig = field(default_factory=FilterConfig)
    state_dir: Path = DEFAULT_STATE_DIR
    poll_interval: float = 0.25  # fallback tier polling
    queue_size: int = 65536
    hash_max_bytes: int = 128 * 1024 * 1024

    def set_mode(self, mode: str, families: frozenset[Family] | None = None) -> None:
        if mode not in MODES:
            raise ConfigError(f"unknown mode {mode!r}: choose one of {', '.join(MODES)}")
        for fam in families or Family:
            self.modes[fam] = mode


def _check(cond: bool, where: str, message: str) -> None:
    if not cond:
        raise ConfigError(f"{where}: {message}")


def _str_list(value: Any, where: str) -> tuple[str, ...]:
    _check(
        isinstance(value, list) and all(isinstance(v, str) for v in value),
        where,
        "expected a list of strings",
    )
    return tuple(value)


def _prefixes(value: Any, where: str) -> tuple[str, ...]:
    items = _str_list(value, where)
    for item in items:
        _check(item.startswith("/"), where, f"{item!r} is not an absolute path")
    return items


def load(path: Path | None) -> SensorConfig:
    """Read ``path`` (``None``: defaults). Unknown keys are errors, not silently ignored."""
    config = SensorConfig()
    if path is None:
        return config
    try:
        data = tomllib.loads(path.read_text())
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: invalid TOML: {exc}") from None

    known = {"sensor", "capture"}
    for key in data:
        _check(
            key in known, f"{path}: [{key}]", f"unknown section (known: {', '.join(sorted(known))})"
        )

    for key, value in data.items():
        _check(isinstance(value, dict), f"{path}: {key}", "expected a [table]")
    sensor = data.get("sensor", {})
    for key, value in sensor.items():
        where = f"{path}: sensor.{key}"
        if key == "state_dir":
            _check(
                isinstance(value, str) and value.startswith("/"), where, "expected an absolute path"
            )
            config.state_dir = Path(value)
        elif key == "queue_size":
            _check(isinstance(value, int) and value > 0, where, "expected a positive integer")
            config.queue_size = value
        else:
            raise ConfigError(f"{where}: unknown key")

    capture = data.get("capture", {})
    for key, value in capture.items():
        where = f"{path}: capture.{key}"
        if key == "mode":
            _check(
                isinstance(value, str) and value in MODES,
                where,
                f"expected one of {', '.join(MODES)}",
            )
            config.set_mode(value)
        elif key == "modes":
            _check(isinstance(value, dict), where, "expected a table of family = mode")
            for fam, mode in value.items():
                _check(fam in set(Family), f"{where}.{fam}", "unknown family")
                _check(mode in MODES, f"{where}.{fam}", f"expected one of {', '.join(MODES)}")
                config.modes[Family(fam)] = mode
        elif key == "families":
            names = _str_list(value, where)
            for name in names:
                _check(name in set(Family), where, f"unknown family {name!r}")
            _check(bool(names), where, "at least one family is needed")
            config.families = frozenset(Family(n) for n in names)
        elif key == "poll_interval":
            _check(
                isinstance(value, int | float) and 0.01 <= value <= 60,
                where,
                "expected seconds in 0.01..60",
            )
            config.poll_interval = float(value)
        elif key == "hash_max_bytes":
            _check(isinstance(value, int) and value >= 0, where, "expected a byte count")
            config.hash_max_bytes = value
        elif key in (
            "exclude_prefixes",
            "include_prefixes",
            "sensitive_read_prefixes",
            "watch_paths",
        ):
            setattr(config.filters, key, _prefixes(value, where))
        else:
            raise ConfigError(f"{where}: unknown key")
    return config

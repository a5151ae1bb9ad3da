"""Sensor configuration: a TOML file, then ``EDR_SENSOR_<KEY>`` environment overrides, then
command-line flags.

Every key of the file can also come from the environment, named after the key alone (keys are
unique across sections): ``EDR_SENSOR_QUEUE_SIZE=4096``, ``EDR_SENSOR_MODE=tracepoint``. Lists
are comma-separated (``EDR_SENSOR_WATCH_PATHS=/srv,/etc``) and ``EDR_SENSOR_MODES`` takes
``family=mode`` pairs (``process=kprobe,file=fallback``). An unknown ``EDR_SENSOR_`` variable
is an error, like an unknown key, so a typo cannot pass unnoticed.

Every problem is reported as one ``ConfigError`` line naming the file (or variable) and key, so
the daemon can fail at start with a message an operator can act on.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from backplane.schema import Family, Tier
from sensor.capture import FilterConfig

MODES = ("auto", *(t.value for t in Tier))
DEFAULT_STATE_DIR = Path("/var/lib/edr/sensor")
ENV_PREFIX = "EDR_SENSOR_"


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
    # The backplane address (HOST[:PORT]) to stream to; None: the command line decides.
    controller: str | None = None

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


_PREFIX_KEYS = ("exclude_prefixes", "include_prefixes", "sensitive_read_prefixes", "watch_paths")
SENSOR_KEYS = ("state_dir", "queue_size", "controller")
CAPTURE_KEYS = ("mode", "modes", "families", "poll_interval", "hash_max_bytes", *_PREFIX_KEYS)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _apply_sensor(config: SensorConfig, key: str, value: Any, where: str) -> None:
    if key == "state_dir":
        _check(isinstance(value, str) and value.startswith("/"), where, "expected an absolute path")
        config.state_dir = Path(value)
    elif key == "queue_size":
        _check(_is_int(value) and value > 0, where, "expected a positive integer")
        config.queue_size = value
    elif key == "controller" and value is None:  # an empty EDR_SENSOR_CONTROLLER: unset
        config.controller = None
    elif key == "controller":
        _check(
            isinstance(value, str) and bool(value.strip()) and not any(c.isspace() for c in value),
            where,
            "expected HOST[:PORT] without spaces",
        )
        config.controller = value
    else:
        raise ConfigError(f"{where}: unknown key")


def _apply_capture(config: SensorConfig, key: str, value: Any, where: str) -> None:
    if key == "mode":
        _check(
            isinstance(value, str) and value in MODES, where, f"expected one of {', '.join(MODES)}"
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
            isinstance(value, int | float) and not isinstance(value, bool) and 0.01 <= value <= 60,
            where,
            "expected seconds in 0.01..60",
        )
        config.poll_interval = float(value)
    elif key == "hash_max_bytes":
        _check(_is_int(value) and value >= 0, where, "expected a byte count")
        config.hash_max_bytes = value
    elif key in _PREFIX_KEYS:
        setattr(config.filters, key, _prefixes(value, where))
    else:
        raise ConfigError(f"{where}: unknown key")


def _from_env(key: str, raw: str, where: str) -> Any:
    """Turn an environment string into the value the TOML file would hold for ``key``."""
    if key == "controller" and not raw.strip():
        return None  # sensor.env ships the variable empty until the address is known
    if key in ("families", *_PREFIX_KEYS):
        return [v.strip() for v in raw.split(",") if v.strip()]
    if key == "modes":
        pairs: dict[str, str] = {}
        for item in (v.strip() for v in raw.split(",")):
            if not item:
                continue
            fam, sep, mode = item.partition("=")
            _check(bool(sep), where, f"expected family=mode pairs, got {item!r}")
            pairs[fam.strip()] = mode.strip()
        return pairs
    if key in ("queue_size", "hash_max_bytes"):
        try:
            return int(raw.strip())
        except ValueError:
            raise ConfigError(f"{where}: expected an integer, got {raw!r}") from None
    if key == "poll_interval":
        try:
            return float(raw.strip())
        except ValueError:
            raise ConfigError(f"{where}: expected a number of seconds, got {raw!r}") from None
    return raw


def load(path: Path | None, *, env: Mapping[str, str] | None = None) -> SensorConfig:
    """Read ``path`` (``None``: defaults), then apply ``EDR_SENSOR_*`` variables from ``env``
    (default: the process environment). Unknown keys are errors, not silently ignored."""
    config = SensorConfig()
    if path is not None:
        _load_file(config, path)
    env = os.environ if env is None else env
    overrides: dict[str, tuple[str, str]] = {}
    for name, raw in env.items():
        if not name.startswith(ENV_PREFIX):
            continue
        key = name[len(ENV_PREFIX) :].lower()
        if key not in SENSOR_KEYS and key not in CAPTURE_KEYS:
            known = ", ".join(ENV_PREFIX + k.upper() for k in (*SENSOR_KEYS, *CAPTURE_KEYS))
            raise ConfigError(f"environment {name}: unknown setting (known: {known})")
        overrides[key] = (name, raw)
    # A fixed order, so EDR_SENSOR_MODE sets every family before EDR_SENSOR_MODES refines some.
    for key in (*SENSOR_KEYS, *CAPTURE_KEYS):
        if key not in overrides:
            continue
        name, raw = overrides[key]
        where = f"environment {name}"
        value = _from_env(key, raw, where)
        if key in SENSOR_KEYS:
            _apply_sensor(config, key, value, where)
        else:
            _apply_capture(config, key, value, where)
    return config


def _load_file(config: SensorConfig, path: Path) -> None:
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
    for key, value in data.get("sensor", {}).items():
        _apply_sensor(config, key, value, f"{path}: sensor.{key}")
    for key, value in data.get("capture", {}).items():
        _apply_capture(config, key, value, f"{path}: capture.{key}")

"""The controller's configuration: a TOML file, then ``EDR_CONTROLLER_<KEY>`` environment overrides.

Every key is optional; the file is flat (no tables)::

    state_dir = "/var/lib/edr/controller"     # PKI in <state_dir>/pki, store in controller.db
    http_host = "0.0.0.0"
    http_port = 8443
    backplane = "tcp://0.0.0.0:7443"
    rule_dirs = ["/etc/edr/rules"]
    retention_max_age = 2592000               # seconds; 0 = keep forever
    retention_max_bytes = 10737418240         # bytes of event documents; 0 = unbounded
    command_ttl = 3600                        # seconds a queued command waits for its host
    server_names = ["edr.example.org", "localhost", "127.0.0.1"]

An environment variable overrides the file: lists are comma-separated
(``EDR_CONTROLLER_RULE_DIRS=/a,/b``). Every problem is reported as one ``ConfigError`` line
that names the key and where its value came from.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import socket
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ENV_PREFIX = "EDR_CONTROLLER_"
DEFAULT_STATE_DIR = Path("/var/lib/edr/controller")


class ConfigError(ValueError):
    """Invalid configuration; the message is one line meant for the operator."""


def _default_names() -> list[str]:
    names = [socket.gethostname(), "localhost", "127.0.0.1"]
    return list(dict.fromkeys(n for n in names if n))  # dedupe, keep order


@dataclass(frozen=True)
class ControllerConfig:
    """Everything ``edr-controller serve`` needs. Build it directly in tests."""

    state_dir: Path = DEFAULT_STATE_DIR
    http_host: str = "0.0.0.0"  # noqa: S104 - the console is meant to be reachable
    http_port: int = 8443
    backplane: str = "tcp://0.0.0.0:7443"
    rule_dirs: tuple[Path, ...] = ()
    retention_max_age: float | None = 30 * 86400.0
    retention_max_bytes: int | None = None
    command_ttl: float = 3600.0
    server_names: tuple[str, ...] = field(default_factory=lambda: tuple(_default_names()))
    # Tuning, rarely changed: events buffered for detection (ingest waits when full) and
    # items buffered per websocket client (dropped and counted when full).
    detection_queue: int = 256
    live_queue: int = 1000
    max_body: int = 1024 * 1024

    def __post_init__(self) -> None:
        # Accept plain strings and lists from callers that build the object by hand.
        object.__setattr__(self, "state_dir", Path(self.state_dir))
        object.__setattr__(self, "rule_dirs", tuple(Path(d) for d in self.rule_dirs))
        object.__setattr__(self, "server_names", tuple(self.server_names))
        _validate(self)

    @property
    def pki_dir(self) -> Path:
        return self.state_dir / "pki"

    @property
    def db_path(self) -> Path:
        return self.state_dir / "controller.db"


# key → (kind, human description of what is accepted)
_KINDS: dict[str, str] = {
    "state_dir": "path",
    "http_host": "str",
    "http_port": "port",
    "backplane": "str",
    "rule_dirs": "paths",
    "retention_max_age": "opt_seconds",
    "retention_max_bytes": "opt_int",
    "command_ttl": "seconds",
    "server_names": "strs",
    "detection_queue": "pos_int",
    "live_queue": "pos_int",
    "max_body": "pos_int",
}


def _validate(cfg: ControllerConfig) -> None:
    if not cfg.http_host:
        raise ConfigError("http_host: must not be empty")
    if not 0 <= cfg.http_port <= 65535:
        raise ConfigError(f"http_port: {cfg.http_port} is not a port number (0-65535)")
    if not cfg.backplane.startswith(("tcp://", "ipc://")):
        raise ConfigError(f"backplane: {cfg.backplane!r} must be a tcp:// or ipc:// endpoint")
    if cfg.command_ttl <= 0:
        raise ConfigError("command_ttl: must be a positive number of seconds")
    if not cfg.server_names:
        raise ConfigError("server_names: at least one name is needed for the certificate")
    for name in cfg.server_names:
        try:
            ipaddress.ip_address(name)
        except ValueError:
            if not name or len(name) > 253 or any(c.isspace() or c in "/\\" for c in name):
                raise ConfigError(f"server_names: {name!r} is not a host name") from None
    for key in ("detection_queue", "live_queue", "max_body"):
        if getattr(cfg, key) <= 0:
            raise ConfigError(f"{key}: must be positive")


def _convert(key: str, value: Any, source: str) -> Any:
    """Check and convert one raw value (from TOML or an environment string)."""
    kind = _KINDS[key]
    from_env = isinstance(value, str) and source.startswith("environment")

    def bad(expected: str) -> ConfigError:
        return ConfigError(f"{key} ({source}): expected {expected}, got {value!r}")

    if kind in ("paths", "strs"):
        if from_env:
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
            raise bad("a list of non-empty strings")
        return tuple(Path(v) for v in value) if kind == "paths" else tuple(value)
    if kind in ("path", "str"):
        if not isinstance(value, str) or not value:
            raise bad("a non-empty string")
        return Path(value) if kind == "path" else value
    # numbers
    if from_env:
        try:
            value = float(value) if kind.endswith("seconds") else int(value)
        except ValueError:
            raise bad("a number") from None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise bad("a number")
    if kind in ("port", "opt_int", "pos_int") and not isinstance(value, int):
        raise bad("an integer")
    if value < 0:
        raise bad("a number ≥ 0")
    if kind in ("opt_seconds", "opt_int"):
        return None if value == 0 else value  # 0 means "no limit"
    if kind == "seconds":
        return float(value)
    return value


def load_config(
    path: str | os.PathLike[str] | None = None,
    *,
    env: Mapping[str, str] | None = None,
    **overrides: Any,
) -> ControllerConfig:
    """Read ``path`` (if given), apply environment overrides, then ``overrides`` (CLI flags).

    Raises:
        ConfigError: unreadable file, TOML syntax error, unknown key or bad value.
    """
    env = os.environ if env is None else env
    values: dict[str, Any] = {}
    if path is not None:
        try:
            with open(path, "rb") as f:
                data = tomllib.load(f)
        except OSError as e:
            raise ConfigError(f"cannot read config file {path}: {e.strerror or e}") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"config file {path}: invalid TOML: {e}") from None
        for key, value in data.items():
            if key not in _KINDS:
                known = ", ".join(sorted(_KINDS))
                raise ConfigError(f"config file {path}: unknown key {key!r} (known: {known})")
            values[key] = _convert(key, value, f"in {path}")
    for name, raw in env.items():
        if not name.startswith(ENV_PREFIX):
            continue
        key = name[len(ENV_PREFIX) :].lower()
        if key not in _KINDS:
            raise ConfigError(f"environment variable {name}: unknown setting {key!r}")
        values[key] = _convert(key, raw, f"environment {name}")
    for key, value in overrides.items():
        if value is None:
            continue
        if key not in _KINDS:
            raise ConfigError(f"unknown setting {key!r}")
        values[key] = _convert(
            key, str(value) if isinstance(value, Path) else value, "command line"
        )
    try:
        return ControllerConfig(**values)
    except TypeError as e:  # pragma: no cover - keys are checked above
        raise ConfigError(str(e)) from None


def as_dict(cfg: ControllerConfig) -> dict[str, Any]:
    """The configuration as plain JSON-able values (for logs and the API)."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        if isinstance(v, Path):
            v = str(v)
        elif isinstance(v, tuple):
            v = [str(x) for x in v]
        out[f.name] = v
    return out

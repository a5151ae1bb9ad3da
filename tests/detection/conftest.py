"""Event builders shaped like the sensor's (backplane.schema + sensor.capture) and a helper
that loads rules written into a temporary folder."""

from __future__ import annotations

import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from backplane.schema import Action, Tier, new_event
from controller.detection import DetectionEngine

HOST = {"id": "h-0001", "name": "web-01"}


def process_fields(
    image: str = "/usr/bin/ls",
    cmdline: str | None = None,
    *,
    parent_image: str = "/usr/bin/bash",
    parent_cmdline: str = "-bash",
    cwd: str = "/home/alice",
    user: str = "alice",
    pid: int = 4242,
) -> dict[str, Any]:
    args = (cmdline or image).split()
    return {
        "process": {
            "pid": pid,
            "entity_id": f"e-{pid}",
            "name": image.rsplit("/", 1)[-1],
            "executable": image,
            "args": args,
            "args_count": len(args),
            "command_line": cmdline if cmdline is not None else image,
            "working_directory": cwd,
            "parent": {
                "pid": 100,
                "entity_id": "e-100",
                "name": parent_image.rsplit("/", 1)[-1],
                "executable": parent_image,
                "command_line": parent_cmdline,
            },
        },
        "user": {"id": "1000", "name": user, "audit": {"id": "1000"}},
    }


def exec_event(image: str = "/usr/bin/ls", cmdline: str | None = None, **kw: Any) -> dict[str, Any]:
    ev = new_event(Action.EXEC, host=HOST, tier=Tier.TRACEPOINT)
    ev.update(process_fields(image, cmdline, **kw))
    return ev


def file_event(
    path: str,
    action: Action = Action.FILE_WRITE,
    image: str = "/usr/bin/vim",
    original: str | None = None,
    **kw: Any,
) -> dict[str, Any]:
    ev = new_event(action, host=HOST, tier=Tier.TRACEPOINT)
    ev.update(process_fields(image, **kw))
    directory, _, name = path.rpartition("/")
    ev["file"] = {"path": path, "name": name, "directory": directory or "/"}
    if original is not None:
        ev["file"]["Ext"] = {"original": {"path": original}}
    return ev


def net_event(
    ip: str,
    port: int,
    image: str = "/usr/bin/curl",
    action: Action = Action.CONNECT,
    transport: str = "tcp",
    domain: str | None = None,
    **kw: Any,
) -> dict[str, Any]:
    ev = new_event(action, host=HOST, tier=Tier.TRACEPOINT)
    ev.update(process_fields(image, **kw))
    ev["network"] = {
        "transport": transport,
        "type": "ipv6" if ":" in ip else "ipv4",
        "direction": "egress" if action is Action.CONNECT else "ingress",
    }
    ev["source"] = {"ip": "::1" if ":" in ip else "10.0.0.5", "port": 40000}
    ev["destination"] = {"ip": ip, "port": port}
    if domain:
        ev["destination"]["domain"] = domain
    return ev


RuleLoader = Callable[..., DetectionEngine]


@pytest.fixture
def load_rule(tmp_path: Path) -> RuleLoader:
    """Write one rule (detection block given as YAML) and return an engine that loaded only it."""
    counter = iter(range(10_000))

    def load(detection: str, category: str = "process_creation", **extra: str) -> DetectionEngine:
        n = next(counter)
        folder = tmp_path / f"r{n}"
        folder.mkdir()
        lines = [
            f"title: test rule {n}",
            f"id: 00000000-0000-4000-8000-{n:012d}",
            "level: high",
            "logsource:",
            "  product: linux",
            f"  category: {category}",
            "detection:",
            textwrap.indent(textwrap.dedent(detection).strip("\n"), "  "),
        ]
        lines += [f"{k}: {v}" for k, v in extra.items()]
        (folder / "rule.yml").write_text("\n".join(lines) + "\n")
        engine = DetectionEngine(include_builtin=False)
        report = engine.load([folder])
        assert report.problems == [], [str(p) for p in report.problems]
        assert len(report.loaded) == 1
        return engine

    return load


class Events:
    """The builders above, handed to tests as one fixture (conftest is not importable)."""

    exec = staticmethod(exec_event)
    file = staticmethod(file_event)
    net = staticmethod(net_event)
    host = HOST


@pytest.fixture
def ev() -> type[Events]:
    return Events

"""Fixtures for the controller core tests (helpers live in core_harness.py)."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from core_harness import Controller, Sensor, make_config


@pytest.fixture
def controller(tmp_path: Path) -> Iterator[Controller]:
    ctl = Controller(make_config(tmp_path))
    try:
        yield ctl
    finally:
        ctl.close()


@pytest.fixture
def sensor_factory(controller: Controller, tmp_path: Path) -> Iterator[Callable[..., Sensor]]:
    made: list[Sensor] = []

    def make(name: str = "sensor-01", **kw: Any) -> Sensor:
        s = Sensor(controller, tmp_path / f"sensor-{len(made)}", name, **kw)
        made.append(s)
        return s

    yield make
    for s in made:
        s.stop()

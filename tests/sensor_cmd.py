"""The sensor's command line as the end-to-end tests start it: one place for its shape."""

from __future__ import annotations

import sys


def fallback_sensor(*args: str) -> list[str]:
    """``edr-sensor run`` from this checkout, fallback tier, process family, then ``args``.

    The fallback tier needs no BPF, so these tests run as any user and on any kernel.
    """
    return [
        *(sys.executable, "-m", "sensor.cli", "run"),
        *("--mode", "fallback", "--families", "process"),
        *args,
    ]

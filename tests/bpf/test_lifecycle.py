"""Availability checks, the kprobe tier's refusal here, and the source lifecycle (root)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from backplane.schema import Family
from sensor import ebpf
from sensor.capture import CaptureContext, TierUnavailable
from sensor.ebpf import KprobeSource, TracepointSource
from sensor.process_table import ProcessTable

from .conftest import start_source

pytestmark = [pytest.mark.root, pytest.mark.timeout(120)]


def _ctx() -> CaptureContext:
    return CaptureContext(host={"id": "h"}, table=ProcessTable("h"), emit=lambda ev: None)


def test_tracepoint_tier_is_available_here() -> None:
    assert TracepointSource.unavailable() is None
    assert os.environ.get("BCC_KERNEL_SOURCE")  # defaulted to the generic headers if unset


@pytest.mark.skipif(Path("/sys/kernel/tracing/kprobe_events").exists(), reason="has kprobes")
def test_kprobe_tier_refuses_without_kprobes() -> None:
    reason = KprobeSource.unavailable()
    assert reason is not None and "kprobes" in reason
    with pytest.raises(TierUnavailable, match="kprobes"):
        KprobeSource(_ctx(), frozenset(Family)).open()


def test_kprobe_tier_refuses_mismatched_headers(monkeypatch, tmp_path: Path) -> None:
    (tmp_path / "include/generated").mkdir(parents=True)
    (tmp_path / "include/generated/utsrelease.h").write_text('#define UTS_RELEASE "1.2.3-old"\n')
    monkeypatch.setenv("BCC_KERNEL_SOURCE", str(tmp_path))
    fake_tracefs = tmp_path / "tracefs"
    for sub in ("events/sched/sched_process_exec", "events/syscalls/sys_enter_openat"):
        (fake_tracefs / sub).mkdir(parents=True)
    (fake_tracefs / "kprobe_events").write_text("")
    monkeypatch.setattr(ebpf, "TRACEFS", fake_tracefs)
    reason = KprobeSource.unavailable()
    assert reason is not None and "1.2.3-old" in reason and "not the running" in reason


def test_missing_headers_are_reported(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setenv("BCC_KERNEL_SOURCE", str(tmp_path / "nowhere"))
    assert "no kernel headers" in (TracepointSource.unavailable() or "")


def test_no_families_is_refused() -> None:
    src = TracepointSource(_ctx(), frozenset())
    with pytest.raises(TierUnavailable, match="no families"):
        src.open()
    src.close()


@pytest.mark.bpf
def test_close_is_idempotent_and_stop_is_prompt() -> None:
    running = start_source(frozenset({Family.NETWORK}))
    took = running.halt()
    assert took < 0.5
    running.source.close()  # second close: no error
    assert running.source.counters()["dropped"] == 0
    # a closed source's run returns at once
    import threading

    stop = threading.Event()
    running.source.run(stop)

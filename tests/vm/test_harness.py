"""The VM harness's pure-Python parts (no VM is booted: `make vm-test` does that)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

import pytest

HERE = Path(__file__).resolve().parent


def _load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"edr_vm_{name}", HERE / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


harness = _load("harness")
guest = _load("guest_check")


def result_line(**fields: object) -> str:
    return "EDR-VM-RESULT " + json.dumps(fields)


def test_qemu_command_is_isolated_and_leaves_the_image_alone(tmp_path: Path) -> None:
    cmd = harness.qemu_command(tmp_path, "6.1.0-99-amd64", ("kprobe",), repo=Path("/r"))
    assert cmd[0] == "qemu-system-x86_64"
    assert "-enable-kvm" in cmd and "-nographic" in cmd and "-no-reboot" in cmd
    assert cmd[cmd.index("-nic") + 1] == "none"  # no network device at all
    assert cmd[cmd.index("-kernel") + 1] == str(tmp_path / "boot/vmlinuz-6.1.0-99-amd64")
    drive = cmd[cmd.index("-drive") + 1]
    assert "snapshot=on" in drive and str(tmp_path / "rootfs.img") in drive
    share = cmd[cmd.index("-virtfs") + 1]
    assert "readonly=on" in share and "path=/r," in share
    assert "edr.tiers=kprobe" in cmd[cmd.index("-append") + 1].split()
    tcg = harness.qemu_command(tmp_path, "6.1.0-99-amd64", ("kprobe",), accel="tcg")
    assert "-enable-kvm" not in tcg and tcg[tcg.index("-accel") + 1].startswith("tcg")
    with pytest.raises(ValueError, match="accelerator"):
        harness.qemu_command(tmp_path, "6.1.0-99-amd64", ("kprobe",), accel="hvf")


@pytest.mark.parametrize(
    ("kernel", "tiers"),
    [
        ("", ("kprobe",)),
        ("6.1,x", ("kprobe",)),
        ("../x", ("kprobe",)),
        ("6.1", ("bogus",)),
        ("6.1", ()),
    ],
)
def test_qemu_command_refuses_bad_input(
    tmp_path: Path, kernel: str, tiers: tuple[str, ...]
) -> None:
    with pytest.raises(ValueError):
        harness.qemu_command(tmp_path, kernel, tiers)


def test_parse_console_finds_results_among_kernel_noise() -> None:
    good = {"tier": "kprobe", "kernel": "6.1", "checks": [{"name": "exec", "ok": True}]}
    text = "\r\n".join(
        [
            "[    1.0] random: crng init done",
            "[    2.0] audit: noise " + result_line(**good),  # printk glued in front
            "EDR-VM-RESULT {not json",
            "EDR-VM-RESULT [1, 2]",
            "EDR-VM-DONE",
        ]
    )
    results, errors = harness.parse_console(text)
    assert results == [good]
    assert len(errors) == 2
    assert "unreadable result line" in errors[0] and "not an object" in errors[1]


def outcome(results: list[dict[str, object]], *, finished: bool = True) -> object:
    return harness.BootOutcome(kernel="6.1", results=results, finished=finished, seconds=1.0)


def test_judge_per_tier() -> None:
    ok = [{"name": "exec", "ok": True}, {"name": "files", "ok": True}]
    bad = [{"name": "exec", "ok": True}, {"name": "network", "ok": False, "error": "x"}]
    verdict = harness.judge(
        outcome(
            [
                {"tier": "kprobe", "kernel": "6.1", "checks": ok},
                {"tier": "tracepoint", "kernel": "6.1", "checks": bad},
            ]
        ),
        ("kprobe", "tracepoint"),
    )
    assert verdict == {"kprobe": "PASS (2 checks)", "tracepoint": "FAIL: network"}


def test_judge_reports_missing_errors_and_wrong_kernel() -> None:
    tiers = ("kprobe", "tracepoint")
    assert harness.judge(outcome([], finished=False), tiers)["kprobe"] == (
        "FAIL: no result (VM timed out)"
    )
    setup_failed = outcome([{"error": "scripts/setup.sh failed in the guest"}])
    assert harness.judge(setup_failed, tiers)["tracepoint"] == (
        "FAIL: scripts/setup.sh failed in the guest"
    )
    crashed = outcome([{"tier": "kprobe", "error": "guest_check exited 1"}])
    assert harness.judge(crashed, tiers)["kprobe"] == "FAIL: guest_check exited 1"
    elsewhere = outcome([{"tier": "kprobe", "kernel": "6.12", "checks": [{"ok": True}]}])
    assert harness.judge(elsewhere, ("kprobe",))["kprobe"].startswith("FAIL: ran on 6.12")
    empty = outcome([{"tier": "kprobe", "kernel": "6.1", "checks": []}])
    assert harness.judge(empty, ("kprobe",))["kprobe"] == "FAIL: no checks ran"


def test_format_table() -> None:
    table = harness.format_table(
        [("6.1.0-1-amd64", {"kprobe": "PASS (9 checks)", "tracepoint": "FAIL: files"})],
        ("kprobe", "tracepoint"),
    )
    lines = table.splitlines()
    assert lines[0].split() == ["kernel", "kprobe", "tracepoint"]
    assert set(lines[1].replace(" ", "")) == {"-"}
    assert lines[2].startswith("6.1.0-1-amd64") and lines[2].endswith("FAIL: files")


def test_kernels_in_needs_an_image(tmp_path: Path) -> None:
    with pytest.raises(harness.HarnessError, match=r"build_image\.sh"):
        harness.kernels_in(tmp_path)
    (tmp_path / "kernels.txt").write_text("\n")
    with pytest.raises(harness.HarnessError, match="no kernels"):
        harness.kernels_in(tmp_path)
    (tmp_path / "kernels.txt").write_text("6.1.0-1-amd64\n6.12.9+bpo-amd64\n")
    assert harness.kernels_in(tmp_path) == ["6.1.0-1-amd64", "6.12.9+bpo-amd64"]


def test_boot_refuses_a_missing_kernel(tmp_path: Path) -> None:
    with pytest.raises(harness.HarnessError, match="missing"):
        harness.boot(tmp_path, "6.1.0-1-amd64", ("kprobe",), timeout=1)


def test_guest_checker_records_failures_without_stopping(tmp_path: Path) -> None:
    checker = guest.Checker(guest.load_e2e(), "kprobe", tmp_path)
    assert checker.run("good", lambda: None)

    def boom() -> None:
        raise AssertionError("no matching event")

    assert not checker.run("bad", boom)
    assert [r["ok"] for r in checker.results] == [True, False]
    assert checker.results[1]["error"] == "AssertionError: no matching event"


def test_guest_check_refuses_unknown_tier() -> None:
    with pytest.raises(SystemExit):
        guest.main(["--tier", "fallback"])

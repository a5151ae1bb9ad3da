"""Response actions driven from the console in headless Chromium, end to end: the real
controller over HTTPS, the real sensor process over the mutual-TLS backplane, and checks on
the machine itself (``/proc``, a network namespace's reachability and nftables).

* Kill a held process from its alert: a policy put in force through the Policy page makes the
  sensor hold (SIGSTOP) a matching exec; the test rule raises an alert for it; Kill on the
  alert page, confirmed, must succeed and the process must really be gone.
* Isolate and unisolate: the sensor runs inside a "host" network namespace whose only links
  lead to a "controller" namespace (where the backplane listens) and an "other" one. Isolation
  must cut "other" and keep the controller; the machine's own ruleset must not change.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from browser_harness import RULE_MARKER, Controller, SensorProcess, wait_for

from controller.store.interface import NotFound

sys.path.insert(0, str(Path(__file__).parents[1] / "response"))
from netns_lab import Namespaces, netns_lab

pytest.importorskip("playwright.sync_api")
from console_page import CHROMIUM, Errors, login, shot
from playwright.sync_api import Browser, Page, expect

pytestmark = [
    pytest.mark.root,  # signals, nftables, namespaces and the proc connector need root
    pytest.mark.timeout(180),
    pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium"),
]

CTRL, OTHER = "10.78.1.2", "10.78.2.2"


@contextmanager
def console(browser: Browser, ctl: Controller) -> Iterator[tuple[Page, Errors]]:
    ctx = browser.new_context(
        ignore_https_errors=True, base_url=ctl.url, viewport={"width": 1366, "height": 768}
    )
    try:
        pg = ctx.new_page()
        pg.set_default_timeout(15_000)
        yield pg, Errors(pg)
    finally:
        ctx.close()


def proc_state(pid: int) -> str | None:
    """The one-letter state from ``/proc/<pid>/stat``; None once the pid is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return stat.rsplit(")", 1)[1].split()[0]  # the name in parentheses may hold spaces


def command_done(pg: Page, area: str, status: str = "succeeded") -> None:
    """The command's state drawn under ``area`` reaches ``status`` (the page polls it)."""
    expect(pg.locator(f"{area} .cmd-status")).to_have_attribute(
        "data-status", status, timeout=30_000
    )


# -- kill a held process from its alert ----------------------------------------------------------


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Controller, str]]:
    state = tmp_path_factory.mktemp("respond")
    ctl = Controller(state)
    sensor = SensorProcess(ctl, state / "sensor", hostname="respond-host")
    try:
        yield ctl, sensor.host_id
    finally:
        sensor.stop()
        ctl.close()


def test_kill_held_process_from_its_alert(browser: Browser, stack: tuple[Controller, str]) -> None:
    ctl, host_id = stack
    tag = f"edr-hold-{uuid.uuid4().hex[:8]}"
    with console(browser, ctl) as (pg, errors):
        login(pg, errors, "ada")

        # Put a hold policy in force through the Policy page.
        pg.goto("/#/policy")
        doc = {"responses": {"hold_suspicious_exec": {"enabled": True, "patterns": [f"*{tag}*"]}}}
        pg.locator("#policy-doc").fill(json.dumps(doc, indent=2))
        pg.get_by_label("Change comment").fill("hold the browser test's process")
        pg.get_by_role("button", name="Save and push to all hosts").click()
        expect(pg.locator("main")).to_contain_text("by ada")
        version = ctl.ctx.store.current_policy().version
        wait_for(
            lambda: ctl.ctx.store.get_host(host_id).policy_version == version,
            20,
            "the sensor to apply the hold policy",
        )
        pg.reload()
        expect(pg.locator("main table").first).to_contain_text("yes")
        shot(pg, "policy-hold")

        # The suspicious exec: held by the sensor, alerted on by the test rule.
        victim = subprocess.Popen(
            [sys.executable, "-c", "import time; time.sleep(120)", RULE_MARKER, tag]
        )
        try:
            wait_for(
                lambda: proc_state(victim.pid) == "T",
                15,
                f"the sensor to hold (SIGSTOP) pid {victim.pid}",
            )
            assert victim.poll() is None

            pg.goto("/#/alerts")
            row = pg.locator("#alert-list tbody tr").filter(has_text=tag)
            expect(row).to_have_count(1, timeout=20_000)
            row.click()
            expect(pg.locator("main")).to_contain_text(tag)
            kill = pg.locator("#held button[data-action=kill]")
            expect(kill).to_be_visible()
            assert proc_state(victim.pid) == "T"  # still held while the analyst looks
            kill.click()
            expect(pg.locator("#confirm-text")).to_contain_text(f"Kill process {victim.pid}")
            pg.locator("#confirm-ok").click()
            command_done(pg, "#alert-command")
            shot(pg, "alert-kill-held")

            # Really gone: it died of SIGKILL (reaping the zombie), and /proc no longer has it.
            assert victim.wait(10) == -signal.SIGKILL
            assert proc_state(victim.pid) is None
        finally:
            if victim.poll() is None:
                victim.kill()
                victim.wait(10)
        cmds = ctl.ctx.store.command_history(host_id)
        assert [(c.action, c.status.value) for c in cmds] == [("kill", "succeeded")]
        assert errors.items == []


# -- isolate and unisolate inside network namespaces ---------------------------------------------


@pytest.fixture
def lab() -> Iterator[Namespaces]:
    """host ⇄ controller (10.78.1.0/24) and host ⇄ other (10.78.2.0/24), veth pairs only."""
    with netns_lab("10.78", "fd78", "edr-b") as ns:
        yield ns


def host_online(ctl: Controller, host_id: str) -> bool:
    try:
        return bool(ctl.ctx.store.get_host(host_id).online)
    except NotFound:  # not said hello yet
        return False


def test_isolate_and_unisolate_in_a_namespace(
    browser: Browser, lab: Namespaces, tmp_path: Path
) -> None:
    # The backplane listens in the controller namespace; the console stays on our loopback.
    ctl = Controller(tmp_path, backplane_host=CTRL, netns=lab.ctrl)
    sensor: SensorProcess | None = None
    try:
        sensor = SensorProcess(ctl, tmp_path / "sensor", hostname="isolated-host", netns=lab.host)
        host_id = sensor.host_id
        wait_for(lambda: host_online(ctl, host_id), 20, "the namespaced sensor to connect")
        with console(browser, ctl) as (pg, errors):
            login(pg, errors, "rex")
            name = ctl.ctx.store.get_host(host_id).hostname  # what the sensor reported
            pg.goto(f"/#/host/{host_id}")
            expect(pg.locator("h1")).to_contain_text(f"Host {name}")
            expect(pg.locator("h1 .badge.isolated")).to_have_count(0)

            pg.locator("button[data-action=isolate]").click()
            expect(pg.locator("#confirm-text")).to_contain_text(f"Isolate host {name}")
            pg.locator("#confirm-ok").click()
            command_done(pg, "#host-command")
            expect(pg.locator("#host-command")).to_contain_text('"isolated":true')
            assert lab.has_edr_table()
            assert not lab.reach(OTHER), "isolation left 'other' reachable"
            # Still connected: heartbeats keep arriving through the isolation.
            isolated_at = ctl.ctx.store.get_host(host_id).last_seen
            wait_for(
                lambda: ctl.ctx.store.get_host(host_id).last_seen > isolated_at,
                30,
                "a heartbeat from the isolated sensor",
            )
            assert ctl.ctx.store.get_host(host_id).online

            # The controller records the isolation the sensor confirmed; the page shows it.
            pg.reload()
            expect(pg.locator("h1 .badge.isolated")).to_have_count(1)
            assert ctl.ctx.store.get_host(host_id).isolated
            shot(pg, "host-isolated")
            pg.locator("button[data-action=unisolate]").click()
            expect(pg.locator("#confirm-text")).to_contain_text("Lift the network isolation")
            pg.locator("#confirm-ok").click()
            command_done(pg, "#host-command")
            assert lab.reach(OTHER), "'other' still unreachable after unisolate"
            assert not lab.has_edr_table()
            pg.reload()
            expect(pg.locator("h1 .badge.isolated")).to_have_count(0)
            shot(pg, "host-unisolated")
            assert errors.items == []
        cmds = ctl.ctx.store.command_history(host_id)
        assert sorted((c.action, c.status.value) for c in cmds) == [
            ("isolate", "succeeded"),
            ("unisolate", "succeeded"),
        ]
    finally:
        if sensor is not None:
            sensor.stop()
        ctl.close()

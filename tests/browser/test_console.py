"""The analyst console in headless Debian Chromium (Playwright) against a real controller over
HTTPS and the real sensor (fallback tier) streaming over the mutual-TLS backplane.

Killing a held process and isolate/unisolate are in ``test_response.py``.
"""

from __future__ import annotations

import subprocess
import sys
import uuid
from collections.abc import Iterator

import pytest
from browser_harness import RULE_MARKER, Controller, SensorProcess

pytest.importorskip("playwright.sync_api")
from console_page import CHROMIUM, Errors, login, shot
from playwright.sync_api import Browser, Page, expect

pytestmark = [
    pytest.mark.root,  # the sensor's proc connector needs root
    pytest.mark.timeout(180),
    pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium"),
]


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Controller, str]]:
    state = tmp_path_factory.mktemp("console")
    ctl = Controller(state)
    sensor = SensorProcess(ctl, state / "sensor")
    try:
        yield ctl, sensor.host_id
    finally:
        sensor.stop()
        ctl.close()


@pytest.fixture
def page(browser: Browser, stack: tuple[Controller, str]) -> Iterator[tuple[Page, Errors]]:
    ctx = browser.new_context(
        ignore_https_errors=True, base_url=stack[0].url, viewport={"width": 1366, "height": 768}
    )
    pg = ctx.new_page()
    pg.set_default_timeout(15_000)
    errors = Errors(pg)
    yield pg, errors
    ctx.close()


def run_on_host(*argv: str) -> None:
    subprocess.run(
        [sys.executable, "-c", "import time; time.sleep(0.8)", *argv], check=True, timeout=30
    )


def test_wrong_password_is_shown_in_words(page: tuple[Page, Errors]) -> None:
    pg, errors = page
    pg.goto("/")
    pg.get_by_label("User name").fill("ada")
    pg.get_by_label("Password").fill("not the password")
    pg.get_by_role("button", name="Log in").click()
    expect(pg.locator("#login-error")).to_have_text("invalid username or password")
    errors.allow("401")  # the refused login request itself
    assert errors.items == []


def test_analyst_incident_flow(page: tuple[Page, Errors], stack: tuple[Controller, str]) -> None:
    pg, errors = page
    ctl, host_id = stack
    login(pg, errors, "ada")

    # Fleet: the real sensor's host, online, with its tier.
    row = pg.locator("#fleet tbody tr").filter(has_text="fallback")
    expect(row).to_have_count(1)
    expect(row.locator(".badge.online")).to_be_visible()
    shot(pg, "fleet")

    # Live events: a process run on the host appears over the websocket.
    pg.goto("/#/live?kind=exec")
    expect(pg.locator("#stream-state")).to_have_text("connected")
    tag = f"edr-browser-{uuid.uuid4().hex[:8]}"
    # Still running when its tree is shown, so the process's response buttons are offered.
    long = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", tag])
    try:
        _tree_of_running_process(pg, ctl, host_id, tag)
    finally:
        long.kill()
        long.wait(10)
    # A rule raises an alert; triage it.
    run_on_host(RULE_MARKER, tag)
    pg.goto("/#/alerts")
    alert_row = pg.locator("#alert-list tbody tr").filter(has_text="Browser Test Marker")
    expect(alert_row.first).to_be_visible(timeout=20_000)
    shot(pg, "alerts")
    alert_row.first.click()
    expect(pg.locator("#alert-status")).to_contain_text("new")
    pg.locator("#triage button[data-status=acknowledged]").click()
    expect(pg.locator("#alert-status")).to_contain_text("acknowledged")
    pg.locator("#assign-me").click()
    expect(pg.locator("main")).to_contain_text("Assigneeada")
    pg.locator("#comment").fill("looked at it: test marker")
    pg.get_by_role("button", name="Add comment").click()
    expect(pg.locator("#comments")).to_contain_text("looked at it: test marker")
    expect(pg.locator("#held button[data-action=kill]")).to_be_visible()
    shot(pg, "alert")
    # One click to the process tree.
    pg.locator("#open-tree").click()
    expect(pg.locator("#process-details .cmdline")).to_contain_text(RULE_MARKER)

    # The store agrees with what the page showed.
    alerts = ctl.ctx.store.list_alerts(limit=50)
    triaged = [a for a in alerts if a.status.value == "acknowledged"]
    assert triaged
    stored = ctl.ctx.store.get_alert(triaged[0].id)
    assert stored.assignee == "ada" and stored.comments[0].text == "looked at it: test marker"

    # Reload keeps the session; the other pages render.
    pg.reload()
    expect(pg.locator("#whoami")).to_contain_text("ada")
    for name, sel in (
        ("commands", "#command-list"),
        ("policy", "#policy-doc"),
        ("enrollment", "#certificates"),
        ("audit", "#audit-list"),
        ("search", "form"),
    ):
        pg.goto(f"/#/{name}")
        expect(pg.locator(sel).first).to_be_visible()
        shot(pg, name)
    pg.goto("/#/search?action=exec")
    expect(pg.locator("#search-results tbody tr").first).to_be_visible()
    pg.set_viewport_size({"width": 2560, "height": 1440})
    pg.goto(f"/#/host/{host_id}")
    expect(pg.locator("#charts .uplot, #charts p").first).to_be_visible()
    shot(pg, "host-2560")
    assert errors.items == []


def test_viewer_sees_no_response_buttons(
    page: tuple[Page, Errors], stack: tuple[Controller, str]
) -> None:
    pg, errors = page
    _ctl, host_id = stack
    login(pg, errors, "val")
    nav = pg.locator("#nav")
    expect(nav).to_contain_text("Fleet")
    expect(nav).not_to_contain_text("Audit log")
    expect(nav).not_to_contain_text("Enrollment")
    pg.goto(f"/#/host/{host_id}")
    expect(pg.locator("#charts")).to_be_visible()
    assert pg.locator(".response, button[data-action]").count() == 0
    pg.goto("/#/alerts")
    first = pg.locator("#alert-list tbody tr").first
    if first.count():
        first.click()
        expect(pg.locator("#alert-status")).to_be_visible()
        assert pg.locator("#triage, #held, #mark-safe").count() == 0
    shot(pg, "viewer-host")
    pg.goto("/#/audit")
    expect(pg.locator("main")).to_contain_text("needs the admin role")
    assert errors.items == []


def test_session_end_returns_to_login(page: tuple[Page, Errors]) -> None:
    pg, errors = page
    login(pg, errors, "rex")
    pg.get_by_role("button", name="Log out").click()
    expect(pg.locator("#login-error")).to_have_text("Logged out.")
    pg.reload()
    expect(pg.get_by_label("User name")).to_be_visible()
    assert errors.items == []


def _tree_of_running_process(pg: Page, ctl: Controller, host_id: str, tag: str) -> None:
    live_row = pg.locator("#live-events tr").filter(has_text=tag).first
    expect(live_row).to_be_visible(timeout=20_000)
    shot(pg, "live")

    # Pause holds new rows back (so the row stops moving), then click through to the tree.
    pg.locator("#pause").click()
    expect(pg.locator("#pause")).to_have_attribute("aria-pressed", "true")
    live_row.click()
    expect(pg.locator("#process-tree")).to_be_visible()
    expect(pg.locator("#process-details .cmdline")).to_contain_text(tag)
    expect(pg.locator("#process-details")).to_contain_text("root")
    expect(pg.locator("#process-tree .node").first).to_be_visible()
    assert pg.locator("#process-tree li").count() >= 2  # the ancestry is there too
    expect(pg.locator("#process-details button[data-action=kill]")).to_be_visible()
    expect(pg.locator("#charts .uplot, #charts p").first).to_be_visible()
    shot(pg, "host-process-tree")

    # A response action asks first, saying exactly what will happen; cancelling sends nothing.
    pg.locator("#process-details button[data-action=kill]").click()
    expect(pg.locator("#confirm-text")).to_contain_text("Kill process")
    expect(pg.locator("#confirm-text")).to_contain_text("SIGKILL")
    pg.get_by_role("button", name="Cancel").click()
    assert ctl.ctx.store.command_history(host_id) == []

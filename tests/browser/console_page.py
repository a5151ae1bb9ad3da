"""What every browser test shares: the Chromium to drive, error collection, login, screenshots."""

from __future__ import annotations

from pathlib import Path

from browser_harness import PASSWORD
from playwright.sync_api import Page, expect

CHROMIUM = Path("/usr/bin/chromium")
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
SHOTS = Path(__file__).resolve().parents[2] / "artifacts" / "screenshots"


class Errors:
    """Console errors and uncaught page errors, asserted empty at the end of each test."""

    def __init__(self, page: Page) -> None:
        self.items: list[str] = []
        page.on(
            "console",
            lambda m: self.items.append(f"console: {m.text}") if m.type == "error" else None,
        )
        page.on("pageerror", lambda e: self.items.append(f"pageerror: {e}"))

    def allow(self, needle: str) -> None:
        """Drop expected entries (the browser logs every 4xx fetch as a console error)."""
        self.items = [i for i in self.items if needle not in i]


def login(page: Page, errors: Errors, user: str, password: str = PASSWORD) -> None:
    page.goto("/#/fleet")
    page.get_by_label("User name").fill(user)
    page.get_by_label("Password").fill(password)
    page.get_by_role("button", name="Log in").click()
    expect(page.locator("#whoami")).to_contain_text(user)


def shot(page: Page, name: str) -> None:
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=True)

"""Browser tests: the harness module sits next to the tests (pytest uses importlib mode)."""

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    """One headless Debian Chromium per test module (each test opens its own context).

    Not session-wide: Playwright's sync API keeps an asyncio loop running in the main thread
    while it is open, which would make every later test's ``asyncio.run()`` fail.
    """
    playwright_sync = pytest.importorskip("playwright.sync_api")
    from console_page import ARGS, CHROMIUM

    if not CHROMIUM.exists():
        pytest.skip("needs Debian's chromium")
    with playwright_sync.sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=ARGS, headless=True)
        yield b
        b.close()

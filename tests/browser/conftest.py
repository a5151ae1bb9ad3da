"""Browser tests: the harness module sits next to the tests (pytest uses importlib mode)."""

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(scope="session")
def browser() -> Iterator[object]:
    """One headless Debian Chromium for the whole run (each test opens its own context)."""
    playwright_sync = pytest.importorskip("playwright.sync_api")
    from console_page import ARGS, CHROMIUM

    if not CHROMIUM.exists():
        pytest.skip("needs Debian's chromium")
    with playwright_sync.sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=ARGS, headless=True)
        yield b
        b.close()

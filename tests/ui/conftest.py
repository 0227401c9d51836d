"""Fixtures of the dashboard tests: the shared real service and a real headless Chromium.

The browser is Debian's `chromium` (`apt-get install -y chromium`), driven by Playwright. A
machine without it fails these tests, by design: the dashboard is tested in a real browser.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.opsd_client.service import LiveService, shared_service

CHROMIUM_ENV = "OPSD_TEST_CHROMIUM"


def chromium_path() -> str:
    """`$OPSD_TEST_CHROMIUM`, else Debian's /usr/bin/chromium (or chromium on PATH)."""
    candidates = [os.environ.get(CHROMIUM_ENV), "/usr/bin/chromium", shutil.which("chromium")]
    for candidate in candidates:
        if candidate and Path(candidate).exists():
            return candidate
    raise AssertionError(
        "the dashboard tests need a Chromium: install Debian's package "
        f"(apt-get install -y chromium) or set {CHROMIUM_ENV}"
    )


@pytest.fixture(scope="session")
def service(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> LiveService:
    return shared_service(request.config, tmp_path_factory)


# Per module, not per session: Playwright's sync API keeps an asyncio loop running while it is
# open, and asyncio.run() in a later async test of the same worker would then fail.
@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    executable = chromium_path()
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(
            executable_path=executable,
            args=["--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"],
        )
        yield launched
        launched.close()

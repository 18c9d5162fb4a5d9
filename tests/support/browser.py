"""A real headless Chromium driven by selenium, for tests of the web page.

Uses the system's chromium and chromedriver (Debian: /usr/bin); no downloads. Tests skip with
a clear reason when either is missing.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def find_browser() -> tuple[str, str]:
    """(browser binary, chromedriver) or skip the test saying what is missing."""
    browser = next((p for p in map(shutil.which, CHROMIUM_NAMES) if p), None)
    driver = shutil.which("chromedriver")
    missing = [name for name, path in (("chromium", browser), ("chromedriver", driver)) if not path]
    if missing:
        pytest.skip(
            f"web page tests need {' and '.join(missing)} on PATH (apt install chromium "
            "chromium-driver)"
        )
    assert browser and driver
    return browser, driver


@contextmanager
def headless_chrome(width: int = 1280, height: int = 1000) -> Iterator:
    """A headless Chromium session with the browser console log captured."""
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service

    browser, chromedriver = find_browser()
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--disable-gpu",
        f"--window-size={width},{height}",
        "--force-device-scale-factor=1",
    ):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(chromedriver))
    try:
        yield driver
    finally:
        driver.quit()


def console_errors(driver) -> list[dict]:  # type: ignore[no-untyped-def]
    """SEVERE entries of the browser console since the last call (empty if unsupported)."""
    try:
        logs = driver.get_log("browser")
    except Exception:  # noqa: BLE001 - a driver without the log API: nothing to check
        return []
    return [entry for entry in logs if entry.get("level") == "SEVERE"]

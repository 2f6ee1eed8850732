"""Headless Chromium for browser tests: Debian's ``chromium`` driven through ``chromium-driver``.

Missing, the test is skipped; under CI, where ``.ci/run`` installs both, it fails.
Screenshots go to ``$QABUSE_TEST_ARTIFACTS`` (default ``test-artifacts/`` in the
checkout), so a CI run keeps them.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from support.required import require_installed

ARTIFACTS_ENV = "QABUSE_TEST_ARTIFACTS"


def artifacts_dir() -> Path:
    """Where tests leave what a person may want to look at (screenshots)."""
    default = Path(__file__).resolve().parents[2] / "test-artifacts"
    path = Path(os.environ.get(ARTIFACTS_ENV) or default)
    path.mkdir(parents=True, exist_ok=True)
    return path


@contextlib.contextmanager
def headless_chromium(width: int = 1280, height: int = 1000) -> Iterator[object]:
    """A selenium WebDriver on headless Chromium, quit on exit."""
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver_path = shutil.which("chromedriver")
    require_installed(
        browser is not None and driver_path is not None,
        "chromium with chromium-driver",
        "chromium chromium-driver",
        "the triage page in a real browser",
    )
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(browser)
    for argument in (
        "--headless=new",
        "--no-sandbox",  # CI runs as root
        "--disable-dev-shm-usage",
        "--disable-gpu",
        f"--window-size={width},{height}",
    ):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(executable_path=str(driver_path)), options=options)
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()

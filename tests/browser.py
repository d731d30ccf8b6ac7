"""A headless Chromium driven by Selenium: Debian's ``chromium`` and ``chromium-driver``
(``make test`` installs them), never a browser or driver a test tool downloads.

Each browser gets a fresh profile in a temporary directory, removed when it quits. The
flags keep it off the network (the machine has none beyond the package registries)
and let it run as root.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from typing import Iterator

import pytest

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
FLAGS = ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--no-first-run", "--no-default-browser-check", "--disable-extensions",
         "--hide-scrollbars", "--window-size=1400,1600")


@contextlib.contextmanager
def chromium() -> Iterator["webdriver.Chrome"]:  # noqa: F821
    """A headless Chromium; skips the test when Debian's chromium-driver is missing."""
    if not (os.access(CHROMEDRIVER, os.X_OK) and os.access(CHROMIUM, os.X_OK)):
        pytest.skip(f"{CHROMEDRIVER} is missing: `make browser-deps` (part of `make test`) "
                    "installs Debian's chromium and chromium-driver")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="cw-chromium-", dir="/tmp")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (*FLAGS, f"--user-data-dir={profile}"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = None
    try:
        driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
        driver.set_page_load_timeout(30)
        driver.set_script_timeout(30)
        yield driver
    finally:
        if driver is not None:
            driver.quit()
        shutil.rmtree(profile, ignore_errors=True)

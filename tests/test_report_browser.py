"""The report page in a real browser (issue 32): headless Chromium, driven by Selenium.

The page of a real run loads with no console error, its timeline has one row per process, and
clicking the death's mark opens its block. With MPLOG_UPDATE_SCREENSHOT=1 it writes
docs/report.png. Skipped, saying how to install them, without Chromium, chromedriver or Selenium.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

from conftest import read_blocks
from test_report import ROOT, make_run, report

INSTALL = "apt-get install -y chromium chromium-driver && pip install selenium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"


def _driver(profile: str):
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.skip(f"selenium is not installed ({INSTALL})")
    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    if not binary or not os.path.exists(CHROMEDRIVER):
        pytest.skip(f"Chromium or chromedriver is not installed ({INSTALL})")
    opts = webdriver.ChromeOptions()
    opts.binary_location = binary
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
                 f"--user-data-dir={profile}", "--window-size=1280,900"):
        opts.add_argument(flag)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_page_in_chromium(service, tmp_path, method):
    """No SEVERE console entry; one timeline row per (process, pid) of the log; a click on the
    SIGKILL's death mark shows its block in the panel."""
    import multiprocessing

    from selenium.webdriver.common.by import By  # noqa: F401 (skip above if absent)

    profile = tempfile.mkdtemp(prefix="mplog-chromium-")
    driver = _driver(profile)
    try:
        svc = make_run(service, multiprocessing.get_context(method), tmp_path)
        assert report(svc.full_path.parent).returncode == 0
        page = svc.full_path.parent / "run.report.html"
        driver.get(page.as_uri())
        severe = [e for e in driver.get_log("browser") if e.get("level") == "SEVERE"]
        assert not severe, severe
        rows = driver.find_elements(By.CSS_SELECTOR, "#timeline g.row")
        assert len(rows) == len({(b["process"], b["pid"]) for b in read_blocks(svc.full_path)})
        if os.environ.get("MPLOG_UPDATE_SCREENSHOT") == "1" and method == "fork":
            driver.save_screenshot(str(ROOT / "docs" / "report.png"))
        panel = driver.find_element(By.ID, "panel")
        assert not panel.is_displayed()
        kill = next(d for d in driver.find_elements(By.CSS_SELECTOR, "#timeline g.death")
                    if d.find_element(By.TAG_NAME, "text").get_attribute("textContent") == "SIGKILL(-9)")
        driver.execute_script("arguments[0].dispatchEvent(new MouseEvent('click', {bubbles: true}))", kill)
        assert panel.is_displayed()
        text = driver.find_element(By.ID, "panel-body").text
        assert "was killed by SIGKILL" in text and "exit: SIGKILL(-9)" in text
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)

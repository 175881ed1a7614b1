"""Shared helpers for tests that drive Debian's headless Chromium through selenium.

``click_and_wait`` waits for a *new document* rather than for the clicked element to go
stale: Chromium 156's driver raises a plain WebDriverException (not
StaleElementReferenceException) from ``is_enabled()`` on a detached element, which breaks
``EC.staleness_of``. Marking the current document with a JavaScript property and waiting
until a loaded document without that mark answers works whatever the next URL is
(redirects to the same page included).
"""

from __future__ import annotations

import base64
import io
import shutil
import time
import uuid

import numpy as np
import pytest

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
HAVE_CHROMIUM = bool(shutil.which(CHROMIUM) and shutil.which(CHROMEDRIVER))
needs_chromium = pytest.mark.skipif(not HAVE_CHROMIUM,
                                    reason="needs Debian chromium and chromium-driver (make system-packages)")


def chromium(user_data_dir, width: int = 1280, height: int = 1024, browser_log: bool = False):
    """A headless Chromium driver; the caller quits it. ``browser_log`` keeps the console log
    for ``driver.get_log("browser")``."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--no-first-run", f"--window-size={width},{height}", f"--user-data-dir={user_data_dir}"):
        opts.add_argument(flag)
    if browser_log:
        opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    driver.set_page_load_timeout(20)
    return driver


def by_id(driver, element_id):
    from selenium.webdriver.common.by import By

    return driver.find_element(By.ID, element_id)


def _marked(driver, mark: str):
    """True while the marked (old) document is current, False once a loaded new one is,
    None while the answer is unknown (navigation in progress)."""
    from selenium.common.exceptions import WebDriverException

    try:
        state = driver.execute_script(
            "return [window.__riskpipe_mark === arguments[0], document.readyState];", mark)
    except WebDriverException:
        return None
    if state[0]:
        return True
    return False if state[1] == "complete" else None


def click_and_wait(driver, element, timeout: float = 15.0) -> None:
    """Click something that navigates, and wait until the next page has loaded."""
    mark = uuid.uuid4().hex
    driver.execute_script("window.__riskpipe_mark = arguments[0];", mark)
    element.click()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if _marked(driver, mark) is False:
            return
        time.sleep(0.05)
    raise TimeoutError(f"no new page within {timeout:g} s after the click (still at {driver.current_url})")


def data_url_image(src: str) -> np.ndarray:
    """Decode an ``<img src="data:image/png;base64,...">`` into an RGB uint8 array."""
    from PIL import Image

    assert src.startswith("data:image/png;base64,"), src[:40]
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))).convert("RGB"))


def natural_size(driver, element) -> tuple[int, int]:
    """The (width, height) in pixels the browser decoded for an ``<img>``; (0, 0) if it failed."""
    w, h = driver.execute_script("return [arguments[0].naturalWidth, arguments[0].naturalHeight];", element)
    return int(w), int(h)


def screenshot(element) -> np.ndarray:
    """What Chromium actually painted for ``element``, as an RGB uint8 array."""
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(element.screenshot_as_png)).convert("RGB"))

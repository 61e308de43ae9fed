"""The operators' web page in a real browser: headless Chromium (Debian's ``chromium`` and
``chromium-driver``, driven by Selenium) against the real daemon and the real registry on loopback.

One operator's session: sign in with the API key, see a pulled model, prefetch another through a slow
upstream and watch its progress bar grow live, pin a model and see an eviction skip it, delete one and
see it gone from ``/api/tags``; all along, no request leaves 127.0.0.1 and the console shows no error.
With ``UPDATE_SCREENSHOT=1`` the test writes ``docs/admin-page.png`` (the README's screenshot).
"""

from __future__ import annotations

import json
import os
import shutil
import time
import urllib.request
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

import pytest

from tests.integration.helpers import UPSTREAM_SETTINGS
from tests.support.daemon import REPO_ROOT, MirrorDaemon, MirrorFactory
from tests.support.faultproxy import FaultProxy
from tests.support.models import MiB, ModelFactory, PushedModel

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
KEY = "ui-test-key"
SCREENSHOT = REPO_ROOT / "docs" / "admin-page.png"
BROWSER_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
)
CAP_GB = 0.005  # 5 MB: the three models of the test (~64 KiB, ~4 MiB, ~1 MiB) do not fit together

webdriver: Any = None
try:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait
except ImportError:  # (the test extra installs it)
    pass


def _browser_missing() -> str | None:
    if webdriver is None:
        return "the Python package selenium is missing (pip install '.[test]')"
    for path in (CHROMIUM, CHROMEDRIVER):
        if not (os.path.exists(path) and shutil.which(path)):
            return f"{path} is missing (Debian packages chromium and chromium-driver)"
    return None


@pytest.fixture
def browser() -> Iterator[Any]:
    """Headless Chromium, logging the console and every network request it makes."""
    missing = _browser_missing()
    if missing is not None:
        if os.environ.get("CI"):
            pytest.fail(missing + "; under CI the browser tests must run", pytrace=False)
        pytest.skip(missing)
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in BROWSER_FLAGS:
        options.add_argument(flag)
    options.add_argument("--window-size=1280,1600")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(20)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture(scope="module")
def third_model(model_factory: ModelFactory) -> PushedModel:
    return model_factory("library/uimodel", "latest", MiB, 21)


def api(mirror: MirrorDaemon, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
    """An Ollama API call with the key, as a client would make it."""
    request = urllib.request.Request(
        mirror.url + path,
        data=None if body is None else json.dumps(body).encode(),
        method=method,
        headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.loads(response.read() or b"{}")


def tags(mirror: MirrorDaemon) -> list[str]:
    return sorted(m["name"] for m in api(mirror, "GET", "/api/tags")["models"])


def rows(driver: Any) -> dict[str, dict[str, str]]:
    """The models table as the operator reads it: name -> column header -> cell text."""
    return driver.execute_script(  # type: ignore[no-any-return]
        """
        const heads = [...document.querySelectorAll('#models thead th')].map(th => th.textContent.trim());
        const out = {};
        for (const tr of document.querySelectorAll('#models tbody tr')) {
          const cells = [...tr.children].map(c => c.textContent.trim());
          out[cells[0]] = Object.fromEntries(heads.map((h, i) => [h.replace(/ [▲▼]$/, ''), cells[i]]));
        }
        return out;
        """
    )


def progress_bars(driver: Any) -> list[tuple[float, float]]:
    return [
        tuple(pair)
        for pair in driver.execute_script(
            "return [...document.querySelectorAll('#fills progress')].map(p => [p.value, p.max]);"
        )
    ]


def test_an_operator_signs_in_watches_a_fill_pins_and_deletes_in_a_real_browser(
    browser: Any,
    mirror_factory: MirrorFactory,
    proxy: FaultProxy,
    small_model: PushedModel,
    medium_model: PushedModel,
    third_model: PushedModel,
) -> None:
    mirror = mirror_factory(
        upstream_url=proxy.url,
        config={
            "security": {"api_key": KEY},
            "upstream": UPSTREAM_SETTINGS,
            "cache": {"max_size_gb": CAP_GB, "min_free_gb": 0},
        },
    )
    api(mirror, "POST", "/api/pull", {"model": "tiny", "stream": False})
    wait = WebDriverWait(browser, 20, poll_frequency=0.1)

    # --- sign in -------------------------------------------------------------------------------
    browser.get(mirror.url + "/mirror/ui")
    signin = browser.page_source
    assert 'type="password"' in signin
    assert "tiny" not in signin and proxy.url not in signin and str(mirror.cache_dir) not in signin
    browser.find_element(By.ID, "key").send_keys(KEY)
    browser.find_element(By.CSS_SELECTOR, "form button[type=submit]").click()
    wait.until(lambda d: "tiny:latest" in rows(d))
    cookie = browser.get_cookie("ollama_mirror_ui")
    assert cookie is not None and cookie["httpOnly"] and cookie["sameSite"] == "Strict"
    assert browser.execute_script("return document.cookie") == ""  # HttpOnly: no script can read it
    assert rows(browser)["tiny:latest"]["Pinned"] == "no"
    assert browser.find_element(By.ID, "upstreams").text == f"registry.ollama.ai → {proxy.url}"

    # --- a prefetch through a slow upstream, followed live -------------------------------------
    proxy.throttle(200 * 1024, path="/blobs/")  # per connection: the 4 MiB layer takes about 5 s
    browser.find_element(By.ID, "pull-name").send_keys("medium")
    browser.find_element(By.ID, "pull-button").click()
    seen: list[tuple[float, float]] = []
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        bars = progress_bars(browser)
        big = [bar for bar in bars if bar[1] > MiB]
        if big and (not seen or big[0] != seen[-1]):
            seen.append(big[0])
            if os.environ.get("UPDATE_SCREENSHOT") and 0.3 < big[0][0] / big[0][1] < 0.8:
                SCREENSHOT.parent.mkdir(exist_ok=True)
                browser.save_screenshot(str(SCREENSHOT))
        if seen and not bars:
            break
        time.sleep(0.1)
    values = [value for value, _ in seen]
    assert len(values) >= 3, f"the progress bar did not move live: {seen}"
    assert values == sorted(values) and values[0] < values[-1] and values[0] < seen[0][1]
    assert browser.find_element(By.ID, "fills-empty").is_displayed()
    proxy.throttle(None)
    wait.until(lambda d: "medium:latest" in rows(d))  # (the page reloads its table when a tag lands)

    # --- pin, then an eviction skips the pinned model ------------------------------------------
    browser.find_element(By.CSS_SELECTOR, "button[aria-label='Pin tiny:latest']").click()
    wait.until(lambda d: rows(d)["tiny:latest"]["Pinned"] == "yes")
    # tiny is the least recently used: without its pin the sweep making room would take it first
    api(mirror, "POST", "/api/pull", {"model": "uimodel", "stream": False})
    assert tags(mirror) == ["tiny:latest", "uimodel:latest"]
    browser.refresh()
    wait.until(lambda d: set(rows(d)) == {"tiny:latest", "uimodel:latest"})

    # --- delete, with its confirmation ---------------------------------------------------------
    browser.find_element(By.CSS_SELECTOR, "button[aria-label='Delete uimodel:latest']").click()
    dialog = browser.find_element(By.ID, "confirm")
    wait.until(lambda d: dialog.is_displayed())
    assert "uimodel:latest" in dialog.text
    browser.find_element(By.ID, "confirm-ok").click()
    wait.until(lambda d: "uimodel:latest" not in rows(d))
    assert browser.find_element(By.ID, "action-status").text == "Deleted uimodel:latest."
    assert tags(mirror) == ["tiny:latest"]

    # --- a phone's width, dark mode -----------------------------------------------------------
    browser.set_window_size(390, 844)
    wait.until(lambda d: d.execute_script("return window.innerWidth") <= 400)
    overflow = browser.execute_script("return document.documentElement.scrollWidth - window.innerWidth")
    assert overflow <= 0, "the page scrolls sideways on a narrow screen (only the table may, in its box)"
    browser.execute_cdp_cmd(
        "Emulation.setEmulatedMedia", {"features": [{"name": "prefers-color-scheme", "value": "dark"}]}
    )
    background, text = browser.execute_script(
        "const s = getComputedStyle(document.body); return [s.backgroundColor, s.color];"
    )
    assert background == "rgb(13, 17, 23)" and text == "rgb(230, 237, 243)"  # light text on a dark page
    browser.set_window_size(1280, 1600)

    # --- accessible names, nothing from elsewhere, no console errors ---------------------------
    for button in browser.find_elements(By.CSS_SELECTOR, "button"):
        name = button.get_attribute("aria-label") or button.text
        assert name.strip() or not button.is_displayed(), button.get_attribute("outerHTML")
    assert browser.find_elements(By.CSS_SELECTOR, "#models thead th[scope=col]")
    requested = set()
    for entry in browser.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        if message["method"] == "Network.requestWillBeSent":
            requested.add(message["params"]["request"]["url"])
    assert any("/mirror/ui/events" in url for url in requested)
    outside = [
        u
        for u in requested
        if urlsplit(u).scheme not in ("data", "blob") and urlsplit(u).hostname != "127.0.0.1"
    ]
    assert outside == [], f"the page made requests off 127.0.0.1: {outside}"
    errors = [entry for entry in browser.get_log("browser") if entry["level"] == "SEVERE"]
    assert errors == [], errors

"""Review console login and session rules, in a real headless Chromium where a page is
involved: logout ends the session on the server (an old cookie stops working), failed
logins lock out a reviewer name as well as an address, and a login attempt costs the
same whether the name exists or not."""

from __future__ import annotations

import http.client
import re
from urllib.parse import urlencode, urlsplit

import pytest
from werkzeug.security import generate_password_hash

from browserkit import HAVE_CHROMIUM, by_id, chromium, click_and_wait
from riskpipe.review import serve_background
from riskpipe.review.settings import Credentials
from test_review_records import seed_ledger

PASSWORD = "correct horse battery staple"
BOB = "bobs own passphrase"
needs_browser = pytest.mark.skipif(not HAVE_CHROMIUM, reason="needs Debian chromium and chromium-driver")


@pytest.fixture
def console(tmp_path):
    path = tmp_path / "ledger.sqlite3"
    seed_ledger(path)
    server = serve_background(path, "127.0.0.1", 0, PASSWORD, users={"bob": generate_password_hash(BOB)},
                              metrics=None)
    yield server
    server.stop()


@pytest.fixture
def browser(tmp_path):
    driver = chromium(tmp_path / "chromium")
    yield driver
    driver.quit()


def login(driver, base_url, name, password):
    driver.delete_all_cookies()
    driver.get(base_url + "login")
    by_id(driver, "username").send_keys(name)
    by_id(driver, "password").send_keys(password)
    click_and_wait(driver, by_id(driver, "login"))


def logged_in_as(driver) -> str | None:
    from selenium.webdriver.common.by import By

    found = driver.find_elements(By.ID, "reviewer-name")
    return found[0].text if found else None


def with_cookie(driver, base_url, cookie: dict) -> None:
    """Open the queue carrying ``cookie`` (and nothing else)."""
    driver.delete_all_cookies()
    driver.get(base_url + "login")
    driver.add_cookie({"name": cookie["name"], "value": cookie["value"], "path": "/"})
    driver.get(base_url)


@needs_browser
def test_logout_ends_the_session_on_the_server(console, browser):
    login(browser, console.url, "alice", PASSWORD)
    assert logged_in_as(browser) == "alice"
    old = browser.get_cookie("riskpipe_review")
    with_cookie(browser, console.url, old)  # the copied cookie works while the session is open
    assert logged_in_as(browser) == "alice" and "/login" not in browser.current_url
    click_and_wait(browser, by_id(browser, "logout"))
    assert "/login" in browser.current_url
    with_cookie(browser, console.url, old)  # replaying the cookie from before the logout
    assert "/login" in browser.current_url and logged_in_as(browser) is None
    assert "evt-urgent" not in browser.page_source


def fail_login_from(base_url: str, source_ip: str, name: str, password: str) -> int:
    """One login attempt from a given loopback address (the whole 127/8 is local)."""
    u = urlsplit(base_url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=10, source_address=(source_ip, 0))
    try:
        conn.request("GET", "/login")
        r = conn.getresponse()
        html = r.read().decode()
        cookie = r.getheader("Set-Cookie").split(";", 1)[0]
        token = re.search(r'name="csrf_token" type="hidden" value="([^"]+)"', html).group(1)
        body = urlencode({"csrf_token": token, "username": name, "password": password})
        conn.request("POST", "/login", body=body, headers={"Cookie": cookie,
                                                           "Content-Type": "application/x-www-form-urlencoded"})
        r = conn.getresponse()
        r.read()
        return r.status
    finally:
        conn.close()


@needs_browser
def test_failed_logins_lock_out_the_reviewer_name_from_every_address(console, browser):
    # five wrong guesses at bob's password, each from another address: no address is locked
    assert [fail_login_from(console.url, f"127.0.0.{i}", "bob", "wrong guess") for i in range(2, 7)] == [401] * 5
    login(browser, console.url, "bob", BOB)  # bob's right password, from yet another address
    assert logged_in_as(browser) is None
    assert "Too many failed logins" in browser.page_source
    login(browser, console.url, "alice", PASSWORD)  # the address itself is not locked
    assert logged_in_as(browser) == "alice"


def test_login_costs_the_same_whether_the_name_exists_or_not(monkeypatch):
    import riskpipe.review.settings as settings_mod

    creds = Credentials(users={"bob": generate_password_hash(BOB), "carol": "carols plain passphrase"}, shared=None)
    calls = []
    real = settings_mod.check_password_hash
    monkeypatch.setattr(settings_mod, "check_password_hash", lambda h, p: calls.append(h) or real(h, p))
    # The cost of an attempt is its hash verification: exactly one on every path, with
    # the same method and work factor (e.g. scrypt:32768:8:1) as a real user's hash.
    # Counted, not timed: a wall-clock ratio flakes on a loaded machine.
    method = creds.users["bob"].split("$", 1)[0]
    for name in ("bob", "carol", "nobody", "x" * 3, "bad name!"):
        calls.clear()
        assert creds.authenticate(name, "wrong password") is None
        assert len(calls) == 1, name  # one hash verification on every path
        assert calls[0].split("$", 1)[0] == method, (name, calls[0].split("$", 1)[0])
    assert creds.authenticate("bob", BOB) == "bob" and creds.authenticate("carol", "carols plain passphrase") == "carol"

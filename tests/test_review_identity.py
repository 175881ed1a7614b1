"""Reviewer identity (issue 19 item 7): names match in full, NFKC-normalised and
case-folded ("alice\\n" is no name); guesses at the shared password are limited per
credential across names and addresses; X-Forwarded-For is believed only from
``trusted_proxies``. Over real HTTP against the running console."""

from __future__ import annotations

import http.client
import re
from urllib.parse import urlencode, urlsplit

import pytest
from werkzeug.security import generate_password_hash

from riskpipe.review import serve_background
from riskpipe.review.app import SHARED_MAX_FAILURES
from riskpipe.review.settings import Credentials, SettingsError, client_address, normalize_reviewer
from test_review_records import seed_ledger

PASSWORD = "correct horse battery staple"
BOB = "bobs own passphrase"


def attempt(base_url: str, name: str, password: str, source_ip: str = "127.0.0.1",
            forwarded_for: str | None = None) -> tuple[int, str | None]:
    """One login over HTTP: (status, the reviewer the session then shows or None)."""
    u = urlsplit(base_url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=10, source_address=(source_ip, 0))
    extra = {"X-Forwarded-For": forwarded_for} if forwarded_for else {}
    try:
        conn.request("GET", "/login", headers=extra)
        r = conn.getresponse()
        html = r.read().decode()
        cookie = r.getheader("Set-Cookie").split(";", 1)[0]
        token = re.search(r'name="csrf_token" type="hidden" value="([^"]+)"', html).group(1)
        body = urlencode({"csrf_token": token, "username": name, "password": password})
        conn.request("POST", "/login", body=body, headers={"Cookie": cookie, **extra,
                                                           "Content-Type": "application/x-www-form-urlencoded"})
        r = conn.getresponse()
        r.read()
        status, cookie = r.status, (r.getheader("Set-Cookie") or cookie).split(";", 1)[0]
        if status != 302:
            return status, None
        conn.request("GET", "/", headers={"Cookie": cookie})
        page = conn.getresponse().read().decode()
        m = re.search(r'id="reviewer-name"[^>]*>([^<]*)<', page)
        return status, (m.group(1).strip() if m else None)
    finally:
        conn.close()


@pytest.fixture
def console(tmp_path):
    path = tmp_path / "ledger.sqlite3"
    seed_ledger(path)
    server = serve_background(path, "127.0.0.1", 0, PASSWORD, users={"bob": generate_password_hash(BOB)}, metrics=None)
    yield server
    server.stop()


def test_reviewer_names_match_in_full_normalised_and_case_folded() -> None:
    assert normalize_reviewer("alice") == normalize_reviewer("Alice") == normalize_reviewer("ＡＬＩＣＥ") == "alice"
    for bad in ("alice\n", "alice\r\n", "alice ", " alice", "al ice", "alice\x00", "", "a" * 65, None, 3):
        assert normalize_reviewer(bad) is None, repr(bad)
    creds = Credentials(users={"Bob": generate_password_hash(BOB)}, shared=PASSWORD)
    assert creds.authenticate("alice\n", PASSWORD) is None  # the "$ before a newline" hole
    assert creds.authenticate("BOB", BOB) == "bob" and creds.authenticate("ＢＯＢ", BOB) == "bob"
    assert creds.authenticate("bob", PASSWORD) is None  # a configured user never with the shared password
    with pytest.raises(SettingsError, match="same reviewer"):
        Credentials(users={"bob": "a long passphrase", "BOB": "another passphrase"})


def test_alice_newline_does_not_log_in_as_alice(console) -> None:
    assert attempt(console.url, "alice\n", PASSWORD) == (400, None)
    assert attempt(console.url, "alice\r\n", PASSWORD) == (400, None)
    assert attempt(console.url, "Alice", PASSWORD) == (302, "alice")  # one reviewer, however spelt
    assert attempt(console.url, "ａｌｉｃｅ", PASSWORD) == (302, "alice")
    assert attempt(console.url, "BOB", PASSWORD) == (401, None)  # bob is a user: the shared password is not his


def test_shared_password_guesses_are_limited_across_names_and_addresses(console) -> None:
    # every guess under a new name from a new address: no name and no address reaches its limit
    statuses = [attempt(console.url, f"guesser{i}", f"wrong guess {i}", f"127.0.1.{i + 1}")[0]
                for i in range(SHARED_MAX_FAILURES)]
    assert statuses == [401] * SHARED_MAX_FAILURES
    # the shared credential is now locked for a while, even with the right password
    assert attempt(console.url, "carol", PASSWORD, "127.0.2.1") == (429, None)
    assert attempt(console.url, "bob", BOB, "127.0.2.2") == (302, "bob")  # his own credential is not


def test_forwarded_for_is_believed_only_from_trusted_proxies(tmp_path) -> None:
    assert client_address("10.0.0.5", "203.0.113.7", ["10.0.0.0/8"]) == "203.0.113.7"
    assert client_address("10.0.0.5", "198.51.100.1, 203.0.113.7, 10.0.0.9", ["10.0.0.0/8"]) == "203.0.113.7"
    assert client_address("192.0.2.1", "203.0.113.7", ["10.0.0.0/8"]) == "192.0.2.1"  # not a proxy: ignored
    assert client_address("10.0.0.5", "203.0.113.7", []) == "10.0.0.5"
    assert client_address("10.0.0.5", "not-an-ip", ["10.0.0.0/8"]) == "10.0.0.5"
    path = tmp_path / "ledger.sqlite3"
    seed_ledger(path)
    behind = serve_background(path, "127.0.0.1", 0, PASSWORD, metrics=None, trusted_proxies=("127.0.0.1",))
    direct = serve_background(path, "127.0.0.1", 0, PASSWORD, metrics=None)
    try:
        # behind a proxy: one client's five failures lock that client, not the proxy's other clients
        assert [attempt(behind.url, f"n{i}", "wrong", forwarded_for="203.0.113.7")[0] for i in range(5)] == [401] * 5
        assert attempt(behind.url, "alice", PASSWORD, forwarded_for="203.0.113.7") == (429, None)
        assert attempt(behind.url, "alice", PASSWORD, forwarded_for="203.0.113.8") == (302, "alice")
        # no trusted proxy: a forged header does not dodge the per-address lockout
        assert [attempt(direct.url, f"m{i}", "wrong", "127.0.3.1", f"203.0.113.{i}")[0] for i in range(5)] == [401] * 5
        assert attempt(direct.url, "alice", PASSWORD, "127.0.3.1", "198.51.100.99") == (429, None)
    finally:
        behind.stop()
        direct.stop()

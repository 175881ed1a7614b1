"""The console's security rules at the HTTP level (Flask's test client speaks WSGI to the
real app), and the credential configuration: no default credential, clear errors."""

from __future__ import annotations

import re

import pytest
from click.testing import CliRunner
from werkzeug.security import generate_password_hash

from riskpipe.ledger import Ledger
from riskpipe.review.app import create_app
from riskpipe.review.settings import PASSWORD_ENV, Credentials, ReviewSettings, SettingsError, resolve_settings
from test_review_records import seed_ledger

PASSWORD = "correct horse battery staple"
CERTIFICATE_DETAILS = ("radius", "p_lower", "0.4412", "certificate_risk", "abstain-to-review", "sigma", "looked fine")


@pytest.fixture
def ledger_path(tmp_path):
    path = tmp_path / "ledger.sqlite3"
    seed_ledger(path)
    return path


@pytest.fixture
def app(ledger_path):
    from riskpipe.metrics import ReviewMetrics

    creds = Credentials(users={"bob": generate_password_hash("bobs own passphrase")}, shared=PASSWORD)
    return create_app(ReviewSettings(ledger=str(ledger_path), credentials=creds), metrics=ReviewMetrics())


def csrf_token(html: str) -> str:
    return re.search(r'name="csrf_token" type="hidden" value="([^"]+)"', html).group(1)


def log_in(client, name="alice", password=PASSWORD):
    token = csrf_token(client.get("/login").get_data(as_text=True))
    return client.post("/login", data={"csrf_token": token, "username": name, "password": password})


def verdicts(ledger_path) -> int:
    with Ledger(ledger_path) as led:
        return led.count("verdict")


@pytest.mark.parametrize("path", ["/", "/item/evt-urgent", "/item/evt-done", "/item/no-such-event"])
def test_unauthenticated_gets_redirect_and_no_record_content(app, path):
    r = app.test_client().get(path)
    assert r.status_code == 302 and r.headers["Location"].startswith("/login?next=")
    body = r.get_data(as_text=True)
    assert not any(s in body for s in CERTIFICATE_DETAILS)


def test_unauthenticated_post_is_refused(app, ledger_path):
    client = app.test_client()
    token = csrf_token(client.get("/login").get_data(as_text=True))  # a valid token, but nobody logged in
    r = client.post("/verdict/evt-urgent", data={"csrf_token": token, "verdict": "confirmed_clean"})
    assert r.status_code == 401
    assert not any(s in r.get_data(as_text=True) for s in CERTIFICATE_DETAILS)
    assert verdicts(ledger_path) == 1


def test_session_cookie_is_httponly_samesite_strict_and_pages_are_locked_down(app):
    client = app.test_client()
    r = log_in(client)
    assert r.status_code == 302 and r.headers["Location"] == "/"
    cookie = r.headers["Set-Cookie"]
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie
    page = client.get("/item/evt-urgent")
    assert page.status_code == 200
    csp = page.headers["Content-Security-Policy"]
    assert "default-src 'none'" in csp and "frame-ancestors 'none'" in csp and "img-src 'self' data:" in csp
    assert page.headers["Cache-Control"] == "no-store" and page.headers["X-Frame-Options"] == "DENY"
    assert "http://" not in page.get_data(as_text=True) and "https://" not in page.get_data(as_text=True)


@pytest.mark.parametrize("token", [None, "", "forged", "other-session"])
def test_post_without_this_sessions_csrf_token_is_refused(app, ledger_path, token):
    client = app.test_client()
    log_in(client)
    if token == "other-session":
        other = app.test_client()
        log_in(other, "mallory")
        token = csrf_token(other.get("/item/evt-urgent").get_data(as_text=True))
    data = {"verdict": "confirmed_clean", "note": "forged"}
    if token is not None:
        data["csrf_token"] = token
    r = client.post("/verdict/evt-urgent", data=data)
    assert r.status_code == 400 and "Cross-site request protection" in r.get_data(as_text=True)
    assert verdicts(ledger_path) == 1


def test_logout_needs_the_token_and_ends_the_session(app):
    client = app.test_client()
    log_in(client)
    assert client.post("/logout").status_code == 400  # a forged logout is refused too
    token = csrf_token(client.get("/").get_data(as_text=True))
    assert client.post("/logout", data={"csrf_token": token}).status_code == 302
    assert client.get("/").status_code == 302


def test_wrong_password_and_shared_password_for_a_named_user_are_refused(app):
    client = app.test_client()
    assert log_in(client, "alice", "not the password").status_code == 401
    assert log_in(client, "bob", PASSWORD).status_code == 401  # bob has his own password
    assert client.get("/").status_code == 302
    assert log_in(client, "bob", "bobs own passphrase").status_code == 302
    assert "Signed in as <strong id=\"reviewer-name\">bob</strong>" in client.get("/").get_data(as_text=True)


def test_repeated_failures_lock_the_address_out(app):
    client = app.test_client()
    for _ in range(5):
        assert log_in(client, "alice", "guess").status_code == 401
    assert log_in(client, "alice", PASSWORD).status_code == 429  # even the right password, for a while


def test_verdict_is_recorded_with_who_and_when_and_refused_twice(app, ledger_path):
    client = app.test_client()
    log_in(client, "bob", "bobs own passphrase")
    token = csrf_token(client.get("/item/evt-routine").get_data(as_text=True))
    r = client.post("/verdict/evt-routine", data={"csrf_token": token, "verdict": "unsure", "note": "blurry"})
    assert r.status_code == 302
    with Ledger(ledger_path) as led:
        v = led.get("evt-routine", kind="verdict")
    assert (v["reviewer"], v["verdict"], v["note"]) == ("bob", "unsure", "blurry") and v["ts"].endswith("Z")
    again = client.post("/verdict/evt-routine", data={"csrf_token": token, "verdict": "confirmed_clean"})
    assert again.status_code == 409 and "a verdict already exists (unsure by bob" in again.get_data(as_text=True)
    bad = client.post("/verdict/evt-urgent", data={"csrf_token": token, "verdict": "probably-fine"})
    assert bad.status_code == 400 and "Not a valid choice" in bad.get_data(as_text=True)
    unrouted = client.post("/verdict/evt-allowed", data={"csrf_token": token, "verdict": "confirmed_clean"})
    assert unrouted.status_code == 409
    assert verdicts(ledger_path) == 2


def test_metrics_are_open_but_carry_only_review_counters(app):
    client = app.test_client()
    log_in(client)
    token = csrf_token(client.get("/item/evt-urgent").get_data(as_text=True))
    client.post("/verdict/evt-urgent", data={"csrf_token": token, "verdict": "confirmed_manipulated"})
    text = app.test_client().get("/metrics").get_data(as_text=True)
    assert "riskpipe_review_backlog 2.0" in text
    assert 'riskpipe_review_verdicts_total{verdict="confirmed_manipulated"} 1.0' in text
    assert "riskpipe_review_time_to_verdict_seconds_count" in text
    names = {line.split("{")[0].split(" ")[0] for line in text.splitlines() if line and not line.startswith("#")}
    assert all(n.startswith("riskpipe_review_") for n in names - {"riskpipe_build_info"})
    assert "riskpipe_review_routed_total" not in names  # the stage's: it routes, the console serves the queue
    assert "evt-" not in text and "radius" not in text and "broker_up" not in text


def test_login_next_parameter_cannot_redirect_off_site(app):
    for target in ("//evil.example/x", "https://evil.example/", "/\\evil.example", "//[x", "http://[x/"):
        client = app.test_client()
        token = csrf_token(client.get("/login").get_data(as_text=True))
        r = client.post(f"/login?next={target}", data={"csrf_token": token, "username": "alice", "password": PASSWORD})
        assert r.headers["Location"] == "/"
    client = app.test_client()
    token = csrf_token(client.get("/login").get_data(as_text=True))
    r = client.post("/login?next=/item/evt-audit",
                    data={"csrf_token": token, "username": "alice", "password": PASSWORD})
    assert r.headers["Location"] == "/item/evt-audit"


# -- configuration -------------------------------------------------------------------------

def test_no_credential_means_no_console(tmp_path):
    with pytest.raises(SettingsError, match=r"no reviewer credential configured.*there is no default"):
        resolve_settings(ledger=str(tmp_path / "l.db"), environ={})


def test_review_command_refuses_to_start_without_a_credential(tmp_path):
    from riskpipe.cli.review_cmd import review

    result = CliRunner().invoke(review, ["--ledger", str(tmp_path / "l.db")], env={PASSWORD_ENV: ""})
    assert result.exit_code == 2
    assert "riskpipe: error: no reviewer credential configured" in result.output
    assert "Traceback" not in result.output


@pytest.mark.parametrize("config, message", [
    ("review: {password: short}", "shared password: must be at least 8 characters"),
    ("review: {users: {'al ice': 'a long passphrase'}}", "review.users: 'al ice' is not a valid reviewer name"),
    ("review: {pasword: 'a long passphrase'}", r"review.pasword: Extra inputs are not permitted"),
    ("review: {password: 'a long passphrase', port: 99999}", "review.port: Input should be less than or equal"),
    ("review: [1, 2]", "review: must be a mapping"),
    ("review: {password: 'a long passphrase', secret_key: tooshort}", "review.secret_key: must be at least 32"),
    ("review: {", "invalid YAML"),
    ("review: {password: 'a long passphrase', outcomes_topic: 'review outcomes'}",
     "review.outcomes_topic: .* is not a Kafka topic name"),
])
def test_bad_config_is_named(tmp_path, config, message):
    cfg = tmp_path / "riskpipe.yaml"
    cfg.write_text(config)
    with pytest.raises(SettingsError, match=message):
        resolve_settings(ledger=str(tmp_path / "l.db"), config_path=str(cfg), environ={})


def test_topic_options_follow_kafkas_rule(tmp_path):
    for option, kw in (("--review-topic", {"review_topic": "a/b"}), ("--outcomes-topic", {"outcomes_topic": ".."})):
        with pytest.raises(SettingsError, match=rf"^{option}: .* is not a Kafka topic name"):
            resolve_settings(ledger=str(tmp_path / "l.db"), environ={"RISKPIPE_REVIEW_PASSWORD": "a long passphrase"},
                             **kw)


def test_credential_sources_and_precedence(tmp_path):
    cfg = tmp_path / "riskpipe.yaml"
    cfg.write_text("ledger: from-config.db\nbootstrap_servers: 127.0.0.1:9\ntopics: {review: rev}\n"
                   "review: {password: 'config passphrase', users: {dana: 'danas passphrase'}, port: 8470}\n")
    s = resolve_settings(config_path=str(cfg), environ={})
    assert (s.ledger, s.bootstrap_servers, s.review_topic, s.port) == (str(tmp_path / "from-config.db"), "127.0.0.1:9",
                                                                      "rev", 8470)  # relative to the config
    assert s.credentials.authenticate("erin", "config passphrase") == "erin"
    assert s.credentials.authenticate("dana", "danas passphrase") == "dana"
    s = resolve_settings(config_path=str(cfg), environ={PASSWORD_ENV: "env passphrase"})
    assert s.credentials.authenticate("erin", "env passphrase") == "erin"
    assert s.credentials.authenticate("erin", "config passphrase") is None
    pw = tmp_path / "pw"
    pw.write_text("file passphrase\n")
    s = resolve_settings(config_path=str(cfg), password_file=str(pw), port=0, environ={PASSWORD_ENV: "env passphrase"})
    assert s.credentials.authenticate("erin", "file passphrase") == "erin" and s.port == 0
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(SettingsError, match=r"--password-file .*empty: file is empty"):
        resolve_settings(ledger="l.db", password_file=str(tmp_path / "empty"), environ={})
    with pytest.raises(SettingsError, match=r"--password-file .*missing: cannot read"):
        resolve_settings(ledger="l.db", password_file=str(tmp_path / "missing"), environ={})


def test_the_configs_secret_files_are_read_next_to_it(tmp_path, monkeypatch):
    """`review.password_file` and `review.secret_key_file` were read relative to the working
    directory, unlike every other path of the config (its `ledger:` beside it)."""
    stage = tmp_path / "stage"
    stage.mkdir()
    (stage / "pw").write_text("file passphrase\n")
    (stage / "session-key").write_text("k" * 16 + "ey-of-the-console-0123456789\n")
    (stage / "riskpipe.yaml").write_text("ledger: l.db\nreview: {password_file: pw, secret_key_file: session-key}\n")
    monkeypatch.chdir(tmp_path)
    s = resolve_settings(config_path="stage/riskpipe.yaml", environ={})
    assert s.credentials.authenticate("erin", "file passphrase") == "erin"
    assert s.secret_key == ("k" * 16 + "ey-of-the-console-0123456789").encode()


def test_queue_page_is_paginated_and_filtered(app, ledger_path):
    from test_review_records import decision_record

    with Ledger(ledger_path) as led:  # 3 waiting from seed_ledger, and 220 more
        led.append_many([decision_record(f"evt-bulk-{i:03d}", priority=2) for i in range(220)])
    client = app.test_client()
    log_in(client)
    seen, url, sizes = [], "/?size=100", []
    while url:
        html = client.get(url).get_data(as_text=True)
        ids = re.findall(r'data-id="([^"]+)"', html)
        sizes.append(len(ids))
        seen += ids
        assert '<span class="count" id="backlog">223</span>' in html
        nxt = re.search(r'id="next" href="([^"]+)"', html)
        url = nxt.group(1).replace("&amp;", "&") if nxt else None
    assert sizes == [100, 100, 23] and len(set(seen)) == 223 and seen[0] == "evt-urgent"
    assert len(re.findall(r'data-id=', client.get("/?size=5000").get_data(as_text=True))) == 200  # bounded
    filtered = client.get("/?reason=certificate_abstained&model=digits").get_data(as_text=True)
    assert len(re.findall(r'data-id=', filtered)) == 50 and "matching the filter" in filtered
    assert client.get("/?after=nonsense").status_code == 400


def test_the_login_throttle_keeps_only_failures_inside_its_window(monkeypatch):
    """Asking whether a name or address is locked stored an empty entry for it, and
    entries were never dropped: 3,000 refused POSTs left 3,002 keys. A look-up stores
    nothing now, and once SWEEP_KEYS keys are held a failure drops the expired ones;
    locking still works as before."""
    from riskpipe.review import access

    clock = [1000.0]
    monkeypatch.setattr(access.time, "monotonic", lambda: clock[0])
    monkeypatch.setattr(access, "SWEEP_KEYS", 50)
    t = access.LoginThrottle()
    assert not any(t.locked(f"name:{i}", f"addr:{i}") for i in range(3000))
    assert not t.failures  # looked up, never stored
    for _ in range(access.MAX_FAILURES):
        t.fail("name:alice")
    assert t.locked("name:alice") and not t.locked("name:bob")
    for i in range(200):
        t.fail(f"addr:{i}")
    assert len(t.failures) == 201
    clock[0] += access.LOCKOUT_SECONDS + 1  # every failure so far is outside the window
    assert not t.locked("name:alice") and "name:alice" not in t.failures
    t.fail("addr:new")
    assert set(t.failures) == {"addr:new"}  # the sweep dropped the 200 expired addresses


def test_every_queue_row_opens_its_own_decision_whatever_its_id(tmp_path):
    """Event ids may hold '/', '..' and '.' (only control characters are refused). In a
    path a browser resolves them: the row of 'x/../evt/7' opened evt/7's page and took a
    verdict for it, and '/evt/7' (merged slashes) did too. Links name the item as ?id=,
    which nothing resolves; each row opens, and its verdict lands on, its own decision."""
    import html as html_lib
    from urllib.parse import urljoin, urlsplit

    from riskpipe.ledger import Ledger
    from test_review_records import decision_record

    ids = ["evt/7", "/evt/7", "x/../evt/7", "evt/7/.", "a?b=c&id=evt/7", "100% #1"]
    path = tmp_path / "l.db"
    with Ledger(str(path)) as led:
        for i, eid in enumerate(ids):
            led.append({**decision_record(eid, digit_index=i),
                        "review": {"routed": True, "priority": i, "deadline": None, "audit_sample": False}})
    app = create_app(ReviewSettings(ledger=str(path), credentials=Credentials(
        users={"alice": generate_password_hash("alice passphrase")})), metrics=None)
    client = app.test_client()
    log_in(client, "alice", "alice passphrase")
    queue = client.get("/").get_data(as_text=True)
    links = [html_lib.unescape(h) for h in re.findall(r'class="item-link" href="([^"]+)"', queue)]
    assert len(links) == len(ids)
    for href in links:
        url = urlsplit(urljoin("http://console/", href))  # what a browser requests: the query kept as it is
        page = client.get(url.path + "?" + url.query)
        assert page.status_code == 200, href
        shown = html_lib.unescape(re.search(r'<code id="event-id">(.*?)</code>', page.get_data(as_text=True)).group(1))
        action = html_lib.unescape(re.search(r'id="verdict-form"', page.get_data(as_text=True)) and
                                   re.search(r'<form method="post" action="([^"]+)" id="verdict-form"',
                                             page.get_data(as_text=True)).group(1))
        post = urlsplit(urljoin("http://console/", action))
        r = client.post(post.path + "?" + post.query,
                        data={"csrf_token": csrf_token(page.get_data(as_text=True)), "verdict": "unsure"})
        assert r.status_code == 302, (shown, r.status_code)
        with Ledger(str(path)) as led:
            assert led.get(shown, kind="verdict")["id"] == shown
    with Ledger(str(path)) as led:
        assert sorted(e.record["id"] for e in led.records("verdict")) == sorted(ids)  # each its own verdict
    assert client.get("/item").status_code == 400

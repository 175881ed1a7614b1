"""The review console driven in a real headless Chromium (Debian chromium + chromium-driver)
against a real Tansu broker: log in, see the queue, open an item, record a verdict, find it
in the ledger and on the review-outcomes topic; forged cross-site posts are refused."""

from __future__ import annotations

import base64
import io
import json
import threading
import time
import urllib.request
from datetime import UTC, datetime, timedelta
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
from PIL import Image

from browserkit import HAVE_CHROMIUM, by_id, chromium, click_and_wait
from riskpipe.ledger import Ledger
from riskpipe.review import serve_background
from test_review_records import decision_record, seed_ledger

pytestmark = [pytest.mark.broker, pytest.mark.slow]

PASSWORD = "correct horse battery staple"
if not HAVE_CHROMIUM:
    pytest.skip("needs Debian chromium and chromium-driver (make system-packages)", allow_module_level=True)


@pytest.fixture(scope="module")
def broker():
    from riskpipe.stream.broker import EmbeddedBroker

    with EmbeddedBroker() as b:
        b.create_topics(["review", "review-outcomes"])
        yield b


@pytest.fixture(scope="module")
def console(tmp_path_factory, broker):
    path = tmp_path_factory.mktemp("review") / "ledger.sqlite3"
    records = seed_ledger(path)
    server = serve_background(path, "127.0.0.1", 0, PASSWORD, bootstrap_servers=broker.bootstrap,
                              consumer_session_timeout_ms=2000, consumer_heartbeat_ms=600)
    server.records = records
    yield server
    server.stop()


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    driver = chromium(tmp_path_factory.mktemp("chromium"))
    yield driver
    driver.quit()


def queue_ids(driver) -> list[str]:
    from selenium.webdriver.common.by import By

    return [row.get_attribute("data-id") for row in driver.find_elements(By.CSS_SELECTOR, "#queue tbody tr")]


def login(driver, base_url, password=PASSWORD, name="alice"):
    driver.delete_all_cookies()
    driver.get(base_url + "login")
    by_id(driver, "username").send_keys(name)
    by_id(driver, "password").send_keys(password)
    click_and_wait(driver, by_id(driver, "login"))


def metrics_text(base_url: str) -> str:
    with urllib.request.urlopen(base_url + "metrics", timeout=10) as r:
        return r.read().decode()


def outcomes(bootstrap: str, want_key: str, timeout: float = 20.0) -> list[tuple[str, dict]]:
    """Every message on review-outcomes, read until ``want_key`` shows up."""
    from kafka import KafkaConsumer, TopicPartition

    consumer = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, consumer_timeout_ms=1000)
    try:
        tp = TopicPartition("review-outcomes", 0)
        consumer.assign([tp])
        consumer.seek_to_beginning(tp)
        got, deadline = [], time.monotonic() + timeout
        while time.monotonic() < deadline:
            for msg in consumer.poll(timeout_ms=500).get(tp, []):
                got.append((msg.key.decode(), json.loads(msg.value)))
            if any(k == want_key for k, _ in got):
                return got
        return got
    finally:
        consumer.close()


def test_unauthenticated_visitor_sees_only_the_login_page(console, browser):
    browser.delete_all_cookies()
    for path in ("", "item/evt-urgent", "item/evt-done"):
        browser.get(console.url + path)
        assert "/login" in browser.current_url
        page = browser.page_source
        for secret in ("radius", "p_lower", "0.4412", "abstain-to-review", "certificate_risk", "evt-urgent\"",
                       "looked fine"):
            assert secret not in page, f"{secret!r} leaked to an unauthenticated request for /{path}"


def test_wrong_password_is_refused(console, browser):
    login(browser, console.url, password="not the password")
    assert "/login" in browser.current_url
    assert "Wrong reviewer name or password" in browser.page_source
    browser.get(console.url)
    assert "/login" in browser.current_url


def test_login_queue_item_verdict_reach_ledger_and_outcomes_topic(console, browser, broker):
    from selenium.webdriver.common.by import By

    login(browser, console.url)
    assert by_id(browser, "reviewer-name").text == "alice"
    # routed and audit items, most urgent first; the reviewed and the allowed ones are not there
    assert queue_ids(browser) == ["evt-urgent", "evt-routine", "evt-audit"]
    audit_row = browser.find_element(By.CSS_SELECTOR, 'tr[data-id="evt-audit"]')
    assert "audit sample" in audit_row.text

    click_and_wait(browser, browser.find_element(By.LINK_TEXT, "evt-urgent"))
    assert by_id(browser, "event-id").text == "evt-urgent"
    rec = console.records["evt-urgent"]
    # the digit, drawn from input.data: downsampling the PNG gives the input back
    src = by_id(browser, "input-image").get_attribute("src")
    assert src.startswith("data:image/png;base64,")
    img = np.asarray(Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))).convert("L"), dtype=float)
    step = img.shape[0] // 8
    np.testing.assert_allclose(img[::step, ::step] / 255.0, np.reshape(rec["input"]["data"], (8, 8)), atol=1 / 255)
    assert by_id(browser, "prediction").text.startswith(str(rec["prediction"]))
    assert by_id(browser, "rule").text == "abstain-to-review"
    assert "says nothing about whether the input is clean" in by_id(browser, "certificate-scope").text
    cert_text = by_id(browser, "certificate").text
    assert "abstained yes" in cert_text and "sigma 0.25" in cert_text and "radius_threat 0" in cert_text
    assert "certificate_risk 1" in by_id(browser, "signals").text
    assert by_id(browser, "nist-controls").text.split() == ["MAP", "3.5", "MANAGE", "1.3", "MEASURE", "2.7"]
    assert by_id(browser, "audit-sample").text == "no"
    assert by_id(browser, "deadline").text.startswith(rec["review"]["deadline"])

    by_id(browser, "verdict-confirmed_manipulated").click()
    by_id(browser, "note").send_keys("extra stroke on the left edge")
    before = datetime.now(UTC)
    click_and_wait(browser, by_id(browser, "submit-verdict"))
    assert "recorded for evt-urgent by alice" in browser.page_source
    assert queue_ids(browser) == ["evt-routine", "evt-audit"]

    with Ledger(console.settings.ledger) as led:
        verdict = led.get("evt-urgent", kind="verdict")
        assert led.verify().ok
    assert verdict["verdict"] == "confirmed_manipulated" and verdict["reviewer"] == "alice"
    assert verdict["note"] == "extra stroke on the left edge"
    assert verdict["decision_ts"] == rec["ts"] and verdict["decision"] == "review" and verdict["policy_version"] == "3"
    when = datetime.fromisoformat(verdict["ts"])
    assert before - timedelta(seconds=1) <= when <= datetime.now(UTC)

    published = outcomes(broker.bootstrap, "evt-urgent")
    assert ("evt-urgent", verdict) in published

    # the item page now shows who decided and when, and offers no second verdict
    browser.get(console.url + "item/evt-urgent")
    assert f"by alice at {verdict['ts']}" in by_id(browser, "existing-verdict").text
    assert not browser.find_elements(By.ID, "verdict-form")


def test_records_on_the_review_topic_join_the_queue(console, browser, broker):
    from kafka import KafkaProducer

    rec = decision_record("evt-from-kafka", digit_index=7, priority=1,
                          deadline=datetime.now(UTC) + timedelta(minutes=30))
    producer = KafkaProducer(bootstrap_servers=broker.bootstrap, acks="all")
    try:
        producer.send("review", key=b"evt-from-kafka", value=json.dumps(rec).encode()).get(timeout=10)
        producer.send("review", key=b"junk", value=b"{not json").get(timeout=10)
        # nested too deeply for the standard library's reader: a RecursionError, not a ValueError,
        # used to end the feed's thread, and no later record reached the queue
        producer.send("review", key=b"deep", value=b"[" * 100_000).get(timeout=10)
        late = decision_record("evt-after-deep", digit_index=3, priority=1,
                               deadline=datetime.now(UTC) + timedelta(minutes=40))
        producer.send("review", key=b"evt-after-deep", value=json.dumps(late).encode()).get(timeout=10)
    finally:
        producer.close()
    # the backlog gauge follows the topic without anyone opening a page
    deadline = time.monotonic() + 20
    while "riskpipe_review_backlog 4.0" not in metrics_text(console.url) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert "riskpipe_review_backlog 4.0" in metrics_text(console.url)
    login(browser, console.url)
    deadline = time.monotonic() + 20
    while "evt-after-deep" not in queue_ids(browser) and time.monotonic() < deadline:
        time.sleep(0.3)
        browser.refresh()
    assert queue_ids(browser)[:2] == ["evt-from-kafka", "evt-after-deep"]  # priority 1, earliest deadlines
    # the malformed messages are skipped with their positions named, and the feed carries on
    deadline = time.monotonic() + 10
    while console.feed.rejected < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert console.feed.rejected == 2 and console.feed.last_error.startswith("review[0]@2: skipped")
    assert "nested too deeply" in console.feed.last_error


@pytest.fixture
def attacker_site(tmp_path):
    """A page on another origin that auto-submits a verdict form to the console."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(SimpleHTTPRequestHandler, directory=str(tmp_path)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()

    def page(host: str, target: str, with_token: str | None = None) -> str:
        token = f'<input type="hidden" name="csrf_token" value="{with_token}">' if with_token else ""
        (tmp_path / "attack.html").write_text(
            f'<html><body><form id="f" method="post" action="{target}">{token}'
            '<input type="hidden" name="verdict" value="confirmed_clean">'
            '<input type="hidden" name="note" value="forged"></form>'
            '<script>document.getElementById("f").submit()</script></body></html>')
        return f"http://{host}:{server.server_port}/attack.html"

    yield page
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize("host, token", [
    ("127.0.0.1", None),          # same site, other origin: the cookie goes along, the CSRF token is missing
    ("127.0.0.1", "forged-token"),  # a made-up token
    ("localhost", None),          # other site: SameSite=Strict keeps the cookie home as well
])
def test_cross_site_posts_are_refused(console, browser, attacker_site, host, token):
    login(browser, console.url)
    assert "evt-routine" in queue_ids(browser)
    browser.get(attacker_site(host, console.url + "verdict/evt-routine", token))
    deadline = time.monotonic() + 10
    while "/verdict/evt-routine" not in browser.current_url and time.monotonic() < deadline:
        time.sleep(0.1)
    assert "/verdict/evt-routine" in browser.current_url
    assert "Request refused" in browser.page_source or "Not logged in" in browser.page_source
    with Ledger(console.settings.ledger) as led:
        assert led.get("evt-routine", kind="verdict") is None

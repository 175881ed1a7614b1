"""The review console's backlog-age gauge (riskpipe_review_backlog_oldest_age_seconds): the
age of the oldest routed decision without a verdict, read by the RiskpipeReviewBacklogStale
alert (deploy/prometheus, promtool-tested in test_alerts)."""

from __future__ import annotations

import re
from datetime import UTC, datetime

import pytest
from werkzeug.security import generate_password_hash

from browserkit import by_id, chromium, click_and_wait, needs_chromium
from riskpipe.ledger import Ledger, parse_ts
from riskpipe.metrics import ReviewMetrics
from riskpipe.review.app import create_app
from riskpipe.review.settings import Credentials, ReviewSettings
from test_review_records import seed_ledger
from test_review_security import csrf_token, log_in


def _gauge(app) -> float:
    text = app.test_client().get("/metrics").get_data(as_text=True)
    return float(re.search(r"^riskpipe_review_backlog_oldest_age_seconds (\S+)$", text, re.M).group(1))


def _oldest_waiting_age(path) -> float:
    with Ledger(str(path)) as led:
        done = {e.record["id"] for e in led.records("verdict")}
        waiting = [e.record for e in led.records("decision") if (e.record.get("review") or {}).get("routed")
                   or (e.record.get("review") or {}).get("audit_sample")]
        times = [parse_ts(r["ts"]) for r in waiting if r["id"] not in done]
    return (datetime.now(UTC) - min(times)).total_seconds() if times else 0.0


def test_backlog_age_gauge_is_the_oldest_waiting_item(tmp_path):
    path = tmp_path / "ledger.sqlite3"
    seed_ledger(path)
    creds = Credentials(users={"alice": generate_password_hash("alice passphrase")})
    app = create_app(ReviewSettings(ledger=str(path), credentials=creds), metrics=ReviewMetrics())
    client = app.test_client()
    log_in(client, "alice", "alice passphrase")
    # a verdict on the oldest waiting item moves the gauge to the next oldest
    with Ledger(str(path)) as led:
        waiting = sorted((e.record for e in led.records("decision") if (e.record.get("review") or {}).get("routed")
                          and led.get(e.record["id"], kind="verdict") is None), key=lambda r: r["ts"])
    for rec in waiting:
        token = csrf_token(client.get(f"/item/{rec['id']}").get_data(as_text=True))
        assert client.post(f"/verdict/{rec['id']}", data={"csrf_token": token, "verdict": "unsure"}).status_code == 302
        expected = _oldest_waiting_age(path)
        assert abs(_gauge(app) - expected) < 5.0, (rec["id"], _gauge(app), expected)
    assert _oldest_waiting_age(path) >= 0.0


def test_backlog_age_gauge_ages_on_a_quiet_console(tmp_path):
    """Nobody reviews and nothing arrives (the neglect RiskpipeReviewBacklogStale exists
    for): the gauge was set only at start, after a feed batch or a verdict, so it stopped
    ageing below the alert's 4 h. It is computed at every scrape."""
    from datetime import timedelta

    from riskpipe.timestamps import rfc3339_millis
    from test_review_records import decision_record

    path = tmp_path / "quiet.sqlite3"
    with Ledger(str(path)) as led:
        led.append({**decision_record("old", digit_index=0), "ts": rfc3339_millis(datetime.now(UTC)
                                                                                 - timedelta(hours=3, minutes=59))})
    app = create_app(ReviewSettings(ledger=str(path), credentials=Credentials(
        users={"alice": generate_password_hash("alice passphrase")})), metrics=ReviewMetrics())
    first = _gauge(app)
    assert 3 * 3600 + 59 * 60 - 5 < first < 4 * 3600
    import time as time_module

    time_module.sleep(1.1)  # the item gets older, and nothing else happens
    assert _gauge(app) >= first + 1.0  # it ages between scrapes, with no batch and no verdict


# ---- four eyes: review.require_second_reviewer_for: [block] --------------------------------
USERS = ("alice", "bob", "carol")


def _four_eyes_ledger(tmp_path):
    from test_review_records import decision_record

    path = tmp_path / "four-eyes.sqlite3"
    with Ledger(str(path)) as led:
        led.append(decision_record("blk-1", decision="block", abstained=False))
        led.append(decision_record("blk-2", decision="block", abstained=False, digit_index=1))
        led.append(decision_record("rev-1", decision="review", digit_index=2))
    return path


def _settings(path, required=("block",)):
    creds = Credentials(users={n: generate_password_hash(f"{n} passphrase") for n in USERS})
    return ReviewSettings(ledger=str(path), credentials=creds, require_second_reviewer_for=tuple(required))


def _post(app, name, event_id, verdict):
    client = app.test_client()
    log_in(client, name, f"{name} passphrase")
    token = csrf_token(client.get(f"/item/{event_id}").get_data(as_text=True))
    return client.post(f"/verdict/{event_id}", data={"csrf_token": token, "verdict": verdict})


def test_overriding_a_block_needs_a_second_reviewer(tmp_path):
    path = _four_eyes_ledger(tmp_path)
    app = create_app(_settings(path), metrics=None)
    assert _post(app, "alice", "blk-1", "confirmed_clean").status_code == 302
    with Ledger(str(path)) as led:
        assert led.get("blk-1", kind="verdict") is None  # not final on one reviewer's word
        assert led.get("blk-1", kind="first_review")["reviewer"] == "alice"
    page = _logged_in(app, "alice").get("/item/blk-1").get_data(as_text=True)
    assert 'id="you-reviewed"' in page and 'id="verdict-form"' not in page  # no form for a verdict she cannot give
    assert 'id="verdict-form"' in _logged_in(app, "bob").get("/item/blk-1").get_data(as_text=True)
    again = _post(app, "alice", "blk-1", "confirmed_clean")  # a post all the same (an old tab): refused
    assert again.status_code == 409 and "needs a second reviewer" in again.get_data(as_text=True)
    assert _post(app, "bob", "blk-1", "confirmed_clean").status_code == 302
    with Ledger(str(path)) as led:
        final = led.get("blk-1", kind="verdict")
        assert (final["reviewer"], final["first_reviewer"], final["verdict"]) == ("bob", "alice", "confirmed_clean")
        assert led.verify().ok
    # keeping a block, and verdicts on review decisions, need one reviewer
    assert _post(app, "alice", "blk-2", "confirmed_manipulated").status_code == 302
    assert _post(app, "alice", "rev-1", "confirmed_clean").status_code == 302
    with Ledger(str(path)) as led:
        assert led.get("blk-2", kind="verdict")["reviewer"] == "alice"
        assert led.get("rev-1", kind="verdict")["reviewer"] == "alice"
    # without the setting, one reviewer overrides a block (the documented default)
    path2 = _four_eyes_ledger(tmp_path / "plain")
    plain = create_app(_settings(path2, required=()), metrics=None)
    assert _post(plain, "alice", "blk-1", "confirmed_clean").status_code == 302
    with Ledger(str(path2)) as led:
        assert led.get("blk-1", kind="verdict")["reviewer"] == "alice"


def test_a_double_review_sample_stays_blind_and_never_overrides_a_block_on_one_reviewers_word(tmp_path):
    """Blocks in the double-review sample, with four eyes on block overrides.

    * alice overrides (confirmed_clean): the first review is a blind sample's. Labelled
      four_eyes, it showed bob her verdict ("First of two reviews: Confirmed clean").
    * alice keeps the block, bob overrides it: refusing bob (409, "the first review does not
      give that verdict") told him alice's verdict and let him give another, biasing the
      sample's agreement. Bob's review is recorded as a second review; carol, a third
      reviewer who sees both, settles it. The block is overridden only if she gives the
      override too; the agreement counts alice and bob's pair, as given."""
    import json

    from riskpipe.report import write_report
    from riskpipe.review.queue import in_double_review_sample
    from test_review_records import decision_record

    sampled = [f"s{i}" for i in range(4000) if in_double_review_sample(f"s{i}", 0.05)][:4]
    path = tmp_path / "sample.sqlite3"
    with Ledger(str(path)) as led:
        for i, eid in enumerate(sampled):
            led.append({**decision_record(eid, decision="block", abstained=False, digit_index=i),
                        "review": {"routed": True, "priority": 1, "deadline": None, "audit_sample": False}})
    settings = _settings(path)
    app = create_app(ReviewSettings(**{**settings.__dict__, "double_review_fraction": 0.05}), metrics=None)
    overridden_first, kept_first, settled_keep, two_give_it = sampled

    def page(name, eid):
        client = _logged_in(app, name)
        return client.get(f"/item/{eid}").get_data(as_text=True)

    # alice's override is a blind sample's first review: bob's page does not show it
    assert _post(app, "alice", overridden_first, "confirmed_clean").status_code == 302
    shown = page("bob", overridden_first)
    assert "Double-review sample" in shown and "the first verdict is not shown" in shown
    assert "Confirmed clean —" not in shown and "First of two reviews" not in shown
    assert _post(app, "bob", overridden_first, "confirmed_manipulated").status_code == 302  # keeps it: final
    # alice keeps the block, bob overrides: recorded (no refusal to learn from), not final
    for eid in (kept_first, settled_keep):
        assert _post(app, "alice", eid, "confirmed_manipulated").status_code == 302
        assert _post(app, "bob", eid, "confirmed_clean").status_code == 302
        assert _post(app, "bob", eid, "unsure").status_code == 409  # no second try
    with Ledger(str(path)) as led:
        assert led.get(kept_first, kind="verdict") is None and led.get(kept_first, kind="second_review")["verdict"] \
            == "confirmed_clean"
    third = page("carol", kept_first)
    assert "settled by a third reviewer" in third and "alice" in third and "bob" in third
    assert _post(app, "alice", kept_first, "confirmed_clean").status_code == 409  # the third is someone else
    assert _post(app, "carol", kept_first, "confirmed_clean").status_code == 302  # override given twice: final
    assert _post(app, "carol", settled_keep, "unsure").status_code == 302  # the block stands
    # two reviewers giving the override at once: final, as the four-eyes rule promises
    assert _post(app, "alice", two_give_it, "confirmed_clean").status_code == 302
    assert _post(app, "bob", two_give_it, "confirmed_clean").status_code == 302
    with Ledger(str(path)) as led:
        got = {eid: led.get(eid, kind="verdict") for eid in sampled}
        assert led.verify().ok
    assert (got[overridden_first]["verdict"], got[overridden_first]["first_verdict"],
            got[overridden_first]["double_review"]) == ("confirmed_manipulated", "confirmed_clean", "sample")
    settled = got[kept_first]
    assert (settled["reviewer"], settled["verdict"], settled["first_reviewer"], settled["first_verdict"],
            settled["second_reviewer"], settled["second_verdict"]) == \
        ("carol", "confirmed_clean", "alice", "confirmed_manipulated", "bob", "confirmed_clean")
    assert (got[settled_keep]["verdict"], got[settled_keep]["second_verdict"]) == ("unsure", "confirmed_clean")
    assert got[two_give_it]["verdict"] == got[two_give_it]["first_verdict"] == "confirmed_clean"
    review = json.loads(write_report(path, tmp_path / "r.json", "json").read_text())["review"]
    # the pairs as given: one agrees (two_give_it), three disagree
    assert (review["agreement"]["pairs"], review["agreement"]["agree"]) == (4, 1)
    assert review["four_eyes_overrides"] == 2  # kept_first (bob and carol) and two_give_it


def test_require_second_reviewer_for_is_validated(tmp_path):
    import yaml

    from riskpipe.review.settings import SettingsError, resolve_settings

    cfg = tmp_path / "riskpipe.yaml"
    users = {"alice": "alice passphrase", "bob": "bob passphrase"}
    cfg.write_text(yaml.safe_dump({"ledger": str(tmp_path / "l.db"),
                                   "review": {"require_second_reviewer_for": ["block"], "users": users}}))
    env: dict[str, str] = {}
    assert resolve_settings(config_path=str(cfg), environ=env).require_second_reviewer_for == ("block",)
    # with a shared password one person can log in as two reviewers: refused, naming both settings
    for extra in ({"require_second_reviewer_for": ["block"]}, {"double_review_fraction": 0.05}):
        cfg.write_text(yaml.safe_dump({"ledger": str(tmp_path / "l.db"), "review": {"users": users, **extra}}))
        with pytest.raises(SettingsError, match=r"review\.(require_second_reviewer_for|double_review_fraction) "
                                                r"need per-reviewer credentials .* a shared password is set"):
            resolve_settings(config_path=str(cfg), environ={"RISKPIPE_REVIEW_PASSWORD": "a long shared passphrase"})
    cfg.write_text(yaml.safe_dump({"ledger": str(tmp_path / "l.db"),
                                   "review": {"require_second_reviewer_for": ["blocks"], "users": users}}))
    try:
        resolve_settings(config_path=str(cfg), environ=env)
    except SettingsError as e:
        assert "review.require_second_reviewer_for" in str(e) and "\n" not in str(e)
    else:
        raise AssertionError("a bad decision name was accepted")


@needs_chromium
def test_four_eyes_in_a_real_browser(tmp_path):
    from selenium.webdriver.common.by import By

    from riskpipe.review.server import start

    path = _four_eyes_ledger(tmp_path)
    server = start(_settings(path), metrics=None)
    driver = chromium(tmp_path / "chromium")
    try:
        def login(name):
            driver.delete_all_cookies()
            driver.get(server.url + "login")
            by_id(driver, "username").send_keys(name)
            by_id(driver, "password").send_keys(f"{name} passphrase")
            click_and_wait(driver, by_id(driver, "login"))

        def give(verdict):
            driver.get(server.url + "item/blk-1")
            by_id(driver, f"verdict-{verdict}").click()
            click_and_wait(driver, by_id(driver, "submit-verdict"))

        login("alice")
        give("confirmed_clean")
        assert "takes effect when a second reviewer confirms it" in driver.page_source
        driver.get(server.url + "item/blk-1")
        first = by_id(driver, "first-review").text
        assert "First of two reviews" in first and "alice" in first
        # no form for a verdict alice cannot give (before: a form, then a 409)
        assert "awaits another reviewer" in by_id(driver, "you-reviewed").text
        assert not driver.find_elements(By.ID, "verdict-form")
        with Ledger(str(path)) as led:
            assert led.get("blk-1", kind="verdict") is None
        login("bob")
        give("confirmed_clean")
        driver.get(server.url + "item/blk-1")
        assert "bob" in by_id(driver, "existing-verdict").text
        assert not driver.find_elements(By.ID, "verdict-form")
        with Ledger(str(path)) as led:
            assert led.get("blk-1", kind="verdict")["first_reviewer"] == "alice"
    finally:
        driver.quit()
        server.stop()


def test_double_review_sample_and_the_reports_agreement(tmp_path):
    """With review.double_review_fraction 1.0 every routed item gets two independent
    reviews; the second reviewer does not see the first verdict; the report's agreement and
    Cohen's kappa are the ones computed here from the pairs."""
    import json

    from riskpipe.report import write_report
    from test_review_records import decision_record

    path = tmp_path / "double.sqlite3"
    with Ledger(str(path)) as led:
        for i in range(6):
            led.append(decision_record(f"d-{i}", decision="review", digit_index=i))
    import dataclasses

    app = create_app(dataclasses.replace(_settings(path, required=()), double_review_fraction=1.0), metrics=None)
    firsts = ["confirmed_clean", "confirmed_manipulated", "unsure", "confirmed_clean", "confirmed_manipulated",
              "unsure"]
    seconds = ["confirmed_clean", "confirmed_manipulated", "confirmed_clean", "confirmed_clean", "unsure", "unsure"]
    for i, (a, b) in enumerate(zip(firsts, seconds)):
        assert _post(app, "alice", f"d-{i}", a).status_code == 302
        page = _logged_in(app, "bob").get(f"/item/d-{i}").get_data(as_text=True)
        assert "Double-review sample" in page and "the first verdict is not shown" in page
        assert "Confirmed" not in page.split('id="first-review"')[1].split("</p>")[0]
        assert _post(app, "bob", f"d-{i}", b).status_code == 302
    d = json.loads(write_report(path, tmp_path / "r.json", "json").read_text())
    ag = d["review"]["agreement"]
    n, agree = 6, sum(a == b for a, b in zip(firsts, seconds))
    chance = sum(firsts.count(k) * seconds.count(k) for k in set(firsts) | set(seconds)) / n**2
    assert (ag["pairs"], ag["agree"]) == (n, agree)
    assert ag["cohen_kappa"] == pytest.approx((agree / n - chance) / (1 - chance))
    with Ledger(str(path)) as led:
        v = led.get("d-2", kind="verdict")
        assert (v["reviewer"], v["first_reviewer"], v["first_verdict"], v["double_review"]) == \
            ("bob", "alice", "unsure", "sample")


def _logged_in(app, name):
    client = app.test_client()
    log_in(client, name, f"{name} passphrase")
    return client


def test_double_review_draw_is_deterministic_and_near_its_fraction():
    from riskpipe.review.queue import in_double_review_sample

    ids = [f"evt-{i}" for i in range(4000)]
    drawn = [i for i in ids if in_double_review_sample(i, 0.1)]
    assert drawn == [i for i in ids if in_double_review_sample(i, 0.1)]
    assert 0.08 < len(drawn) / len(ids) < 0.12
    assert not any(in_double_review_sample(i, 0.0) for i in ids) and all(in_double_review_sample(i, 1.0) for i in ids)


def _queue_pages(client, url: str) -> tuple[list[list[str]], list[str]]:
    """(the ids of each queue page from ``url`` on, following "next", the pages' HTML)."""
    pages, htmls = [], []
    while url:
        html = client.get(url).get_data(as_text=True)
        pages.append(re.findall(r'data-id="([^"]+)"', html))
        htmls.append(html)
        nxt = re.search(r'id="next" href="([^"]+)"', html)
        url = nxt.group(1).replace("&amp;", "&") if nxt else None
    return pages, htmls


def test_an_item_awaiting_another_reviewer_is_not_offered_to_those_who_reviewed_it(tmp_path):
    """An item waiting for a second (four eyes, double-review sample) or third reviewer (a
    sample whose two reviews disagree on an override) was listed to the reviewers who had
    already reviewed it, first on their queue, and each of them got a 409 on opening it and
    giving a verdict. It is listed for the others, marked as awaiting another reviewer;
    the backlog still counts it, the page says how many are not listed and why, and pages
    (filtered or not) stay full: every item is listed once to whoever may review it."""
    import dataclasses

    from riskpipe.review import queue as rq
    from riskpipe.review.queue import in_double_review_sample
    from test_review_records import decision_record

    sampled = [f"s{i}" for i in range(4000) if in_double_review_sample(f"s{i}", 0.05)][:2]
    plain = [f"p{i}" for i in range(400) if not in_double_review_sample(f"p{i}", 0.05)][:8]
    four_eyes_item, sampled_second, sampled_third = plain[0], sampled[0], sampled[1]
    path = tmp_path / "awaiting.sqlite3"
    with Ledger(str(path)) as led:
        # the three awaiting items are the most urgent: priority 1, first on every queue
        led.append(decision_record(four_eyes_item, decision="block", abstained=False, priority=1))
        for i, eid in enumerate(sampled):
            led.append({**decision_record(eid, decision="block", abstained=False, digit_index=i + 1),
                        "review": {"routed": True, "priority": 1, "deadline": None, "audit_sample": False}})
        for i, eid in enumerate(plain[1:]):  # seven more, two of them blocks (reason "certified")
            led.append(decision_record(eid, decision="block" if i < 2 else "review", abstained=i >= 2,
                                       digit_index=i + 3))
    app = create_app(dataclasses.replace(_settings(path), double_review_fraction=0.05), metrics=None)
    assert _post(app, "alice", four_eyes_item, "confirmed_clean").status_code == 302  # awaits a second reviewer
    assert _post(app, "alice", sampled_second, "confirmed_manipulated").status_code == 302  # sample: a second
    assert _post(app, "alice", sampled_third, "confirmed_manipulated").status_code == 302
    assert _post(app, "bob", sampled_third, "confirmed_clean").status_code == 302  # disagree: a third reviewer
    everything = [four_eyes_item, *sampled, *plain[1:]]
    awaiting = {four_eyes_item: "second", sampled_second: "second", sampled_third: "third"}
    not_for = {"alice": set(awaiting), "bob": {sampled_third}, "carol": set()}
    clients = {name: _logged_in(app, name) for name in USERS}
    for name, client in clients.items():
        pages, htmls = _queue_pages(client, "/?size=2")
        listed = [eid for page in pages for eid in page]
        want = [eid for eid in everything if eid not in not_for[name]]
        assert sorted(listed) == sorted(want) and len(listed) == len(set(listed)), (name, pages)
        assert all(len(page) == 2 for page in pages[:-1]) and pages[-1], (name, pages)  # full pages, none empty
        for html in htmls:  # the backlog counts every waiting item; the page says why some are not listed
            assert '<span class="count" id="backlog">10</span>' in html
            assert '<span id="not-for-you">Items you reviewed that await another reviewer' in html
        rows = {m.group(1): m.group(2) for html in htmls
                for m in re.finditer(r'data-id="([^"]+)">(.*?)</tr>', html, re.S)}
        for eid, which in awaiting.items():
            if eid in rows:
                assert f"awaits a {which} reviewer" in rows[eid], (name, eid)
                assert "Confirmed" not in rows[eid]  # the row never tells a verdict
        assert all("awaits a" not in rows[eid] for eid in plain[1:])
        # the same, filtered: blocks that are certified (the three awaiting items and two more)
        pages, htmls = _queue_pages(client, "/?size=2&reason=certified&model=digits")
        listed = [eid for page in pages for eid in page]
        want = [eid for eid in [four_eyes_item, *sampled, *plain[1:3]] if eid not in not_for[name]]
        assert sorted(listed) == sorted(want) and len(listed) == len(set(listed)), (name, pages)
        assert all(len(page) == 2 for page in pages[:-1]) and pages[-1], (name, pages)
        with Ledger(str(path)) as led:
            where = rq.QueueFilter(reason="certified", model="digits")
            assert rq.backlog(led, where=where) - len(not_for[name]) == len(listed)
    # carol settles the third-review item, bob and carol the two awaiting a second: gone for everyone
    assert _post(app, "carol", sampled_third, "unsure").status_code == 302
    assert _post(app, "bob", sampled_second, "confirmed_manipulated").status_code == 302
    assert _post(app, "carol", four_eyes_item, "confirmed_clean").status_code == 302
    for client in clients.values():
        pages, htmls = _queue_pages(client, "/?size=50")
        assert sorted(pages[0]) == sorted(plain[1:])
        assert '<span class="count" id="backlog">7</span>' in htmls[0]


def test_the_queue_for_a_reviewer_on_either_backend(target):
    """``pending(reviewer=...)`` reads a review's reviewer in SQL (each backend's JSON
    access): the items awaiting another reviewer after this one's review are left out of
    this reviewer's queue."""
    from riskpipe.review import queue as rq
    from test_review_records import decision_record

    with Ledger(target) as led:
        for i in range(5):
            led.append(decision_record(f"b{i}", decision="block", abstained=False, digit_index=i, priority=1))
        for eid in ("b0", "b1"):
            rq.record_review(led, eid, "confirmed_clean", "", "alice", ("block",))
        rq.record_review(led, "b2", "confirmed_clean", "", "bob", ("block",))
        assert [it.id for it in rq.pending(led, reviewer="alice")] == ["b2", "b3", "b4"]
        assert [it.id for it in rq.pending(led, reviewer="alice", limit=2)] == ["b2", "b3"]
        assert [it.id for it in rq.pending(led, reviewer="bob")] == ["b0", "b1", "b3", "b4"]
        assert [it.id for it in rq.pending(led)] == ["b0", "b1", "b2", "b3", "b4"]
        assert [it.reviews for it in rq.pending(led)] == [1, 1, 1, 0, 0]
        rq.record_review(led, "b0", "confirmed_clean", "", "bob", ("block",))  # final: gone for both
        assert [it.id for it in rq.pending(led, reviewer="alice")] == ["b2", "b3", "b4"]
        assert [it.id for it in rq.pending(led, reviewer="bob")] == ["b1", "b3", "b4"]
        assert rq.backlog(led) == 4

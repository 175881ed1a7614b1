"""A console scoped to its stage: two stages share one review topic (and a ledger already
holds another stage's record); the console started with stage A's config ingests and shows
only A's records, in real headless Chromium against the embedded broker."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import yaml

from browserkit import HAVE_CHROMIUM, by_id, chromium, click_and_wait
from riskpipe.ledger import Ledger
from riskpipe.policy import load_policy
from riskpipe.review.scope import PolicyId, StageScope
from test_review_records import decision_record

PASSWORD = "correct horse battery staple"
ROOT = Path(__file__).resolve().parents[1]
DEFAULT, STRICT = ROOT / "policies" / "default.yaml", ROOT / "policies" / "strict.yaml"


def _policy_of(path: Path) -> dict:
    p = load_policy(str(path))
    return {"name": p.name, "version": str(p.version), "sha256": p.sha256, "shadow": False}


def _record(event_id: str, model: str, policy: dict) -> dict:
    rec = decision_record(event_id, priority=1)
    rec["model"] = {**rec["model"], "name": model}
    rec["policy"] = policy
    return rec


def _stage_config(tmp: Path, ledger: Path, bootstrap: str | None = None) -> Path:
    """Stage A: the digits model under policies/default.yaml."""
    cfg = {"ledger": str(ledger), "policy": str(DEFAULT), "models": {"digits": {"spec": "demo:digits"}},
           **({"bootstrap_servers": bootstrap} if bootstrap else {})}
    path = tmp / "stage-a.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_scope_names_why_a_record_is_not_the_stages():
    own = _policy_of(DEFAULT)
    scope = StageScope({"digits": PolicyId(own["name"], own["version"], own["sha256"])})
    assert scope.refuses(_record("a", "digits", own)) is None
    assert "model 'credit' is not one of this stage's (digits)" in scope.refuses(_record("b", "credit", own))
    # the same name and version with other content (another stage's edited copy) is another policy
    twin = {**own, "sha256": "f" * 64}
    why = scope.refuses(_record("c", "digits", twin))
    assert why is not None and f"sha256 {'f' * 12}" in why and f"sha256 {own['sha256'][:12]}" in why
    assert scope.refuses({"id": "d", "model": {"name": "digits"}}).endswith(
        f"decided under no policy, not this stage's policy {own['name']} v{own['version']} sha256 {own['sha256'][:12]}")


def test_settings_take_the_scope_from_the_config(tmp_path):
    from riskpipe.review.settings import resolve_settings

    settings = resolve_settings(config_path=str(_stage_config(tmp_path, tmp_path / "l.db")),
                                environ={"RISKPIPE_REVIEW_PASSWORD": PASSWORD})
    own = _policy_of(DEFAULT)
    assert settings.scope.policies == {"digits": PolicyId(own["name"], own["version"], own["sha256"])}
    # without a config there is no stage to scope to: every record is the console's
    assert resolve_settings(ledger=str(tmp_path / "l.db"), environ={"RISKPIPE_REVIEW_PASSWORD": PASSWORD}).scope is None


@pytest.mark.broker
@pytest.mark.slow
@pytest.mark.skipif(not HAVE_CHROMIUM, reason="needs Debian chromium and chromium-driver")
def test_console_sees_only_its_stage_while_another_stage_shares_the_topic(tmp_path):
    from kafka import KafkaProducer
    from selenium.webdriver.common.by import By

    from riskpipe.review.server import ConsoleServer
    from riskpipe.review.settings import resolve_settings
    from riskpipe.stream.broker import EmbeddedBroker

    own, strict = _policy_of(DEFAULT), _policy_of(STRICT)
    ledger = tmp_path / "ledger.sqlite3"
    with Ledger(ledger) as led:  # copied in earlier by an unscoped console: kept, but not shown
        led.append(_record("b-old", "credit", own), kind="decision")
    mine = [_record(f"a-{i}", "digits", own) for i in range(3)]
    theirs = [_record("b-0", "credit", own),                                   # a model stage A does not run
              _record("b-1", "digits", strict),                                # A's model under B's policy
              _record("b-2", "digits", {**own, "sha256": "e" * 64})]           # same name and version, other content
    with EmbeddedBroker() as broker:
        broker.create_topics(["review", "review-outcomes"])
        producer = KafkaProducer(bootstrap_servers=broker.bootstrap)
        for rec in [r for pair in zip(theirs, mine) for r in pair]:  # interleaved on one topic
            producer.send("review", key=rec["id"].encode(), value=json.dumps(rec).encode())
        producer.flush()
        producer.close()
        settings = resolve_settings(config_path=str(_stage_config(tmp_path, ledger, broker.bootstrap)),
                                    environ={"RISKPIPE_REVIEW_PASSWORD": PASSWORD})
        server = ConsoleServer(settings, metrics=None, consumer_session_timeout_ms=2000,
                               consumer_heartbeat_ms=600).start()
        driver = chromium(tmp_path / "chromium")
        try:
            deadline = time.monotonic() + 60
            while (server.feed.received, server.feed.other_stage) != (3, 3) and time.monotonic() < deadline:
                time.sleep(0.2)
            assert (server.feed.received, server.feed.other_stage) == (3, 3)
            with Ledger(ledger) as led:  # ingestion: only stage A's records were copied in
                assert sorted(e.entry_id for e in led.records(kind="decision")) == ["a-0", "a-1", "a-2", "b-old"]
            driver.get(server.url + "login")
            by_id(driver, "username").send_keys("alice")
            by_id(driver, "password").send_keys(PASSWORD)
            click_and_wait(driver, by_id(driver, "login"))
            ids = [r.get_attribute("data-id") for r in driver.find_elements(By.CSS_SELECTOR, "#queue tbody tr")]
            assert sorted(ids) == ["a-0", "a-1", "a-2"]
            assert by_id(driver, "backlog").text == "3"
            scope_text = by_id(driver, "scope").text
            assert f"digits: policy {own['name']} v{own['version']} sha256 {own['sha256'][:12]}" in scope_text
            assert by_id(driver, "outside").text.startswith("1 waiting record of other models or policies")
            driver.get(server.url + "item/b-old")  # another stage's record: not shown, no verdict form
            assert "is not a record of this console's stage" in driver.find_element(By.TAG_NAME, "body").text
            assert not driver.find_elements(By.ID, "verdict-form")
        finally:
            driver.quit()
            server.stop()

"""The review console's backlog-age gauge (riskpipe_review_backlog_oldest_age_seconds): the
age of the oldest routed decision without a verdict, read by the RiskpipeReviewBacklogStale
alert (deploy/prometheus, promtool-tested in test_alerts)."""

from __future__ import annotations

import re
from datetime import datetime, timezone

from test_review_records import seed_ledger
from test_review_security import csrf_token, log_in
from werkzeug.security import generate_password_hash

from riskpipe.ledger import Ledger, parse_ts
from riskpipe.metrics import StageMetrics
from riskpipe.review.app import create_app
from riskpipe.review.settings import Credentials, ReviewSettings


def _gauge(app) -> float:
    text = app.test_client().get("/metrics").get_data(as_text=True)
    return float(re.search(r"^riskpipe_review_backlog_oldest_age_seconds (\S+)$", text, re.M).group(1))


def _oldest_waiting_age(path) -> float:
    with Ledger(str(path)) as led:
        done = {e.record["id"] for e in led.records("verdict")}
        waiting = [e.record for e in led.records("decision") if (e.record.get("review") or {}).get("routed")
                   or (e.record.get("review") or {}).get("audit_sample")]
        times = [parse_ts(r["ts"]) for r in waiting if r["id"] not in done]
    return (datetime.now(timezone.utc) - min(times)).total_seconds() if times else 0.0


def test_backlog_age_gauge_is_the_oldest_waiting_item(tmp_path):
    path = tmp_path / "ledger.sqlite3"
    seed_ledger(path)
    creds = Credentials(users={"alice": generate_password_hash("alice passphrase")})
    app = create_app(ReviewSettings(ledger=str(path), credentials=creds), metrics=StageMetrics())
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

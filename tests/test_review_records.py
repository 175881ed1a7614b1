"""Synthetic full decision records (docs/records.md) for the review console tests, and
the queue's rules checked on them: who is in the queue, in which order, and verdicts."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime, timedelta

import numpy as np
import pytest

from riskpipe.certify import Certificate
from riskpipe.ledger import Ledger, LedgerError
from riskpipe.models.digits import load_split
from riskpipe.review import queue as rq
from riskpipe.timestamps import rfc3339_millis

T0 = datetime(2025, 3, 1, 12, 0, 0, tzinfo=UTC)


def ts(dt: datetime) -> str:
    return rfc3339_millis(dt)


def decision_record(event_id: str, *, digit_index: int = 0, decision: str = "review", routed: bool = True,
                    audit_sample: bool = False, priority: int | None = 2, deadline: datetime | None = None,
                    abstained: bool = True, when: datetime = T0, include_input: bool = True) -> dict:
    """One full decision record for an 8x8 digit from the demo data set."""
    X, y = load_split("test")
    x = X[digit_index]
    radius = 0.0 if abstained else 0.61
    cert = Certificate(method="smoothing", mode="certify", norm="l2", radius=radius, abstained=abstained,
                       predicted_class=None if abstained else int(y[digit_index]),
                       p_lower=0.4412 if abstained else 0.9931,
                       sigma=0.25, alpha=0.001, n_samples=100_100, elapsed_ms=41.5, seed=1234, input_dim=64)
    cert_d = {**cert.to_dict(), "radius_threat": radius / 8.0, "threat_norm": "linf", "threat_epsilon": 0.03}
    inp = {"sha256": hashlib.sha256(np.ascontiguousarray(x).tobytes()).hexdigest(), "shape": list(x.shape),
           "datatype": "FP32"}
    if include_input:
        inp["data"] = [float(v) for v in x.ravel()]
    return {
        "id": event_id,
        "ts": ts(when),
        "event_ts": ts(when - timedelta(milliseconds=80)),
        "model": {"name": "digits", "spec": "demo:digits", "sha256": "ab" * 32},
        "policy": {"name": "default", "version": "3", "sha256": "cd" * 32, "shadow": False},
        "certificate": cert_d,
        "context": {"nearest_other_class_distance": 2.41, "radius_to_distance_ratio": radius / 2.41,
                    "radius_percentile": 12.0, "reference": "digits-train"},
        "signals": {
            "certificate_risk": {"value": 1.0 if abstained else 0.1, "abstained": abstained, "flagged": abstained},
            "upstream_risk": {"value": 0.35, "flagged": False},
            "context_risk": {"value": 0.2, "radius_percentile": 12.0, "flagged": False},
        },
        "score": 0.71 if abstained else 0.18,
        "decision": decision,
        "rule": "abstain-to-review" if abstained else "allow-certified",
        "reasons": ["certificate_abstained"] if abstained else ["certified"],
        "controls": ["MAP 3.5", "MANAGE 1.3", "MEASURE 2.7", "ISO/IEC 27001:2022 A.5.28"],
        "review": {"routed": routed, "priority": priority if routed or audit_sample else None,
                   "deadline": ts(deadline) if deadline else None, "audit_sample": audit_sample},
        "explanation": "score = 0.6*certificate_risk + 0.3*upstream_risk + 0.1*context_risk; rule fired",
        "scope": cert.scope,
        "input": inp,
        "prediction": int(y[digit_index]),
        "upstream_risk": 0.35,
        "source": {"topic": "inferences", "partition": 0, "offset": digit_index},
        "worker": "w-0",
    }


def seed_ledger(path, now: datetime | None = None) -> dict[str, dict]:
    """A ledger with two routed items, one audit sample, one allowed decision and one
    already reviewed item; returns the records by id."""
    now = now or datetime.now(UTC)
    recs = {
        "evt-routine": decision_record("evt-routine", digit_index=1, priority=2, deadline=now + timedelta(hours=4)),
        "evt-urgent": decision_record("evt-urgent", digit_index=0, priority=1, deadline=now + timedelta(hours=1)),
        "evt-audit": decision_record("evt-audit", digit_index=2, decision="allow", routed=False, audit_sample=True,
                                     priority=3, deadline=now + timedelta(hours=24), abstained=False),
        "evt-allowed": decision_record("evt-allowed", digit_index=3, decision="allow", routed=False, abstained=False),
        "evt-done": decision_record("evt-done", digit_index=4, priority=1, deadline=now + timedelta(hours=1)),
    }
    with Ledger(path) as led:
        for r in recs.values():
            assert led.append(r, kind="decision")
        rq.record_verdict(led, "evt-done", "confirmed_clean", "looked fine", "carol", now)
    return recs


def test_queue_holds_routed_and_audit_items_in_priority_then_deadline_order(tmp_path):
    now = datetime.now(UTC)
    seed_ledger(tmp_path / "l.db", now)
    with Ledger(tmp_path / "l.db") as led:
        led.append(decision_record("evt-urgent-later", priority=1, deadline=now + timedelta(hours=3)))
        led.append(decision_record("evt-no-priority", priority=None, deadline=None))
        ids = [it.id for it in rq.pending(led)]
    assert ids == ["evt-urgent", "evt-urgent-later", "evt-routine", "evt-audit", "evt-no-priority"]


def _reference_queue(led) -> list[str]:
    """The queue by its definition, from the records themselves (every record parsed)."""
    reviewed = {e.entry_id for e in led.records(kind="verdict")}
    items = []
    for e in led.records(kind="decision"):
        if e.entry_id in reviewed or not rq.needs_review(e.record):
            continue
        try:
            rq.check_decision_record(e.record)
        except rq.ReviewError:
            continue
        items.append(rq.QueueItem(e.record, e.seq))
    return [it.id for it in sorted(items, key=rq.QueueItem.sort_key)]


def test_queue_from_the_facts_table_agrees_with_the_records(tmp_path):
    now = datetime.now(UTC)
    seed_ledger(tmp_path / "l.db", now)
    with Ledger(tmp_path / "l.db") as led:
        led.append(decision_record("evt-audit-2", decision="allow", routed=False, audit_sample=True))
        bad = decision_record("evt-bad-priority")
        bad["review"]["priority"] = "high"  # the console cannot sort it: it was left out of queue and backlog
        with pytest.raises(LedgerError, match=r"record\[0\]\.review\.priority: must be an integer or null"):
            led.append(bad)  # so the ledger refuses it (the stage never writes one; ingest and the API could)
        huge = decision_record("evt-huge-priority", priority=2**70)  # beyond 64 bits: still sorted, last of the ints
        led.append(huge)
        for i in range(30):
            led.append(decision_record(f"evt-{i:02d}", priority=[1, 2, None][i % 3],
                                       deadline=None if i % 4 == 0 else now + timedelta(minutes=i * 7 % 50)))
        rq.record_verdict(led, "evt-07", "unsure", "", "dave", now)
        want = _reference_queue(led)
        assert [it.id for it in rq.pending(led)] == want and len(want) == 34
        assert rq.backlog(led) == len(want)
        pages, after = [], None
        while True:  # keyset pages: each starts after the last item of the one before
            page = rq.pending(led, after=after, limit=7)
            if not page:
                break
            pages.append(page)
            after = page[-1].cursor
        assert [it.id for page in pages for it in page] == want and [len(p) for p in pages] == [7] * 4 + [6]
        with pytest.raises(rq.ReviewError, match="after: not a queue position"):
            rq.pending(led, after="1:x", limit=7)


class _Gauges:
    """The three metrics the console's backlog refresh sets (riskpipe.metrics.ReviewMetrics)."""

    def __init__(self) -> None:
        self.backlog, self.age, self.breaches = None, None, 0

    def set_review_backlog(self, n: int) -> None:
        self.backlog = n

    def set_review_backlog_age(self, seconds: float) -> None:
        self.age = seconds

    def review_deadline_breach(self) -> None:
        self.breaches += 1


def test_backlog_gauges_and_each_deadline_breach_once(tmp_path, monkeypatch):
    """The refresh after each verdict reads only deadlines passed since the previous one
    and records appended since (one arriving overdue included), and notes every waiting
    item past its deadline exactly once; the backlog and its age match the records."""
    from riskpipe.review import context
    from riskpipe.review.app import ConsoleState
    from riskpipe.review.settings import Credentials, ReviewSettings

    now = datetime.now(UTC)
    seed_ledger(tmp_path / "l.db", now)
    state = ConsoleState(ReviewSettings(ledger=str(tmp_path / "l.db"), credentials=Credentials(shared="x" * 16)),
                         metrics=_Gauges())
    with Ledger(tmp_path / "l.db") as led:
        for i in range(6):  # deadlines 10 minutes apart, the first three already passed
            led.append(decision_record(f"evt-late-{i}", priority=2, deadline=now + timedelta(minutes=10 * i - 25),
                                       when=now - timedelta(hours=i)))
        clock = [now]
        monkeypatch.setattr(context, "utc_now", lambda: clock[0])
        scans = []
        real = rq.overdue

        def overdue(*args, **kwargs):
            found, mark = real(*args, **kwargs)
            scans.append(found)
            return found, mark

        monkeypatch.setattr(rq, "overdue", overdue)
        state.note_queue(led)
        assert sorted(scans[-1]) == ["evt-late-0", "evt-late-1", "evt-late-2"] and state.metrics.breaches == 3
        assert state.metrics.backlog == rq.backlog(led) == len(_reference_queue(led)) == 9
        assert state.metrics.age == (now - min(T0, now - timedelta(hours=5))).total_seconds()
        assert rq.oldest_waiting(led) == min(T0, now - timedelta(hours=5))
        clock[0] = now + timedelta(minutes=12)  # evt-late-3 passes its deadline; a record arrives overdue
        led.append(decision_record("evt-arrived-late", priority=2, deadline=now - timedelta(days=2)))
        state.note_queue(led)
        assert sorted(scans[-1]) == ["evt-arrived-late", "evt-late-3"] and state.metrics.breaches == 5
        rq.record_verdict(led, "evt-late-4", "unsure", "", "erin", now)
        # evt-late-4 has a verdict: not a breach; evt-late-5 and two seeded ones are
        clock[0] = now + timedelta(hours=5)
        state.note_queue(led)
        assert sorted(scans[-1]) == ["evt-late-5", "evt-routine", "evt-urgent"] and state.metrics.breaches == 8
        state.note_queue(led)
        assert scans[-1] == [] and state.metrics.breaches == 8
        full, _ = real(led, clock[0])
        assert len(full) == len(set(full)) == 8  # what a scan from scratch finds: each of them, noted once


def test_queue_filters_by_model_policy_and_reason(tmp_path):
    seed_ledger(tmp_path / "l.db")
    with Ledger(tmp_path / "l.db") as led:
        other = decision_record("evt-other-model")
        other["model"] = {"name": "cifar_cnn", "sha256": "ef" * 32}
        other["policy"] = {"name": "strict", "version": "1", "sha256": "01" * 32}
        other["reasons"] = ["out_of_support", "no_certificate"]
        led.append(other)
        assert [i.id for i in rq.pending(led, where=rq.QueueFilter(model="cifar_cnn"))] == ["evt-other-model"]
        assert [i.id for i in rq.pending(led, where=rq.QueueFilter(policy="default"))] == [
            "evt-urgent", "evt-routine", "evt-audit"]
        assert [i.id for i in rq.pending(led, where=rq.QueueFilter(reason="no_certificate"))] == ["evt-other-model"]
        assert [i.id for i in rq.pending(led, where=rq.QueueFilter(reason="certificate_abstained"))] == [
            "evt-urgent", "evt-routine"]
        # a wildcard is a character, not a pattern
        assert rq.pending(led, where=rq.QueueFilter(reason="no%certificate")) == []
        assert rq.pending(led, where=rq.QueueFilter(reason="no_certificat")) == []  # whole codes only
        assert rq.backlog(led, where=rq.QueueFilter(model="digits", reason="certificate_abstained")) == 2


def test_verdict_record_follows_docs_and_a_second_one_is_refused(tmp_path):
    recs = seed_ledger(tmp_path / "l.db")
    when = T0 + timedelta(minutes=30)
    with Ledger(tmp_path / "l.db") as led:
        v = rq.record_verdict(led, "evt-urgent", "confirmed_manipulated", "  stroke added  ", "alice", when)
        assert v == {"id": "evt-urgent", "verdict": "confirmed_manipulated", "note": "stroke added",
                     "reviewer": "alice", "ts": "2025-03-01T12:30:00.000Z", "decision_ts": recs["evt-urgent"]["ts"],
                     "decision": "review", "policy_version": "3",
                     # the decision it is on (its ledger scope): a verdict on one stage's decision is not another's
                     "model": {k: recs["evt-urgent"]["model"][k] for k in ("name", "sha256")},
                     "policy": {k: recs["evt-urgent"]["policy"][k] for k in ("name", "version", "sha256")}}
        assert led.get("evt-urgent", kind="verdict") == v
        assert rq.seconds_to_review(v) == 1800.0
        with pytest.raises(rq.AlreadyReviewed, match=r"evt-urgent: a verdict already exists .*alice"):
            rq.record_verdict(led, "evt-urgent", "unsure", "", "bob", when)
        assert led.count("verdict") == 2
        assert led.verify().ok


@pytest.mark.parametrize("args, message", [
    (("evt-urgent", "maybe", "", "alice"), "verdict: must be one of confirmed_clean"),
    (("evt-urgent", "unsure", "x" * 2001, "alice"), "note: at most 2000 characters"),
    (("evt-missing", "unsure", "", "alice"), "evt-missing: no decision record"),
])
def test_bad_verdicts_are_refused_with_the_field_named(tmp_path, args, message):
    seed_ledger(tmp_path / "l.db")
    with Ledger(tmp_path / "l.db") as led:
        with pytest.raises(rq.ReviewError, match=message):
            rq.record_verdict(led, *args)
        assert led.count("verdict") == 1


def test_malformed_records_are_named_not_crashed_on():
    rec = decision_record("evt-x")
    rec["review"]["deadline"] = "next tuesday"
    with pytest.raises(rq.ReviewError, match=r"evt-x: review.deadline: not an RFC 3339 time"):
        rq.check_decision_record(rec)
    with pytest.raises(rq.ReviewError, match="id: missing"):
        rq.check_decision_record({"review": {}})
    # what the queue groups and filters by: a list there killed the feed thread of a console
    # with --config (unhashable in the scope check), or made every queue page a 500
    for field, value, says in (("model", {"name": ["m"]}, "model: must be a name"), ("model", 7, "model: must be"),
                               ("policy", ["p"], "policy: must be an object"),
                               ("policy", {"name": "p", "version": "1", "sha256": 7},
                                "policy.sha256: must be a string"),
                               ("model", {"name": "m", "sha256": ["ab"]}, "model.sha256: must be a string")):
        with pytest.raises(rq.ReviewError, match=says):
            rq.check_decision_record({**decision_record("evt-y"), field: value})
    # a queue position beyond 64 bits is a malformed position (it was a 500 and a traceback)
    for cursor in ("99999999999999999999:1:1", "1:1:99999999999999999999", "1:1:-1"):
        with pytest.raises(rq.ReviewError, match="after: not a queue position"):
            rq.parse_cursor(cursor)
    assert rq.parse_cursor("-5:1e300:7") == (-5, 1e300, 7)


def test_a_filtered_page_reads_its_groups_index_ranges(tmp_path, monkeypatch):
    """A filter narrows the queue to a few facts groups; each group's page is read through
    the index that leads with the group and the queue flags (SQLite's planner otherwise
    takes the queue-order index and walks the whole queue for a rare group: 6 s at
    1,000,000 items)."""
    import sqlite3

    from riskpipe.ledger.store import Snapshot

    seed_ledger(tmp_path / "l.db")
    seen: list[tuple[str, tuple]] = []
    real = Snapshot.__call__

    def spy(self, sql, params=()):
        seen.append((sql, tuple(params)))
        return real(self, sql, params)

    monkeypatch.setattr(Snapshot, "__call__", spy)
    with Ledger(tmp_path / "l.db") as led:
        page = rq.pending(led, where=rq.QueueFilter(reason="certificate_abstained"), limit=1)
        after = rq.pending(led, where=rq.QueueFilter(reason="certificate_abstained"), after=page[0].cursor, limit=1)
    assert [i.id for i in page + after] == ["evt-urgent", "evt-routine"]
    per_group = [(sql, params) for sql, params in seen if "f.gid = ?" in sql]
    assert len(per_group) == 4  # two groups (priorities 1 and 2), two pages
    db = sqlite3.connect(tmp_path / "l.db")
    for sql, params in per_group:
        plan = " ".join(r[3] for r in db.execute("EXPLAIN QUERY PLAN " + sql, params))
        assert "USING INDEX facts_queue_group (gid=?" in plan, plan

"""A verdict is on one decision, not on an event id. Two stages (here: one model under two
policies, as in a staged policy roll-out) sharing a ledger may both decide the same event
and both route it to review. Before, verdicts were keyed by the event id alone: a
verdict given in stage B's console took stage A's item out of A's queue, so A's routed
decision counted as reviewed though nobody had looked at it (fails open), and A's console
showed A's item as "not a record of this stage" because B's decision was the later one.

Now the verdict names its decision's model and policy and takes that decision's ledger
scope (riskpipe.ledger.chain.decision_scope): each decision waits for its own verdict,
the console resolves an id to its own stage's decision, a verdict given without a stage
on an event several stages decided is refused, and the report counts each verdict under
the policy whose decision it is on. A verdict written before (no model named) still
covers every decision of its id."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from riskpipe.ledger import Ledger
from riskpipe.review import queue as rq
from riskpipe.review.scope import PolicyId, StageScope
from test_review_records import decision_record
from test_review_scope import DEFAULT, STRICT, _policy_of

WHEN = datetime(2025, 3, 1, 12, 30, tzinfo=UTC)


def _decided_by_both(path) -> tuple[dict, dict, StageScope, StageScope]:
    """Event ``evt-shared`` decided under the default policy (stage A) and the strict one
    (stage B), both routed; ``evt-a-only`` decided by A alone."""
    pa, pb = _policy_of(DEFAULT), _policy_of(STRICT)
    a, b = decision_record("evt-shared", priority=1), decision_record("evt-shared", priority=1)
    a["policy"], b["policy"] = pa, pb
    only = decision_record("evt-a-only", priority=2)
    only["policy"] = pa
    with Ledger(path) as led:
        for rec in (a, b, only):
            assert led.append(rec, kind="decision")
    scope = {p["sha256"]: StageScope({"digits": PolicyId(p["name"], p["version"], p["sha256"])}) for p in (pa, pb)}
    return a, b, scope[pa["sha256"]], scope[pb["sha256"]]


def _waiting(led, scope) -> list[tuple[str, str]]:
    return [(i.record["id"], i.record["policy"]["name"]) for i in rq.pending(led, scope)]


def test_a_verdict_on_one_stages_decision_leaves_the_others_waiting(tmp_path):
    a, b, scope_a, scope_b = _decided_by_both(tmp_path / "l.db")
    with Ledger(tmp_path / "l.db") as led:
        assert _waiting(led, scope_a) == [("evt-shared", a["policy"]["name"]), ("evt-a-only", a["policy"]["name"])]
        assert _waiting(led, scope_b) == [("evt-shared", b["policy"]["name"])]
        assert rq.backlog(led) == 3
        v = rq.record_verdict(led, "evt-shared", "confirmed_clean", "", "bob", WHEN, scope=scope_b)
        assert v["policy"] == {k: b["policy"][k] for k in ("name", "version", "sha256")}
        assert _waiting(led, scope_b) == []
        # A's decision of the same event still waits for A's reviewer
        assert _waiting(led, scope_a) == [("evt-shared", a["policy"]["name"]), ("evt-a-only", a["policy"]["name"])]
        assert (rq.backlog(led, scope_a), rq.backlog(led, scope_b), rq.backlog(led)) == (2, 0, 2)
        assert rq.review_of(led, a) is None and rq.review_of(led, b) == v
        # B's decision takes no second verdict; A's takes its own
        with pytest.raises(rq.AlreadyReviewed, match=r"evt-shared: a verdict already exists .*bob"):
            rq.record_verdict(led, "evt-shared", "unsure", "", "carol", WHEN, scope=scope_b)
        w = rq.record_verdict(led, "evt-shared", "confirmed_manipulated", "", "alice", WHEN, scope=scope_a)
        assert rq.review_of(led, a) == w and _waiting(led, scope_a) == [("evt-a-only", a["policy"]["name"])]
        assert [r["reviewer"] for r in led.get_all("evt-shared", kind="verdict")] == ["bob", "alice"]
        assert led.verify().ok


def test_without_a_stage_a_verdict_on_an_event_several_stages_decided_is_refused(tmp_path):
    _decided_by_both(tmp_path / "l.db")
    with Ledger(tmp_path / "l.db") as led:
        with pytest.raises(rq.ReviewError, match=r"evt-shared: decided by 2 stages .*review it in the console of its "
                                                 r"stage"):
            rq.record_review(led, "evt-shared", "confirmed_clean", "", "bob", when=WHEN)
        assert led.count("verdict") == led.count("first_review") == 0
        # an event one stage decided needs no stage named
        assert rq.record_verdict(led, "evt-a-only", "unsure", "", "bob", WHEN)["id"] == "evt-a-only"


def test_the_first_of_two_reviews_is_per_decision_too(tmp_path):
    a, b, scope_a, scope_b = _decided_by_both(tmp_path / "l.db")
    with Ledger(tmp_path / "l.db") as led:
        # a sampled double review: B's first review must not make A's item a "second review"
        first, kind = rq.record_review(led, "evt-shared", "unsure", "", "bob", double_review_fraction=1.0,
                                       when=WHEN, scope=scope_b)
        assert kind == rq.FIRST_REVIEW and rq.review_of(led, b, rq.FIRST_REVIEW) == first
        assert rq.review_of(led, a, rq.FIRST_REVIEW) is None
        again, kind = rq.record_review(led, "evt-shared", "unsure", "", "bob", double_review_fraction=1.0,
                                       when=WHEN, scope=scope_a)
        assert kind == rq.FIRST_REVIEW and again["policy"]["sha256"] == a["policy"]["sha256"]
        done, kind = rq.record_review(led, "evt-shared", "unsure", "", "carol", double_review_fraction=1.0,
                                      when=WHEN, scope=scope_b)
        assert kind == rq.VERDICT and done["first_reviewer"] == "bob" and _waiting(led, scope_b) == []
        assert [i.record["id"] for i in rq.pending(led, scope_a)] == ["evt-shared", "evt-a-only"]


def test_a_verdict_written_before_verdicts_named_their_decision_covers_every_decision_of_its_id(tmp_path):
    a, b, scope_a, scope_b = _decided_by_both(tmp_path / "l.db")
    legacy = {"id": "evt-shared", "verdict": "unsure", "note": "", "reviewer": "old", "ts": "2025-03-01T12:00:00.000Z",
              "decision_ts": a["ts"], "decision": "review", "policy_version": a["policy"]["version"]}
    with Ledger(tmp_path / "l.db") as led:
        assert led.append(legacy, kind="verdict", entry_id="evt-shared")
        assert _waiting(led, scope_a) == [("evt-a-only", a["policy"]["name"])] and _waiting(led, scope_b) == []
        assert rq.backlog(led) == 1
        assert rq.review_of(led, a) == legacy == rq.review_of(led, b)
        with pytest.raises(rq.AlreadyReviewed):
            rq.record_verdict(led, "evt-shared", "confirmed_clean", "", "bob", WHEN, scope=scope_b)
        assert led.count("verdict") == 1


def test_the_report_counts_each_verdict_under_the_policy_of_its_decision(tmp_path):
    from riskpipe.report.data import gather

    a, b, scope_a, _ = _decided_by_both(tmp_path / "l.db")
    with Ledger(tmp_path / "l.db") as led:  # on A's decision, the earlier of the two
        rq.record_verdict(led, "evt-shared", "confirmed_manipulated", "", "bob", WHEN, scope=scope_a)
    data = gather(str(tmp_path / "l.db"), verify=False)
    by_policy = {row["name"]: row["verdicts"] for row in data["breakdown"]["policies"]}
    of_a, of_b = (next(n for n in by_policy if p["name"] in n and p["sha256"][:12] in n)
                  for p in (a["policy"], b["policy"]))
    assert by_policy[of_a]["confirmed_manipulated"] == 1
    assert sum(by_policy[of_b].values()) == 0
    assert data["review"]["verdicts_total"] == 1


def test_each_console_shows_and_takes_the_verdict_on_its_own_stages_decision(tmp_path):
    from riskpipe.review.app import create_app
    from riskpipe.review.settings import Credentials, ReviewSettings
    from test_review_security import PASSWORD, csrf_token, log_in

    a, b, scope_a, scope_b = _decided_by_both(tmp_path / "l.db")

    def console(scope):
        app = create_app(ReviewSettings(ledger=str(tmp_path / "l.db"), credentials=Credentials(shared=PASSWORD),
                                        scope=scope), metrics=None)
        client = app.test_client()
        assert log_in(client).status_code == 302
        return client

    in_a, in_b, unscoped = console(scope_a), console(scope_b), console(None)
    page = in_a.get("/item/evt-shared")  # B's decision is the later one; A's console shows A's
    assert page.status_code == 200 and a["policy"]["sha256"][:12] in page.get_data(as_text=True)
    assert unscoped.get("/item/evt-shared").status_code == 409  # which stage's? it does not guess
    token = csrf_token(in_b.get("/item/evt-shared").get_data(as_text=True))
    assert in_b.post("/verdict/evt-shared", data={"csrf_token": token, "verdict": "confirmed_clean"}).status_code == 302
    with Ledger(tmp_path / "l.db") as led:
        assert rq.review_of(led, b)["reviewer"] == "alice" and rq.review_of(led, a) is None
        assert [i.record["id"] for i in rq.pending(led, scope_a)] == ["evt-shared", "evt-a-only"]
    assert "evt-shared" in in_a.get("/").get_data(as_text=True)
    token = csrf_token(in_a.get("/item/evt-shared").get_data(as_text=True))
    assert in_a.post("/verdict/evt-shared", data={"csrf_token": token, "verdict": "unsure"}).status_code == 302
    with Ledger(tmp_path / "l.db") as led:
        assert rq.review_of(led, a)["verdict"] == "unsure" and led.count("verdict") == 2


def test_decisions_far_apart_in_time_still_get_their_own_verdicts(tmp_path):
    """The waiting check reads the decision's scope from its own row, whatever lies between."""
    pa = _policy_of(DEFAULT)
    with Ledger(tmp_path / "l.db") as led:
        for i in range(30):
            rec = decision_record(f"evt-{i:02d}", priority=2, when=WHEN + timedelta(minutes=i))
            rec["policy"] = pa
            led.append(rec, kind="decision")
        scope = StageScope({"digits": PolicyId(pa["name"], pa["version"], pa["sha256"])})
        for i in range(0, 30, 3):
            rq.record_verdict(led, f"evt-{i:02d}", "unsure", "", "bob", WHEN, scope=scope)
        assert rq.backlog(led, scope) == 20 == len(rq.pending(led, scope))
        assert all(int(i.record["id"][-2:]) % 3 for i in rq.pending(led, scope))


def test_a_verdict_is_for_the_decision_the_page_showed_even_if_the_event_was_decided_again(tmp_path):
    """The stage re-decided evt-x with a retrained model (same name and policy: another
    decision) while the reviewer had the block open; the verdict landed on the new decision,
    unseen, and the block stayed in the queue for good (its link opened the new one, which
    had a verdict). Links and forms now carry the decision's ledger position (?seq=)."""
    import re

    from riskpipe.review.app import create_app
    from riskpipe.review.scope import PolicyId, StageScope
    from riskpipe.review.settings import Credentials, ReviewSettings
    from test_review_security import PASSWORD, csrf_token, log_in

    path = str(tmp_path / "l.sqlite")
    old = decision_record("evt-x", decision="block", priority=1)
    old["reasons"] = ["OLD_DECISION_REASON"]
    new = decision_record("evt-x", decision="block", priority=1)
    new["model"] = {**new["model"], "sha256": "ef" * 32}
    new["reasons"] = ["NEW_DECISION_REASON"]
    with Ledger(path) as led:
        led.append(old)
    p = old["policy"]
    scope = StageScope({"digits": PolicyId(p["name"], str(p["version"]), p["sha256"])})
    for settings in (ReviewSettings(ledger=path, credentials=Credentials(shared=PASSWORD), scope=scope),
                     ReviewSettings(ledger=path, credentials=Credentials(shared=PASSWORD))):  # without --config too
        if settings.scope is None:  # a fresh ledger for the console that names no stage
            path = str(tmp_path / "unscoped.sqlite")
            with Ledger(path) as led:
                led.append(old)
            settings = ReviewSettings(ledger=path, credentials=Credentials(shared=PASSWORD))
        client = create_app(settings, metrics=None).test_client()
        log_in(client, "alice")
        queue = client.get("/").get_data(as_text=True)
        (link,) = re.findall(r'href="(/item\?id=evt-x&amp;seq=\d+)"', queue)
        page = client.get(link.replace("&amp;", "&")).get_data(as_text=True)
        assert "OLD_DECISION_REASON" in page
        action = re.search(r'<form method="post" action="([^"]+)" id="verdict-form"', page).group(1)
        with Ledger(path) as led:
            led.append(new)  # the stage decides the event again
        r = client.post(action.replace("&amp;", "&"),
                        data={"csrf_token": csrf_token(page), "verdict": "confirmed_manipulated", "note": ""})
        assert r.status_code == 302, r.get_data(as_text=True)
        with Ledger(path) as led:
            (v,) = led.get_all("evt-x", kind="verdict")
            assert v["model"]["sha256"] == old["model"]["sha256"]  # the decision shown, not the new one
            waiting = rq.pending(led, settings.scope)
            assert [i.record["reasons"] for i in waiting] == [["NEW_DECISION_REASON"]]
        # the new decision has a page and a link of its own, and takes its own verdict
        queue = client.get("/").get_data(as_text=True)
        (link,) = re.findall(r'href="(/item\?id=evt-x&amp;seq=\d+)"', queue)
        page = client.get(link.replace("&amp;", "&")).get_data(as_text=True)
        assert "NEW_DECISION_REASON" in page
        action = re.search(r'<form method="post" action="([^"]+)" id="verdict-form"', page).group(1)
        r = client.post(action.replace("&amp;", "&"), data={"csrf_token": csrf_token(page), "verdict": "unsure"})
        assert r.status_code == 302
        with Ledger(path) as led:
            assert len(led.get_all("evt-x", kind="verdict")) == 2 and rq.backlog(led, settings.scope) == 0
    assert client.get("/item?id=evt-x&seq=999").status_code == 404  # no decision of the event there
    assert client.get("/item?id=evt-x&seq=1x").status_code == 400


@pytest.mark.parametrize("edit", [
    "UPDATE entries SET scope = '' WHERE kind = 'verdict'",  # the verdict now covers every decision of its id
    "UPDATE entries SET scope = 'x' WHERE kind = 'decision' AND seq = 1",  # a decision no verdict ever covers
])
def test_an_edited_scope_column_is_caught_by_verify(tmp_path, edit):
    """``scope`` is an index column outside the hash, and the queue, the backlog and the
    report join verdicts to decisions on it. Set to '' on one stage's verdict, it took the
    other stage's routed decision off the queue (backlog 1 -> 0) while ``ledger verify``
    and the report said intact. Verify now checks every row's scope against its record."""
    from ledger_records import as_superuser

    path = str(tmp_path / "l.db")
    _a, _b, _scope_a, scope_b = _decided_by_both(path)
    with Ledger(path) as led:
        rq.record_verdict(led, "evt-shared", "confirmed_clean", "", "bob", WHEN, scope=scope_b)
        assert led.verify().ok
    as_superuser(path, [edit])
    with Ledger(path) as led:
        res = led.verify()
    assert not res.ok and "scope column" in res.reason and "verdict covers" in res.reason, res

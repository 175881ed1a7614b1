"""Statistics that do not flatter, on a ledger built through the stage and the review
console: two users' models (a tabular skops model, and a TorchScript model whose output
breaks its contract on some inputs) under two policies with different alphas, verdicts by
two reviewers (overrides among them) through the console. The report's certified fractions,
model-fault rates, p_A lower-bound quantiles and the bound on false certificates (sum of
alpha over certified decisions, per model and period) equal the figures computed here
independently from the ledger rows."""

from __future__ import annotations

import json
import re
from collections import defaultdict

import numpy as np
import pytest

from browserkit import chromium, natural_size, needs_chromium, screenshot
from riskpipe.ledger import Ledger
from riskpipe.report import write_report
from streamkit import policy_with
from usermodels import fault_inputs, faulty_model, tabular_model

CONTEXT_OFF = {"certificate_risk": {"function": "exponential", "half_life": 1.0},
               "upstream_risk": {"default": 0.5}, "context_risk": {"enabled": False}}
SCORE = {"combiner": "weighted_mean", "weights": {"certificate_risk": 0.5, "upstream_risk": 0.5, "context_risk": 0.0}}


def _smoothing(alpha: float) -> dict:
    return {"method": "smoothing", "mode": "decide", "sigma": 0.25, "alpha": alpha, "max_samples": 200}


@pytest.fixture(scope="module")
def stage_ledger(tmp_path_factory):
    from riskpipe.app.compose import build_pipeline
    from riskpipe.app.config import load_config
    from riskpipe.app.offline import run_offline
    from riskpipe.stream.events import make_event

    tmp = tmp_path_factory.mktemp("stats")
    wine = tabular_model(tmp)
    (tmp / "p1").mkdir()
    (tmp / "p2").mkdir()
    wine_policy = policy_with(tmp / "p1", certifier=_smoothing(0.01))
    fault_policy = policy_with(tmp / "p2", certifier=_smoothing(0.001), signals=CONTEXT_OFF, score=SCORE)
    healthy, faulty = fault_inputs(6, 4)
    X = np.load(wine.data)["X"][:10].astype(np.float32)
    runs = [
        (load_config(None, models={"wine": wine.spec}, references={"wine": str(wine.data)}, policy=wine_policy),
         [make_event(f"wine-{i}", "wine", x, upstream_risk=0.1 if i < 6 else 0.97) for i, x in enumerate(X)]),
        (load_config(None, models={"faulty": faulty_model(tmp, "nan")}, policy=fault_policy),
         [make_event(f"f-{i}", "faulty", x, upstream_risk=0.0) for i,
          x in enumerate(np.concatenate([healthy, faulty]))]),
    ]
    path = tmp / "ledger.db"
    with Ledger(str(path)) as led:
        for k, (config, events) in enumerate(runs):
            res = run_offline(events, tmp / f"out{k}", config, pipeline=build_pipeline(config), ledger=led)
            assert res.stats.decided == len(events)
        records = [e.record for e in led.records("decision")]
    _review_through_the_console(path, [r for r in records if r["review"]["routed"]])
    with Ledger(str(path)) as led:
        verdicts = [e.record for e in led.records("verdict")]
    report = json.loads(write_report(path, tmp / "r.json", "json", until=UNTIL).read_text())
    return path, records, report, verdicts


UNTIL = "2100-01-01T00:00:00Z"


def _review_through_the_console(path, routed: list[dict]) -> None:
    """alice and bob take verdicts in the real console app (login, CSRF, form post); the
    last two routed decisions stay in the backlog. Blocks are called clean (overrides)."""
    from werkzeug.security import generate_password_hash

    from riskpipe.review.app import create_app
    from riskpipe.review.settings import Credentials, ReviewSettings
    from test_review_security import csrf_token, log_in

    creds = Credentials(users={n: generate_password_hash(f"{n} passphrase") for n in ("alice", "bob")})
    app = create_app(ReviewSettings(ledger=str(path), credentials=creds), metrics=None)
    assert len(routed) >= 4
    for i, rec in enumerate(routed[:-2]):
        name = ("alice", "bob")[i % 2]
        with app.test_client() as client:
            assert log_in(client, name, f"{name} passphrase").status_code == 302
            token = csrf_token(client.get(f"/item/{rec['id']}").get_data(as_text=True))
            verdict = "confirmed_clean" if rec["decision"] == "block" or i % 3 == 0 else "confirmed_manipulated"
            r = client.post(f"/verdict/{rec['id']}", data={"csrf_token": token, "verdict": verdict})
            assert r.status_code == 302, r.get_data(as_text=True)[:500]


def _certified(r: dict) -> bool:
    c = r["certificate"]
    return not c["abstained"] and c.get("certified") is not False


def test_false_certificate_bound_is_the_sum_of_alpha_from_the_ledger_rows(stage_ledger):
    _, records, d, _ = stage_ledger
    fc = d["certificates"]["false_certificates"]
    by_model, by_period = defaultdict(float), defaultdict(float)
    for r in records:
        if _certified(r):
            a = r["certificate"].get("alpha") or 0.0
            by_model[r["model"]["name"]] += a
            by_period[(r["model"]["name"], r["ts"][:13] + ":00Z")] += a
    assert d["decisions"]["bucket"] == "hour"
    assert fc["bound"] == pytest.approx(sum(by_model.values()))
    assert fc["certified"] == sum(map(_certified, records)) and fc["without_alpha"] == 0
    assert {r["model_label"]: r["alpha_sum"] for r in fc["by_model"]} == pytest.approx(dict(by_model))
    assert {(r["model_label"],
             r["bucket"]): r["alpha_sum"] for r in fc["by_model_period"]} == pytest.approx(dict(by_period))
    # the two policies' alphas differ, so a bound that ignored them would not match
    assert {r["certificate"]["alpha"] for r in records} == {0.01, 0.001}
    assert "expected number of false certificates" in fc["meaning"] and "at most the sum" in fc["meaning"]


def test_certified_fraction_model_faults_and_p_lower_match_the_ledger(stage_ledger):
    _, records, d, _ = stage_ledger
    c = d["certificates"]
    rows = {r["model_label"]: r for r in c["by_model"]}
    assert set(rows) == {"wine", "faulty"}
    for name, row in rows.items():
        mine = [r for r in records if r["model"]["name"] == name]
        assert row["decisions"] == len(mine)
        assert row["certified"] == sum(map(_certified, mine))
        assert row["certified_rate"] == pytest.approx(row["certified"] / len(mine))
        assert row["abstained"] == sum(r["certificate"]["abstained"] for r in mine)
        assert row["model_faults"] == sum("model_fault" in r["reasons"] for r in mine)
    assert rows["faulty"]["model_faults"] == 4 and rows["faulty"]["model_fault_rate"] == pytest.approx(0.4)
    assert rows["wine"]["model_faults"] == 0
    assert len(c["by_policy"]) == 2 and sum(r["decisions"] for r in c["by_model_policy"]) == len(records)
    for g in c["p_lower"]:
        vals = sorted(r["certificate"]["p_lower"] for r in records
                      if r["model"]["name"] == g["model"] and r["certificate"].get("p_lower") is not None)
        assert g["quantiles"]["n"] == len(vals) > 0
        assert (g["quantiles"]["min"], g["quantiles"]["max"]) == (vals[0], vals[-1])
        assert sum(g["histogram"]["counts"]) == len(vals)
    # the mean certified radius is not reported anywhere
    assert all("mean" not in g["quantiles"] for g in d["radius"]["groups"])


def test_html_and_markdown_state_the_bound_and_what_it_means(stage_ledger, tmp_path):
    path, _, d, _ = stage_ledger
    html = write_report(path, tmp_path / "r.html", "html").read_text()
    assert '<section id="certificates">' in html and 'id="false-certificates"' in html
    bound = d["certificates"]["false_certificates"]["bound"]
    assert bound > 0 and re.search(r"At most ([0-9.]+) false certificates expected", html).group(1) == f"{bound:.4g}"
    assert "expected number of false certificates" in html and "Sun, Mao" in html
    assert html.count("histogram of the lower bound on p_A") == len(d["certificates"]["p_lower"])
    md = write_report(path, tmp_path / "r.md", "md").read_text()
    assert "Bound on false certificates" in md and "| faulty |" in md
    assert f"{d['review']['backlog']['waiting']} routed without a verdict" in md



def _p(values: list[float], q: float) -> float:
    v = sorted(values)
    return v[min(len(v) - 1, int(round(q * (len(v) - 1))))]


def test_oversight_figures_per_reason_and_backlog_match_the_ledger(stage_ledger):
    from riskpipe.ledger import parse_ts

    _, records, d, verdicts = stage_ledger
    rev = d["review"]
    by_id = {r["id"]: r for r in records}
    assert {v["reviewer"] for v in verdicts} == {"alice", "bob"}
    minutes, overrides, eligible = defaultdict(list), defaultdict(int), defaultdict(int)
    for v in verdicts:
        dec = by_id[v["id"]]
        for reason in dec["reasons"] or ["(no reason)"]:
            minutes[reason].append((parse_ts(v["ts"]) - parse_ts(dec["ts"])).total_seconds() / 60)
            eligible[reason] += dec["decision"] in ("allow", "block")
            overrides[reason] += (dec["decision"], v["verdict"]) in {("allow", "confirmed_manipulated"),
                                                                      ("block", "confirmed_clean")}
    rows = {r["reason"]: r for r in rev["by_reason"]}
    assert set(rows) == set(minutes) and "model_fault" in rows
    for reason, row in rows.items():
        assert row["verdicts"] == len(minutes[reason])
        assert row["minutes_to_verdict"]["p50"] == pytest.approx(_p(minutes[reason], 0.5))
        assert row["minutes_to_verdict"]["p95"] == pytest.approx(_p(minutes[reason], 0.95))
        assert (row["overrides"], row["override_eligible"]) == (overrides[reason], eligible[reason])
    assert sum(overrides.values()) > 0
    waiting = [r for r in records if r["review"]["routed"] and r["id"] not in {v["id"] for v in verdicts}]
    assert rev["backlog"]["waiting"] == len(waiting) == rev["pending"] == 2
    until = parse_ts(UNTIL)
    ages = [(until - parse_ts(r["ts"])).total_seconds() / 3600 for r in waiting]
    assert rev["backlog"]["age_hours"]["max"] == pytest.approx(max(ages))
    assert rev["backlog"]["age_hours"]["p50"] == pytest.approx(_p(ages, 0.5))


@needs_chromium
def test_sections_as_chromium_paints_them(stage_ledger, tmp_path):
    """Looked at as a person would: each new section is displayed, painted (its screenshot
    is not blank) and its rendered text carries the figures; the p_A histograms decode."""
    from selenium.webdriver.common.by import By

    from riskpipe.policy.controls import mapping

    path, _, d, _ = stage_ledger
    out = write_report(path, tmp_path / "r.html", "html", until=UNTIL)
    fc = d["certificates"]["false_certificates"]
    want = {
        "certified-by-model": ["wine", "faulty", "40.0%"],
        "false-certificates": [f"At most {fc['bound']:.4g} false certificates expected", "sum of their alphas"],
        "false-certificates-by-period": ["wine", "faulty"],
        "oversight-by-reason": ["model_fault", "p95"],
        "backlog": [f"{d['review']['backlog']['waiting']} routed decisions without a verdict"],
        "controls": ["EU AI Act", "Art. 15(3)", "A.6.2.8", "AML.T0015", "ML01:2023", "NIST AI 800-4"],
    }
    driver = chromium(tmp_path / "chromium", 1280, 1000)
    try:
        driver.get(out.as_uri())
        for element_id, texts in want.items():
            el = driver.find_element(By.ID, element_id)
            driver.execute_script("arguments[0].scrollIntoView();", el)
            assert el.is_displayed() and el.size["width"] > 200 and el.size["height"] > 10, element_id
            assert screenshot(el).std() > 5, f"{element_id}: painted blank"
            text = el.text
            for t in texts:
                assert t in text, (element_id, t)
        rows = driver.find_elements(By.CSS_SELECTOR, "#controls table tr")
        assert len(rows) >= len(mapping()) + 1
        imgs = driver.find_elements(By.CSS_SELECTOR, "#certificates img")
        assert len(imgs) == len(d["certificates"]["p_lower"]) > 0
        for img in imgs:
            driver.execute_script("arguments[0].scrollIntoView();", img)
            assert natural_size(driver, img)[0] > 100 and screenshot(img).std() > 10
    finally:
        driver.quit()


def test_the_backlog_counts_each_stages_waiting_decision_of_one_event(tmp_path):
    """Two stages (policies) routed one event; a verdict on stage A's decision left B's
    waiting, but the report joined verdicts to decisions on the id alone: its backlog said 0
    (B's gone from the evidence), and once both had a verdict ``riskpipe report`` ended in a
    traceback. It now counts what the console's queue counts (queue.VERDICT_COVERS)."""
    from riskpipe.ledger import Ledger
    from riskpipe.report.data import gather
    from riskpipe.review import queue as rq
    from riskpipe.review.scope import PolicyId, StageScope
    from test_review_records import decision_record

    path = str(tmp_path / "l.sqlite")
    a = decision_record("evt-1", decision="block", priority=1)
    b = decision_record("evt-1", decision="block", priority=1)
    b["policy"] = {"name": "strict", "version": "1", "sha256": "01" * 32, "shadow": False}
    stage = {p["name"]: StageScope({"digits": PolicyId(p["name"], str(p["version"]), p["sha256"])})
             for p in (a["policy"], b["policy"])}
    with Ledger(path) as led:
        led.append(a)
        led.append(b)
        rq.record_verdict(led, "evt-1", "unsure", "", "alice", scope=stage[a["policy"]["name"]])
        assert rq.backlog(led) == 1
    review = gather(path)["review"]
    assert review["backlog"]["waiting"] == 1 == review["pending"] and review["backlog"]["by_reason"]
    assert review["backlog"]["age_hours"]["n"] == 1
    with Ledger(path) as led:
        rq.record_verdict(led, "evt-1", "unsure", "", "bob", scope=stage["strict"])
        assert rq.backlog(led) == 0
    review = gather(path)["review"]
    assert review["backlog"]["waiting"] == 0 == review["pending"] and not review["backlog"]["by_reason"]

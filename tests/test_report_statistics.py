"""Statistics that do not flatter, on a ledger built through the stage: two users' models
(a tabular skops model, and a TorchScript model whose output breaks its contract on some
inputs) under two policies with different alphas. The report's certified fractions,
model-fault rates, p_A lower-bound quantiles and the bound on false certificates (sum of
alpha over certified decisions, per model and period) equal the figures computed here
independently from the ledger rows."""

from __future__ import annotations

import json
import re
from collections import defaultdict

import numpy as np
import pytest
from streamkit import policy_with
from usermodels import fault_inputs, faulty_model, tabular_model

from riskpipe.ledger import Ledger
from riskpipe.report import write_report

CONTEXT_OFF = {"certificate_risk": {"function": "exponential", "half_life": 1.0},
               "upstream_risk": {"default": 0.5}, "context_risk": {"enabled": False}}
SCORE = {"combiner": "weighted_mean", "weights": {"certificate_risk": 0.5, "upstream_risk": 0.5, "context_risk": 0.0}}


def _smoothing(alpha: float) -> dict:
    return {"method": "smoothing", "mode": "decide", "sigma": 0.25, "alpha": alpha, "max_samples": 200}


@pytest.fixture(scope="module")
def stage_ledger(tmp_path_factory):
    from riskpipe.compose import build_pipeline
    from riskpipe.stream.config import load_config
    from riskpipe.stream.events import make_event
    from riskpipe.stream.offline import run_offline

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
         [make_event(f"wine-{i}", "wine", x, upstream_risk=0.1) for i, x in enumerate(X)]),
        (load_config(None, models={"faulty": faulty_model(tmp, "nan")}, policy=fault_policy),
         [make_event(f"f-{i}", "faulty", x, upstream_risk=0.0) for i, x in enumerate(np.concatenate([healthy, faulty]))]),
    ]
    path = tmp / "ledger.db"
    with Ledger(str(path)) as led:
        for k, (config, events) in enumerate(runs):
            res = run_offline(events, tmp / f"out{k}", config, pipeline=build_pipeline(config), ledger=led)
            assert res.stats.decided == len(events)
        records = [e.record for e in led.records("decision")]
    report = json.loads(write_report(path, tmp / "r.json", "json").read_text())
    return path, records, report


def _certified(r: dict) -> bool:
    c = r["certificate"]
    return not c["abstained"] and c.get("certified") is not False


def test_false_certificate_bound_is_the_sum_of_alpha_from_the_ledger_rows(stage_ledger):
    _, records, d = stage_ledger
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
    assert {(r["model_label"], r["bucket"]): r["alpha_sum"] for r in fc["by_model_period"]} == pytest.approx(dict(by_period))
    # the two policies' alphas differ, so a bound that ignored them would not match
    assert {r["certificate"]["alpha"] for r in records} == {0.01, 0.001}
    assert "expected number of false certificates" in fc["meaning"] and "at most the sum" in fc["meaning"]


def test_certified_fraction_model_faults_and_p_lower_match_the_ledger(stage_ledger):
    _, records, d = stage_ledger
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
    path, _, d = stage_ledger
    html = write_report(path, tmp_path / "r.html", "html").read_text()
    assert '<section id="certificates">' in html and 'id="false-certificates"' in html
    bound = d["certificates"]["false_certificates"]["bound"]
    assert bound > 0 and re.search(r"At most ([0-9.]+) false certificates expected", html).group(1) == f"{bound:.4g}"
    assert "expected number of false certificates" in html and "Sun, Mao" in html
    assert html.count("histogram of the lower bound on p_A") == len(d["certificates"]["p_lower"])
    md = write_report(path, tmp_path / "r.md", "md").read_text()
    assert "Bound on false certificates" in md and "| faulty |" in md


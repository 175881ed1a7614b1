"""A malformed upstream risk (given, but no number in [0, 1]) is a broken upstream signal:
the policy's default stands in for it and it is flagged (issue 3), and no shipped policy
allows it. It used to be allowed: the shipped policies read ``flagged`` only to keep a
defaulted value from the block rule, so ``2``, ``NaN`` or ``"0.99"`` meant "allow" where
``0.95`` meant "block". A missing value (no upstream detector at all) decides as before."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from riskpipe.app.config import load_config
from riskpipe.app.offline import run_offline
from riskpipe.certify import Certificate
from riskpipe.policy import load_policy, parse_policy
from riskpipe.policy.lint import lint
from streamkit import policy_with, tabular_event
from usermodels import tabular_model

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = sorted([*ROOT.glob("policies/*.yaml"), *ROOT.glob("examples/*/policy.yaml")])
MALFORMED = [1.0000001, 2, 1e300, -0.5, math.nan, math.inf, -math.inf, "0.99", "high", True, [0.99], {"v": 1}]
CHEAP = {"method": "smoothing", "mode": "decide", "sigma": 0.25, "alpha": 0.01, "max_samples": 200}


def cert(radius=0.9, abstained=False, epsilon=0.25):
    return Certificate(method="smoothing", norm="l2", radius=0.0 if abstained else radius, abstained=abstained,
                       predicted_class=None if abstained else 1, mode="decide", sigma=0.25, alpha=0.001,
                       epsilon=epsilon, certified=not abstained and radius >= epsilon, input_dim=64)


@settings(max_examples=100, deadline=None, derandomize=True)
@given(raw=st.sampled_from(MALFORMED) | st.floats(allow_nan=True).filter(lambda v: not 0.0 <= v <= 1.0),
       radius=st.floats(0.0, 10.0), abstained=st.booleans())
def test_no_shipped_policy_allows_a_malformed_upstream_risk(raw, radius, abstained):
    for path in SHIPPED:
        policy = load_policy(path)
        d = policy.evaluate(cert(radius, abstained, policy.threat_model.epsilon), upstream_risk=raw, event_id="u")
        assert d.signals["upstream_risk"]["malformed"] and d.signals["upstream_risk"]["flagged"]
        assert (d.would_be if policy.shadow else d.decision) != "allow", (path.name, raw, d.rule)


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_a_missing_upstream_risk_decides_as_before(path):
    """None is no upstream detector, not a broken one: a certified input is allowed."""
    policy = load_policy(path)
    d = policy.evaluate(cert(10.0, False, policy.threat_model.epsilon), upstream_risk=None, event_id="m")
    assert d.signals["upstream_risk"]["flagged"] and not d.signals["upstream_risk"]["malformed"]
    assert d.rule != "upstream-malformed"


def test_a_policy_that_would_allow_it_is_linted_naming_the_rule():
    text = (ROOT / "policies/default.yaml").read_text()
    start = text.index("  - id: upstream-malformed")
    end = text.index("  - id: upstream-very-high")
    old = parse_policy(text[:start] + text[end:], "old.yaml")
    warnings = [w for w in lint(old) if "malformed" in w.message]
    assert len(warnings) == 1 and "rule 'certified'" in warnings[0].message
    assert "signals.upstream_risk.malformed" in warnings[0].message
    assert old.evaluate(cert(), upstream_risk=2, event_id="x").decision == "allow"  # what the rule prevents
    assert not [w for w in lint(load_policy(ROOT / "policies/default.yaml")) if "malformed" in w.message]


def test_through_the_stage_a_users_model_reviews_every_malformed_upstream_risk(tmp_path):
    """The wine model under the shipped default policy: each malformed value is reviewed
    with the rule that says so, 0.95 is blocked, and a missing value decides as a low one."""
    from riskpipe.app.compose import build_pipeline

    um = tabular_model(tmp_path)
    policy = policy_with(tmp_path, "default", certifier=CHEAP)
    config = load_config(None, models={"wine": um.spec}, references={"wine": str(um.data)}, policy=policy)
    pipeline = build_pipeline(config)
    X = np.load(um.data)["X"]
    first = run_offline([tabular_event(f"r{i}", X[i], upstream_risk=0.1) for i in range(20)], tmp_path / "first",
                        load_config(None), pipeline=pipeline)
    x = X[next(int(r["id"][1:]) for r in first.read("audit") if r["decision"] == "allow")]  # a certified row
    values = {"m0": 2, "m1": "0.99", "m2": -0.5, "m3": True, "m4": [0.99], "m5": 1.0000001,
              "nan": math.nan, "inf": math.inf}  # the last two written as NaN / Infinity, as Python's json does
    events = [tabular_event(eid, x, upstream_risk=v) for eid, v in values.items()]
    events += [tabular_event("high", x, upstream_risk=0.95), tabular_event("low", x, upstream_risk=0.1),
               tabular_event("none", x, upstream_risk=None)]
    res = run_offline(events, tmp_path / "out", load_config(None), pipeline=pipeline)
    recs = {r["id"]: r for r in res.read("audit")}
    assert not res.read("dlq") and len(recs) == len(events)
    assert recs["low"]["decision"] == "allow"  # the same input with a well-formed low risk
    for eid in values:
        assert recs[eid]["decision"] == "review" and recs[eid]["rule"] == "upstream-malformed", recs[eid]["rule"]
        assert "upstream_risk_malformed" in recs[eid]["reasons"]
    assert recs["high"]["decision"] == "block"
    assert recs["none"]["decision"] == "allow"

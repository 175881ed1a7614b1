"""Prediction agreement: a certificate for another class than the event's prediction is no
certificate for the decision the pipeline acts on."""

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from riskpipe.certify import Certificate
from riskpipe.policy import PolicyError, load_policy, parse_policy

ROOT = Path(__file__).resolve().parents[1]
DEFAULT, STRICT = (load_policy(ROOT / f"policies/{n}.yaml") for n in ("default", "strict"))


def cert(cls=3, radius=0.6, abstained=False):
    return Certificate(method="smoothing", norm="l2", radius=0.0 if abstained else radius, abstained=abstained,
                       predicted_class=None if abstained else cls, mode="decide", sigma=0.25, alpha=0.001,
                       epsilon=0.5, certified=not abstained and radius >= 0.5, input_dim=64)


@pytest.mark.parametrize("policy", [DEFAULT, STRICT], ids=["default", "strict"])
def test_disagreement_goes_to_review_with_prediction_mismatch(policy):
    same = policy.evaluate(cert(3), upstream_risk=0.05, context=None, event_id="a", prediction=3)
    other = policy.evaluate(cert(3), upstream_risk=0.05, context=None, event_id="a", prediction=4)
    none = policy.evaluate(cert(3), upstream_risk=0.05, context=None, event_id="a")
    assert same.prediction_agrees is True and same.certified_in_threat
    assert none.prediction_agrees is None and none.certified_in_threat
    assert other.prediction_agrees is False and not other.certified_in_threat
    assert other.decision == "review" and other.rule == "prediction-mismatch"
    assert "prediction_mismatch" in other.reasons and other.review["routed"]
    assert other.to_dict()["prediction_agrees"] is False
    abstained = policy.evaluate(cert(abstained=True), upstream_risk=0.05, event_id="a", prediction=4)
    assert abstained.prediction_agrees is None  # no certified class to compare with


def _with_rules(rules: str, shadow: bool = False) -> str:
    text = (ROOT / "policies/default.yaml").read_text()
    start, end = text.index("rules:\n"), text.index("fallback:\n")
    text = text[:start] + "rules:\n" + rules + text[end:]
    return text.replace("shadow: false", f"shadow: {str(shadow).lower()}")


ALLOW_DISAGREEING = """  - id: trust-the-radius
    when:
      all:
        - {field: radius_over_epsilon, op: ge, value: 1.0}
    decision: allow
    reasons: [large_radius]
  - id: rest
    decision: review
    reasons: [other]
"""


def test_loader_rejects_a_policy_that_could_allow_a_disagreeing_event():
    """radius >= epsilon is not enough: the certified class may not be the prediction."""
    with pytest.raises(PolicyError, match=r"trust-the-radius.*could allow an uncertified sample"):
        parse_policy(_with_rules(ALLOW_DISAGREEING), "p.yaml")
    assert parse_policy(_with_rules(ALLOW_DISAGREEING, shadow=True), "p.yaml").shadow
    ok = ALLOW_DISAGREEING.replace("{field: radius_over_epsilon, op: ge, value: 1.0}",
                                   "{field: certified_in_threat, op: eq, value: true}")
    assert parse_policy(_with_rules(ok), "p.yaml").rules[0].id == "trust-the-radius"


def test_prediction_agrees_is_a_rule_field():
    rules = """  - id: mismatch
    when:
      all:
        - {field: prediction_agrees, op: eq, value: false}
    decision: block
    reasons: [prediction_mismatch]
  - id: certified
    when:
      all:
        - {field: certified_in_threat, op: eq, value: true}
    decision: allow
    reasons: [ok]
  - id: rest
    decision: review
    reasons: [other]
"""
    pol = parse_policy(_with_rules(rules), "p.yaml")
    d = pol.evaluate(cert(2), upstream_risk=0.05, event_id="x", prediction=0)
    assert (d.decision, d.rule) == ("block", "mismatch")
    with pytest.raises(PolicyError, match="prediction_agrees is true/false"):
        parse_policy(_with_rules(rules.replace("value: false}", "value: 0.5}", 1)), "p.yaml")


@settings(max_examples=200, deadline=None, derandomize=True)
@given(cls=st.integers(0, 9), pred=st.one_of(st.none(), st.integers(0, 9)), radius=st.floats(0.0, 2.0),
       abstained=st.booleans(), upstream=st.floats(0.0, 1.0))
def test_no_shipped_policy_allows_a_disagreeing_event(cls, pred, radius, abstained, upstream):
    for policy in (DEFAULT, STRICT):
        d = policy.evaluate(cert(cls, radius, abstained), upstream_risk=upstream, event_id="h", prediction=pred)
        if d.decision == "allow":
            assert d.prediction_agrees is not False and d.certified_in_threat
        assert "invariant_guard" not in d.reasons

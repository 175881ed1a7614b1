"""policy.evaluate: signals, score bounds and monotonicity, the never-allow-uncertified
invariant (hypothesis), upstream-risk fallbacks, review routing and audit sampling."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from riskpipe.certify import Certificate
from riskpipe.policy import PolicyError, load_policy, parse_policy
from riskpipe.policy.evaluate import audit_draw
from riskpipe.policy.fields import FIELDS
from riskpipe.policy.scoring import combine

ROOT = Path(__file__).resolve().parents[1]
POLICIES = {n: load_policy(ROOT / f"policies/{n}.yaml") for n in ("default", "strict", "shadow")}
DEFAULT_TEXT = (ROOT / "policies/default.yaml").read_text()
SETTINGS = settings(max_examples=150, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])


def cert(radius=0.3, abstained=False, mode="decide", certified=None, epsilon=0.25, norm="l2", input_dim=64):
    if abstained:
        radius = 0.0
    if mode == "decide" and certified is None:
        certified = (not abstained) and radius >= epsilon
    return Certificate(method="smoothing", norm=norm, radius=radius, abstained=abstained,
                       predicted_class=None if abstained else 3, mode=mode, sigma=0.25, alpha=0.001,
                       epsilon=epsilon if mode == "decide" else None, certified=certified if mode == "decide" else None,
                       input_dim=input_dim)


certificates = st.builds(
    cert,
    radius=st.floats(0.0, 3.0),
    abstained=st.booleans(),
    mode=st.sampled_from(["decide", "certify"]),
    certified=st.one_of(st.none(), st.booleans()),
    epsilon=st.sampled_from([0.1, 0.25, 0.35, 0.5]),
)
upstreams = st.one_of(st.none(), st.floats(allow_nan=True, allow_infinity=True), st.floats(0.0, 1.0),
                      st.booleans(), st.text(max_size=5), st.integers(-2, 2))
contexts = st.one_of(
    st.none(), st.just("garbage"),
    st.fixed_dictionaries({"nearest_other_class_distance": st.one_of(st.floats(0.0, 10.0), st.just(float("nan"))),
                           "radius_percentile": st.one_of(st.none(), st.floats(0.0, 100.0))}))


def is_uncertified(c: Certificate, pol) -> bool:
    if c.abstained:
        return True
    if c.mode == "decide":
        return not (c.certified and c.epsilon >= pol.certificate_epsilon(c.norm, c.input_dim))
    return c.radius < pol.threat_model.epsilon


@SETTINGS
@given(c=certificates, up=upstreams, ctx=contexts, name=st.sampled_from(sorted(POLICIES)), eid=st.text(max_size=8))
def test_score_bounded_and_invariant_on_examples(c, up, ctx, name, eid):
    pol = POLICIES[name]
    d = pol.evaluate(c, upstream_risk=up, context=ctx, event_id=eid)
    assert 0.0 <= d.score <= 1.0 and math.isfinite(d.score)
    for s in d.signals.values():
        assert 0.0 <= s["value"] <= 1.0
    assert d.decision in ("allow", "review", "block")
    assert d.certified_in_threat == (not is_uncertified(c, pol))
    if not d.certified_in_threat and not pol.shadow:
        assert d.decision != "allow"
    assert "invariant_guard" not in d.reasons  # the loader's proof, not the runtime guard, kept it out
    if pol.shadow:
        assert d.decision == "allow" and d.would_be in ("allow", "review", "block")
    else:
        assert d.would_be is None
    assert "formula" not in d.explanation and pol.score.combiner in d.explanation


@SETTINGS
@given(combiner=st.sampled_from(["weighted_mean", "max", "noisy_or"]),
       w=st.lists(st.floats(0.0, 1.0), min_size=3, max_size=3).filter(lambda w: sum(w) > 0),
       s=st.lists(st.floats(0.0, 1.0), min_size=3, max_size=3),
       bump=st.lists(st.floats(0.0, 1.0), min_size=3, max_size=3))
def test_combiners_bounded_and_monotone(combiner, w, s, bump):
    names = ["certificate_risk", "upstream_risk", "context_risk"]
    weights = dict(zip(names, w))
    lo = dict(zip(names, s))
    hi = {n: min(1.0, lo[n] + b) for n, b in zip(names, bump)}
    a, _ = combine(combiner, lo, weights)
    b, formula = combine(combiner, hi, weights)
    assert 0.0 <= a <= 1.0 and 0.0 <= b <= 1.0
    assert b >= a - 1e-12
    assert formula.startswith(f"score = {combiner} = ")


@SETTINGS
@given(r1=st.floats(0.0, 3.0), r2=st.floats(0.0, 3.0), up=st.floats(0.0, 1.0), name=st.sampled_from(sorted(POLICIES)))
def test_certificate_risk_decreases_with_radius(r1, r2, up, name):
    pol = POLICIES[name]
    lo, hi = sorted((r1, r2))
    a = pol.evaluate(cert(lo, mode="certify"), upstream_risk=up).signals["certificate_risk"]["value"]
    b = pol.evaluate(cert(hi, mode="certify"), upstream_risk=up).signals["certificate_risk"]["value"]
    assert b <= a
    assert pol.evaluate(cert(abstained=True), upstream_risk=up).signals["certificate_risk"]["value"] == 1.0


@SETTINGS
@given(up1=st.floats(0.0, 1.0), up2=st.floats(0.0, 1.0), c=certificates, name=st.sampled_from(sorted(POLICIES)))
def test_score_monotone_in_upstream_risk(up1, up2, c, name):
    lo, hi = sorted((up1, up2))
    pol = POLICIES[name]
    assert pol.evaluate(c, upstream_risk=hi).score >= pol.evaluate(c, upstream_risk=lo).score - 1e-12


# ---- random policies: whatever the loader accepts never allows an uncertified sample -----
_bool_fields = [f for f, s in FIELDS.items() if s.kind == "bool"]
_num_fields = [f for f, s in FIELDS.items() if s.kind == "number"]
conditions = st.one_of(
    st.builds(lambda f, op, v: {"field": f, "op": op, "value": v},
              st.sampled_from(_bool_fields), st.sampled_from(["eq", "ne"]), st.booleans()),
    st.builds(lambda f, op, v: {"field": f, "op": op, "value": v},
              st.sampled_from(_num_fields), st.sampled_from(["lt", "le", "gt", "ge"]),
              st.sampled_from([0.0, 0.1, 0.25, 0.3, 0.5, 0.9, 1.0, 1.5, 50.0])),
)
rules = st.lists(st.fixed_dictionaries({
    "decision": st.sampled_from(["allow", "review", "block"]),
    "all": st.lists(conditions, max_size=2),
    "any": st.lists(conditions, max_size=2),
}), min_size=1, max_size=4)


def build_policy(rule_specs, mode):
    doc = yaml.safe_load(DEFAULT_TEXT)
    doc["certifier"]["mode"] = mode
    doc["rules"] = []
    for i, r in enumerate(rule_specs):
        rule = {"id": f"r{i}", "decision": r["decision"], "reasons": ["x"]}
        when = {k: r[k] for k in ("all", "any") if r[k]}
        if when:
            rule["when"] = when
        doc["rules"].append(rule)
    return parse_policy(yaml.safe_dump(doc), "random.yaml")


@settings(max_examples=80, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(spec=rules, mode=st.sampled_from(["decide", "certify"]),
       samples=st.lists(st.tuples(certificates, upstreams, contexts), min_size=10, max_size=10))
def test_invariant_on_random_policies(spec, mode, samples):
    try:
        pol = build_policy(spec, mode)
    except PolicyError as e:
        assert "could allow an uncertified sample" in str(e) or "duplicate" in str(e)
        return
    for c, up, ctx in samples:
        d = pol.evaluate(c, upstream_risk=up, context=ctx, event_id="e")
        if not d.certified_in_threat:
            assert d.decision != "allow"
        assert "invariant_guard" not in d.reasons


def test_loader_rejection_is_not_vacuous():
    """The random-policy property must see both outcomes: some policies rejected, some accepted with allow rules."""
    safe = build_policy([{"decision": "allow", "all": [{"field": "certified_in_threat", "op": "eq", "value": True}],
                          "any": []}], "decide")
    assert safe.rules[0].decision == "allow"
    with pytest.raises(PolicyError, match="could allow an uncertified sample"):
        build_policy([{"decision": "allow", "all": [{"field": "score", "op": "lt", "value": 0.5}], "any": []}],
                     "decide")
    # in certify mode a radius at or above epsilon certifies a prediction that agrees: a radius threshold
    # alone is reached by a disagreeing (uncertified) input, and was accepted (the runtime guard caught it)
    with pytest.raises(PolicyError, match=r"prediction_agrees=false, radius_threat=0\.3"):
        build_policy([{"decision": "allow", "all": [{"field": "radius_threat", "op": "ge", "value": 0.3}], "any": []},
                      {"decision": "review", "all": [], "any": []}], "certify")
    disagree = {"field": "prediction_agrees", "op": "eq", "value": False}
    build_policy([{"decision": "review", "all": [disagree], "any": []},
                  {"decision": "allow", "all": [{"field": "radius_threat", "op": "ge", "value": 0.3}], "any": []},
                  {"decision": "review", "all": [], "any": []}], "certify")
    with pytest.raises(PolicyError):  # ... but not in decide mode, where the decision is the certificate's
        build_policy([{"decision": "allow", "all": [{"field": "radius_threat", "op": "ge", "value": 0.3}], "any": []},
                      {"decision": "review", "all": [], "any": []}], "decide")


# ---- upstream risk -------------------------------------------------------------------------
@pytest.mark.parametrize("raw,reason", [(None, "missing"), (float("nan"), "non_finite"), (float("inf"), "non_finite"),
                                        (1.5, "out_of_range"), (-0.1, "out_of_range"), ("0.3", "not_a_number"),
                                        (True, "not_a_number"), ([0.2], "not_a_number")])
def test_malformed_upstream_uses_stated_default_and_flags(raw, reason):
    pol = POLICIES["default"]
    d = pol.evaluate(cert(0.4), upstream_risk=raw)
    s = d.signals["upstream_risk"]
    assert s["flagged"] is True and s["reason"] == reason
    assert s["value"] == pol.signals.upstream_risk.default == 0.5
    assert f"upstream_risk_{reason}" in d.reasons
    assert "flagged" in d.explanation


def test_valid_upstream_is_used_as_is():
    d = POLICIES["default"].evaluate(cert(0.4), upstream_risk=0)
    assert d.signals["upstream_risk"] == {"value": 0.0, "raw": 0.0, "default": 0.5, "flagged": False,
                                          "malformed": False, "weight": 0.3}


# ---- specific decisions ----------------------------------------------------------------------
def test_default_routes_abstained_to_review():
    d = POLICIES["default"].evaluate(cert(abstained=True), upstream_risk=0.1, event_id="a")
    assert (d.decision, d.rule) == ("review", "uncertified")
    assert d.review["routed"] and d.review["deadline_seconds"] is not None
    assert "MEASURE 2.7" in d.controls and "MANAGE 4.1" in d.controls and "GOVERN 1.4" in d.controls
    assert d.radius_threat == 0.0 and d.threat_norm == "l2" and d.threat_epsilon == 0.25


def test_default_blocks_very_high_upstream_risk_of_a_certified_sample():
    d = POLICIES["default"].evaluate(cert(0.5), upstream_risk=0.99, event_id="b")
    assert (d.decision, d.rule) == ("block", "upstream-very-high")
    assert "MANAGE 2.4" in d.controls and d.review["routed"]


def test_decide_certificate_for_a_smaller_epsilon_does_not_count():
    c = cert(0.4, mode="decide", certified=True, epsilon=0.2)  # decided radius >= 0.2, policy needs 0.25
    d = POLICIES["default"].evaluate(c, upstream_risk=0.1)
    assert not d.certified_in_threat and d.decision == "review"
    assert "certificate_epsilon_below_threat" in d.reasons


def test_norm_conversion_in_evaluate():
    text = DEFAULT_TEXT.replace("norm: l2\n  epsilon: 0.25", "norm: linf\n  epsilon: 0.03")
    pol = parse_policy(text, "linf.yaml")
    c = cert(0.4, mode="certify")
    d = pol.evaluate(c, upstream_risk=0.1)
    assert d.radius_threat == pytest.approx(0.05)  # 0.4 / sqrt(64)
    assert d.certified_in_threat
    d = pol.evaluate(cert(0.2, mode="certify"), upstream_risk=0.1)  # 0.025 < 0.03
    assert not d.certified_in_threat and d.decision == "review"
    d = pol.evaluate(cert(0.4, mode="certify", input_dim=None), upstream_risk=0.1)
    assert not d.certified_in_threat and "input_dim_unknown" in d.reasons


def test_shadow_logs_what_it_would_do():
    d = POLICIES["shadow"].evaluate(cert(abstained=True), upstream_risk=0.1, event_id="s")
    assert d.decision == "allow" and d.would_be == "review" and d.shadow
    assert "shadow_mode" in d.reasons and "the rules say review" in d.explanation


def test_priority_bands_and_deadline():
    pol = POLICIES["default"]
    high = pol.evaluate(cert(abstained=True), upstream_risk=1.0, context=None)  # 0.5 + 0.3 + 0.1 = 0.9
    assert high.score == pytest.approx(0.9) and high.review["priority"] == 1 and high.review["deadline_seconds"] == 3600
    mid = pol.evaluate(cert(abstained=True), upstream_risk=0.0)  # 0.5 + 0 + 0.1
    assert mid.score == pytest.approx(0.6) and mid.review["priority"] == 2


def test_audit_sampling_is_deterministic_and_near_the_fraction():
    pol = POLICIES["default"]
    c = cert(0.6)
    ctx = {"nearest_other_class_distance": 1.2, "radius_percentile": 80.0}
    picks = [pol.evaluate(c, upstream_risk=0.05, context=ctx, event_id=f"evt-{i}").review["audit_sample"]
             for i in range(3000)]
    again = [pol.evaluate(c, upstream_risk=0.05, context=ctx, event_id=f"evt-{i}").review["audit_sample"]
             for i in range(200)]
    assert picks[:200] == again
    assert 0.01 <= sum(picks) / len(picks) <= 0.03  # audit_fraction 0.02
    i = picks.index(True)
    d = pol.evaluate(c, upstream_risk=0.05, context=ctx, event_id=f"evt-{i}")
    assert d.decision == "allow" and d.review["routed"] and "audit_sample" in d.reasons
    assert audit_draw(f"evt-{i}", pol.sha256) < 0.02
    assert pol.evaluate(c, upstream_risk=0.05, context=ctx).review["audit_sample"] is False  # no event id


def test_context_signal_uses_ratio_against_half_distance():
    pol = POLICIES["default"]
    full = pol.evaluate(cert(0.5), upstream_risk=0.1,
                        context={"nearest_other_class_distance": 1.0, "radius_percentile": 100.0})
    assert full.signals["context_risk"]["value"] == 0.0  # ratio 0.5 reaches the midpoint, top percentile
    thin = pol.evaluate(cert(0.5), upstream_risk=0.1,
                        context={"nearest_other_class_distance": 4.0, "radius_percentile": None})
    assert thin.signals["context_risk"]["value"] == pytest.approx(1 - 0.125 / 0.5)
    missing = pol.evaluate(cert(0.5), upstream_risk=0.1, context=None)
    assert missing.signals["context_risk"]["flagged"] and missing.signals["context_risk"]["value"] == 0.5


def test_to_dict_is_canonical_json():
    import json

    d = POLICIES["default"].evaluate(cert(abstained=True), upstream_risk=float("nan"), event_id="x")
    text = json.dumps(d.to_dict(), sort_keys=True, allow_nan=False)
    back = json.loads(text)
    assert back["decision"] == "review" and back["signals"]["upstream_risk"]["raw"] == "nan"
    assert set(back["review"]) == {"routed", "priority", "deadline_seconds", "audit_sample"}


def test_score_weights_are_bounded_and_a_nan_score_is_the_highest_risk():
    """weights 1e308 passed ``policy check``; the weighted mean was inf / inf = NaN, and
    max(0, NaN) = 0: every score 0, a certified input with upstream risk 0.94 allowed.
    Each weight is now 0 or in [1e-6, 1e6], and a NaN score counts as 1."""
    from riskpipe.policy.scoring import combine

    for bad in (1e308, 1e7, 4.9e-324, 1e-9):
        doc = yaml.safe_load(DEFAULT_TEXT)
        doc["score"]["weights"]["upstream_risk"] = bad
        with pytest.raises(PolicyError, match=r"weights: each is 0 or in \[1e-06, 1e\+06\]"):
            parse_policy(yaml.safe_dump(doc), "w.yaml")
    assert combine("weighted_mean", {"a": 0.9}, {"a": float("inf")})[0] == 1.0
    for combiner in ("weighted_mean", "max", "noisy_or"):  # no weighted signal: no evidence of low risk
        assert combine(combiner, {"a": 0.1}, {"a": 0.0})[0] == 1.0, combiner
    assert combine("weighted_mean", {"a": 0.2, "b": 0.4}, {"a": 1e6, "b": 1e-6})[0] == pytest.approx(0.2)


def test_the_malformed_upstream_lint_names_the_rule_to_add_as_yaml():
    """The warning's suggested condition ended in a stray '}}' (a doubled brace outside an f-string)."""
    from riskpipe.policy.lint import lint

    pol = build_policy([{"decision": "allow", "all": [{"field": "certified_in_threat", "op": "eq", "value": True}],
                         "any": []}, {"decision": "review", "all": [], "any": []}], "decide")
    [text] = [w.message for w in lint(pol) if "upstream risk is malformed" in w.message]
    assert "{field: signals.upstream_risk.malformed, op: eq, value: true} to review" in text and "}}" not in text

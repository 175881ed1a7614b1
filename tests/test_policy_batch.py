"""policy.evaluate_batch gives the same decisions (and rule traces) as the per-event
reference ``evaluate``, on generated certificates, upstream risks, contexts and
predictions, under every shipped policy and one with rules on every kind of field."""

from __future__ import annotations

import json

import yaml
from hypothesis import given
from hypothesis import strategies as st

from riskpipe.policy import parse_policy
from riskpipe.policy.evaluate import evaluate, evaluate_batch
from test_policy_eval import DEFAULT_TEXT, POLICIES, SETTINGS, cert, certificates, contexts, upstreams


def _policy_reading_every_field():
    """Rules on nullable numbers, nullable booleans, ``any`` lists and an ``ne`` on an absent fact."""
    doc = yaml.safe_load(DEFAULT_TEXT)
    doc["review"] = {**doc.get("review", {}), "audit_fraction": 0.3}
    doc["rules"] = [
        {"id": "agree-mismatch", "decision": "block", "reasons": ["m"],
         "when": {"all": [{"field": "prediction_agrees", "op": "ne", "value": True}],
                  "any": [{"field": "context.radius_percentile", "op": "lt", "value": 10},
                          {"field": "signals.upstream_risk.flagged", "op": "eq", "value": True}]}},
        {"id": "ratio", "decision": "review", "reasons": ["r"],
         "when": {"any": [{"field": "context.radius_to_distance_ratio", "op": "le", "value": 0.2},
                          {"field": "signals.context_risk.value", "op": "ge", "value": 0.9}]}},
        {"id": "certified", "decision": "allow", "reasons": ["ok"],
         "when": {"all": [{"field": "certified_in_threat", "op": "eq", "value": True},
                          {"field": "score", "op": "lt", "value": 0.6}]}},
    ]
    return parse_policy(yaml.safe_dump(doc), "every-field.yaml")


ALL = {**POLICIES, "every-field": _policy_reading_every_field()}
events = st.tuples(certificates, upstreams, contexts, st.one_of(st.none(), st.integers(0, 4)),
                   st.text(max_size=6))


def _same(a, b) -> bool:
    """Equal decisions, traces included; NaN-safe (a flagged NaN risk is kept as text)."""
    return (a == b and json.dumps(a.to_dict(), sort_keys=True) == json.dumps(b.to_dict(), sort_keys=True)
            and a.trace == b.trace)


@SETTINGS
@given(batch=st.lists(events, min_size=0, max_size=12), name=st.sampled_from(sorted(ALL)))
def test_batch_equals_per_event_reference(batch, name):
    pol = ALL[name]
    got = evaluate_batch(pol, [e[0] for e in batch], [e[1] for e in batch], [e[2] for e in batch],
                         [e[4] for e in batch], [e[3] for e in batch])
    assert len(got) == len(batch)
    for (c, up, ctx, pred, eid), d in zip(batch, got):
        ref = evaluate(pol, c, upstream_risk=up, context=ctx, event_id=eid, prediction=pred)
        assert _same(d, ref), (name, d.rule, ref.rule)


def test_a_batch_mate_does_not_change_a_decision():
    """The same event decides the same way alone and beside others (first rule, audit, trace)."""
    pol = ALL["every-field"]
    a = cert(radius=0.6, epsilon=0.25)
    b = cert(abstained=True)
    alone = evaluate_batch(pol, [a], [0.1], [None], ["x"], [3])[0]
    mixed = evaluate_batch(pol, [b, a, b], [float("nan"), 0.1, None], ["garbage", None, None], ["y", "x", "z"],
                           [None, 3, 1])[1]
    assert _same(alone, mixed)

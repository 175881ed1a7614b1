"""policy.evaluate: certificate (+ upstream risk, context) -> Decision. Pure: no I/O,
no clock, no randomness (audit sampling hashes the event id with the policy hash)."""

from __future__ import annotations

import hashlib
import numbers
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from riskpipe.certify.certificate import MODEL_FAULT, Certificate
from riskpipe.certify.norms import conversion_factor
from riskpipe.policy import signals as sig
from riskpipe.policy.fields import OPS, holds
from riskpipe.policy.rules import conditions_hold, iter_conditions
from riskpipe.policy.scoring import combine

if TYPE_CHECKING:
    from riskpipe.policy.schema import Condition, Policy, Rule


@dataclass(frozen=True)
class Decision:
    """One policy decision with everything needed to audit it.

    ``decision`` is what the pipeline does; in shadow mode it is ``allow`` (except for a
    ``model_fault``, which is enforced even there) and ``would_be`` holds what the rules
    decided (``would_be`` is None when enforcing).
    """

    decision: str
    score: float
    signals: dict[str, dict[str, Any]]
    rule: str
    reasons: tuple[str, ...]
    controls: tuple[str, ...]
    explanation: str
    radius_threat: float
    threat_norm: str
    threat_epsilon: float
    certified_in_threat: bool
    prediction_agrees: bool | None
    shadow: bool
    would_be: str | None
    review: dict[str, Any] = field(default_factory=dict)
    trace: tuple[dict[str, Any], ...] = field(default=(), repr=False, compare=False)

    def to_dict(self) -> dict[str, Any]:
        return {
            "decision": self.decision, "score": self.score, "signals": self.signals, "rule": self.rule,
            "reasons": list(self.reasons), "controls": list(self.controls), "explanation": self.explanation,
            "radius_threat": self.radius_threat, "threat_norm": self.threat_norm,
            "threat_epsilon": self.threat_epsilon, "certified_in_threat": self.certified_in_threat,
            "prediction_agrees": self.prediction_agrees,
            "shadow": self.shadow, "would_be": self.would_be, "review": dict(self.review),
        }


def audit_draw(event_id: str, policy_sha256: str) -> float:
    """A number in [0, 1) fixed by (event id, policy): the same event is sampled the
    same way on every replay, and a new policy draws afresh."""
    digest = hashlib.sha256((str(event_id) + policy_sha256).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def _as_certificate(certificate: Certificate | dict[str, Any]) -> Certificate:
    if isinstance(certificate, Certificate):
        return certificate
    if isinstance(certificate, dict):
        return Certificate.from_dict(certificate)
    raise TypeError(f"certificate: expected a Certificate or its dict, got {type(certificate).__name__}")


def threat_view(policy: Policy, cert: Certificate) -> tuple[float, bool, list[str]]:
    """(radius in the threat norm, certified in the threat model, reason codes)."""
    tm = policy.threat_model
    reasons: list[str] = []
    if cert.reason == MODEL_FAULT:  # the model's output broke its contract: no statement at all
        return 0.0, False, [MODEL_FAULT]
    if cert.abstained:
        return 0.0, False, ["abstained"]
    if cert.norm == tm.norm:
        factor = 1.0
    elif cert.input_dim:
        factor = conversion_factor(cert.norm, tm.norm, cert.input_dim)
    else:  # cannot convert without the dimension: claim nothing
        return 0.0, False, ["input_dim_unknown"]
    radius_threat = float(cert.radius) * factor
    if cert.mode == "decide":
        needed = policy.certificate_epsilon(cert.norm, cert.input_dim or 1)
        if cert.epsilon is None or cert.epsilon < needed * (1 - 1e-12):
            return radius_threat, False, ["certificate_epsilon_below_threat"]
        certified = bool(cert.certified)
    else:
        certified = radius_threat >= tm.epsilon
    if not certified:
        reasons.append("radius_below_epsilon")
    return radius_threat, certified, reasons


def prediction_agrees(cert: Certificate, prediction: Any) -> bool | None:
    """Whether the event's prediction is the certified class; None when either is missing."""
    if prediction is None or cert.predicted_class is None:
        return None
    if isinstance(prediction, bool) or not isinstance(prediction, numbers.Integral):  # 3.9, "cat", [1]
        return False  # agrees with no certified class (int() made 3.9 class 3)
    return prediction == int(cert.predicted_class)


def evaluate(policy: Policy, certificate: Certificate | dict[str, Any], upstream_risk: Any = None, context: Any = None,
             event_id: str | None = None, prediction: Any = None) -> Decision:
    """The policy's decision. A certificate for a class other than the event's ``prediction``
    is no certificate for the decision the pipeline acts on: it counts as not certified in
    the threat model (reason ``prediction_mismatch``).

    This is the reference: ``evaluate_batch`` gives the same decisions for a micro-batch."""
    ev = _Evidence.gather(policy, _as_certificate(certificate), upstream_risk, context, prediction,
                          policy.score.weights.model_dump())
    trace: list[dict[str, Any]] = []
    fired = None
    for rule in policy.rules:
        ok = conditions_hold(rule.when, ev.facts)
        trace.append({"rule": rule.id, "matched": ok, "conditions": [
            {"field": c.field, "op": c.op, "value": c.value, "actual": ev.facts.get(c.field),
             "holds": holds(c.field, c.op, c.value, ev.facts)} for c in iter_conditions(rule.when)]})
        if ok:
            fired = rule
            break
    return _conclude(policy, ev, fired, trace, event_id)


def evaluate_batch(policy: Policy, certificates: Sequence[Certificate | dict[str, Any]], upstream_risks: Sequence[Any],
                   contexts: Sequence[Any], event_ids: Sequence[str | None], predictions: Sequence[Any]
                   ) -> list[Decision]:
    """``evaluate`` for a micro-batch (equal decisions, tested against it): each rule
    condition is tested once for the whole batch as an array comparison, so the per-event
    Python work is gathering the evidence and writing the decision."""
    weights = policy.score.weights.model_dump()
    evs = [_Evidence.gather(policy, _as_certificate(c), u, x, p, weights)
           for c, u, x, p in zip(certificates, upstream_risks, contexts, predictions, strict=True)]
    n = len(evs)
    if n == 0:
        return []
    rules = policy.rules
    table: list[list[tuple[Condition, np.ndarray, list[Any]]]] = []  # per rule: (condition, holds, actual) each
    matched = np.zeros((len(rules), n), dtype=bool)
    for r, rule in enumerate(rules):
        conds: list[tuple[Condition, np.ndarray, list[Any]]] = []
        for c in iter_conditions(rule.when):
            actual = [e.facts.get(c.field) for e in evs]
            conds.append((c, _holds_all(c.op, c.value, actual), actual))
        table.append(conds)
        when, ok = rule.when, np.ones(n, dtype=bool)
        if when is not None:
            n_all = len(when.all or ())
            for _, h, _ in conds[:n_all]:
                ok &= h
            if when.any is not None:
                ok &= np.logical_or.reduce([h for _, h, _ in conds[n_all:]], axis=0) if conds[n_all:] else False
        matched[r] = ok
    any_fired = np.asarray(matched.any(axis=0))
    first = np.where(any_fired, matched.argmax(axis=0), len(rules))
    out: list[Decision] = []
    for i, ev in enumerate(evs):
        last = min(int(first[i]), len(rules) - 1)
        trace = [{"rule": rules[r].id, "matched": bool(matched[r, i]), "conditions": [
            {"field": c.field, "op": c.op, "value": c.value, "actual": actual[i], "holds": bool(h[i])}
            for c, h, actual in table[r]]} for r in range(last + 1)]
        out.append(_conclude(policy, ev, rules[first[i]] if any_fired[i] else None, trace, event_ids[i]))
    return out


def _holds_all(op: str, value: Any, actual: list[Any]) -> np.ndarray:
    """``holds`` for one condition over many facts: absent (None) never holds."""
    present = np.array([a is not None for a in actual], dtype=bool)
    vals = np.array([np.nan if a is None else float(a) for a in actual], dtype=np.float64)
    with np.errstate(invalid="ignore"):
        held: np.ndarray = present & OPS[op](vals, float(value))
    return held


@dataclass
class _Evidence:
    """What one event's decision rests on: the certificate in the threat model, the
    signals, the score and the facts the rules read."""

    cert: Certificate
    radius_threat: float
    certified: bool
    cert_reasons: list[str]
    agrees: bool | None
    signals: dict[str, dict[str, Any]]
    score: float
    formula: str
    facts: dict[str, Any]

    @classmethod
    def gather(cls, policy: Policy, cert: Certificate, upstream_risk: Any, context: Any, prediction: Any,
               weights: dict[str, float]) -> _Evidence:
        tm = policy.threat_model
        radius_threat, certified, cert_reasons = threat_view(policy, cert)
        agrees = prediction_agrees(cert, prediction)
        if agrees is False:
            certified = False
            cert_reasons = [r for r in cert_reasons if r != "radius_below_epsilon"] + ["prediction_mismatch"]
        cfg = policy.signals
        signals = {
            "certificate_risk": sig.certificate_risk(cfg.certificate_risk, cert.abstained, radius_threat,
                                                     tm.epsilon, certified),
            "upstream_risk": sig.upstream_risk(cfg.upstream_risk, upstream_risk),
        }
        if cfg.context_risk.enabled:
            signals["context_risk"] = sig.context_risk(cfg.context_risk, context, radius_threat)
        score, formula = combine(policy.score.combiner, {k: v["value"] for k, v in signals.items()}, weights)
        for name, s in signals.items():
            s["weight"] = weights[name]
        if cfg.support_risk.enabled:  # read by rules, never in the score
            signals["support_risk"] = {**sig.support_risk(cfg.support_risk, context), "weight": 0.0}
        ctx = signals.get("context_risk", {})
        sup = signals.get("support_risk", {})
        facts = {
            "certificate.abstained": cert.abstained,
            "certified_in_threat": certified,
            "prediction_agrees": agrees,
            "radius_threat": radius_threat,
            "radius_over_epsilon": radius_threat / tm.epsilon,
            "score": score,
            "signals.certificate_risk.value": signals["certificate_risk"]["value"],
            "signals.upstream_risk.value": signals["upstream_risk"]["value"],
            "signals.upstream_risk.flagged": signals["upstream_risk"]["flagged"],
            "signals.upstream_risk.malformed": signals["upstream_risk"]["malformed"],
            "signals.context_risk.value": ctx.get("value"),
            "signals.context_risk.flagged": ctx.get("flagged"),
            "context.radius_to_distance_ratio": ctx.get("radius_to_distance_ratio"),
            "context.radius_percentile": ctx.get("radius_percentile"),
            "signals.support_risk.value": sup.get("value"),
            "signals.support_risk.out_of_support": sup.get("out_of_support"),
        }
        return cls(cert, radius_threat, certified, cert_reasons, agrees, signals, score, formula, facts)


def _conclude(policy: Policy, ev: _Evidence, fired: Rule | None, trace: list[dict[str, Any]], event_id: str | None
              ) -> Decision:
    """The decision once the rule that fired (None: the fallback) is known."""
    tm, certified, signals, score = policy.threat_model, ev.certified, ev.signals, ev.score
    if fired is not None:
        enforced, rule_id, reasons, controls = fired.decision, fired.id, list(fired.reasons), list(fired.controls)
    else:
        fb = policy.fallback
        enforced, rule_id, reasons, controls = fb.decision, "fallback", list(fb.reasons), list(fb.controls)
    if enforced == "allow" and not certified:
        # The loader proves this unreachable; kept so that a bug can never let one through.
        enforced, reasons = "review", reasons + ["invariant_guard"]
    for code in ev.cert_reasons:
        if code not in reasons and not certified:
            reasons.append(code)
    for name, s in signals.items():
        if s.get("flagged"):
            reasons.append(f"{name}_{s['reason']}")

    # Shadow mode observes a policy without enforcing it, but a broken model output is no
    # decision to observe: a model_fault is enforced even there, never allowed.
    shadowed = policy.shadow and MODEL_FAULT not in ev.cert_reasons
    decision = "allow" if shadowed else enforced
    if shadowed:
        reasons.append("shadow_mode")

    rv = policy.review
    band = rv.band(score)
    audit = bool(decision == "allow" and event_id is not None and rv.audit_fraction > 0
                 and audit_draw(event_id, policy.sha256) < rv.audit_fraction)
    routed = decision == "review" or (decision == "block" and rv.route_blocked) or audit
    if audit:
        reasons.append("audit_sample")
    review = {"routed": routed, "priority": band.priority,
              "deadline_seconds": band.deadline_seconds if routed else None, "audit_sample": audit}
    controls += list(policy.controls.always) + (list(policy.controls.when_routed) if routed else [])
    controls = list(dict.fromkeys(controls))

    explanation = _explain(policy, ev.cert, ev.radius_threat, certified, signals, ev.formula, rule_id, trace,
                           enforced, decision, review)
    return Decision(decision=decision, score=score, signals=signals, rule=rule_id, reasons=tuple(reasons),
                    controls=tuple(controls), explanation=explanation, radius_threat=ev.radius_threat,
                    threat_norm=tm.norm, threat_epsilon=tm.epsilon, certified_in_threat=certified,
                    prediction_agrees=ev.agrees,
                    shadow=policy.shadow, would_be=enforced if policy.shadow else None, review=review,
                    trace=tuple(trace))


def format_value(v: Any) -> str:
    """A signal or field value as explanations print it."""
    if v is None:
        return "absent"
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _explain(policy: Policy, cert: Certificate, radius_threat: float, certified: bool,
             signals: dict[str, dict[str, Any]],
             formula: str, rule_id: str, trace: list[dict[str, Any]], enforced: str, decision: str,
             review: dict[str, Any]) -> str:
    tm = policy.threat_model
    parts = [f"Policy {policy.name} {policy.version} (sha256 {policy.sha256[:12]})."]
    if cert.abstained:
        parts.append(f"Certificate: {cert.method} abstained, so no radius is certified.")
    else:
        parts.append(f"Certificate: {cert.method} {cert.mode}, {cert.norm} radius {cert.radius:.4g}, which covers "
                     f"{radius_threat:.4g} in the threat norm {tm.norm} (Theorem 2) against epsilon {tm.epsilon:g}: "
                     + ("certified in the threat model." if certified else "not certified in the threat model."))
    for name, s in signals.items():
        note = f" (flagged: {s['reason']}, policy default used)" if s.get("flagged") else ""
        parts.append(f"{name} = {s['value']:.4g}{note}.")
    parts.append(formula + ".")
    if rule_id == "fallback":
        parts.append(f"No rule matched; the fallback gives {enforced}.")
    else:
        conds = trace[-1]["conditions"]
        why = "; ".join(f"{c['field']} {c['op']} {format_value(c['value'])} (is {format_value(c['actual'])})"
                        for c in conds)
        parts.append(f"Rule {rule_id!r} fired" + (f": {why}." if why else " (no conditions)."))
    if policy.shadow:
        parts.append(f"Shadow mode: the rules say {enforced}; nothing is enforced, the decision is allow.")
    parts.append(f"Decision: {decision}" + (f", routed to review at priority {review['priority']}"
                                            if review["routed"] else "") + ".")
    parts.append("A certificate never shows an input is clean; only its absence is actionable.")
    return " ".join(parts)

"""Replay recorded decisions under another policy (``riskpipe policy diff``).

Each full decision record carries its certificate, upstream risk and context, so a
new policy's rules, signals and score can be re-evaluated exactly. What cannot be
replayed is the certification itself: when the new certifier or threat model asks a
different question (another sigma, alpha, method, mode, a decide-mode epsilon the old
certificate does not reach, or a smaller epsilon than the one a certificate was withheld
at), the record needs re-certification; so does a record without the context the new
policy reads. Its replayed decision is then not the new policy's answer, and the diff
lists it.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from riskpipe.certify.certificate import MODEL_FAULT, Certificate
from riskpipe.policy.rules import uses_context

if TYPE_CHECKING:
    from pydantic import BaseModel

    from riskpipe.policy.evaluate import Decision
    from riskpipe.policy.schema import Policy


@dataclass
class Replay:
    records: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (id or #n, reason)
    transitions: Counter[str] = field(default_factory=Counter)
    changes: list[dict[str, Any]] = field(default_factory=list)
    recorded_mismatch: list[str] = field(default_factory=list)  # recorded decision != OLD replay
    recertify: list[dict[str, Any]] = field(default_factory=list)
    certifier_changes: list[str] = field(default_factory=list)
    threat_changes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"records": self.records, "skipped": [{"id": i, "reason": r} for i, r in self.skipped],
                "changed": len(self.changes), "transitions": dict(sorted(self.transitions.items())),
                "changes": self.changes, "recorded_mismatch": self.recorded_mismatch,
                "needs_recertification": self.recertify, "certifier_changes": self.certifier_changes,
                "threat_model_changes": self.threat_changes}


def _section_changes(old: BaseModel, new: BaseModel) -> list[str]:
    a, b = old.model_dump(exclude={"description"}), new.model_dump(exclude={"description"})
    return [f"{k} {a[k]!r} -> {b[k]!r}" for k in sorted(a) if a[k] != b[k]]


def recertify_reasons(policy: Policy, cert: Certificate) -> list[str]:
    """Why ``cert`` does not answer ``policy``'s certification question ([] if it does)."""
    c, out = policy.certifier, list[str]()
    if cert.method != c.method:
        out.append(f"method {cert.method} != {c.method}")
    # the smoothed classifier is defined by sigma; alpha is the confidence asked for
    if None not in (cert.sigma, c.sigma) and cert.sigma != c.sigma:
        out.append(f"sigma {cert.sigma:g} != {c.sigma:g}")
    if cert.alpha is not None and cert.alpha > c.alpha:
        out.append(f"alpha {cert.alpha:g} > {c.alpha:g}")
    if cert.mode != c.mode and not (c.mode == "certify" and cert.mode == "bound"):
        out.append(f"mode {cert.mode} != {c.mode}")
    if cert.mode == "decide" and not cert.abstained and cert.input_dim:
        need = policy.certificate_epsilon(cert.norm, cert.input_dim)
        if cert.epsilon is None or cert.epsilon < need * (1 - 1e-12):
            out.append(f"decided against epsilon {cert.epsilon} < {need:.4g} now needed")
    if cert.certified is False and cert.epsilon is not None and cert.input_dim and cert.reason != MODEL_FAULT:
        # withheld at its own epsilon (decide mode's test, Lipschitz's abstain threshold): at
        # the smaller epsilon asked now it may certify, which the record cannot tell
        need = policy.certificate_epsilon(cert.norm, cert.input_dim)
        if need < cert.epsilon * (1 - 1e-12):
            out.append(f"not certified at epsilon {cert.epsilon:g}; the {need:.4g} now needed may be reached")
    return out


def _summary(d: Decision) -> dict[str, Any]:
    return {"decision": d.decision, "rule": d.rule, "score": round(d.score, 6), "reasons": list(d.reasons)}


def replay(old: Policy, new: Policy, records: Iterable[dict[str, Any]]) -> Replay:
    out = Replay(certifier_changes=_section_changes(old.certifier, new.certifier),
                 threat_changes=_section_changes(old.threat_model, new.threat_model))
    context_added = uses_context(new) and not uses_context(old)  # records of OLD's stage carry none
    for n, rec in enumerate(records, 1):
        rid = str(rec.get("id", f"#{n}")) if isinstance(rec, dict) else f"#{n}"
        if not isinstance(rec, dict) or not isinstance(rec.get("certificate"), dict):
            out.skipped.append((rid, "no certificate in the record"))
            continue
        try:
            cert = Certificate.from_dict(rec["certificate"])
        except (TypeError, ValueError) as e:
            out.skipped.append((rid, f"certificate: {e}"))
            continue
        kwargs = {"upstream_risk": rec.get("upstream_risk"), "context": rec.get("context"), "event_id": rec.get("id"),
                  "prediction": rec.get("prediction")}
        before, after = old.evaluate(cert, **kwargs), new.evaluate(cert, **kwargs)
        out.records += 1
        if rec.get("decision") is not None and rec.get("decision") != before.decision:
            out.recorded_mismatch.append(rid)
        why = recertify_reasons(new, cert)
        if rec.get("context") is None and context_added:
            why.append("no context in the record (its policy did not use one), which the new policy reads: "
                       "replayed with the signals' defaults")
        if why:
            out.recertify.append({"id": rid, "reasons": why})
        out.transitions[f"{before.decision} -> {after.decision}"] += 1
        if (before.decision, before.rule, before.review["routed"]) != (after.decision, after.rule,
                                                                        after.review["routed"]):
            out.changes.append({"id": rid, "old": _summary(before), "new": _summary(after),
                                "needs_recertification": bool(why)})
    return out

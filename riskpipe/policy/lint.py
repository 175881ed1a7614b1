"""Lint a valid policy: things that are legal but probably not what the author meant.

* a rule no input can meet, or one earlier rules always pre-empt (unreachable);
* inputs no rule matches (they get the fallback decision);
* a threat norm that differs from the certificate norm, with Theorem 2's shrink
  factor for the given input dimension;
* a certifier that cannot reach the radius the threat model needs, even if every
  noise sample voted for the top class;
* a missing upstream risk that would count as no risk, context weight on a disabled
  context signal.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from riskpipe.certify.norms import conversion_factor
from riskpipe.certify.stats import max_radius
from riskpipe.policy.fields import FIELDS
from riskpipe.policy.rules import analyse, describe_facts, iter_conditions

if TYPE_CHECKING:
    from riskpipe.policy.schema import Certifier, Condition, Policy


@dataclass(frozen=True)
class LintWarning:
    path: tuple[str | int, ...]
    message: str


def _never(c: Condition) -> bool:
    """A single condition that no value in its field's domain satisfies."""
    spec = FIELDS[c.field]
    if spec.kind == "bool":
        return False
    v = c.value
    return ((c.op in ("gt",) and v >= spec.hi) or (c.op == "ge" and v > spec.hi)
            or (c.op == "lt" and v <= spec.lo) or (c.op == "le" and v < spec.lo)
            or (c.op == "eq" and not spec.lo <= v <= spec.hi))


def max_certifiable_radius(certifier: Certifier) -> float | None:
    """The largest radius the certifier section can report, or None when no sample budget
    caps it: a certificate drawn from noise of scale ``sigma`` rests on at most ``n``
    samples (``max_samples`` in decide mode), whose best Clopper-Pearson bound is
    alpha ** (1 / n). Deterministic bounds carry no sigma."""
    if certifier.sigma is None:
        return None
    n = certifier.max_samples if certifier.mode == "decide" else certifier.n
    return max_radius(certifier.sigma, certifier.alpha, n)


def lint(policy: Policy, input_dim: int = 64) -> list[LintWarning]:
    out: list[LintWarning] = []
    a = analyse(policy)
    if not a.exhaustive:
        out.append(LintWarning(("rules",), "too many field/value combinations to check reachability and coverage"))
    for i, rule in enumerate(policy.rules):
        never = [(j, c) for j, c in enumerate(rule.when.all or ()) if _never(c)] if rule.when else []
        if never:
            j, c = never[0]
            spec = FIELDS[c.field]
            out.append(LintWarning(("rules", i, "when", "all", j),
                                   f"condition {c.field} {c.op} {c.value:g} can never hold ({c.field} lies in "
                                   f"[{spec.lo:g}, {spec.hi:g}]); rule {rule.id!r} never fires"))
        elif rule.when and rule.when.any and all(_never(c) for c in rule.when.any):
            out.append(LintWarning(("rules", i, "when", "any"),
                                   f"no condition in 'any' can hold; rule {rule.id!r} never fires"))
        elif not a.satisfiable[i]:
            out.append(LintWarning(("rules", i, "when"),
                                   f"no input can meet these conditions together; rule {rule.id!r} never fires"))
        elif not a.reachable[i]:
            out.append(LintWarning(("rules", i, "id"),
                                   f"unreachable: earlier rules match every input rule {rule.id!r} matches"))
    if not policy.shadow:
        for i, facts in sorted(a.malformed_allowed.items()):
            out.append(LintWarning(("rules", i, "decision"), (
                f"rule {policy.rules[i].id!r} could allow an input whose upstream risk is malformed (given but no "
                f"number in [0, 1]: a string, NaN, 2; the default {policy.signals.upstream_risk.default:g} stands "
                f"in for it), e.g. {describe_facts(facts)}; route {{field: signals.upstream_risk.malformed, op: eq, "
                "value: true} to review in an earlier rule, as the shipped policies do")))
    if a.uncovered is not None:
        out.append(LintWarning(("fallback",), (
            f"uncovered cases: some inputs match no rule and get the fallback {policy.fallback.decision}, "
            f"e.g. {describe_facts(a.uncovered)}")))

    tm, cert_norm = policy.threat_model, policy.certifier.certificate_norm
    if tm.norm != cert_norm:
        f = conversion_factor(cert_norm, tm.norm, input_dim)
        out.append(LintWarning(("threat_model", "norm"), (
            f"threat norm {tm.norm} differs from the certificate norm {cert_norm}: by Theorem 2 an {cert_norm} "
            f"radius r covers only {f:.4g} * r in {tm.norm} at input dimension {input_dim}, so certificates "
            f"must reach {policy.certificate_epsilon(cert_norm, input_dim):.4g} to cover epsilon {tm.epsilon:g}")))
    r_max = max_certifiable_radius(policy.certifier)
    need = policy.certificate_epsilon(cert_norm, input_dim)
    if r_max is not None and r_max < need:
        cfg = policy.certifier
        n_name = "max_samples" if cfg.mode == "decide" else "n"
        out.append(LintWarning(("certifier", n_name), (
            f"no input can be certified: with {n_name}={getattr(cfg, n_name)}, alpha={cfg.alpha:g}, "
            f"sigma={cfg.sigma:g} "
            f"the largest radius smoothing can report is {r_max:.4g} < {need:.4g} needed for the threat model")))
    if policy.signals.upstream_risk.default == 0.0:
        out.append(LintWarning(("signals", "upstream_risk", "default"),
                               "a default of 0 counts a missing upstream risk as no risk"))
    if not policy.signals.context_risk.enabled and policy.score.weights.context_risk > 0:
        out.append(LintWarning(("score", "weights", "context_risk"),
                               "context_risk is disabled; its weight has no effect"))
    if not policy.signals.context_risk.enabled:
        for i, rule in enumerate(policy.rules):
            for c in iter_conditions(rule.when):
                if c.field.startswith("signals.context_risk."):
                    out.append(LintWarning(("rules", i, "when"),
                                           f"rule {rule.id!r} reads {c.field} but context_risk is disabled"))
    return out

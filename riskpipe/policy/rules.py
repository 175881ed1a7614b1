"""Rule matching and the static analysis behind the invariant and the linter.

Runtime: rules are tried in order; the first whose ``when`` holds fires. ``when``
is ``all`` (every condition) and/or ``any`` (at least one); both given means both
must hold; no ``when`` means always.

Static analysis: a condition compares one field with a constant, so whether it
holds depends only on which side of each constant the field lies. For every field
the rules mention we take representative values (each constant, the domain ends, a
point between each pair and beyond the last, and "absent" for nullable fields) and
enumerate their combinations. That decides exactly, for the abstract inputs, which
rules can fire, which are shadowed, which inputs fall through to the fallback, and
whether an uncertified input can reach an ``allow`` rule. Fields are treated as
independent apart from a few facts that always hold (below), so the analysis may
see inputs that cannot occur, never miss ones that can: it is sound for the
invariant.

Facts that always hold (checked by the property tests):
* abstained => not certified_in_threat, radius_threat = radius_over_epsilon = 0,
  certificate risk = 1;
* not certified_in_threat => certificate risk >= r(1) (see signals.py);
* certify mode: certified_in_threat <=> not abstained and radius_threat >= epsilon
  (and radius_over_epsilon >= 1), unless the prediction disagrees;
* prediction_agrees false => not certified_in_threat (a certificate for another class
  is no certificate for the prediction); abstained => prediction_agrees absent.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from riskpipe.policy.fields import FIELDS, OPS, holds
from riskpipe.policy.signals import certificate_risk_floor

if TYPE_CHECKING:
    from riskpipe.policy.schema import Condition, Policy, Rule, When

Combo = tuple[Any, ...]  # one abstract input: a value (or ABSENT) per field, in the analysis' field order

MAX_COMBINATIONS = 200_000
MALFORMED = "signals.upstream_risk.malformed"  # the lint asks whether an allow rule takes it
ABSENT = None


def conditions_hold(when: When | None, facts: dict[str, Any]) -> bool:
    if when is None:
        return True
    if when.all is not None and not all(holds(c.field, c.op, c.value, facts) for c in when.all):
        return False
    return when.any is None or any(holds(c.field, c.op, c.value, facts) for c in when.any)


def first_match(rules: Iterable[Rule], facts: dict[str, Any]) -> int | None:
    for i, rule in enumerate(rules):
        if conditions_hold(rule.when, facts):
            return i
    return None


def iter_conditions(when: When | None) -> tuple[Condition, ...]:
    if when is None:
        return ()
    return tuple(when.all or ()) + tuple(when.any or ())


# Rule fields whose value comes from the context index (riskpipe.policy.fields).
CONTEXT_FIELDS = ("context.", "signals.context_risk.", "signals.support_risk.")


def uses_context(policy: Policy) -> bool:
    """True when ``policy``'s decisions can depend on the context index: the support
    signal is enabled, or the context signal is enabled and either weighs in the score
    or a rule condition reads it."""
    if policy.signals.support_risk.enabled:
        return True
    if not policy.signals.context_risk.enabled:
        return False
    if policy.score.weights.context_risk > 0:
        return True
    return any(c.field.startswith(CONTEXT_FIELDS) for r in policy.rules for c in iter_conditions(r.when))


# ---- abstract inputs ------------------------------------------------------------------
def _points(field: str, constants: set[float], extra: Iterable[float]) -> list[float | None]:
    spec = FIELDS[field]
    if spec.kind == "bool":
        pts: list[float | None] = [False, True]
    else:
        anchors = {spec.lo, *(c for c in constants if spec.lo <= c <= spec.hi),
                   *(e for e in extra if spec.lo <= e <= spec.hi)}
        if math.isfinite(spec.hi):
            anchors.add(spec.hi)
        xs = sorted(anchors)
        pts = [*xs, *((a + b) / 2 for a, b in itertools.pairwise(xs))]
        if not math.isfinite(spec.hi):
            pts.append(xs[-1] + 1.0)
    if spec.nullable:
        pts.append(ABSENT)
    return pts


@dataclass(frozen=True)
class Analysis:
    exhaustive: bool
    satisfiable: tuple[bool, ...]  # rule i can hold for some input
    reachable: tuple[bool, ...]  # rule i fires for some input
    uncovered: dict[str, Any] | None  # an input no rule matches (witness), or None
    invariant_witness: dict[int, dict[str, Any]]  # allow rule i -> an uncertified input that reaches it
    malformed_allowed: dict[int, dict[str, Any]]  # allow rule i -> an input with a malformed upstream risk


def analyse(policy: Policy) -> Analysis:
    rules = policy.rules
    constants: dict[str, set[float]] = {}
    for rule in rules:
        for c in iter_conditions(rule.when):
            if FIELDS[c.field].kind == "number":
                constants.setdefault(c.field, set()).add(float(c.value))
            else:
                constants.setdefault(c.field, set())
    # prediction_agrees is an axis even where no rule reads it: in certify mode a radius >= epsilon
    # is certified only if the prediction agrees (_coherent), so an allow rule reading the radius
    # alone is reached by a disagreeing, uncertified input (the runtime guard caught it; the
    # loader did not)
    fields = sorted(set(constants) | {"certificate.abstained", "certified_in_threat", "prediction_agrees"})
    floor = certificate_risk_floor(policy.signals.certificate_risk)
    extra: dict[str, list[float]] = {"radius_threat": [0.0, policy.threat_model.epsilon],
                                     "radius_over_epsilon": [0.0, 1.0],
             "signals.certificate_risk.value": [floor, 1.0]}
    axes = [_points(f, constants.get(f, set()), extra.get(f, ())) for f in fields]
    if "prediction_agrees" not in constants:  # no rule reads it: a witness shows it only where it matters
        axes[fields.index("prediction_agrees")] = [ABSENT, True, False]
    total = math.prod(len(a) for a in axes)
    if total > MAX_COMBINATIONS:
        return _syntactic(policy)
    n = len(rules)
    sat, reach = [False] * n, [False] * n
    uncovered: dict[str, Any] | None = None
    witness: dict[int, dict[str, Any]] = {}
    malformed: dict[int, dict[str, Any]] = {}
    certify_mode = policy.certifier.mode == "certify"
    eps = policy.threat_model.epsilon
    compiled = [_compile(rule.when, fields) for rule in rules]
    allow = [rule.decision == "allow" for rule in rules]
    i_cert = fields.index("certified_in_threat")
    # an input with a malformed upstream risk: where no rule reads ``malformed``, the rules tell it
    # from others by ``flagged`` (true for it) or not at all; no axis of its own (half the combinations)
    i_mal = next((fields.index(f) for f in (MALFORMED, "signals.upstream_risk.flagged") if f in fields), None)
    idx = {f: fields.index(f) if f in fields else None for f in (
        "certificate.abstained", "certified_in_threat", "radius_threat", "radius_over_epsilon",
        "signals.certificate_risk.value", "prediction_agrees", MALFORMED, "signals.upstream_risk.flagged")}
    for combo in itertools.product(*axes):
        if not _coherent(combo, idx, certify_mode, eps, floor):
            continue
        fired = None
        for i, match in enumerate(compiled):
            if match(combo):
                sat[i] = True
                if fired is None:
                    fired = i
                    reach[i] = True
        if fired is None:
            uncovered = uncovered or dict(zip(fields, combo))
        elif allow[fired]:
            if not combo[i_cert] and fired not in witness:
                witness[fired] = {f: v for f, v in zip(fields, combo) if v is not ABSENT or f in constants}
            if (i_mal is None or combo[i_mal]) and fired not in malformed:
                malformed[fired] = dict(zip(fields, combo))
    return Analysis(True, tuple(sat), tuple(reach), uncovered, witness, malformed)


def _compile(when: When | None, fields: list[str]) -> Callable[[Combo], bool]:
    """``conditions_hold`` for a tuple of facts in ``fields`` order (the analysis hot loop)."""

    if when is None:
        return lambda combo: True
    def leaf(c: Condition) -> Callable[[Combo], bool]:
        i, op, v = fields.index(c.field), OPS[c.op], c.value
        return lambda combo: combo[i] is not None and op(combo[i], v)
    all_ = [leaf(c) for c in when.all or ()]
    any_ = [leaf(c) for c in when.any or ()]
    has_any = when.any is not None
    return lambda combo: all(f(combo) for f in all_) and (not has_any or any(f(combo) for f in any_))


def _coherent(combo: Combo, idx: dict[str, int | None], certify_mode: bool, eps: float, floor: float) -> bool:
    def get(name: str) -> Any:
        i = idx[name]
        return None if i is None else combo[i]

    abstained, certified = get("certificate.abstained"), get("certified_in_threat")
    agrees = get("prediction_agrees")
    if get(MALFORMED) and get("signals.upstream_risk.flagged") is False:  # malformed => flagged
        return False
    if certified and agrees is False:  # a certificate for another class certifies nothing acted on
        return False
    if abstained and agrees is not None:  # no certified class to compare with
        return False
    r, t, risk = get("radius_threat"), get("radius_over_epsilon"), get("signals.certificate_risk.value")
    if abstained and (certified or (r is not None and r != 0) or (t is not None and t != 0)
                      or (risk is not None and risk != 1.0)):
        return False
    if not certified and risk is not None and risk < floor:
        return False
    if certify_mode and not abstained and agrees is not False:
        if r is not None and (r >= eps) != certified:
            return False
        if t is not None and (t >= 1.0) != certified:
            return False
    return True


def _excludes_uncertified(when: When | None) -> bool:
    return when is not None and any(
        c.field == "certified_in_threat" and ((c.op == "eq" and c.value is True) or (c.op == "ne" and c.value is False))
        for c in (when.all or ()))


def _syntactic(policy: Policy) -> Analysis:
    """Fallback when there are too many combinations: an allow rule is accepted only
    if its ``all`` list requires certified_in_threat to be true (and, for the lint, a
    well-formed upstream risk)."""
    n = len(policy.rules)
    witness: dict[int, dict[str, Any]] = {i: {"certified_in_threat": False} for i, r in enumerate(policy.rules)
               if r.decision == "allow" and not _excludes_uncertified(r.when)}
    malformed: dict[int, dict[str, Any]] = {i: {MALFORMED: True} for i, r in enumerate(policy.rules)
                                            if r.decision == "allow" and not _excludes_malformed(r.when)}
    return Analysis(False, (True,) * n, (True,) * n, None, witness, malformed)


def _excludes_malformed(when: When | None) -> bool:
    return when is not None and any(
        c.field in (MALFORMED, "signals.upstream_risk.flagged") and c.op == "eq" and c.value is False
        for c in (when.all or ()))


def describe_facts(facts: dict[str, Any]) -> str:
    parts = []
    for k, v in sorted(facts.items()):
        parts.append(f"{k}={'absent' if v is None else (str(v).lower() if isinstance(v, bool) else f'{v:g}')}")
    return ", ".join(parts)

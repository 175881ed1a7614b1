"""The closed set of facts a rule condition may reference.

Rules never evaluate expressions: a condition names one of these fields, an
operator and a constant. Each field has a type and a domain, which the loader uses
to reject conditions of the wrong type and the linter uses to find conditions no
input can meet. A condition on a fact that is absent for an input (``None``: no
context, context signal disabled) is never met, whatever the operator.
"""

from __future__ import annotations

import difflib
import math
import operator
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class FieldSpec:
    name: str
    kind: str  # "bool" | "number"
    lo: float = 0.0
    hi: float = math.inf
    nullable: bool = False
    doc: str = ""


FIELDS: dict[str, FieldSpec] = {f.name: f for f in (
    FieldSpec("certificate.abstained", "bool", doc="the certifier abstained (no class, radius 0)"),
    FieldSpec("certified_in_threat", "bool",
              doc="not abstained and radius_threat >= epsilon (decide mode: the certificate's decision), and "
                  "the certified class is the event's prediction when it carries one"),
    FieldSpec("prediction_agrees", "bool", nullable=True,
              doc="the event's prediction equals the certified class (absent: no prediction, or no class)"),
    FieldSpec("radius_threat", "number", doc="certified radius converted to the threat norm (Theorem 2)"),
    FieldSpec("radius_over_epsilon", "number", doc="radius_threat / threat_model.epsilon"),
    FieldSpec("score", "number", hi=1.0, doc="composite risk score"),
    FieldSpec("signals.certificate_risk.value", "number", hi=1.0, doc="certificate risk signal"),
    FieldSpec("signals.upstream_risk.value", "number", hi=1.0, doc="upstream risk signal (default when flagged)"),
    FieldSpec("signals.upstream_risk.flagged", "bool", doc="upstream risk was missing or malformed"),
    FieldSpec("signals.upstream_risk.malformed", "bool",
              doc="upstream risk was given but is no number in [0, 1] (a string, NaN, 2, -0.5): a broken "
                  "upstream signal, where missing is none at all"),
    FieldSpec("signals.context_risk.value", "number", hi=1.0, nullable=True,
              doc="context risk signal (absent when disabled)"),
    FieldSpec("signals.context_risk.flagged", "bool", nullable=True, doc="context was missing or malformed"),
    FieldSpec("signals.support_risk.value", "number", hi=1.0, nullable=True,
              doc="support risk signal: distance to the nearest reference sample over the reference set's own "
                  "leave-one-out quantile, divided by the factor, capped at 1 (absent when disabled)"),
    FieldSpec("signals.support_risk.out_of_support", "bool", nullable=True,
              doc="the input lies beyond factor x the reference set's own leave-one-out nearest-neighbour "
                  "distance quantile (absent when disabled or without context)"),
    FieldSpec("context.radius_to_distance_ratio", "number", nullable=True,
              doc="radius_threat / distance to the nearest reference sample of another class"),
    FieldSpec("context.radius_percentile", "number", hi=100.0, nullable=True,
              doc="percentile of radius_threat among the reference radii"),
)}

OPS = {
    "eq": operator.eq, "ne": operator.ne, "lt": operator.lt,
    "le": operator.le, "gt": operator.gt, "ge": operator.ge,
}
BOOL_OPS = ("eq", "ne")


def check_condition(field: str, op: str, value: Any) -> None:
    """Raise ValueError if ``field op value`` is not a well-typed condition."""
    spec = FIELDS.get(field)
    if spec is None:
        close = difflib.get_close_matches(field, FIELDS, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"{field!r} is not a rule field (see policies/README.md){hint}")
    if op not in OPS:
        raise ValueError(f"op {op!r} is not one of {', '.join(OPS)}")
    if spec.kind == "bool":
        if not isinstance(value, bool):
            raise ValueError(f"{field} is true/false; value must be a boolean, got {value!r}")
        if op not in BOOL_OPS:
            raise ValueError(f"{field} is true/false; use op eq or ne, not {op}")
    else:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"{field} is a number; value must be a finite number, got {value!r}")


def holds(field: str, op: str, value: Any, facts: dict[str, Any]) -> bool:
    """Whether ``facts[field] op value``; False when the fact is absent."""
    fact = facts.get(field)
    if fact is None:
        return False
    return bool(OPS[op](fact, value))

"""Risk signals, each a number in [0, 1] with the inputs that produced it.

certificate_risk
    1 when the certificate abstains. Otherwise a decreasing function of
    ``t = radius_threat / epsilon`` (radius already converted to the threat norm):

    * ``exponential``: ``r(t) = 2 ** (-t / half_life)``  (r(0) = 1, r(half_life) = 1/2)
    * ``linear``:      ``r(t) = max(0, 1 - t / zero_at)`` (r(0) = 1, r(zero_at) = 0)

    A decide-mode certificate that did not certify gets no credit past epsilon:
    ``t`` is capped at 1, so an uncertified sample always scores at least r(1).

upstream_risk
    The event's value when it is a finite number in [0, 1]; anything else (missing,
    NaN, out of range, not a number, a boolean) uses the policy's stated default and
    is ``flagged`` with the reason. Never silently zero.

context_risk
    Puts the radius beside the data (``riskpipe.context``). With ``ratio =
    radius_threat / d_other`` (distance from the input to the nearest reference
    sample of another class) and ``pct`` its percentile among reference radii::

        coverage = min(1, ratio / 0.5)       # 1 once the ball reaches halfway to d_other
        r = w * (1 - coverage) + (1 - w) * (1 - pct / 100)

    ``w = ratio_weight``. Half the distance is the meaningful yardstick: the
    nearest-neighbour label between two reference samples flips at the midpoint. If
    only one of ratio and percentile is known, that term alone is used; with neither
    (no context) the policy's default applies and the signal is flagged. A larger
    distance never lowers it (the ratio term is non-decreasing in ``d_other``; at
    ``d_other = 0`` it takes its limit: 0 for a positive radius, 1 for radius 0).

support_risk
    How far the input lies outside the reference set's support. With ``d`` the distance
    to the nearest reference sample of any class and ``q`` the reference set's own
    leave-one-out nearest-neighbour distance at the policy's ``quantile``
    (``riskpipe.context``)::

        ratio = d / q;  r = min(1, ratio / factor);  out_of_support = ratio > factor

    Non-decreasing in ``d``. It does not enter the score (in-support decisions are
    unchanged); rules read ``signals.support_risk.out_of_support`` (the shipped
    policies route it to review with reason ``out_of_support``).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, TypeGuard

if TYPE_CHECKING:
    from riskpipe.policy.schema import CertificateRiskSignal, ContextRiskSignal, SupportRiskSignal, UpstreamRiskSignal


def _finite_number(v: Any) -> TypeGuard[float]:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return False
    return isinstance(v, int) or math.isfinite(v)  # an int is finite (isfinite overflows past a double)


def json_safe(v: Any) -> Any:
    """A value as it may appear in a record (canonical JSON forbids NaN)."""
    if v is None or isinstance(v, (bool, str)) or _finite_number(v):
        return v
    text = repr(v)
    return text if len(text) <= 64 else text[:61] + "..."


def certificate_risk(cfg: CertificateRiskSignal, abstained: bool, radius_threat: float, epsilon: float,
                     certified: bool) -> dict[str, Any]:
    if abstained:
        return {"value": 1.0, "abstained": True, "radius_threat": 0.0, "epsilon": epsilon, "t": 0.0,
                "function": cfg.function, "flagged": False}
    t = radius_threat / epsilon
    if not certified:
        t = min(t, 1.0)
    value = _curve(cfg, t)
    return {"value": value, "abstained": False, "radius_threat": radius_threat, "epsilon": epsilon, "t": t,
            "function": cfg.function, "flagged": False}


def _curve(cfg: CertificateRiskSignal, t: float) -> float:
    if cfg.function == "exponential":
        return float(2.0 ** (-t / cfg.half_life))
    return float(max(0.0, 1.0 - t / cfg.zero_at))


def certificate_risk_floor(cfg: CertificateRiskSignal) -> float:
    """The least certificate risk an uncertified sample can get: r(1)."""
    return _curve(cfg, 1.0)


def upstream_risk(cfg: UpstreamRiskSignal, raw: Any) -> dict[str, Any]:
    if raw is None:
        reason = "missing"
    elif isinstance(raw, bool) or not isinstance(raw, (int, float)):
        reason = "not_a_number"
    elif isinstance(raw, float) and not math.isfinite(raw):
        reason = "non_finite"
    elif not 0.0 <= raw <= 1.0:
        reason = "out_of_range"
    else:
        return {"value": float(raw), "raw": float(raw), "default": cfg.default, "flagged": False,
                "malformed": False}
    # malformed (given, but no number in [0, 1]) is told apart from missing: a pipeline without
    # an upstream detector sends none on every event, while "2", NaN or "high" is a broken one
    return {"value": cfg.default, "raw": json_safe(raw), "default": cfg.default, "flagged": True,
            "malformed": reason != "missing", "reason": reason}


def context_risk(cfg: ContextRiskSignal, context: Any, radius_threat: float) -> dict[str, Any]:
    """``context`` as ``ContextIndex.context`` returns it; the ratio is recomputed from
    the stored distance so that a replay under another threat model stays consistent."""
    ratio: float | None = None
    pct: float | None = None
    ratio_term: float | None = None
    if isinstance(context, dict):
        d = context.get("nearest_other_class_distance")
        if _finite_number(d) and d > 0:
            ratio = radius_threat / d
            ratio_term = 1.0 - min(1.0, ratio / 0.5)
        elif _finite_number(d) and d == 0:  # the limit as d -> 0, so a larger d never lowers the risk
            ratio_term = 0.0 if radius_threat > 0 else 1.0
        p = context.get("radius_percentile")
        if _finite_number(p) and 0.0 <= p <= 100.0:
            pct = float(p)
    out: dict[str, Any] = {"radius_to_distance_ratio": ratio, "radius_percentile": pct,
                           "ratio_weight": cfg.ratio_weight}
    pct_term = None if pct is None else 1.0 - pct / 100.0
    if ratio_term is None or pct_term is None:  # one term alone, or neither (the default, flagged)
        single = pct_term if ratio_term is None else ratio_term
        if single is None:
            reason = "missing" if context is None else "malformed"
            return {**out, "value": cfg.default, "default": cfg.default, "flagged": True, "reason": reason}
        value = single
    else:
        value = cfg.ratio_weight * ratio_term + (1.0 - cfg.ratio_weight) * pct_term
    return {**out, "value": float(min(1.0, max(0.0, value))), "flagged": False}


def support_risk(cfg: SupportRiskSignal, context: Any) -> dict[str, Any]:
    """``context`` as ``ContextIndex.context`` returns it (see the module docstring)."""
    d = q = None
    if isinstance(context, dict):
        d, q = context.get("nearest_reference_distance"), context.get("support_reference_distance")
    out: dict[str, Any] = {"nearest_reference_distance": d if _finite_number(d) else None,
                           "support_reference_distance": q if _finite_number(q) else None,
                           "quantile": cfg.quantile, "factor": cfg.factor}
    if d == math.inf and _finite_number(q):  # beyond any float: as far out of support as it gets
        return {**out, "ratio": None, "value": 1.0, "out_of_support": True, "flagged": False}
    if not (_finite_number(d) and d >= 0 and _finite_number(q) and q >= 0):
        reason = "missing" if context is None else "malformed"
        return {**out, "ratio": None, "value": cfg.default, "default": cfg.default, "out_of_support": None,
                "flagged": True, "reason": reason}
    ratio = d / q if q > 0 else (math.inf if d > 0 else 0.0)
    return {**out, "ratio": ratio if math.isfinite(ratio) else None, "value": float(min(1.0, ratio / cfg.factor)),
            "out_of_support": bool(ratio > cfg.factor), "flagged": False}

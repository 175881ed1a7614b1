"""Combiners: signals in [0, 1] and weights -> one score in [0, 1].

* ``weighted_mean``: ``score = sum(w_i * s_i) / sum(w_i)``      (w_i >= 0, sum > 0)
* ``max``:           ``score = max(w_i * s_i)``                  (w_i in [0, 1])
* ``noisy_or``:      ``score = 1 - prod(1 - w_i * s_i)``         (w_i in [0, 1])

Each is non-decreasing in every signal and bounded in [0, 1] under those weight
constraints (which the loader enforces). Signals that are absent (context disabled)
take no part. ``combine`` returns the score and the formula with the numbers filled
in, which goes into every decision's explanation.
"""

from __future__ import annotations

import math

FORMULAS = {
    "weighted_mean": "sum(w_i * s_i) / sum(w_i)",
    "max": "max(w_i * s_i)",
    "noisy_or": "1 - prod(1 - w_i * s_i)",
}


def combine(combiner: str, values: dict[str, float], weights: dict[str, float]) -> tuple[float, str]:
    names = [n for n in values if weights.get(n, 0.0) > 0.0]
    terms = [(weights[n], values[n], n) for n in names]
    if combiner == "weighted_mean":
        total = sum(w for w, _, _ in terms)
        score = sum(w * s for w, s, _ in terms) / total if total > 0 else 0.0
        shown = " + ".join(f"{w:g}*{s:.4g}" for w, s, _ in terms)
        filled = f"({shown}) / {total:g}"
    elif combiner == "max":
        score = max((w * s for w, s, _ in terms), default=0.0)
        filled = "max(" + ", ".join(f"{w:g}*{s:.4g}" for w, s, _ in terms) + ")"
    elif combiner == "noisy_or":
        score = 1.0 - math.prod(1.0 - w * s for w, s, _ in terms)
        filled = "1 - " + "".join(f"(1 - {w:g}*{s:.4g})" for w, s, _ in terms)
    else:  # the schema admits only the three above
        raise ValueError(f"combiner: {combiner!r} is not one of {', '.join(FORMULAS)}")
    # NaN (inf / inf, 0 * inf) is the highest risk: max(0.0, nan) is 0.0, the lowest, which allowed;
    # so is a score of no signal at all (every weighted one disabled: the loader refuses that policy)
    score = 1.0 if math.isnan(score) or not terms else float(min(1.0, max(0.0, score)))
    legend = ", ".join(f"s_{i + 1}={n}" for i, (_, _, n) in enumerate(terms))
    return score, f"score = {combiner} = {FORMULAS[combiner]} = {filled} = {score:.4f} ({legend})"

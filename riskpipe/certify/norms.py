"""Threat-model norms (position paper, Theorem 2).

An l_p certificate of radius r_p covers an l_q attacker only out to
``r_q = min(d**(1/q - 1/p), 1) * r_p`` for inputs of dimension d: the largest l_q
ball that fits inside the l_p ball of radius r_p. So an l2 certificate of size r is
*not* an l_inf certificate of size r; it is one of size r / sqrt(d).
"""

from __future__ import annotations

import numpy as np

_INV = {"l1": 1.0, "l2": 0.5, "linf": 0.0}  # 1/p for each norm name


def check_norm(norm: str) -> str:
    aliases = {"1": "l1", "2": "l2", "inf": "linf", "l_inf": "linf", "linfty": "linf"}
    n = aliases.get(str(norm).lower(), str(norm).lower())
    if n not in _INV:
        raise ValueError(f"norm: {norm!r} is not one of l1, l2, linf")
    return n


def conversion_factor(p: str, q: str, d: int) -> float:
    """Factor f with r_q = f * r_p: the l_q ball of radius f*r lies inside the l_p ball of radius r."""
    p, q = check_norm(p), check_norm(q)
    if d < 1:
        raise ValueError(f"d: input dimension must be >= 1, got {d}")
    return float(min(d ** (_INV[q] - _INV[p]), 1.0))


def convert_radius(radius: float, p: str, q: str, d: int) -> float:
    """Theorem 2: the l_q radius certified by an l_p certificate of ``radius``."""
    return float(radius) * conversion_factor(p, q, d)


def vector_norm(v: np.ndarray, norm: str) -> np.ndarray:
    """Norm of each row of a (batch, ...) array."""
    flat = np.asarray(v, dtype=np.float64).reshape(len(v), -1)
    order = {"l1": 1, "l2": 2, "linf": np.inf}[check_norm(norm)]
    norms: np.ndarray = np.linalg.norm(flat, ord=order, axis=1)
    return norms

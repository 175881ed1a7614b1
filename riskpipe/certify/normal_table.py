"""The sound sampler's inverse-CDF table, exactly and fast.

The table (riskpipe.certify.samplers, step 4 of the soundness argument) is the integers

    T_i = ceil(2^62 * Phi((i + 1/2) / s)),   i = -J .. J-1,   s = sigma / h,

and it must be exact: it *defines* the noise distribution the certificate speaks about.
Evaluating Phi in 60-digit arithmetic (mpmath) per entry is exact but costs about
100 µs an entry; a fine grid (65,280 levels of [0, 1] at sigma 0.25: s = 16,320,
2J = 326,400 entries) took 23–46 s at every start. Here the same integers come from
about a thousand mpmath evaluations:

1. Anchors. The entries are cut into segments of ``m`` consecutive i, so that every
   point lies within |t| <= 0.1 of its segment's anchor y0 (an entry's own y). At each
   anchor mpmath gives Phi(y0) and the Taylor coefficients of Phi around it,
   c_k = phi(y0) (-1)^(k-1) He_(k-1)(y0) / k!  (He: probabilists' Hermite polynomials),
   to 40 digits.
2. Every entry: Phi(y0 + t) = Phi(y0) + sum_(k=1..K) c_k t^k, t = (i - i0) / s, K = 24,
   evaluated for all entries at once by Horner's rule: the terms k <= 10 in
   double-double arithmetic (pairs of float64, about 106 bits; Dekker/Knuth error-free
   transformations), the smaller ones before them in float64.
   Bounds, with |He_n(x)| e^(-x^2/4) <= 1.0865 sqrt(n!) (Cramér's inequality), hence
   |c_k| <= 0.44 sqrt((k-1)!) / k!: the Lagrange remainder is below
   0.44 sqrt(K!) 0.1^(K+1) / (K+1)! < 1e-38 (``TRUNCATION_BOUND``); the float64 part
   sums terms below |c_11| <= 1e-4, so its rounding (1e-20) enters multiplied by
   t^11 <= 1e-11; the double-double steps on values below 1 add well under 1e-28.
   Together far below 2^-82, i.e. 2^-20 of one table unit.
3. Exactness. 2^62 times the double-double value is split into an integer and a
   remainder r; T_i = integer + ceil(r). Wherever r lies within 2^-20 of an integer
   (where the error of step 2 could decide the ceiling) the entry is recomputed by the
   60-digit formula itself; elsewhere the ceiling is the exact one.

The result equals the direct formula entry for entry (tests/test_samplers.py compares
them), so certificates, their margins and replays do not change.
"""

from __future__ import annotations

import math
from typing import Any

import mpmath
import numpy as np

K = 24  # Taylor terms
K_DD = 10  # terms k <= K_DD are summed in double-double, the smaller ones before them in float64
T_MAX = 0.1  # the farthest an entry's y lies from its anchor
TRUNCATION_BOUND = 0.44 * math.sqrt(math.factorial(K)) * T_MAX ** (K + 1) / math.factorial(K + 1)
AMBIGUOUS = 2.0 ** -20  # in table units: closer than this to an integer, recompute directly
# 2J table entries (int64): 2^21 are 16 MB and build in about a second
# (bench/bench_sound_table.py); 65,280 levels of [0, 1] at sigma 0.25 need 326,400.
MAX_TABLE_ENTRIES = 1 << 21
TAIL_SIGMAS = 10.0  # J h >= 10 sigma
_SPLIT = 134217729.0  # 2^27 + 1


# ---- double-double arithmetic on numpy arrays: (hi, lo) with |lo| <= ulp(hi) / 2 ----------
DD = tuple[np.ndarray, np.ndarray]  # a double-double: (hi, lo)


def _two_sum(a: np.ndarray, b: np.ndarray) -> DD:
    s = a + b
    bb = s - a
    return s, (a - (s - bb)) + (b - bb)


def _quick_two_sum(a: np.ndarray, b: np.ndarray) -> DD:
    s = a + b
    return s, b - (s - a)


def _split(a: np.ndarray) -> DD:
    t = _SPLIT * a
    hi = t - (t - a)
    return hi, a - hi


def _two_prod(a: np.ndarray, b: np.ndarray) -> DD:
    p = a * b
    ah, al = _split(a)
    bh, bl = _split(b)
    return p, ((ah * bh - p) + ah * bl + al * bh) + al * bl


def _dd_mul(ah: np.ndarray, al: np.ndarray, bh: np.ndarray, bl: np.ndarray) -> DD:
    p, e = _two_prod(ah, bh)
    return _quick_two_sum(p, e + (ah * bl + al * bh))


def _dd_add(ah: np.ndarray, al: np.ndarray, bh: np.ndarray, bl: np.ndarray) -> DD:
    s, e = _two_sum(ah, bh)
    t, f = _two_sum(al, bl)
    s, e = _quick_two_sum(s, e + t)
    return _quick_two_sum(s, e + f)


def _dd(x: Any) -> tuple[float, float]:
    """An mpmath number as a double-double."""
    hi = float(x)
    return hi, float(x - hi)


# ---- the table -----------------------------------------------------------------------------
def table_entries(sigma_over_h: float, tail_sigmas: float = TAIL_SIGMAS) -> int:
    """2J, the size of the noise table for noise of sigma / h grid steps."""
    return 2 * max(1, math.ceil(tail_sigmas * sigma_over_h))


def check_table(sigma: float, step: float, tail_sigmas: float = TAIL_SIGMAS) -> None:
    """ValueError naming ``grid_step`` when the table for ``sigma`` on a grid of ``step``
    would exceed ``MAX_TABLE_ENTRIES`` (a policy, a model's range and sigma decide it)."""
    ratio = sigma / step
    n = table_entries(ratio, tail_sigmas) if math.isfinite(ratio) else math.inf
    if n > MAX_TABLE_ENTRIES:
        raise ValueError(f"grid_step: a grid of step {step:.6g} for sigma {sigma:g} needs a noise table of "
                         f"{n:.0f} entries (20 sigma / step); at most {MAX_TABLE_ENTRIES}: use fewer grid_levels, "
                         "a larger grid_step or a smaller sigma")


def direct(i: int, s: float, bits: int) -> int:
    """ceil(2^bits * Phi((i + 1/2) / s)) in 60-digit arithmetic (the defining formula)."""

    with mpmath.workdps(60):
        return int(mpmath.ceil(mpmath.mpf(2) ** bits * mpmath.ncdf((i + mpmath.mpf(0.5)) / mpmath.mpf(s))))


def thresholds(s: float, J: int, bits: int) -> np.ndarray:
    """T_i = ceil(2^bits * Phi((i + 1/2) / s)) for i = -J .. J-1, as int64 (see the module docstring).

    Only i >= 0 is computed: Phi(-y) = 1 - Phi(y), so T_(-i-1) = 2^bits + 1 - T_i whenever
    2^bits Phi(y_i) is not an integer, which step 3 makes sure of (an entry within 2^-20
    of an integer is computed directly, and so is its mirror)."""
    upper, near = _upper_half(s, J, bits)
    lower = (1 << bits) + 1 - upper[::-1]
    for j in np.flatnonzero(near[::-1]).tolist():
        lower[j] = direct(j - J, s, bits)
    return np.concatenate([lower, upper])


def _upper_half(s: float, J: int, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """(T_i for i = 0 .. J-1, which of them were within 2^-20 of an integer before the ceiling)."""

    idx = np.arange(0, J, dtype=np.int64)
    m = max(1, int(2 * T_MAX * s))  # entries per anchor: |i - i0| <= m / 2, so |t| <= T_MAX
    if m == 1:  # a coarse grid: every entry is an anchor, the formula itself is as cheap
        return np.array([direct(int(i), s, bits) for i in idx], dtype=np.int64), np.ones(J, dtype=bool)
    n_seg = -(-len(idx) // m)
    anchor = np.arange(n_seg, dtype=np.int64) * m + m // 2
    coef = np.zeros((2, n_seg, K + 1))  # (hi, lo) of Phi(y0) and c_1 .. c_K per anchor
    with mpmath.workdps(40):
        ms = mpmath.mpf(s)
        for a, i0 in enumerate(anchor.tolist()):
            y = (i0 + mpmath.mpf(0.5)) / ms
            pdf = mpmath.npdf(y)
            coef[:, a, 0] = _dd(mpmath.ncdf(y))
            he_prev, he = mpmath.mpf(0), mpmath.mpf(1)  # He_-1 (unused), He_0
            fact = mpmath.mpf(1)
            for k in range(1, K + 1):  # c_k = phi (-1)^(k-1) He_(k-1) / k!
                fact *= k
                coef[:, a, k] = _dd((-1) ** (k - 1) * pdf * he / fact)
                he_prev, he = he, y * he - (k - 1) * he_prev  # He_k = y He_(k-1) - (k-1) He_(k-2)
    seg = idx // m
    k_off = (idx - anchor[seg]).astype(np.float64)  # |k_off| <= m / 2, exact in float64
    th = k_off / s  # t = k_off / s as a double-double: th + tl
    p, e = _two_prod(th, np.full_like(th, s))
    tl = ((k_off - p) - e) / s
    v = coef[0, seg, K]
    for k in range(K - 1, K_DD, -1):  # Horner: (((c_K t + c_(K-1)) t + ...) + c_1) t
        v = v * th + coef[0, seg, k]
    vh, vl = _quick_two_sum(v * th, np.zeros_like(v))
    vh, vl = _dd_add(vh, vl, coef[0, seg, K_DD], coef[1, seg, K_DD])
    for k in range(K_DD - 1, 0, -1):
        vh, vl = _dd_mul(vh, vl, th, tl)
        vh, vl = _dd_add(vh, vl, coef[0, seg, k], coef[1, seg, k])
    vh, vl = _dd_mul(vh, vl, th, tl)
    vh, vl = _dd_add(vh, vl, coef[0, seg, 0], coef[1, seg, 0])
    scale = float(2 ** bits)
    hi, lo = vh * scale, vl * scale  # exact: a power of two
    whole = np.floor(hi)
    r = (hi - whole) + lo  # hi - floor(hi) is exact; |r| < 2^9 for bits = 62
    up = np.ceil(r)
    out = whole.astype(np.int64) + up.astype(np.int64)
    near = np.minimum(r - np.floor(r), up - r) < AMBIGUOUS
    for j in np.flatnonzero(near).tolist():
        out[j] = direct(int(idx[j]), s, bits)
    return out, near

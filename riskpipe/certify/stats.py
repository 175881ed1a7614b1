"""Binomial confidence bounds and the sequential test schedule (pure, scipy-based).

All bounds are exact (Clopper–Pearson, via the beta distribution) or Goodman's
simultaneous multinomial intervals; nothing here is a hand-rolled special function.
Functions accept scalars or numpy arrays.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import overload

import numpy as np
from scipy import stats

Arr = float | np.ndarray  # a scalar, or an array (broadcast against the others)


@overload
def clopper_pearson_lower(k: float, n: float, alpha: float) -> float: ...
@overload
def clopper_pearson_lower(k: np.ndarray, n: Arr, alpha: Arr) -> np.ndarray: ...
def clopper_pearson_lower(k: Arr, n: Arr, alpha: Arr) -> float | np.ndarray:
    """One-sided lower confidence bound on a binomial p at level 1 - alpha.

    P(p >= bound) >= 1 - alpha. Equals Beta(alpha; k, n - k + 1) quantile; 0 when k = 0.
    """
    k, n = np.asarray(k, dtype=float), np.asarray(n, dtype=float)
    with np.errstate(invalid="ignore"):
        b = stats.beta.ppf(alpha, k, n - k + 1)
    out = np.where(k <= 0, 0.0, b)
    return float(out) if out.ndim == 0 else out


@overload
def clopper_pearson_upper(k: float, n: float, alpha: float) -> float: ...
@overload
def clopper_pearson_upper(k: np.ndarray, n: Arr, alpha: Arr) -> np.ndarray: ...
def clopper_pearson_upper(k: Arr, n: Arr, alpha: Arr) -> float | np.ndarray:
    """One-sided upper confidence bound on a binomial p at level 1 - alpha; 1 when k = n."""
    k, n = np.asarray(k, dtype=float), np.asarray(n, dtype=float)
    with np.errstate(invalid="ignore"):
        b = stats.beta.ppf(1 - alpha, k + 1, n - k)
    out = np.where(k >= n, 1.0, b)
    return float(out) if out.ndim == 0 else out


def goodman_intervals(counts: Arr, alpha: float) -> tuple[np.ndarray, np.ndarray]:
    """Simultaneous (1 - alpha) confidence intervals for all multinomial proportions
    (Goodman 1965): each class uses the chi-square(1) quantile at 1 - alpha/K.

    Returns (lower, upper) arrays of the same length as ``counts``.
    """
    c = np.asarray(counts, dtype=float)
    n, k = c.sum(), len(c)
    a = stats.chi2.ppf(1 - alpha / k, 1)
    half = np.sqrt(a * (a + 4 * c * (n - c) / n))
    lower = (a + 2 * c - half) / (2 * (n + a))
    upper = (a + 2 * c + half) / (2 * (n + a))
    return np.clip(lower, 0.0, 1.0), np.clip(upper, 0.0, 1.0)


@overload
def radius_from_p(p_lower: float, sigma: float) -> float: ...
@overload
def radius_from_p(p_lower: np.ndarray, sigma: Arr) -> np.ndarray: ...
def radius_from_p(p_lower: Arr, sigma: Arr) -> float | np.ndarray:
    """Cohen et al.'s l2 radius sigma * Phi^-1(p_lower); 0 where p_lower <= 1/2."""
    p = np.asarray(p_lower, dtype=float)
    r = np.where(p > 0.5, sigma * stats.norm.ppf(np.clip(p, 0.5, 1.0)), 0.0)
    return float(r) if r.ndim == 0 else r


def max_radius(sigma: float, alpha: float, n: int) -> float:
    """The largest radius smoothing can report from ``n`` samples at level ``alpha``:
    every sample for the top class gives the Clopper-Pearson bound alpha ** (1 / n)."""
    return radius_from_p(clopper_pearson_lower(n, n, alpha), sigma)


@overload
def radius_two_class(p_a_lower: float, p_b_upper: float, sigma: float) -> float: ...
@overload
def radius_two_class(p_a_lower: np.ndarray, p_b_upper: Arr, sigma: Arr) -> np.ndarray: ...
def radius_two_class(p_a_lower: Arr, p_b_upper: Arr, sigma: Arr) -> float | np.ndarray:
    """Seed eq. (4): sigma/2 * (Phi^-1(p_A_lower) - Phi^-1(p_B_upper)); 0 where not positive."""
    pa, pb = np.asarray(p_a_lower, float), np.asarray(p_b_upper, float)
    with np.errstate(divide="ignore", invalid="ignore"):
        r = sigma / 2 * (stats.norm.ppf(pa) - stats.norm.ppf(pb))
    r = np.where(np.isfinite(r) & (r > 0), r, 0.0)
    return float(r) if r.ndim == 0 else r


def binomial_test_pvalue(k_a: int, k_b: int) -> float:
    """Two-sided binomial test of k_a against k_b at p = 1/2 (Cohen's PREDICT)."""
    if k_a + k_b == 0:
        return 1.0
    return float(stats.binomtest(int(k_a), int(k_a + k_b), 0.5).pvalue)


@dataclass(frozen=True)
class SequentialPlan:
    """When to look and what counts decide, for the test H0: p_A < tau.

    tau = Phi(epsilon / sigma): the smoothed radius is >= epsilon iff p_A >= tau.
    At look r (cumulative n_r samples) the top count k certifies when
    k >= accept[r] (i.e. the Clopper–Pearson lower bound at alpha_r is >= tau) and
    gives up when k <= reject[r] (the upper bound at alpha_r is < tau).

    Alpha accounting (why certifying is wrong with probability <= alpha):
    the class under test is the top count at each look, so a wrong certificate
    needs some look r and some class c with p_c < tau and count_c(r) >= accept[r].
    Union over looks and classes. For the most probable class c* (p_c* < tau in the
    bad case) each look contributes at most alpha_r, by monotonicity of the binomial
    tail in p. Every other class has p_c <= 1/2; because accept[r] >= (n_r + 1)/2 the
    tail f_r(p) = P(Bin(n_r, p) >= accept[r]) is convex on [0, 1/2] with f_r(0) = 0,
    so f_r(p) <= 2p f_r(1/2) and those classes together add at most 2 f_r(1/2).
    Hence P(wrong) <= sum_r alpha_r + 2 sum_r f_r(1/2) = ``error_bound`` <= alpha,
    which the constructor checks (shrinking alpha_r, or falling back to a
    Bonferroni split over the classes when tau is close to 1/2). The same union
    covers the reported radius (Clopper–Pearson lower bound at the deciding look).
    The ``reject`` side can only withhold certificates, never make a wrong one.

    ``tau_margin`` (a sampler's total-variation margin eta, see
    ``riskpipe.certify.samplers``) raises the tested threshold to tau + eta: the
    counts are binomial in the implemented probability q_A, |q_A - p_A| <= eta, so
    q_A >= tau + eta established at level alpha implies p_A >= tau at that level.

    Budget-aware futility: certifying at the last look (the budget) needs a top
    fraction of at least ``accept[-1] / looks[-1]``. At look r an input whose
    Clopper–Pearson upper bound (level ``futility``) is below that fraction will
    almost surely not be certified within the budget, so it stops there with
    reason ``budget`` (``futile[r]`` is the largest such count). Like ``reject`` this
    only withholds certificates; it never makes one, so it costs no alpha.
    """

    tau: float
    alpha: float
    looks: tuple[int, ...]
    alphas: tuple[float, ...]
    accept: tuple[int, ...]
    reject: tuple[int, ...]
    error_bound: float
    selection: str
    futile: tuple[int, ...] = ()

    @classmethod
    def build(cls, epsilon: float, sigma: float, alpha: float, max_samples: int,
              first: int = 48, growth: float = 2.0, num_classes: int = 10,
              futility: float | None = 0.01, tau_margin: float = 0.0) -> SequentialPlan:
        if not (epsilon >= 0 and sigma > 0 and 0 < alpha < 1):
            raise ValueError("epsilon >= 0, sigma > 0 and 0 < alpha < 1 are required")
        if max_samples < 1 or first < 1 or growth <= 1:
            raise ValueError("max_samples >= 1, first >= 1 and growth > 1 are required")
        if not 0 <= tau_margin < 0.5:
            raise ValueError(f"tau_margin: must lie in [0, 1/2), got {tau_margin}")
        tau = min(float(stats.norm.cdf(epsilon / sigma)) + tau_margin, 1.0)
        looks: list[int] = []
        n = float(min(first, max_samples))
        while True:
            looks.append(int(min(round(n), max_samples)))
            if looks[-1] >= max_samples:
                break
            n *= growth
        looks_a = np.array(sorted(set(looks)))
        w = 0.5 ** np.arange(1, len(looks_a) + 1)
        w = w / w.sum()
        for shrink in (0.99, 0.95, 0.9, 0.8, 0.6):
            alphas = alpha * shrink * w
            accept = _accept(looks_a, tau, alphas)
            if np.all(2 * accept >= looks_a + 1):
                err = alphas.sum() + 2 * stats.binom.sf(accept - 1, looks_a, 0.5).sum()
                if err <= alpha:
                    return cls._make(tau, alpha, looks_a, alphas, accept, float(err), "top-class", futility)
        alphas = alpha * w / num_classes  # Bonferroni over the classes: always valid
        accept = _accept(looks_a, tau, alphas)
        err = float(num_classes * alphas.sum())
        return cls._make(tau, alpha, looks_a, alphas, accept, err, f"bonferroni-{num_classes}", futility)

    @classmethod
    def _make(cls, tau: float, alpha: float, looks: np.ndarray, alphas: np.ndarray, accept: np.ndarray, err: float,
              selection: str, futility: float | None) -> SequentialPlan:
        reject = stats.binom.ppf(alphas, looks, tau).astype(int)
        # ppf gives the smallest k with cdf(k) >= alpha_r; step back where cdf exceeds it
        reject = np.where(stats.binom.cdf(reject, looks, tau) > alphas, reject - 1, reject)
        futile = np.full(len(looks), -1)
        if futility is not None and accept[-1] <= looks[-1]:
            needed = accept[-1] / looks[-1]
            # largest k with upper bound < needed, i.e. P(Bin(n, needed) <= k) <= futility
            k = stats.binom.ppf(futility, looks, needed).astype(int)
            futile = np.where(stats.binom.cdf(k, looks, needed) > futility, k - 1, k)
            futile[-1] = -1  # the last look decides by accept alone
        return cls(tau, alpha, tuple(int(x) for x in looks), tuple(float(a) for a in alphas),
                   tuple(int(a) for a in accept), tuple(int(r) for r in reject), float(err), selection,
                   tuple(int(f) for f in futile))


def _accept(looks: np.ndarray, tau: float, alphas: np.ndarray) -> np.ndarray:
    """Smallest k per look with P(Bin(n_r, tau) >= k) <= alpha_r (n_r + 1 if none)."""
    k = stats.binom.isf(alphas, looks, tau).astype(int) + 1
    # isf is the smallest k' with sf(k') <= alpha, sf(k') = P(X > k'); so X >= k'+1.
    ok = stats.binom.sf(k - 1, looks, tau) <= alphas
    k = np.where(ok, k, k + 1)
    out: np.ndarray = np.minimum(k, looks + 1)
    return out

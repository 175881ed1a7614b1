"""What ``riskpipe init`` measures about a model and its reference set, and the
smoothing noise (sigma) and threat-model budget (epsilon) it proposes from them.

Pure: arrays and a predict function in, dataclasses out. Inputs are in the space the
certificate lives in: raw for images, ``x / s`` for a tabular model with a per-feature
scale s (the caller passes the scaled reference set and the wrapped model's predict).

Why these rules:

* sigma: randomized smoothing certifies what the base classifier still gets right under
  N(0, sigma^2 I) noise, and larger sigma certifies larger radii (up to
  ``sigma * Phi^-1(alpha^(1/n))``). So the proposal is the *largest* sigma of a small
  grid at which the noisy accuracy stays within ``TOLERANCE`` of the clean accuracy.
  A model not trained with noise keeps nothing at any sigma; then the smallest sigma
  is proposed and the reasons say to retrain with Gaussian noise augmentation.
* epsilon: a radius of sigma needs p_A >= Phi(1) = 0.84, the regime where a
  noise-trained model certifies most clean inputs, so epsilon starts at sigma. It is
  capped at a quarter of the 5th percentile of the distance from a reference input to
  the nearest reference input of another class: between two such inputs the
  nearest-neighbour label flips at the midpoint, and a budget past a small fraction of
  that distance would class legitimate neighbours of other classes as attacks.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from sklearn.neighbors import NearestNeighbors
from threadpoolctl import threadpool_limits

from riskpipe.certify.samplers import F32_SLACK, float32_slack
from riskpipe.certify.stats import max_radius

SIGMAS = (0.12, 0.25, 0.5, 1.0)  # Cohen et al.'s grid (CIFAR-10 and ImageNet)
TOLERANCE = 0.05  # accuracy a proposed sigma may cost
DISTANCE_FRACTION = 0.25  # epsilon <= this * 5th percentile of the other-class distance
MAX_SURVEY = 2000  # reference inputs used for distances (seeded subsample beyond)
MAX_SWEEP = 256  # reference inputs in the noisy-accuracy sweep
NORMS = {"l2": "euclidean", "linf": "chebyshev"}


MAX_GRID_LEVELS = 65535  # 16-bit inputs
RESOLVABLE = 0.05  # a grid counts only where float32's slack is below this fraction of its step
UINT8_LEVELS = 255  # OIP UINT8 tensors: v -> lo + (hi - lo) * v / 255
# The sound sampler's model evaluations/s through the stage over the gaussian one's, measured
# side by side by bench/bench_sound.py (bench/results/sound.json, "stage"; a test keeps these
# in step with it).
SOUND_EVALS_IMAGE = 0.93  # the image example, 3x32x32 CNN, 8-bit grid, batches of 64
SOUND_EVALS_DEMO = 1.00  # demo digits 1x8x8 (its grid of 16 levels: a small table, cheap lookups)


class SurveyError(ValueError):
    """A reference set that cannot be surveyed; the message names the field and reason."""


@dataclass(frozen=True)
class Distances:
    """Distance from each reference input to the nearest one of another class."""

    norm: str
    p5: float
    p25: float
    median: float
    n: int


@dataclass(frozen=True)
class SweepPoint:
    sigma: float
    accuracy: float  # on inputs plus N(0, sigma^2 I) noise, averaged over draws


@dataclass(frozen=True)
class Survey:
    input_shape: tuple[int, ...]
    num_classes: int
    n_reference: int
    class_counts: dict[int, int]
    value_min: float  # raw units
    value_max: float
    clean_accuracy: float
    distances: dict[str, Distances]  # by norm, in certificate units
    sweep: list[SweepPoint]
    sweep_inputs: int
    sweep_seconds: float


@dataclass(frozen=True)
class Proposal:
    sigma: float
    epsilon: float
    max_radius: float  # largest radius decide mode can certify with max_samples at alpha
    reasons: list[str] = field(default_factory=list)  # why this sigma, why this epsilon
    notes: list[str] = field(default_factory=list)  # what else the numbers say


@dataclass(frozen=True)
class Grid:
    """Every reference value lies on lo + k * (hi - lo) / levels, k integer."""

    levels: int
    lo: float
    hi: float
    distinct: int  # distinct values in the reference set
    max_offset: float  # largest distance of a value from its grid point, in grid steps


@dataclass(frozen=True)
class SamplerProposal:
    sampler: str  # gaussian | sound
    grid_levels: int | None
    reasons: list[str] = field(default_factory=list)


def quantisation_grid(X: np.ndarray, lo: float, hi: float, max_levels: int = MAX_GRID_LEVELS) -> Grid | None:
    """The grid of [lo, hi] with the fewest levels L <= ``max_levels`` on which every value
    of X lies, or None.

    Exact: a value counts as on the grid only within float32's representation slack
    (``float32_slack``), never within a fraction of a step; and L is the smallest such
    integer, found by testing every candidate L against every distinct value (candidates
    die after a few values unless the data are on their grid). L stops where the slack
    reaches ``RESOLVABLE`` of a step (for [0, 1]: beyond 65535), since float32 could not
    tell a finer grid from none.
    """
    lo, hi = float(lo), float(hi)
    v = np.unique(np.asarray(X, dtype=np.float32)).astype(np.float64)
    width = hi - lo
    slack = float32_slack(np.abs(v), lo) / width  # in units of the range
    if not width > 0 or v[0] < lo - slack[0] * width or v[-1] > hi + slack[-1] * width:
        return None
    top = min(max_levels, math.floor(RESOLVABLE * width / (F32_SLACK * max(abs(lo), abs(hi)))))
    levels = np.arange(1, top + 1, dtype=np.float64)
    t = (v - lo) / width
    for start in range(0, len(t), 32):
        k = t[start:start + 32, None] * levels
        fits = (np.abs(k - np.round(k)) <= slack[start:start + 32, None] * levels).all(axis=0)
        levels = levels[fits]
        if len(levels) == 0:
            return None
    L = int(levels[0])
    offset = float(np.abs(t * L - np.round(t * L)).max())
    return Grid(levels=L, lo=lo, hi=hi, distinct=len(v), max_offset=offset)


def propose_sampler(grid: Grid | None, n_values: int, value_range: tuple[float, float] | None,
                    tabular: bool = False) -> SamplerProposal:
    """``sound`` with the measured grid when the reference set is quantised, else ``gaussian``
    (the schema's default, since nothing tells riskpipe that inputs are quantised); the
    reasons say why, what it costs, and what to declare to change it."""
    uint8 = (f"events sent as UINT8 Open Inference Protocol binary tensors (v -> lo + (hi - lo) * v / "
             f"{UINT8_LEVELS}) lie on the {UINT8_LEVELS}-level grid of the value range by construction")
    if grid is not None:
        lo, hi, L = grid.lo, grid.hi, grid.levels
        both = math.lcm(L, UINT8_LEVELS)
        uint8_note = (f"{uint8}, so they are on this grid too" if L % UINT8_LEVELS == 0 else
                      f"{uint8}; to accept them as well, set grid_levels: {both} (a multiple of both)"
                      if both <= MAX_GRID_LEVELS else f"{uint8}, which this grid does not hold: they go to the DLQ")
        return SamplerProposal("sound", L, [
            f"sampler sound, grid_levels {L}: all {n_values} reference values ({grid.distinct} distinct) lie on "
            f"the grid {lo:g} + k * ({hi:g} - {lo:g}) / {L} (largest offset {grid.max_offset:.2g} steps, float32 "
            "representation), so the sound sampler's certificates hold in floating point (Voráček & Hein 2023); "
            f"measured against the gaussian sampler side by side (bench/results/sound.json): "
            f"{SOUND_EVALS_IMAGE:.2f}x the gaussian sampler's model evaluations/s through the stage on the "
            f"3x32x32 image example, {SOUND_EVALS_DEMO:.2f}x on the 8x8 demo model. "
            f"Inputs off the grid go to the DLQ (reason off_grid); {uint8_note}"])
    declare = ("if your inputs are quantised, declare it: certifier.sampler: sound with grid_levels (steps of "
               "the declared value range) or grid_step; " + uint8 + " (grid_levels: 255)")
    if tabular:
        why = "tabular inputs are certified in standardized units x / s, where the features share no grid"
    elif value_range is None:
        why = "the model declares no single value range (lo, hi) to look for a quantisation grid in"
    else:
        why = (f"the reference values are on no grid {value_range[0]:g} + k * ({value_range[1]:g} - "
               f"{value_range[0]:g}) / L with L <= {MAX_GRID_LEVELS} up to float32 representation")
    return SamplerProposal("gaussian", None, [
        f"sampler gaussian: {why}. Its certificates are not floating-point sound (float Gaussian noise added in "
        f"floating point; Voráček & Hein 2023), and their scope says so; {declare}"])


def check_reference(X: np.ndarray, y: np.ndarray | None, input_shape: tuple[int, ...], num_classes: int,
                    source: str = "reference") -> tuple[np.ndarray, np.ndarray]:
    """``(X shaped (N, *input_shape) float32, y int64)``, or SurveyError naming the field."""
    if y is None:
        raise SurveyError(f"{source}: no array 'y'; init needs the labels of the reference inputs to measure "
                          "distances to the nearest other-class sample")
    X = np.asarray(X)
    n_features = int(np.prod(input_shape))
    if X.shape[1:] != tuple(input_shape):
        if X[0].size != n_features:
            raise SurveyError(f"{source}: X rows have shape {list(X.shape[1:])}, the model expects "
                              f"{list(input_shape)}")
        X = X.reshape((len(X),) + tuple(input_shape))
    y = np.asarray(y)
    if y.min() < 0 or y.max() >= num_classes:
        raise SurveyError(f"{source}: y holds labels in [{y.min()}, {y.max()}], the model has {num_classes} "
                          f"classes (0..{num_classes - 1})")
    if len(np.unique(y)) < 2:
        raise SurveyError(f"{source}: y holds one class only; distances to another class need at least two")
    return X.astype(np.float32), y.astype(np.int64)


def _subsample(n: int, k: int, seed: int) -> np.ndarray:
    if n <= k:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size=k, replace=False))


def other_class_distances(Z: np.ndarray, y: np.ndarray, norm: str) -> np.ndarray:
    """(N,) distance in ``norm`` from each row of Z to the nearest row of another class."""
    flat = Z.reshape(len(Z), -1)
    out = np.full(len(Z), np.inf)
    with threadpool_limits(limits=1):
        for c in np.unique(y):
            others = flat[y != c]
            nn = NearestNeighbors(n_neighbors=1, metric=NORMS[norm], algorithm="brute").fit(others)
            mine = y == c
            out[mine] = nn.kneighbors(flat[mine], return_distance=True)[0][:, 0]
    return out


def _distances(Z: np.ndarray, y: np.ndarray, norm: str) -> Distances:
    d = other_class_distances(Z, y, norm)
    p5, p25, med = np.percentile(d, [5, 25, 50])
    return Distances(norm=norm, p5=float(p5), p25=float(p25), median=float(med), n=len(d))


def noisy_accuracy(predict: Callable[[np.ndarray], np.ndarray], Z: np.ndarray, y: np.ndarray, sigma: float,
                   rng: np.random.Generator, draws: int = 4) -> float:
    """Accuracy of ``predict`` on Z + N(0, sigma^2 I), averaged over ``draws`` noise draws."""
    hits = 0
    for _ in range(draws):
        noisy = Z + sigma * rng.standard_normal(Z.shape).astype(np.float32)
        hits += int((np.asarray(predict(noisy)) == y).sum())
    return hits / (draws * len(Z))


def survey(predict: Callable[[np.ndarray], np.ndarray], X: np.ndarray, Z: np.ndarray, y: np.ndarray,
           num_classes: int, seed: int = 0, sigmas=SIGMAS, budget_s: float = 30.0) -> Survey:
    """Measure the reference set (X raw, Z in certificate units, y labels) and the model on it.

    The sweep runs sigmas in increasing order and stops early once ``budget_s`` is
    spent (at least one sigma is always measured); it stops too once the accuracy has
    fallen past the tolerance, since larger sigmas only lose more.
    """
    keep = _subsample(len(Z), MAX_SURVEY, seed)
    Zs, ys = Z[keep], y[keep]
    distances = {n: _distances(Zs, ys, n) for n in NORMS}
    sweep_idx = _subsample(len(Z), MAX_SWEEP, seed + 1)
    Zw, yw = Z[sweep_idx], y[sweep_idx]
    clean = float((np.asarray(predict(Zw)) == yw).mean())
    rng = np.random.default_rng(seed)
    points: list[SweepPoint] = []
    t0 = time.perf_counter()
    for sigma in sorted(sigmas):
        points.append(SweepPoint(float(sigma), noisy_accuracy(predict, Zw, yw, sigma, rng)))
        if points[-1].accuracy < clean - TOLERANCE or time.perf_counter() - t0 > budget_s:
            break
    counts = {int(c): int(k) for c, k in zip(*np.unique(y, return_counts=True))}
    return Survey(input_shape=tuple(X.shape[1:]), num_classes=num_classes, n_reference=len(X), class_counts=counts,
                  value_min=float(X.min()), value_max=float(X.max()), clean_accuracy=clean, distances=distances,
                  sweep=points, sweep_inputs=len(Zw), sweep_seconds=time.perf_counter() - t0)


def _round_down(x: float, digits: int = 2) -> float:
    """x rounded down to ``digits`` significant digits (a budget never grows by rounding)."""
    if x <= 0:
        return x
    scale = 10 ** (digits - 1 - math.floor(math.log10(x)))
    return math.floor(x * scale) / scale


def propose(s: Survey, alpha: float, max_samples: int, scaled: bool = False) -> Proposal:
    """sigma and epsilon (l2, certificate units) from a survey; ``reasons`` say why, with numbers."""
    unit = "standardized units (||delta / s||_2)" if scaled else "input units"
    ok = [p for p in s.sweep if p.accuracy >= s.clean_accuracy - TOLERANCE]
    tried = ", ".join(f"{p.sigma:g}: {p.accuracy:.3f}" for p in s.sweep)
    if ok:
        sigma = max(p.sigma for p in ok)
        reasons = [f"sigma {sigma:g}: the largest noise level at which accuracy stays within {TOLERANCE:g} of the "
                   f"clean {s.clean_accuracy:.3f} on {s.sweep_inputs} reference inputs (noisy accuracy by sigma: "
                   f"{tried}); larger sigma certifies larger radii"]
    else:
        sigma = min(p.sigma for p in s.sweep)
        reasons = [f"sigma {sigma:g}: no sigma keeps accuracy within {TOLERANCE:g} of the clean {s.clean_accuracy:.3f} "
                   f"(noisy accuracy by sigma: {tried}); the smallest is proposed. Train the model with Gaussian "
                   "noise augmentation at this sigma, or most inputs will abstain and go to review"]
    d = s.distances["l2"]
    cap = DISTANCE_FRACTION * d.p5
    epsilon = _round_down(min(sigma, cap))
    r_max = max_radius(sigma, alpha, max_samples)
    why = "sigma (a radius of sigma needs p_A >= Phi(1) = 0.84)" if sigma <= cap else \
        f"{DISTANCE_FRACTION:g} x the 5th percentile of the other-class distance"
    reasons.append(f"epsilon {epsilon:g} (l2, {unit}) = {why}: nearest reference input of another class at "
                   f"p5 {d.p5:.3g}, p25 {d.p25:.3g}, median {d.median:.3g}; the cap is {cap:.3g}; decide mode can "
                   f"certify at most {r_max:.3g} at sigma {sigma:g}, alpha {alpha:g}, {max_samples} samples")
    dim = int(np.prod(s.input_shape))
    li = s.distances["linf"]
    notes = [f"l_inf: nearest other class at p5 {li.p5:.3g}, median {li.median:.3g}; an l2 certificate of "
                   f"{epsilon:g} covers an l_inf attacker only out to {epsilon / math.sqrt(dim):.3g} "
                   f"(Theorem 2, d = {dim})"]
    if s.clean_accuracy < 0.5:
        notes.insert(0, f"clean accuracy on the reference set is only {s.clean_accuracy:.3f}: check that X is in the "
                        "units the model takes (e.g. [0, 1] rather than [0, 255]) and that y follows the model's "
                        "class order")
    return Proposal(sigma=float(sigma), epsilon=float(epsilon), max_radius=r_max, reasons=reasons, notes=notes)

"""Seeded black-box attacks for models without gradients (ONNX, scikit-learn other than trees).

* ``hop_skip_jump``: the decision-based HopSkipJump attack (Chen, Jordan & Wainwright,
  2020), the one ``riskpipe.attacks.attack_model`` runs. From an adversarial starting
  point it binary-searches to the decision boundary, estimates the boundary's normal
  from the labels of random probes around the boundary point (a Monte Carlo gradient
  estimate that needs only ``predict``), steps along it with a geometric step size and
  searches back to the boundary, closer to the input each round. All inputs advance in
  lockstep, each round's probes in one ``predict`` call.
* ``random_search``: random points on the surface of the budget ball (its first phase,
  and a baseline). Far weaker: it found 3 of 38 adversarial examples where PGD found 23
  on the same CNN (issue 20).

Only ``predict`` is called, ``queries`` times per input at most. Every adversarial
example either reports is genuine (checked against the model, inside the budget).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

NAME = "HopSkipJump (decision-based, black-box)"
RANDOM_SEARCH = "random search (black-box)"


def value_bounds(value_range) -> tuple[np.ndarray | np.float32, np.ndarray | np.float32]:
    """``(lo, hi)`` to clip attacked inputs to: the declared range (scalars, or arrays
    shaped like one input for per-feature ranges), or no bound when none is declared."""
    if value_range is None:
        return np.float32(-np.inf), np.float32(np.inf)
    lo, hi = value_range
    return np.asarray(lo, dtype=np.float32), np.asarray(hi, dtype=np.float32)


class Rows(NamedTuple):
    """An attack's inputs as flat rows: ``X`` (n, d) float32, the input ``shape``, labels
    ``y`` (int64), one budget per row ``eps`` (float64, a copy the attack may change) and
    the value bounds ``lo``, ``hi`` per feature."""

    X: np.ndarray
    shape: tuple[int, ...]
    y: np.ndarray
    eps: np.ndarray
    lo: np.ndarray
    hi: np.ndarray


def flat_rows(X: np.ndarray, y: np.ndarray, epsilon, value_range, bound_dtype=np.float32) -> Rows:
    """``X``, ``y``, ``epsilon`` (one budget or one per input) and ``value_range`` as the
    per-row attacks take them (``hop_skip_jump``, ``nes_pgd``, ``tree_attack``)."""
    X = np.asarray(X, dtype=np.float32)
    flat = X.reshape(len(X), -1)
    d = flat.shape[1]
    eps = np.broadcast_to(np.asarray(epsilon, dtype=np.float64), (len(X),)).copy()
    lo, hi = (np.broadcast_to(np.asarray(v, dtype=bound_dtype).reshape(-1) if np.ndim(v) else v, (d,))
              for v in value_bounds(value_range))
    return Rows(flat, X.shape, np.asarray(y, dtype=np.int64).reshape(-1), eps, lo, hi)


def _surface_point(shape: tuple[int, ...], eps: np.ndarray, norm: str, rng: np.random.Generator) -> np.ndarray:
    e = eps.reshape((-1,) + (1,) * (len(shape) - 1))
    if norm == "linf":
        return rng.choice(np.array([-1.0, 1.0], dtype=np.float32), size=shape) * e
    d = rng.standard_normal(shape).astype(np.float32)
    n = np.sqrt((d.reshape(len(d), -1) ** 2).sum(axis=1)).reshape(e.shape)
    return d / np.maximum(n, 1e-12) * e


def random_search(predict, X: np.ndarray, y: np.ndarray, epsilon, norm: str = "l2", queries: int = 100,
                  value_range=None, seed: int = 0) -> np.ndarray:
    """Adversarial candidates for ``predict`` (batch -> class ids), one per row of ``X``:
    the first of ``queries`` random points on the ``epsilon`` sphere (``norm`` l2 or linf;
    ``epsilon`` one budget or one per input) that changes the class away from ``y``, else
    the input unchanged. Returns float32 with the shape of ``X``."""
    if norm not in ("l2", "linf"):
        raise ValueError(f"norm: random search supports l2 or linf, got {norm!r}")
    if queries < 1:
        raise ValueError(f"queries: must be >= 1, got {queries}")
    X = np.asarray(X, dtype=np.float32)
    y = np.asarray(y, dtype=np.int64).reshape(-1)
    eps = np.broadcast_to(np.asarray(epsilon, dtype=np.float32), (len(X),)).copy()
    lo, hi = value_bounds(value_range)
    rng = np.random.default_rng(seed)
    out = X.copy()
    todo = np.flatnonzero(eps > 0)
    for _ in range(int(queries)):
        if len(todo) == 0:
            break
        cand = np.clip(X[todo] + _surface_point(X[todo].shape, eps[todo], norm, rng), lo, hi).astype(np.float32)
        fooled = np.asarray(predict(cand)) != y[todo]
        out[todo[fooled]] = cand[fooled]
        todo = todo[~fooled]
    return out


def _dist(D: np.ndarray, norm: str) -> np.ndarray:
    return np.abs(D).max(axis=1) if norm == "linf" else np.sqrt((D.astype(np.float64) ** 2).sum(axis=1))


def _toward(x: np.ndarray, a: np.ndarray, t: np.ndarray, norm: str) -> np.ndarray:
    """Points between x (t = 0) and a (t = 1): the blend (l2), or a clipped to the l_inf
    box of t * ||a - x||_inf around x (l_inf, HopSkipJump's projection)."""
    t = t[:, None]
    if norm == "l2":
        return (x + t * (a - x)).astype(np.float32)
    r = t * np.abs(a - x).max(axis=1, keepdims=True)
    return np.clip(a, x - r, x + r).astype(np.float32)


def hop_skip_jump(predict, X: np.ndarray, y: np.ndarray, epsilon, norm: str = "l2", queries: int = 1000,
                  value_range=None, seed: int = 0) -> np.ndarray:
    """Adversarial candidates for ``predict`` (batch -> class ids), one per row of ``X``: a
    point within ``epsilon`` (``norm`` l2 or linf; one budget or one per input) of the row
    that ``predict`` puts in another class than ``y``, found with about ``queries`` model
    calls per input (no new round starts past it; a round's last binary search may add
    a few), else the row unchanged. Float32 with the shape of ``X``.

    Budgeted HopSkipJump: the search minimises the distance to the boundary and stops
    for an input as soon as a genuine adversarial point lies within its budget."""
    if norm not in ("l2", "linf"):
        raise ValueError(f"norm: HopSkipJump supports l2 or linf, got {norm!r}")
    if queries < 20:
        raise ValueError(f"queries: HopSkipJump needs at least 20 per input, got {queries}")
    x0, shape, y, eps, lo, hi = flat_rows(X, y, epsilon, value_range)
    n, d = x0.shape
    rng = np.random.default_rng(seed)
    used = np.zeros(n, dtype=np.int64)
    out = x0.copy()
    done = eps <= 0

    def adversarial(P: np.ndarray, rows: np.ndarray) -> np.ndarray:
        used[rows] += 1
        return np.asarray(predict(P.reshape((len(P),) + shape[1:]))) != y[rows]

    # 1. a starting point per input: random points on the budget sphere (done if one fools
    #    the model); the nearest batch-mate the model puts in another class (the usual
    #    start of decision-based attacks: a real input of another class); else ever larger
    #    random perturbations inside the value range
    init_q = max(queries // 20, 5)
    start = np.full((n, d), np.nan, dtype=np.float32)
    own = np.asarray(predict(x0.reshape(shape)))
    for i in range(n):
        other = np.flatnonzero(own != y[i])
        if len(other):
            j = other[np.argmin(_dist(x0[other] - x0[i], norm))]
            start[i] = x0[j]
    for k in range(2 * init_q):
        rows = np.flatnonzero(~done & (np.isnan(start[:, 0]) | (k < init_q)))
        if len(rows) == 0:
            break
        scale = eps[rows] * (1.0 if k < init_q else 2.0 ** min(k - init_q + 1, 30))
        cand = np.clip(x0[rows] + _surface_point((len(rows), d), scale, norm, rng), lo, hi).astype(np.float32)
        fooled = adversarial(cand, rows)
        take = fooled & np.isnan(start[rows, 0])
        start[rows[take]] = cand[take]
        inside = fooled & (_dist(cand - x0[rows], norm) <= eps[rows])
        out[rows[inside]] = cand[inside]
        done[rows[inside]] = True
    active = np.flatnonzero(~done & ~np.isnan(start[:, 0]))
    if len(active) == 0:
        return out.reshape(shape)
    x, a = x0[active], start[active]
    theta = 1.0 / (d * math.sqrt(d)) if norm == "l2" else 1.0 / (d * d)

    def boundary(rows_i: np.ndarray, x: np.ndarray, a: np.ndarray) -> np.ndarray:
        """Binary search between x (clean) and a (adversarial): the adversarial end."""
        t_lo, t_hi = np.zeros(len(x)), np.ones(len(x))
        while True:
            todo = np.flatnonzero(t_hi - t_lo > theta)
            if len(todo) == 0:
                return _toward(x, a, t_hi, norm)
            mid = (t_lo[todo] + t_hi[todo]) / 2
            adv = adversarial(_toward(x[todo], a[todo], mid, norm), rows_i[todo])
            t_hi[todo] = np.where(adv, mid, t_hi[todo])
            t_lo[todo] = np.where(adv, t_lo[todo], mid)

    xb = boundary(active, x, a)
    it = 0
    while len(active):
        dist = _dist(xb - x, norm)
        win = dist <= eps[active]
        out[active[win]] = xb[win]
        keep = ~win & (used[active] < queries)
        active, x, xb, dist = active[keep], x[keep], xb[keep], dist[keep]
        if len(active) == 0:
            break
        it += 1
        # 2. the boundary's normal at xb from the labels of probes around it
        b = int(min(max(100 * math.sqrt(it), 20), 1000, max(queries - used[active].max(), 1)))
        delta = (math.sqrt(d) if norm == "l2" else d) * theta * dist
        u = rng.standard_normal((len(active), b, d)) if norm == "l2" else rng.uniform(-1, 1, (len(active), b, d))
        u /= np.sqrt((u ** 2).sum(axis=2, keepdims=True))
        probes = np.clip(xb[:, None, :] + delta[:, None, None] * u, lo, hi).astype(np.float32)
        phi = adversarial(probes.reshape(-1, d), np.repeat(active, b)).reshape(len(active), b).astype(np.float64)
        used[active] += b - 1  # adversarial() counts a repeated row once
        phi = 2 * phi - 1
        phi -= phi.mean(axis=1, keepdims=True) if b > 1 else 0
        g = (phi[:, :, None] * u).mean(axis=1)
        g = np.sign(g) if norm == "linf" else g / np.maximum(np.sqrt((g ** 2).sum(axis=1, keepdims=True)), 1e-12)
        # 3. geometric step along it, halved until still adversarial, then back to the boundary
        xi = dist / math.sqrt(it)
        nxt = xb.copy()
        pending = np.arange(len(active))
        for _ in range(12):
            if len(pending) == 0:
                break
            cand = np.clip(xb[pending] + xi[pending, None] * g[pending], lo, hi).astype(np.float32)
            ok = adversarial(cand, active[pending])
            nxt[pending[ok]] = cand[ok]
            xi[pending[~ok]] /= 2
            pending = pending[~ok]
        xb = boundary(active, x, nxt)
    return out.reshape(shape)


SCORE_NAME = "PGD on NES gradient estimates (score-based, black-box)"


def nes_pgd(scores, X: np.ndarray, y: np.ndarray, epsilon, norm: str = "l2", steps: int = 20, samples: int = 50,
            value_range=None, seed: int = 0, sigma: float = 1e-3) -> np.ndarray:
    """Adversarial candidates from class scores alone (``scores``: batch -> (B, classes)),
    one per row of ``X``: PGD (the steps, projection and clipping of ``riskpipe.attacks.pgd``)
    on the margin max_j s_j - s_y, its gradient estimated from ``samples`` antithetic pairs
    of Gaussian probes of relative size ``sigma`` per step (NES, Ilyas et al. 2018):
    2 * samples + 1 model calls per input and step. For models that expose scores but no
    gradients (ONNX, scikit-learn's predict_proba); the point with the best margin is
    kept. Float32 with the shape of ``X``, within ``epsilon`` and the value range."""
    if norm not in ("l2", "linf"):
        raise ValueError(f"norm: the score-based attack supports l2 or linf, got {norm!r}")
    if steps < 1 or samples < 1:
        raise ValueError(f"steps, samples: must be >= 1, got {steps}, {samples}")
    x0, shape, y, eps, lo, hi = flat_rows(X, y, epsilon, value_range, np.float64)
    x0 = x0.astype(np.float64)
    n, d = x0.shape
    rng = np.random.default_rng(seed)

    def margin(P: np.ndarray, labels: np.ndarray) -> np.ndarray:
        s = np.asarray(scores(P.astype(np.float32).reshape((len(P),) + shape[1:])), dtype=np.float64)
        rows = np.arange(len(s))
        sy = s[rows, labels]
        s[rows, labels] = -np.inf
        return s.max(axis=1) - sy  # > 0: another class wins

    def project(P: np.ndarray) -> np.ndarray:
        D = P - x0
        if norm == "linf":
            D = np.clip(D, -eps[:, None], eps[:, None])
        else:
            nd = np.sqrt((D ** 2).sum(axis=1, keepdims=True))
            D = D * np.minimum(1.0, eps[:, None] / np.maximum(nd, 1e-12))
        return np.clip(x0 + D, lo, hi)

    x = project(x0 + _surface_point((n, d), eps * 0.5, norm, rng).astype(np.float64))
    best, best_m = x0.copy(), margin(x0, y)
    step = eps * 2.5 / steps
    scale = sigma * np.maximum(eps, 1e-12)  # probe size relative to the budget
    for _ in range(int(steps)):
        u = rng.standard_normal((n, samples, d))
        P = np.concatenate([x[:, None] + scale[:, None, None] * u, x[:, None] - scale[:, None, None] * u], axis=1)
        m = margin(P.reshape(-1, d), np.repeat(y, 2 * samples)).reshape(n, 2 * samples)
        g = ((m[:, :samples] - m[:, samples:])[:, :, None] * u).mean(axis=1)
        if norm == "linf":
            x = x + step[:, None] * np.sign(g)
        else:
            x = x + step[:, None] * g / np.maximum(np.sqrt((g ** 2).sum(axis=1, keepdims=True)), 1e-12)
        x = project(x)
        mx = margin(x, y)
        better = mx > best_m
        best[better], best_m[better] = x[better], mx[better]
    return project(best).astype(np.float32).reshape(shape)

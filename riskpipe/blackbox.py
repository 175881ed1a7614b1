"""A seeded black-box attack for models without gradients (scikit-learn via skops, ONNX).

Random search on the surface of the budget ball: each query draws, for every input not
yet fooled, one point at distance ``epsilon`` (l_inf: a random corner of the box; l2: a
random direction scaled to ``epsilon``), clipped to the value range, and keeps it when
the predicted class changes. Only the model's ``predict`` is called. It is far weaker
than PGD, so its robust accuracy is only a loose upper bound; every adversarial example
it reports is genuine (checked against the model, inside the budget).
"""

from __future__ import annotations

import numpy as np

NAME = "random search (black-box)"


def value_bounds(value_range) -> tuple[np.ndarray, np.ndarray]:
    """``(lo, hi)`` to clip attacked inputs to: the declared range (scalars, or arrays
    shaped like one input for per-feature ranges), or no bound when none is declared."""
    if value_range is None:
        return np.float32(-np.inf), np.float32(np.inf)
    lo, hi = value_range
    return np.asarray(lo, dtype=np.float32), np.asarray(hi, dtype=np.float32)


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

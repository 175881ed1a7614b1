"""Radius in context (position paper, Open Question 3): "radius 0.5" means little
until it is set beside how far apart real samples are.

For each input, with its certified radius already converted to the threat norm:

* ``nearest_other_class_distance`` d: the distance, in the threat norm, from the
  input to the nearest reference sample whose label differs from the predicted
  class (when the certificate abstained, the nearest reference sample's label
  stands in for the prediction);
* ``radius_to_distance_ratio`` = radius / d. Compare it with 0.5, not 1: between the
  input and that other-class sample the nearest-neighbour label flips at the
  midpoint, so a ratio near 0.5 means the certified ball reaches that far, and a
  ratio far below 0.5 means an attacker has room the certificate does not cover;
* ``radius_percentile``: percent of reference radii <= radius (None without reference
  radii). The reference radii are certified once for the reference set by a cheap
  certifier call the caller supplies, converted to the threat norm by that caller;
* support of the reference set: ``nearest_reference_distance``, the distance to the
  nearest reference sample of *any* class, beside the same distance measured for the
  reference set itself, leaving each sample out (its leave-one-out nearest-neighbour
  distances, computed once when the index is built): ``support_reference_distance`` is
  their ``support_quantile`` quantile and ``support_percentile`` the percent of them <=
  the input's distance. Calibrated on the reference set itself, the ratio of the two
  means the same for every model and scale (the policy's ``support_risk`` signal).

Queries compute one distance matrix to every reference sample (scikit-learn
``pairwise_distances_chunked`` with the metric of the threat norm: l1 -> manhattan, l2 ->
euclidean, linf -> chebyshev) and take the minimum per class over the samples sorted
by label: one call per micro-batch instead of one neighbour search per class. Saved as .npz
(arrays only; loaded with ``allow_pickle=False``). Pure apart from save/load; which
reference set a model uses, and the caching of its reference radii, is decided by
the composition root (riskpipe.app.compose).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from sklearn.metrics import pairwise_distances_chunked
from threadpoolctl import ThreadpoolController

from riskpipe import npy
from riskpipe.certify.norms import check_norm
from riskpipe.paths import atomic_write

METRICS = {"l1": "manhattan", "l2": "euclidean", "linf": "chebyshev"}
FORMAT_VERSION = 1


_THREADPOOLS: list[ThreadpoolController] = []


def _one_blas_thread():
    """Limit BLAS to one thread for a query. The controller is made once: scanning the
    loaded libraries (what ``threadpool_limits`` does per call) cost more than the query."""
    if not _THREADPOOLS:
        _THREADPOOLS.append(ThreadpoolController())
    return _THREADPOOLS[0].limit(limits=1)


class ContextError(ValueError):
    """A reference set or context file that cannot be used; names the field and reason."""


@dataclass
class ContextIndex:
    X: np.ndarray  # (N, D) float32, flattened reference inputs
    y: np.ndarray  # (N,) int64 labels
    norm: str
    name: str = "reference"
    reference_radii: np.ndarray | None = None  # sorted, threat norm
    _sorted: np.ndarray | None = field(default=None, repr=False)  # X ordered by label
    _classes: np.ndarray | None = field(default=None, repr=False)  # the labels, ascending
    _starts: np.ndarray | None = field(default=None, repr=False)  # first row of each class in _sorted
    support_distances: np.ndarray | None = field(default=None, repr=False)  # sorted leave-one-out NN distances

    # ---- construction --------------------------------------------------------------------
    @classmethod
    def build(cls, X, y, norm: str, reference_radii=None, name: str = "reference") -> ContextIndex:
        try:
            norm = check_norm(norm)
        except ValueError as e:
            raise ContextError(str(e)) from None
        X = np.asarray(X, dtype=np.float32)
        y = np.asarray(y)
        if X.ndim < 2 or len(X) == 0:
            raise ContextError(f"X: need a non-empty (N, ...) array, got shape {X.shape}")
        if y.shape != (len(X),) or not np.issubdtype(y.dtype, np.integer):
            raise ContextError(f"y: need {len(X)} integer labels, got shape {y.shape} dtype {y.dtype}")
        X = X.reshape(len(X), -1)
        if not np.isfinite(X).all():
            raise ContextError("X: contains NaN or infinite values")
        if len(np.unique(y)) < 2:
            raise ContextError("y: need at least two classes to measure distance to another class")
        radii = None
        if reference_radii is not None:
            radii = np.sort(np.asarray(reference_radii, dtype=np.float64).ravel())
            if len(radii) == 0 or not np.isfinite(radii).all() or (radii < 0).any():
                raise ContextError("reference_radii: need finite radii >= 0")
        index = cls(X=X, y=y.astype(np.int64), norm=norm, name=str(name), reference_radii=radii)
        index._fit()
        return index

    def _fit(self) -> None:
        order = np.argsort(self.y, kind="stable")
        # float64 (the queries too): in float32 a squared distance overflows to inf beyond
        # ~1.8e19, and an input that far out read as having no distance at all
        self._sorted = np.ascontiguousarray(self.X[order], dtype=np.float64)
        self._classes, self._starts = np.unique(self.y[order], return_index=True)
        self.support_distances = self._leave_one_out()

    def _leave_one_out(self) -> np.ndarray:
        """Sorted distance from each reference sample to its nearest *other* reference sample."""
        def nearest(D: np.ndarray, start: int) -> np.ndarray:
            rows = np.arange(len(D))
            D[rows, start + rows] = np.inf  # the sample itself is left out
            return D.min(axis=1)

        X = self._sorted  # any order: the result is sorted
        chunks = pairwise_distances_chunked(X, X, metric=METRICS[self.norm], reduce_func=nearest)
        return np.sort(np.concatenate(list(chunks)))

    def support_reference_distance(self, quantile: float) -> float:
        """The ``quantile`` of the reference set's leave-one-out nearest-neighbour distances."""
        assert self.support_distances is not None  # set by _fit
        return float(np.quantile(self.support_distances, quantile))

    # ---- queries -------------------------------------------------------------------------
    def _class_distances(self, Xq: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(B, C) distance to the nearest sample of each class, and the class ids. Queries
        go in chunks (scikit-learn's working memory), so a large reference set stays bounded."""
        starts, classes = self._starts, self._classes
        assert starts is not None and classes is not None  # set by _fit
        per_class = lambda D, start: np.minimum.reduceat(D, starts, axis=1)  # noqa: E731
        chunks = pairwise_distances_chunked(Xq.astype(np.float64), self._sorted,
                                            metric=METRICS[self.norm], reduce_func=per_class)
        return np.vstack(list(chunks)), classes

    def context(self, x_batch, predicted_classes, radius_threat, support_quantile: float = 0.99) -> list[dict]:
        """One context dict per input (see the module docstring for each field)."""
        Xq = np.asarray(x_batch, dtype=np.float32).reshape(len(x_batch), -1)
        if Xq.shape[1] != self.X.shape[1]:
            raise ContextError(f"x_batch: inputs have {Xq.shape[1]} features, the reference set {self.X.shape[1]}")
        radii = np.asarray(radius_threat, dtype=np.float64).reshape(-1)
        if len(radii) != len(Xq) or len(predicted_classes) != len(Xq):
            raise ContextError("context: x_batch, predicted_classes and radius_threat need the same length")
        with _one_blas_thread():  # small queries: BLAS threads only contend (20x slower on a busy box)
            D, classes = self._class_distances(Xq)
        rows = np.arange(len(Xq))
        own = np.array([D[i].argmin() if c is None else -1 for i, c in enumerate(predicted_classes)])
        known = own < 0  # a predicted class (not the nearest label) stands in
        pred = np.array([-1 if c is None else int(c) for c in predicted_classes], dtype=np.int64)
        pos = np.minimum(np.searchsorted(classes, pred), len(classes) - 1)
        own = np.where(known, np.where(classes[pos] == pred, pos, -1), own)
        d_any = D.min(axis=1)  # nearest reference sample of any class: the support
        D = D.copy()
        D[rows[own >= 0], own[own >= 0]] = np.inf  # the input's own class does not count
        d = D.min(axis=1)
        support_ref = self.support_reference_distance(support_quantile)
        assert self.support_distances is not None  # set by _fit
        support_pct = 100.0 * np.searchsorted(self.support_distances, d_any, side="right") / len(self.support_distances)
        pct = (None if self.reference_radii is None else
               100.0 * np.searchsorted(self.reference_radii, radii, side="right") / len(self.reference_radii))
        reference = self.reference
        return [{
            "nearest_other_class_distance": float(d[i]),
            "radius_to_distance_ratio": float(radii[i]) / float(d[i]) if d[i] > 0 else None,
            "radius_percentile": None if pct is None else float(pct[i]),
            "nearest_reference_distance": float(d_any[i]),
            "support_reference_distance": support_ref,
            "support_quantile": float(support_quantile),
            "support_percentile": float(support_pct[i]),
            "reference": dict(reference),
        } for i in rows]

    def percentile(self, radius: float) -> float | None:
        if self.reference_radii is None:
            return None
        k = np.searchsorted(self.reference_radii, radius, side="right")
        return float(100.0 * k / len(self.reference_radii))

    @property
    def reference(self) -> dict:
        return {"name": self.name, "size": int(len(self.X)), "norm": self.norm}

    # ---- persistence ---------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        radii = self.reference_radii if self.reference_radii is not None else np.zeros(0)
        with atomic_write(path) as f:
            np.savez(f, X=self.X, y=self.y, norm=np.array(self.norm), name=np.array(self.name),
                     reference_radii=radii, has_radii=np.array(self.reference_radii is not None),
                     version=np.array(FORMAT_VERSION))
        return path

    @classmethod
    def load(cls, path: str | Path, norm: str | None = None) -> ContextIndex:
        """Load a saved index, or a plain reference .npz with arrays ``X`` and ``y``
        (then ``norm`` is required and an index is built)."""
        try:
            with npy.load_npz(path) as z:
                arrays = {k: z[k] for k in z.files}
        except FileNotFoundError:
            raise ContextError(f"context {path}: file not found") from None
        except (ValueError, OSError) as e:
            raise ContextError(f"context {path}: not a readable .npz of plain arrays ({e})") from None
        for key in ("X", "y"):
            if key not in arrays:
                raise ContextError(f"context {path}: missing array {key!r}")
        saved_norm = str(arrays["norm"]) if "norm" in arrays else None
        use_norm = norm or saved_norm
        if use_norm is None:
            raise ContextError(f"context {path}: no norm saved; give the threat norm")
        radii = arrays["reference_radii"] if bool(arrays.get("has_radii", False)) else None
        if norm is not None and saved_norm is not None and check_norm(norm) != saved_norm:
            radii = None  # distances and radii were in another norm
        name = str(arrays["name"]) if "name" in arrays else Path(path).stem
        return cls.build(arrays["X"], arrays["y"], use_norm, reference_radii=radii, name=name)

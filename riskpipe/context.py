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
  certifier call the caller supplies, converted to the threat norm by that caller.

Indexes are scikit-learn ``NearestNeighbors`` (one per class) with the metric of the
threat norm: l1 -> manhattan, l2 -> euclidean, linf -> chebyshev. Saved as .npz
(arrays only; loaded with ``allow_pickle=False``). Pure apart from save/load; which
reference set a model uses, and the caching of its reference radii, is decided by
the composition root (riskpipe.compose).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from sklearn.neighbors import NearestNeighbors
from threadpoolctl import threadpool_limits

from riskpipe.certify.norms import check_norm

METRICS = {"l1": "manhattan", "l2": "euclidean", "linf": "chebyshev"}
FORMAT_VERSION = 1


class ContextError(ValueError):
    """A reference set or context file that cannot be used; names the field and reason."""


@dataclass
class ContextIndex:
    X: np.ndarray  # (N, D) float32, flattened reference inputs
    y: np.ndarray  # (N,) int64 labels
    norm: str
    name: str = "reference"
    reference_radii: np.ndarray | None = None  # sorted, threat norm
    _indexes: dict[int, NearestNeighbors] = field(default_factory=dict, repr=False)

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
        self._indexes = {}
        for c in np.unique(self.y):
            nn = NearestNeighbors(n_neighbors=1, metric=METRICS[self.norm], algorithm="brute")
            nn.fit(self.X[self.y == c])
            self._indexes[int(c)] = nn

    # ---- queries -------------------------------------------------------------------------
    def _class_distances(self, Xq: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(B, C) distance to the nearest sample of each class, and the class ids."""
        classes = np.array(sorted(self._indexes))
        D = np.empty((len(Xq), len(classes)))
        for j, c in enumerate(classes):
            D[:, j] = self._indexes[int(c)].kneighbors(Xq, return_distance=True)[0][:, 0]
        return D, classes

    def context(self, x_batch, predicted_classes, radius_threat) -> list[dict]:
        """One context dict per input (see the module docstring for each field)."""
        Xq = np.asarray(x_batch, dtype=np.float32).reshape(len(x_batch), -1)
        if Xq.shape[1] != self.X.shape[1]:
            raise ContextError(f"x_batch: inputs have {Xq.shape[1]} features, the reference set {self.X.shape[1]}")
        radii = np.asarray(radius_threat, dtype=np.float64).reshape(-1)
        if len(radii) != len(Xq) or len(predicted_classes) != len(Xq):
            raise ContextError("context: x_batch, predicted_classes and radius_threat need the same length")
        with threadpool_limits(limits=1):  # small queries: BLAS threads only contend (20x slower on a busy box)
            D, classes = self._class_distances(Xq)
        out = []
        for i in range(len(Xq)):
            own = predicted_classes[i]
            if own is None:
                own = int(classes[D[i].argmin()])
            others = D[i][classes != int(own)]
            d = float(others.min())
            r = float(radii[i])
            out.append({
                "nearest_other_class_distance": d,
                "radius_to_distance_ratio": r / d if d > 0 else None,
                "radius_percentile": self.percentile(r),
                "reference": self.reference,
            })
        return out

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
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        radii = self.reference_radii if self.reference_radii is not None else np.zeros(0)
        with open(tmp, "wb") as f:
            np.savez(f, X=self.X, y=self.y, norm=np.array(self.norm), name=np.array(self.name),
                     reference_radii=radii, has_radii=np.array(self.reference_radii is not None),
                     version=np.array(FORMAT_VERSION))
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: str | Path, norm: str | None = None) -> ContextIndex:
        """Load a saved index, or a plain reference .npz with arrays ``X`` and ``y``
        (then ``norm`` is required and an index is built)."""
        try:
            with np.load(path, allow_pickle=False) as z:
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

"""Deterministic certificates for tree ensembles (family ``trees``).

For an l_inf box B = [z - r, z + r] (intersected with the model's value range) a
node splitting on ``x[f] <= t`` can send a point of B left iff lo_f <= t and right
iff hi_f > t; a leaf is *reachable* iff every split on its path can. Then for the
predicted class y and every other class j

    min over B of (score_y - score_j)  >=  base_y - base_j + sum over trees of
                                           min over reachable leaves of (v_y - v_j)

because each tree contributes one reachable leaf at every point of B. When every
such lower bound is positive, no point of B changes the class: a sound certificate.
For one tree the bound is exact (a leaf region is a box, so a leaf is reachable iff
its region meets B); for an ensemble it is conservative, since the trees' worst
leaves need not be reachable together (exact verification is NP-hard, Kantchelian et
al. 2016; this is the per-tree bound of Chen et al. 2019, without their clique search).

The reachable set only changes when an edge of B crosses a threshold, i.e. at the
breakpoints r = |t - z_f|; the certified predicate is monotone in r. So the radius
search is a bisection over each input's sorted breakpoints: the reported radius is
just below (``rel_tol`` relative) the first breakpoint whose box fails, checked
itself — the exact largest radius up to ``rel_tol`` for this bound. Every node is
undecided within its rounding ``slack`` (riskpipe.models.trees), and an allowance
guards the sums of leaf values: ours in float64 and the model's own (``sum_ulp``: XGBoost
adds in float32, where boosted stumps differ from the float64 sum by ~1e-5), so rounding
cannot certify a zero margin.

Vectorised over the micro-batch: reachability is one boolean (nodes, B) pass per
depth level, the per-tree minima one ``np.minimum.reduceat``.
"""

from __future__ import annotations

import math
import time
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from riskpipe.certify.certificate import MODEL_FAULT, Certificate
from riskpipe.certify.norms import check_norm
from riskpipe.certify.protocol import CertifierBase

if TYPE_CHECKING:
    from riskpipe.certify.protocol import Batch
    from riskpipe.models.base import Model
    from riskpipe.models.trees import TreeEnsemble

FP_ALLOWANCE = 1e-9  # relative to the largest possible |sum of leaf values|
_COARSE_PASSES = 8  # plain bisection passes before the breakpoint search
_PASS_CELLS = 4_000_000  # inputs x nodes per radius search (breakpoints are float64: 2 x 8 bytes per cell)


class TreeGeometry:
    """What the bounds need from a ``TreeEnsemble``, arranged once per model."""

    def __init__(self, ens: TreeEnsemble) -> None:
        self.ens = ens
        self.levels = ens.levels()
        # per level: nodes, split features, and the thresholds with their slack folded in
        self.level_tests = [(n, ens.feature[n], (ens.threshold[n] + ens.slack[n])[:, None],
                             (ens.threshold[n] - ens.slack[n])[:, None]) for n in self.levels]
        self.inner = np.flatnonzero(ens.feature >= 0)
        self.leaves = ens.leaves
        self.starts = np.searchsorted(ens.tree[self.leaves], np.arange(ens.n_trees))
        self.leaf_values = ens.value[self.leaves]
        per_tree = np.maximum.reduceat(np.abs(self.leaf_values).max(axis=1), self.starts)
        # the model's own sums round too: T + 1 additions, each off by at most ulp * (|base| + sum of
        # max|v|), in each of two class scores, plus the same again for a base read off its margins
        rel = max(FP_ALLOWANCE, 2 * (ens.n_trees + 2) * ens.sum_ulp)
        self.allowance = rel * (2 * per_tree.sum() + 2 * np.abs(ens.base).max() + 1e-300)
        inner_thr = ens.threshold[self.inner]
        self.threshold_span = float(inner_thr.max() - inner_thr.min()) if len(inner_thr) else 0.0

    def reachable(self, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
        """(N, B) bool: node n reachable from some point of the box [lo, hi] (rows of lo, hi).
        Nodes are the rows, so each level gathers and scatters whole contiguous rows."""
        e = self.ens
        loT, hiT = np.ascontiguousarray(lo.T), np.ascontiguousarray(hi.T)
        reach = np.zeros((len(e.feature), len(lo)), dtype=bool)
        reach[e.roots] = True
        for nodes, f, left_t, right_t in self.level_tests:
            here = reach[nodes]
            reach[e.left[nodes]] = here & (loT[f] <= left_t)
            reach[e.right[nodes]] = here & (hiT[f] > right_t)
        return reach

    def margin_lower(self, reach: np.ndarray, y: np.ndarray) -> np.ndarray:
        """(B, C) lower bounds of score_y - score_j over the box; column y is +inf."""
        V, base = self.leaf_values, self.ens.base
        rl = reach[self.leaves]  # (L, B)
        out = np.full((len(y), V.shape[1]), np.inf)
        for c in range(V.shape[1]):
            rows = np.flatnonzero(y == c)
            if len(rows) == 0:
                continue
            rc = rl[:, rows]
            for j in range(V.shape[1]):
                if j != c:  # per tree, the smallest v_c - v_j over its reachable leaves
                    d = np.where(rc, (V[:, c] - V[:, j])[:, None], np.inf)
                    out[rows, j] = np.minimum.reduceat(d, self.starts, axis=0).sum(axis=0) + base[c] - base[j]
        lower: np.ndarray = out - self.allowance
        return lower

    def certified(self, z: np.ndarray, r: np.ndarray, y: np.ndarray, lo_rng: np.ndarray, hi_rng: np.ndarray
                  ) -> np.ndarray:
        """(B,) bool: class y constant on the l_inf box of radius r around z (within the range)."""
        rr = r[:, None]
        lo, hi = np.maximum(z - rr, lo_rng), np.minimum(z + rr, hi_rng)
        ok: np.ndarray = self.margin_lower(self.reachable(lo, hi), y).min(axis=1) > 0
        return ok

    def breakpoints(self, z: np.ndarray) -> np.ndarray:
        """(B, 2 * inner) radii at which the box's edges cross a threshold (<= 0: crossed already)."""
        e, n = self.ens, self.inner
        zf = z[:, e.feature[n]]
        return np.concatenate([zf - (e.threshold[n] + e.slack[n]), (e.threshold[n] - e.slack[n]) - zf], axis=1)


_GEOMETRY: weakref.WeakKeyDictionary[TreeEnsemble, TreeGeometry] = weakref.WeakKeyDictionary()


def _geometry(ens: TreeEnsemble) -> TreeGeometry:
    """Arranged once per ensemble (a model's trees are extracted once at load time)."""
    geo = _GEOMETRY.get(ens)
    if geo is None:
        geo = _GEOMETRY[ens] = TreeGeometry(ens)
    return geo


@dataclass
class TreeBounds(CertifierBase):
    """Tree-ensemble certifier: deterministic l_inf (or, via ball-in-box, l2) radii.

    ``eps_max`` caps the radius (default: the width of the value range, else the span
    of the thresholds, beyond which every leaf is reachable); ``rel_tol`` is how far
    below a failing breakpoint the reported radius sits; ``batch_size`` caps inputs
    per pass (memory grows with inputs x nodes)."""

    model: Model
    norm: str = "linf"
    eps_max: float | None = None
    rel_tol: float = 1e-9
    batch_size: int = 256

    method = "trees"
    modes = ("certify",)
    inputs_per_call = 256

    def __post_init__(self) -> None:
        self.norm = check_norm(self.norm)
        if self.norm not in ("linf", "l2"):
            raise ValueError(f"norm: trees certifies linf or l2 (ball in box), got {self.norm!r}")
        if getattr(self.model, "trees", None) is None:
            why = getattr(self.model, "meta", {}).get("trees_error", "it is not a supported tree ensemble")
            raise ValueError(f"model: the trees certificate needs a tree ensemble; "
                             f"{getattr(self.model, 'spec', self.model)}: {why}")
        if self.model.trees.n_features != self.model.input_dim:
            raise ValueError(f"model: trees use {self.model.trees.n_features} features, "
                             f"the input has {self.model.input_dim}")
        self.geometry = _geometry(self.model.trees)
        rng = self.model.value_range
        if self.eps_max is None:
            width = None if rng is None else float(np.max(np.asarray(rng[1]) - np.asarray(rng[0])))
            self.eps_max = width if width is not None else max(self.geometry.threshold_span, 1.0)
        self.eps_max = float(self.eps_max)
        if not (self.eps_max > 0 and math.isfinite(self.eps_max)):
            raise ValueError(f"eps_max: must be a finite number > 0, got {self.eps_max}")
        if not 0 < self.rel_tol < 1e-3:
            raise ValueError(f"rel_tol: must lie in (0, 0.001), got {self.rel_tol}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size: must be >= 1, got {self.batch_size}")

    def _range(self, d: int) -> tuple[np.ndarray, np.ndarray]:
        rng = self.model.value_range
        if rng is None:
            return np.full(d, -np.inf), np.full(d, np.inf)
        lo, hi = (np.broadcast_to(np.asarray(v, dtype=np.float64).reshape(-1) if np.ndim(v) else
                                  np.float64(v), (d,)) for v in rng)
        return lo, hi

    def radii(self, Z: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
        """(certified l_inf radius, certified at the point, box evaluations) per input of class y.

        A few plain bisection passes first narrow each input's bracket [r_ok, r_bad]
        (certified, failed), so only the breakpoints inside it are sorted and searched;
        every radius reported is one that was checked."""
        geo = self.geometry
        eps_max = self.eps_max
        assert eps_max is not None  # set in __post_init__
        lo_rng, hi_rng = self._range(Z.shape[1])
        B = len(Z)

        def ok(rows: np.ndarray, r: np.ndarray) -> np.ndarray:
            return geo.certified(Z[rows], r, y[rows], lo_rng, hi_rng)

        every = np.arange(B)
        at_point = ok(every, np.zeros(B))
        at_max = ok(every, np.full(B, eps_max)) & at_point
        r_ok, r_bad = np.zeros(B), np.full(B, eps_max)
        evals = 2
        for _ in range(_COARSE_PASSES):
            act = np.flatnonzero(at_point & ~at_max)
            if len(act) == 0:
                break
            mid = (r_ok[act] + r_bad[act]) / 2
            good = ok(act, mid)
            r_ok[act] = np.where(good, mid, r_ok[act])
            r_bad[act] = np.where(good, r_bad[act], mid)
            evals += 1
        raw = geo.breakpoints(Z) * (1 - self.rel_tol)  # just below each breakpoint
        inside = [np.sort(raw[i][(raw[i] > r_ok[i]) & (raw[i] < r_bad[i])]) if at_point[i] and not at_max[i]
                  else np.empty(0) for i in range(B)]
        m = np.array([len(c) for c in inside])
        cand = np.full((B, max(int(m.max()), 1)), np.inf)
        for i, c in enumerate(inside):
            cand[i, :len(c)] = c
        lo = np.full(B, -1)  # index of the largest certified candidate (-1: none above r_ok)
        hi = m.copy()        # index of the smallest failed one
        while True:
            act = np.flatnonzero(hi - lo > 1)
            if len(act) == 0:
                break
            mid = (lo[act] + hi[act]) // 2
            good = ok(act, cand[act, mid])
            lo[act] = np.where(good, mid, lo[act])
            hi[act] = np.where(good, hi[act], mid)
            evals += 1
        radius = np.where(lo >= 0, cand[every, np.maximum(lo, 0)], r_ok)
        radius = np.where(at_max, eps_max, np.where(at_point, radius, 0.0))
        return radius, at_point, evals

    def certify_batch(self, X: Batch, seeds: Sequence[int]) -> list[Certificate]:
        """One certificate per input: the model's class is constant on the l_inf box of the
        reported radius (inside the value range); abstains when not even the input's
        own box of rounding slack keeps the class. Seeds are recorded, nothing is random."""
        t0 = time.perf_counter()
        Z = np.asarray(X, dtype=np.float32)
        Z = Z.reshape(len(Z), -1)
        if len(seeds) != len(Z):
            raise ValueError(f"seeds: need one per input ({len(Z)}), got {len(seeds)}")

        fwd = self.model.classes(torch.from_numpy(Z.reshape((len(Z),) + tuple(self.model.input_shape))))
        y, bad = fwd.values.cpu().numpy().astype(np.int64), fwd.bad.cpu().numpy()
        Z = Z.astype(np.float64)
        radius, at_point = np.zeros(len(Z)), np.zeros(len(Z), dtype=bool)
        evals = 0
        step = min(self.batch_size, max(1, _PASS_CELLS // len(self.model.trees.feature)))
        for a in range(0, len(Z), step):
            r, p, n = self.radii(Z[a:a + step], y[a:a + step])
            radius[a:a + step], at_point[a:a + step] = r, p
            evals = max(evals, n)
        per_input_ms = (time.perf_counter() - t0) * 1e3 / max(len(Z), 1)
        ens = self.model.trees
        eps_max = self.eps_max
        assert eps_max is not None  # set in __post_init__
        out = []
        for i in range(len(Z)):
            r_i = 0.0 if bad[i] else float(radius[i])
            abstain = r_i <= 0.0
            reason = None if not abstain else ("margin_not_positive" if not at_point[i] else "radius_below_tolerance")
            if bad[i]:  # the model's own output broke its contract: the trees' bound speaks about nothing
                reason = MODEL_FAULT
            out.append(Certificate(
                method=self.method, mode="bound", norm=self.norm, radius=0.0 if abstain else r_i, abstained=abstain,
                predicted_class=None if abstain else int(y[i]), n_samples=1, elapsed_ms=per_input_ms,
                seed=int(seeds[i]), input_dim=self.model.input_dim, reason=reason,
                extra={**({MODEL_FAULT: fwd.reason} if bad[i] else {}),
                       "model_class": int(y[i]), "linf_radius": r_i, "eps_max": self.eps_max,
                       "capped": bool(r_i >= eps_max), "rel_tol": self.rel_tol, "box_evaluations": evals,
                       "trees": ens.n_trees, "nodes": int(len(ens.feature)), "ensemble": ens.source,
                       "value_range": None if self.model.value_range is None
                       else [np.asarray(v).tolist() for v in self.model.value_range]}))
        return out


__all__ = ["TreeBounds", "TreeGeometry"]

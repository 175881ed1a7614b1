"""An attack that reads the trees: greedy leaf-region search over threshold crossings.

Inside the budget box every feature only matters through which side of each of its
thresholds it lies on, so feature f has finitely many *cells* in the box (the gaps
between its thresholds) and one representative per cell (the cell's midpoint, or
the box edge) reaches every behaviour of the ensemble along f. The search starts at
the clean input (and at ``restarts`` random cells of the box), and in each round
takes the move that most lowers the margin score_y - max_j score_j of the extracted
ensemble: one feature to another cell, or a jump into the region of one of the leaves
the box reaches (the ``MAX_LEAVES`` that favour another class most; for a single tree
this finds the nearest leaf of another class, so the attack is exact there), every
candidate evaluated at once, until the
margin is negative and the model's own ``predict`` confirms the class change, or no
move helps. This is the coordinate-wise search of Kantchelian et al. (2016) and of
Zhang et al.'s leaf-tuple attack (2020) in its simplest form: not exact, but it
sees every threshold the box contains, where random search sees almost none.

Every reported adversarial example is genuine: checked with ``predict`` and inside
the budget (l_inf: the box; l2: moves that would leave the ball are not taken).
"""

from __future__ import annotations

import weakref

import numpy as np

from riskpipe.blackbox import flat_rows

NAME = "tree leaf-region search (greedy threshold crossings)"
MAX_CELLS = 32  # representatives per feature and round (evenly spread when there are more)


def _margin(scores: np.ndarray, y: int) -> np.ndarray:
    other = np.delete(scores, y, axis=1).max(axis=1)
    return scores[:, y] - other


def _inside(v: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """float32 values of v, nudged to stay inside [lo, hi]."""
    v32 = np.clip(v, lo, hi).astype(np.float32)
    v32 = np.where(v32 < lo, np.nextafter(v32, np.float32(np.inf)), v32)
    return np.where(v32 > hi, np.nextafter(v32, np.float32(-np.inf)), v32)


def cell_points(ens, f: int, lo: float, hi: float) -> np.ndarray:
    """One float32 value per cell of feature f's thresholds inside [lo, hi]."""
    t = np.unique(ens.threshold[ens.feature == f])
    t = t[(t >= lo) & (t < hi)]
    reps = np.concatenate([[lo], (t[:-1] + t[1:]) / 2, [hi]]) if len(t) else np.array([lo, hi])
    return np.unique(_inside(reps, lo, hi))


_BOXES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
MAX_LEAVES = 128  # leaf jumps per round: the reachable leaves that favour the attacker most
_BOX_CELLS = 5_000_000  # nodes x features above which leaf boxes are not materialised


def leaf_boxes(ens):
    """(leaves, lo, hi): leaf l's region is lo < x <= hi per feature (None when too large)."""
    if ens in _BOXES:
        return _BOXES[ens]
    n, d = len(ens.feature), ens.n_features
    out = None
    if n * d <= _BOX_CELLS:
        lo, hi = np.full((n, d), -np.inf), np.full((n, d), np.inf)
        for nodes in ens.levels():
            f, t = ens.feature[nodes], ens.threshold[nodes]
            for child, is_left in ((ens.left[nodes], True), (ens.right[nodes], False)):
                lo[child], hi[child] = lo[nodes], hi[nodes]
                if is_left:
                    hi[child, f] = np.minimum(hi[nodes, f], t)
                else:
                    lo[child, f] = np.maximum(lo[nodes, f], t)
        leaves = ens.leaves
        out = (leaves, lo[leaves], hi[leaves])
    _BOXES[ens] = out
    return out


def _leaf_moves(ens, boxes, p, x, y: int, lo, hi) -> np.ndarray:
    """Points: p moved into each of the most attacker-friendly leaves the box [lo, hi] reaches."""
    leaves, llo, lhi = boxes
    a = np.maximum(llo, lo)  # leaf region inside the budget box: a < q <= b (strict at a leaf's own bound)
    b = np.minimum(lhi, hi)
    a32 = a.astype(np.float32)
    a32 = np.where((a32 <= llo) & np.isfinite(llo), np.nextafter(a32, np.float32(np.inf)), a32)
    a32 = np.where(a32 < lo, np.nextafter(a32, np.float32(np.inf)), a32)
    b32 = b.astype(np.float32)
    b32 = np.where(b32 > b, np.nextafter(b32, np.float32(-np.inf)), b32)
    ok = (a32 <= b32).all(axis=1)
    if not ok.any():
        return np.empty((0, len(p)), np.float32)
    v = ens.value[leaves[ok]]
    gain = v[:, y] - np.delete(v, y, axis=1).max(axis=1)  # the leaf's own push towards another class
    pick = np.argsort(gain, kind="stable")[:MAX_LEAVES]
    return np.clip(p, a32[ok][pick], b32[ok][pick]).astype(np.float32)


def tree_attack(ens, predict, X: np.ndarray, y: np.ndarray, epsilon, norm: str = "linf", value_range=None,
                seed: int = 0, rounds: int | None = None, restarts: int = 1) -> np.ndarray:
    """Adversarial candidates for a tree ensemble ``ens`` (riskpipe.models.trees) whose
    model classifies with ``predict``, one per row of ``X``: a point within ``epsilon``
    (``norm`` linf or l2; one budget or one per input) of the row that ``predict``
    classifies differently from ``y``, else the row itself. Seeded; float32 out."""

    if norm not in ("linf", "l2"):
        raise ValueError(f"norm: the tree attack supports linf or l2, got {norm!r}")
    if restarts < 0:
        raise ValueError(f"restarts: must be >= 0, got {restarts}")
    X2, shape, y, eps, vlo, vhi = flat_rows(X, y, epsilon, value_range, np.float64)
    rounds = rounds or min(2 * X2.shape[1] + 4, 16)
    rng = np.random.default_rng(seed)

    def flat_predict(Z: np.ndarray) -> np.ndarray:
        return np.asarray(predict(Z.reshape((len(Z),) + shape[1:])))

    out = X2.copy()
    for i in range(len(X2)):
        if eps[i] <= 0:
            continue
        x = X2[i].astype(np.float64)
        lo, hi = np.maximum(x - eps[i], vlo), np.minimum(x + eps[i], vhi)
        cells = [cell_points(ens, f, lo[f], hi[f]) for f in range(len(x))]
        starts = [X2[i].copy()]
        for _ in range(restarts):
            starts.append(np.array([rng.choice(c) for c in cells], dtype=np.float32))
            if norm == "l2":  # random cells of the box may lie outside the ball: pull towards x
                d = starts[-1] - X2[i]
                n = float(np.linalg.norm(d))
                if n > eps[i]:
                    starts[-1] = (X2[i] + d * (eps[i] / n) * (1 - 1e-6)).astype(np.float32)
        boxes = leaf_boxes(ens)
        for p in starts:
            found = _descend(ens, flat_predict, p, X2[i], int(y[i]), cells, eps[i], norm, rounds, rng,
                             boxes, (lo, hi))
            if found is not None:
                out[i] = found
                break
    return out.reshape(shape)


def _descend(ens, predict, p: np.ndarray, x: np.ndarray, y: int, cells, eps: float, norm: str, rounds: int,
             rng, boxes, box) -> np.ndarray | None:
    """Greedy moves from p (one feature to another cell, or into one leaf's region); the
    first point ``predict`` puts outside y, or None."""
    p = p.copy()
    best = _margin(ens.scores(p[None]), y)[0]
    for _ in range(rounds):
        if best <= 0 and int(predict(p[None])[0]) != y:
            return p
        cand, where = [], []
        for f, c in enumerate(cells):
            if len(c) > MAX_CELLS:
                c = c[np.sort(rng.choice(len(c), MAX_CELLS, replace=False))]
            c = c[c != p[f]]
            if norm == "l2":  # keep ||q - x||_2 <= eps
                rest = float(np.sum((p - x) ** 2) - (p[f] - x[f]) ** 2)
                c = c[rest + (c.astype(np.float64) - x[f]) ** 2 <= eps ** 2]
            cand.append(c)
            where.append(np.full(len(c), f))
        vals, feats = np.concatenate(cand), np.concatenate(where)
        Q = np.repeat(p[None], len(vals), axis=0)
        Q[np.arange(len(vals)), feats] = vals
        if boxes is not None:
            J = _leaf_moves(ens, boxes, p, x, y, *box)
            if norm == "l2":
                J = J[np.sum((J.astype(np.float64) - x) ** 2, axis=1) <= eps ** 2]
            Q = np.concatenate([Q, J])
        if len(Q) == 0:
            return None
        m = _margin(ens.scores(Q), y)
        k = int(np.argmin(m))
        if m[k] >= best and best >= 0:
            return None  # no single move helps: a local minimum of the margin
        p, best = Q[k], m[k]
    return p if best <= 0 and int(predict(p[None])[0]) != y else None


__all__ = ["NAME", "cell_points", "tree_attack"]

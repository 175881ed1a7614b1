"""Tree ensembles as flat arrays, extracted once when a model is loaded.

Every supported ensemble (scikit-learn DecisionTree, RandomForest, ExtraTrees,
GradientBoosting and HistGradientBoosting classifiers, alone or behind per-feature
scalers in a Pipeline; XGBoost and LightGBM boosters) becomes one ``TreeEnsemble``:

    score_c(x) = base_c + sum over trees t of value_t[leaf_t(x), c]
    class(x)   = argmax_c score_c(x)

where ``leaf_t(x)`` follows ``x[feature] <= threshold`` to the left child. Forests
store each tree's class probabilities divided by the number of trees (the forest's
``predict_proba``); boosting stores raw margins (one column per class; a binary
booster's margin m becomes the pair (0, m), so class 1 wins exactly when m > 0).

``slack`` is, per node, how far the model's own comparison may sit from ``threshold``
in the input's units because of rounding (float32 casts, a folded scaler, a strict
``<`` turned into ``<=``). Certificates treat a node as undecided within its slack,
so they stay sound without reproducing each library's arithmetic bit for bit.

An extraction that cannot be trusted raises ``TreeError``; the loader also checks
the extracted ensemble against the model's own ``predict`` on probe points.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace

import numpy as np

REL_SLACK = 1e-6  # relative rounding allowance per threshold (float32 has 6e-8)
ABS_SLACK = 2.0 ** -140  # absolute allowance: float32 rounds |x| below 2**-149 to 0 (subnormals)
F32_ULP = 2.0 ** -24  # unit roundoff of a float32 sum (XGBoost accumulates margins in float32)
F64_ULP = 2.0 ** -53
_SCALERS = ("StandardScaler", "MinMaxScaler", "MaxAbsScaler", "RobustScaler")


class TreeError(ValueError):
    """An estimator whose trees cannot be extracted faithfully; the message says why."""


class MalformedTree(TreeError):
    """Node arrays no tree builder writes (a child that is not a later node, a node with
    two parents, a split on a feature the input lacks): edited, not fitted. The model's
    own predict would loop for ever or read beyond the input, so the loader refuses the
    whole model, not only its trees certificate."""


def check_nodes(feature, left, right, n_features: int, source: str) -> None:
    """Raise MalformedTree unless the node arrays of one tree (children as indices local
    to the tree, root 0, ``feature < 0`` a leaf) form a tree: walked from the root, every
    internal node's children are in range and each node is reached once (no cycle, no
    node with two parents), and every split reached is on a feature in ``[0, n_features)``.
    Then every walk from the root ends at a leaf in fewer than ``len(feature)`` steps."""
    feature = np.asarray(feature).astype(np.int64, copy=False)
    left, right = np.asarray(left).astype(np.int64, copy=False), np.asarray(right).astype(np.int64, copy=False)
    n = len(feature)
    if n == 0 or len(left) != n or len(right) != n:
        raise MalformedTree(f"{source}: malformed tree ({n} nodes, {len(left)} left and {len(right)} right children)")
    seen = np.zeros(n, dtype=bool)
    seen[0] = True
    frontier = np.zeros(1, dtype=np.int64)
    while len(frontier):
        inner = frontier[feature[frontier] >= 0]
        if (feature[inner] >= n_features).any():
            raise MalformedTree(f"{source}: malformed tree: a split on feature {int(feature[inner].max())}, the model "
                                f"has {n_features}")
        kids = np.concatenate([left[inner], right[inner]])
        out = (kids < 0) | (kids >= n)
        if out.any():
            raise MalformedTree(f"{source}: malformed tree: a child index {int(kids[out][0])} outside its {n} nodes")
        if seen[kids].any() or len(np.unique(kids)) != len(kids):
            raise MalformedTree(f"{source}: malformed tree: a node is reached twice from the root (a cycle or a node "
                                "with two parents)")
        seen[kids] = True
        frontier = kids


def check_loaded_trees(obj) -> None:
    """Raise MalformedTree unless every scikit-learn ``Tree`` and ``TreePredictor`` held
    anywhere in a loaded estimator (a forest's trees, a pipeline's steps, a trusted
    subclass or wrapper) passes ``check_nodes`` against the input width of the estimator
    holding it. Run before anything calls the estimator: scikit-learn's own predict walks
    the nodes in C without bounds checks (a cycle hangs, an index out of range crashes)."""
    # lazy: scikit-learn's classes only where its estimators are read (boosters need none)
    from sklearn.ensemble._hist_gradient_boosting.predictor import TreePredictor
    from sklearn.tree._tree import Tree

    seen: set[int] = set()
    stack: list[tuple[object, int | None]] = [(obj, None)]
    while stack:
        o, width = stack.pop()
        if id(o) in seen or o is None or isinstance(o, str | bytes | int | float | bool):
            continue
        seen.add(id(o))
        if isinstance(o, Tree):
            left = np.asarray(o.children_left, dtype=np.int64)
            n_features = int(o.n_features) if width is None else min(int(o.n_features), width)
            feature = np.asarray(o.feature, dtype=np.int64)
            if (feature[left != -1] < 0).any():
                raise MalformedTree(f"{type(obj).__name__}: malformed tree: a split on a negative feature")
            check_nodes(np.where(left != -1, feature, -1), left, o.children_right, n_features, type(obj).__name__)
            continue
        if isinstance(o, TreePredictor):
            nodes = o.nodes
            feature = np.where(nodes["is_leaf"].astype(bool), -1, nodes["feature_idx"].astype(np.int64))
            check_nodes(feature, nodes["left"], nodes["right"], width if width is not None else 2 ** 62,
                        type(obj).__name__)
            continue
        if isinstance(o, np.ndarray):
            if o.dtype == object:
                stack.extend((x, width) for x in o.ravel())
            continue
        if isinstance(o, list | tuple | set | frozenset):
            stack.extend((x, width) for x in o)
            continue
        if isinstance(o, dict):
            stack.extend((x, width) for x in o.values())
            continue
        d = getattr(o, "__dict__", None)
        if isinstance(d, dict):
            n = d.get("n_features_in_")
            stack.extend((x, int(n) if isinstance(n, int | np.integer) else width) for x in d.values())


@dataclass(frozen=True, eq=False)
class TreeEnsemble:
    """All trees of a model in one set of flat node arrays (trees stored one after another).

    ``feature[n] == -1`` marks a leaf; ``value[n]`` is a leaf's contribution to each
    class score; ``tree[n]`` the tree a node belongs to; ``roots`` each tree's root."""

    feature: np.ndarray    # (N,) int64
    threshold: np.ndarray  # (N,) float64: left iff x[feature] <= threshold
    slack: np.ndarray      # (N,) float64 >= 0
    left: np.ndarray       # (N,) int64
    right: np.ndarray      # (N,) int64
    value: np.ndarray      # (N, C) float64
    tree: np.ndarray       # (N,) int64
    roots: np.ndarray      # (T,) int64
    base: np.ndarray       # (C,) float64
    n_features: int
    kind: str              # "forest" (averaged probabilities) or "boosting" (summed margins)
    source: str            # the estimator, e.g. "RandomForestClassifier"
    sum_ulp: float = F64_ULP  # unit roundoff of the model's own score sums (float32 for XGBoost)

    @property
    def n_trees(self) -> int:
        return len(self.roots)

    @property
    def n_classes(self) -> int:
        return self.value.shape[1]

    @property
    def leaves(self) -> np.ndarray:
        return np.flatnonzero(self.feature < 0)

    def levels(self) -> list[np.ndarray]:
        """Internal nodes grouped by depth, roots first (parents before children)."""
        out, frontier = [], self.roots
        while len(frontier):
            inner = frontier[self.feature[frontier] >= 0]
            if len(inner) == 0:
                break
            out.append(inner)
            frontier = np.concatenate([self.left[inner], self.right[inner]])
        return out

    def apply(self, X: np.ndarray) -> np.ndarray:
        """(B, T) leaf index of every tree for every row of X (float64 comparisons)."""
        return self._walk(X, False)[0]

    def apply_near(self, X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``apply(X)``, and (B,) whether a row passes within a threshold's slack at any
        node on its paths: there the model's own comparison may go the other way."""
        leaves, near = self._walk(X, True)
        return leaves, np.asarray(near.reshape(len(leaves), -1).any(axis=1))

    def _walk(self, X: np.ndarray, track: bool) -> tuple[np.ndarray, np.ndarray]:
        X = np.asarray(X, dtype=np.float64).reshape(len(X), -1)
        B, T = len(X), self.n_trees
        node = np.tile(self.roots, B)
        near = np.zeros(B * T, dtype=bool)
        offset = np.repeat(np.arange(B) * X.shape[1], T)  # row start in the flat X
        flat = X.ravel()
        active = np.arange(B * T)
        while len(active):
            n = node[active]
            f = self.feature[n]
            inner = f >= 0
            active, n, f = active[inner], n[inner], f[inner]
            x = flat[offset[active] + f]
            if track:
                near[active] |= np.abs(x - self.threshold[n]) <= self.slack[n]
            node[active] = np.where(x > self.threshold[n], self.right[n], self.left[n])
        return node.reshape(B, T), near

    def scores(self, X: np.ndarray) -> np.ndarray:
        """(B, C) class scores of the ensemble."""
        return self.base + self.value[self.apply(X)].sum(axis=1)

    def scaled(self, s: np.ndarray) -> TreeEnsemble:
        """The ensemble of g(z) = f(s * z): thresholds and slack divided by s[feature]."""
        s = np.asarray(s, dtype=np.float64).ravel()
        if len(s) != self.n_features:
            raise TreeError(f"scale: {len(s)} values, the trees use {self.n_features} features")
        sf = s[np.where(self.feature >= 0, self.feature, 0)]
        thr = np.where(self.feature >= 0, self.threshold / sf, 0.0)
        slack = np.where(self.feature >= 0, self.slack / sf + REL_SLACK * np.abs(thr) + ABS_SLACK, 0.0)
        return replace(self, threshold=thr, slack=slack)


# ---------------------------------------------------------------- assembling --------
class _Builder:
    """Collects trees given as node arrays (children as indices local to the tree)."""

    def __init__(self, n_classes: int, n_features: int, source: str):
        self.n_classes, self.n_features, self.source = n_classes, n_features, source
        self.parts: list[tuple] = []
        self.size = 0

    def add(self, feature, threshold, slack, left, right, value) -> None:
        check_nodes(feature, left, right, self.n_features, self.source)
        feature = np.asarray(feature, dtype=np.int64)
        n = len(feature)
        leaf = feature < 0
        off = self.size
        left = np.where(leaf, -1, np.asarray(left, dtype=np.int64) + off)
        right = np.where(leaf, -1, np.asarray(right, dtype=np.int64) + off)
        value = np.where(leaf[:, None], np.asarray(value, dtype=np.float64).reshape(n, self.n_classes), 0.0)
        thr = np.where(leaf, 0.0, np.asarray(threshold, dtype=np.float64))
        sl = np.where(leaf, 0.0, np.asarray(slack, dtype=np.float64))
        self.parts.append((feature, thr, sl, left, right, value, off))
        self.size += n

    def build(self, base, n_features: int, kind: str, source: str) -> TreeEnsemble:
        if not self.parts:
            raise TreeError(f"{source}: no trees")
        feature, threshold, slack, left, right, value = (np.concatenate([p[k] for p in self.parts]) for k in range(6))
        tree = np.concatenate([np.full(len(p[0]), t, dtype=np.int64) for t, p in enumerate(self.parts)])
        roots = np.array([p[6] for p in self.parts], dtype=np.int64)
        ens = TreeEnsemble(feature, threshold, slack, left, right, value, tree=tree, roots=roots,
                           base=np.asarray(base, dtype=np.float64).reshape(-1),
                           n_features=int(n_features), kind=kind, source=source)
        if not (np.isfinite(ens.threshold).all() and np.isfinite(ens.value).all() and np.isfinite(ens.base).all()):
            raise TreeError(f"{source}: non-finite thresholds or leaf values")
        if (ens.feature >= n_features).any():
            raise TreeError(f"{source}: a split uses a feature beyond the model's {n_features}")
        return ens


def _binary_values(v: np.ndarray) -> np.ndarray:
    """A binary booster's margin m as the class-score pair (0, m)."""
    return np.stack([np.zeros_like(v), v], axis=1)


def _rel(t: np.ndarray) -> np.ndarray:
    return REL_SLACK * np.abs(t) + ABS_SLACK


# ---------------------------------------------------------------- scikit-learn ------
def _sklearn_classes() -> tuple[type, ...]:
    """scikit-learn's own classes whose fitted state riskpipe reads (imported here, late:
    this module is also used for boosters without scikit-learn's estimators)."""
    # lazy: as the docstring says
    from sklearn.dummy import DummyClassifier
    from sklearn.ensemble import (
        ExtraTreesClassifier,
        GradientBoostingClassifier,
        HistGradientBoostingClassifier,
        RandomForestClassifier,
    )
    from sklearn.ensemble._hist_gradient_boosting.predictor import TreePredictor
    from sklearn.impute import SimpleImputer
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import MaxAbsScaler, MinMaxScaler, RobustScaler, StandardScaler
    from sklearn.tree import DecisionTreeClassifier, DecisionTreeRegressor, ExtraTreeClassifier
    from sklearn.tree._tree import Tree

    return (DecisionTreeClassifier, RandomForestClassifier, ExtraTreesClassifier, GradientBoostingClassifier,
            HistGradientBoostingClassifier, Pipeline, SimpleImputer, StandardScaler, MinMaxScaler, MaxAbsScaler,
            RobustScaler, DummyClassifier, DecisionTreeRegressor, ExtraTreeClassifier, TreePredictor, Tree)


def _exact_name(obj) -> str | None:
    """The class name of ``obj`` when its class is exactly one of scikit-learn's own
    (same module and qualname: ``type(obj) is``), else None. A subclass, even a trusted
    one keeping the name (a forest with a tuned threshold overriding ``predict``), is not
    read as its base class's trees: what it computes is its own code."""
    t = type(obj)
    for cls in _sklearn_classes():
        if t is cls:
            return cls.__name__
    return None


def _qualified(obj) -> str:
    t = type(obj)
    return f"{t.__module__}.{t.__qualname__}"


def _not_exact(obj, what: str = "a supported tree ensemble") -> str:
    """Why ``obj`` is not read as trees: it is not one of scikit-learn's own classes."""
    base = next((c for c in type(obj).__mro__[1:] if c in _sklearn_classes()), None)
    if base is not None:
        return (f"{_qualified(obj)} is a subclass of scikit-learn's {base.__name__} (it may compute its own "
                "predict); only scikit-learn's own classes are read as trees")
    return f"{_qualified(obj)} is not {what}"


def _require_exact(obj, *names: str) -> str:
    name = _exact_name(obj)
    if name is None or (names and name not in names):
        raise TreeError(_not_exact(obj) if name is None else f"{name} where {' or '.join(names)} was expected")
    return name


def _fold(scaler) -> tuple[np.ndarray, np.ndarray]:
    """(a, b) with scaler(x) = a * x + b per feature, a > 0."""
    name = _exact_name(scaler)
    if name is None:
        raise TreeError(_not_exact(scaler, f"a per-feature scaler ({', '.join(_SCALERS)})"))
    if name == "StandardScaler":  # transform subtracts mean_ only with with_mean, divides only with with_std
        a = 1.0 / scaler.scale_ if scaler.with_std and scaler.scale_ is not None else np.ones(scaler.n_features_in_)
        b = -scaler.mean_ * a if scaler.with_mean and scaler.mean_ is not None else np.zeros_like(a)
    elif name == "RobustScaler":
        a = 1.0 / scaler.scale_ if scaler.with_scaling and scaler.scale_ is not None else np.ones(scaler.n_features_in_)
        b = -scaler.center_ * a if scaler.with_centering and scaler.center_ is not None else np.zeros_like(a)
    elif name == "MaxAbsScaler":
        a, b = 1.0 / scaler.scale_, np.zeros(len(scaler.scale_))
    elif name == "MinMaxScaler":
        if scaler.clip:
            raise TreeError("MinMaxScaler(clip=True) is not a per-feature affine map")
        a, b = np.asarray(scaler.scale_, dtype=np.float64), np.asarray(scaler.min_, dtype=np.float64)
    else:
        raise TreeError(f"pipeline step {name} is not a per-feature scaler ({', '.join(_SCALERS)})")
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if not (np.isfinite(a).all() and (a > 0).all() and np.isfinite(b).all()):
        raise TreeError(f"{name}: scales must be finite and positive")
    return a, b


def _sk_tree(builder: _Builder, tree, fold, values: np.ndarray) -> None:
    """One sklearn ``Tree`` (left iff float32(x') <= threshold on x' = a x + b, where
    column j of x' is column ``cols[j]`` of the model's input)."""
    a, b, cols = fold
    # scikit-learn's predict takes a node as a leaf exactly when its left child is -1
    inner = np.asarray(tree.children_left, dtype=np.int64) != -1
    feature = np.where(inner, tree.feature.astype(np.int64), -1)
    if (feature[inner] < 0).any():
        raise MalformedTree(f"{builder.source}: malformed tree: a split on a negative feature")
    check_nodes(feature, tree.children_left, tree.children_right, len(a), builder.source)
    f = np.where(inner, feature, 0)
    t = tree.threshold.astype(np.float64)
    raw = (t - b[f]) / a[f]
    slack = REL_SLACK * (np.abs(raw) + np.abs(t / a[f]) + np.abs(b[f] / a[f])) + ABS_SLACK
    builder.add(np.where(inner, cols[f], -1), raw, slack, tree.children_left, tree.children_right, values)


def _proba(tree) -> np.ndarray:
    v = tree.value[:, 0, :].astype(np.float64)
    total = v.sum(axis=1, keepdims=True)
    return np.divide(v, total, out=np.zeros_like(v), where=total > 0)


def _from_sklearn(est, n_features: int, fold) -> TreeEnsemble:
    name = _exact_name(est)
    if name is None:
        raise TreeError(_not_exact(est))
    if getattr(est, "classes_", None) is None:  # a regressor, or a custom estimator: no trees to certify
        raise TreeError(f"{name}: not a classifier (it has no classes_)")
    K = len(est.classes_)
    b = _Builder(K, n_features, name)
    if name == "DecisionTreeClassifier":
        _check_single_output(est)
        _require_exact(est.tree_, "Tree")
        _sk_tree(b, est.tree_, fold, _proba(est.tree_))
        return b.build(np.zeros(K), n_features, "forest", name)
    if name in ("RandomForestClassifier", "ExtraTreesClassifier"):
        _check_single_output(est)
        T = len(est.estimators_)
        for e in est.estimators_:
            _require_exact(e, "DecisionTreeClassifier", "ExtraTreeClassifier")
            _require_exact(e.tree_, "Tree")
            _sk_tree(b, e.tree_, fold, _proba(e.tree_) / T)
        return b.build(np.zeros(K), n_features, "forest", name)
    if name == "GradientBoostingClassifier":
        init = est.init_
        if not ((isinstance(init, str) and init == "zero") or _exact_name(init) == "DummyClassifier"):
            raise TreeError(f"{name}: init estimator {type(init).__name__} is not a constant")
        probe = np.zeros((1, n_features))
        base = np.asarray(est._raw_predict_init(probe), dtype=np.float64).reshape(-1)
        lr = float(est.learning_rate)
        for stage in est.estimators_:
            for k, reg in enumerate(stage):
                _require_exact(reg, "DecisionTreeRegressor")
                _require_exact(reg.tree_, "Tree")
                v = reg.tree_.value[:, 0, 0].astype(np.float64) * lr
                if K == 2:
                    vals = _binary_values(v)
                else:
                    vals = np.zeros((len(v), K))
                    vals[:, k] = v
                _sk_tree(b, reg.tree_, fold, vals)
        return b.build(_binary_values(base)[0] if K == 2 else base, n_features, "boosting", name)
    if name == "HistGradientBoostingClassifier":
        a, off, cols = fold
        base = np.asarray(est._baseline_prediction, dtype=np.float64).reshape(-1)
        for stage in est._predictors:
            for k, pred in enumerate(stage):
                _require_exact(pred, "TreePredictor")
                nodes = pred.nodes
                if nodes["is_categorical"].any():
                    raise TreeError(f"{name}: categorical splits are not supported")
                leaf = nodes["is_leaf"].astype(bool)
                feature = np.where(leaf, -1, nodes["feature_idx"].astype(np.int64))
                check_nodes(feature, nodes["left"], nodes["right"], len(a), b.source)
                f = np.where(leaf, 0, feature)
                t = nodes["num_threshold"].astype(np.float64)  # left iff float64(x') <= t
                raw = (t - off[f]) / a[f]
                slack = REL_SLACK * (np.abs(raw) + np.abs(t / a[f]) + np.abs(off[f] / a[f])) + ABS_SLACK
                v = nodes["value"].astype(np.float64)
                if K == 2:
                    vals = _binary_values(v)
                else:
                    vals = np.zeros((len(v), K))
                    vals[:, k] = v
                b.add(np.where(leaf, -1, cols[f]), raw, slack, nodes["left"], nodes["right"], vals)
        return b.build(_binary_values(base)[0] if K == 2 else base, n_features, "boosting", name)
    raise TreeError(f"{name} is not a supported tree ensemble")


def _check_single_output(est) -> None:
    if getattr(est, "n_outputs_", 1) != 1:
        raise TreeError(f"{type(est).__name__}: multi-output trees are not supported")


def sklearn_ensemble(est) -> TreeEnsemble:
    """The trees of a fitted scikit-learn classifier (or Pipeline of per-feature scalers
    ending in one). Raises TreeError for anything else."""
    n_features = getattr(est, "n_features_in_", None)
    if n_features is None:
        raise TreeError(f"{type(est).__name__}: not fitted")
    # x' = a * x[cols] + b: what the final estimator sees, as a map of the model's input
    a, b, cols = np.ones(n_features), np.zeros(n_features), np.arange(n_features)
    if _exact_name(est) == "Pipeline":
        *pre, (_, final) = est.steps
        for _, step in pre:
            if step is None or (isinstance(step, str) and step == "passthrough"):
                continue
            width = getattr(step, "n_features_in_", None)
            if width != len(cols):
                raise TreeError(f"pipeline step {type(step).__name__} takes {width} features, "
                                f"the steps before it give {len(cols)}")
            if _exact_name(step) == "SimpleImputer" and not step.add_indicator \
                    and isinstance(step.missing_values, float) and np.isnan(step.missing_values):
                # identity on finite inputs (the stage admits only finite values), except that
                # transform drops each column whose statistic is NaN (seen empty in fit) unless
                # keep_empty_features: the following steps number the columns it keeps
                if not step.keep_empty_features:
                    stats = np.asarray(step.statistics_)
                    if stats.dtype.kind not in "fiu" or len(stats) != len(cols):
                        raise TreeError(f"SimpleImputer: statistics_ of dtype {stats.dtype} and length "
                                        f"{len(stats)}, for {len(cols)} numeric features")
                    keep = ~np.isnan(stats.astype(np.float64))
                    a, b, cols = a[keep], b[keep], cols[keep]
                continue
            sa, sb = _fold(step)
            if len(sa) != len(cols):
                raise TreeError(f"{type(step).__name__}: {len(sa)} scales for {len(cols)} features")
            a, b = a * sa, b * sa + sb
        est = final
        if getattr(est, "n_features_in_", None) != len(cols):
            raise TreeError(f"{type(est).__name__} takes {getattr(est, 'n_features_in_', None)} features, "
                            f"the pipeline's steps give {len(cols)}")
    return _from_sklearn(est, int(n_features), (a, b, cols))


# ---------------------------------------------------------------- XGBoost -----------
def xgboost_ensemble(booster) -> tuple[TreeEnsemble, int]:
    """(trees, number of classes) of an XGBoost ``Booster`` (gbtree, numeric splits).

    XGBoost goes left iff float32(x) < split; for float32 inputs that is
    x <= the float32 just below the split. The base margin is recovered from the
    booster's own margin prediction (the JSON spells it differently across versions)."""
    cfg = json.loads(booster.save_raw("json"))
    learner = cfg["learner"]
    objective = learner["objective"]["name"]
    gb = learner["gradient_booster"]
    if gb.get("name") != "gbtree":
        raise TreeError(f"XGBoost booster {gb.get('name')!r}: only gbtree has trees")
    model = gb["model"]
    best = booster.attr("best_iteration")
    if best is not None and int(best) + 1 < booster.num_boosted_rounds():
        raise TreeError(f"XGBoost: the file holds {booster.num_boosted_rounds()} rounds but best_iteration={best} "
                        "(early stopping; XGBClassifier.predict uses only rounds 0..best_iteration): save "
                        "booster[: best_iteration + 1] to certify the model as deployed")
    n_features = int(learner["learner_model_param"]["num_feature"])
    binary = not objective.startswith("multi:")
    if not binary:
        K = int(learner["learner_model_param"]["num_class"])
    elif objective in ("binary:logistic", "binary:logitraw", "binary:hinge"):
        K = 2
    else:
        raise TreeError(f"XGBoost objective {objective!r} is not a classifier")
    info = model.get("tree_info") or [0] * len(model["trees"])
    b = _Builder(K, n_features, f"XGBoost {objective}")
    for t, k in zip(model["trees"], info):
        left = np.asarray(t["left_children"], dtype=np.int64)
        leaf = left < 0
        if any(int(c) != 0 for c in t.get("split_type", [])):
            raise TreeError("XGBoost: categorical splits are not supported")
        cond = np.asarray(t["split_conditions"], dtype=np.float32)
        thr = np.nextafter(cond, np.float32(-np.inf)).astype(np.float64)  # x < c  <=>  x <= prev(c)
        feature = np.where(leaf, -1, np.asarray(t["split_indices"], dtype=np.int64))
        v = cond.astype(np.float64)
        if binary:
            vals = _binary_values(v)
        else:
            vals = np.zeros((len(v), K))
            vals[:, int(k)] = v
        b.add(feature, thr, _rel(thr), left, t["right_children"], vals)
    ens = replace(b.build(np.zeros(K), n_features, "boosting", f"XGBoost {objective}"), sum_ulp=F32_ULP)
    return _with_base(ens, lambda X: xgboost_margin(booster, X, K)), K


def xgboost_margin(booster, X: np.ndarray, K: int) -> np.ndarray:
    """(B, C) margins as class scores: one margin per input (a binary objective) as (0, m),
    K per input as they are (multi:, even with K = 2)."""
    m = np.asarray(booster.inplace_predict(np.asarray(X, dtype=np.float32), predict_type="margin"),
                   dtype=np.float64)
    return _binary_values(m.reshape(-1)) if m.size == len(X) else m.reshape(len(X), K)


# ---------------------------------------------------------------- LightGBM ----------
def lightgbm_ensemble(booster) -> tuple[TreeEnsemble, int]:
    """(trees, number of classes) of a LightGBM ``Booster`` (numeric ``<=`` splits)."""
    dump = booster.dump_model()
    objective = str(dump.get("objective", ""))
    per_iter = int(dump.get("num_tree_per_iteration", 1))
    if objective.startswith(("multiclass", "multiclassova")):
        K = int(dump["num_class"])
        if per_iter != K:
            raise TreeError(f"LightGBM {objective.split()[0]}: {per_iter} trees per iteration for {K} classes")
    elif objective.startswith(("binary", "cross_entropy")):
        K = 2
        if per_iter != 1:
            raise TreeError(f"LightGBM {objective.split()[0]}: {per_iter} trees per iteration, binary has 1")
    else:
        raise TreeError(f"LightGBM objective {objective!r} is not a classifier")
    binary = K == 2 and per_iter == 1
    n_features = int(dump["max_feature_idx"]) + 1
    b = _Builder(K, n_features, f"LightGBM {objective.split()[0] if objective else objective}")
    for i, info in enumerate(dump["tree_info"]):
        nodes: list[dict] = []
        _lgb_walk(info["tree_structure"], nodes)
        feature = np.array([n["f"] for n in nodes], dtype=np.int64)
        thr = np.array([n["t"] for n in nodes], dtype=np.float64)
        v = np.array([n["v"] for n in nodes], dtype=np.float64)
        if binary:  # one margin m per input, as the pair (0, m)
            vals = _binary_values(v)
        else:  # multiclass, K >= 2: tree i adds to class i % K
            vals = np.zeros((len(v), K))
            vals[:, i % per_iter] = v
        b.add(feature, thr, _rel(thr), [n["l"] for n in nodes], [n["r"] for n in nodes], vals)
    ens = b.build(np.zeros(K), n_features, "boosting", f"LightGBM {objective.split()[0]}")
    return _with_base(ens, lambda X: lightgbm_margin(booster, X, K)), K


def _lgb_walk(node: dict, out: list[dict]) -> int:
    idx = len(out)
    if "leaf_value" in node or "split_feature" not in node:
        out.append({"f": -1, "t": 0.0, "v": float(node.get("leaf_value", 0.0)), "l": -1, "r": -1})
        return idx
    if node.get("decision_type", "<=") != "<=":
        raise TreeError("LightGBM: categorical splits are not supported")
    if node.get("missing_type") == "Zero":
        raise TreeError("LightGBM: zero-as-missing splits are not supported")
    entry = {"f": int(node["split_feature"]), "t": float(node["threshold"]), "v": 0.0}
    out.append(entry)
    entry["l"] = _lgb_walk(node["left_child"], out)
    entry["r"] = _lgb_walk(node["right_child"], out)
    return idx


def lightgbm_margin(booster, X: np.ndarray, K: int) -> np.ndarray:
    """(B, C) margins as class scores: one margin per input (a binary objective) as (0, m),
    K per input as they are (multiclass, even with K = 2), as ``xgboost_margin``."""
    m = np.asarray(booster.predict(np.asarray(X, dtype=np.float64), raw_score=True), dtype=np.float64)
    return _binary_values(m.reshape(-1)) if m.size == len(X) else m.reshape(len(X), K)


def _with_base(ens: TreeEnsemble, margin) -> TreeEnsemble:
    """The constant part of a booster's margin: its own margin minus the trees' sum,
    which must be the same on every probe point."""
    X = probe_points(ens)
    diff = margin(X) - ens.scores(X)
    base = np.median(diff, axis=0)
    if not np.allclose(diff, base, rtol=1e-5, atol=1e-5 * (1 + np.abs(base).max())):
        raise TreeError(f"{ens.source}: margins are not the trees' sum plus a constant")
    return replace(ens, base=base)


# ---------------------------------------------------------------- checking ----------
def probe_points(ens: TreeEnsemble, n: int = 256, seed: int = 0) -> np.ndarray:
    """Points around the thresholds (each feature set near one of its own thresholds,
    on either side), where a mistake in the extraction would show."""
    rng = np.random.default_rng(seed)
    X = np.zeros((n, ens.n_features))
    inner = ens.feature >= 0
    for f in range(ens.n_features):
        t = ens.threshold[inner & (ens.feature == f)]
        if len(t) == 0:
            continue
        pick = rng.choice(t, size=n)
        X[:, f] = pick + rng.choice([-1.0, 1.0], size=n) * (np.abs(pick) * 1e-3 + 1e-3) * rng.random(n)
    return X.astype(np.float32)


def check_agreement(ens: TreeEnsemble, predict, num_classes: int) -> None:
    """Raise TreeError unless the trees classify the probe points as ``predict`` does
    (rows where two class scores are within rounding of each other are skipped, and so
    are rows within a threshold's slack on their path: the model's own arithmetic may
    send them the other way there, and certificates treat such a node as undecided)."""
    if ens.n_classes != num_classes:
        raise TreeError(f"{ens.source}: trees give {ens.n_classes} classes, the model {num_classes}")
    X = probe_points(ens)
    leaves, near = ens.apply_near(X)
    s = ens.base + ens.value[leaves].sum(axis=1)
    top = np.sort(s, axis=1)
    clear = (top[:, -1] - top[:, -2] > 1e-6 * (1 + np.abs(top[:, -1]))) & ~near
    if not clear.any():
        raise TreeError(f"{ens.source}: every probe point lies within rounding of a threshold or a tie; "
                        "the extracted trees cannot be checked against the model's predict")
    mine = s.argmax(axis=1)
    theirs = np.asarray(predict(X))
    bad = np.flatnonzero(clear & (mine != theirs))
    if len(bad):
        raise TreeError(f"{ens.source}: extracted trees disagree with the model's predict on "
                        f"{len(bad)} of {len(X)} probe points")


__all__ = ["REL_SLACK", "MalformedTree", "TreeEnsemble", "TreeError", "check_agreement", "check_loaded_trees",
           "check_nodes", "lightgbm_ensemble", "probe_points",
           "sklearn_ensemble", "xgboost_ensemble"]

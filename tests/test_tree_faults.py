"""Faults in reading scikit-learn tree models (the tester's trees round): multi-output
models taken as classifiers, trusted subclasses certified as the plain forest, crafted
tree structures, an imputer that dropped a column, false refusals of valid models, a
two-class multiclass LightGBM booster. Real seeded models trained here (none is the demo)."""

from __future__ import annotations

import numpy as np
import pytest
import skops.io as sio
import torch
from sklearn.datasets import make_classification
from sklearn.ensemble import RandomForestClassifier, RandomForestRegressor
from sklearn.neighbors import KNeighborsRegressor
from sklearn.tree import DecisionTreeClassifier, DecisionTreeRegressor

import treesubclasses
from riskpipe.certify import family
from riskpipe.models import ModelError, load_model
from riskpipe.models.output import check_output


def data(n: int = 400, seed: int = 0):
    X, y = make_classification(n, 5, n_informative=3, n_redundant=1, random_state=seed)
    return X.astype(np.float32), y


def saved(tmp_path, est, name="m"):
    path = tmp_path / f"{name}.skops"
    sio.dump(est, path)
    return str(path)


# ---------------------------------------------------------------- multi-output ------
def _multi_output_models():
    X, y = data()
    Y = np.stack([y, (X[:, 0] > 0).astype(int)], axis=1)
    two_targets = np.stack([X[:, 0] * 3, X[:, 1]], axis=1)
    return X, {
        "multilabel-float-labels": (RandomForestClassifier(10, random_state=0).fit(X, Y.astype(float)), ""),
        "multilabel-int-labels": (RandomForestClassifier(10, random_state=0).fit(X, Y), ""),
        "two-target-forest-regressor": (RandomForestRegressor(10, random_state=0).fit(X, two_targets), "?classes=2"),
        # no n_outputs_: found by its predict's shape on a probe input
        "two-target-knn-regressor": (KNeighborsRegressor(3).fit(X, two_targets), "?classes=2"),
    }


@pytest.mark.parametrize("name", ["multilabel-float-labels", "multilabel-int-labels", "two-target-forest-regressor",
                                  "two-target-knn-regressor"])
def test_a_multi_output_model_is_refused_at_load_in_one_line(tmp_path, name):
    _, models = _multi_output_models()
    est, suffix = models[name]
    trusted = ["sklearn.metrics._dist_metrics.EuclideanDistance64", "sklearn.neighbors._kd_tree.KDTree"]
    with pytest.raises(ModelError, match=r"m\.skops.*multi-output models are not supported") as e:
        load_model(saved(tmp_path, est) + suffix, trusted_types=trusted)
    assert "\n" not in str(e.value)


def test_a_two_d_predict_result_is_a_fault_never_class_scores(tmp_path, monkeypatch):
    X, y = data()
    est = DecisionTreeRegressor(random_state=0).fit(X, y.astype(float))  # one output: loads with ?classes=2
    model = load_model(saved(tmp_path, est) + "?classes=2")
    assert (model.predict(X[:16]) >= 0).all()
    # from now on one float per "output" per input, which would pass as (16, 2) scores
    monkeypatch.setattr(DecisionTreeRegressor, "predict", lambda self, Z: np.stack([Z[:, 0], Z[:, 1]], axis=1))
    c = model.classes(torch.from_numpy(X[:16]))
    assert bool(c.bad.all()) and "multi-output" in str(c.reason)


def test_an_integer_n_by_c_output_says_why_it_is_refused():
    c = check_output(np.zeros((16, 2), dtype=np.int64), 16, 2)
    assert bool(c.bad.all())
    assert c.reason == "integer output of shape (16, 2): class ids must be (16,), and (16, 2) logits must be " \
                       "floating point"


# ---------------------------------------------------------------- trusted subclasses -
@pytest.mark.parametrize("cls", [treesubclasses.ThresholdForest, treesubclasses.ThresholdExtraTrees,
                                 treesubclasses.RandomForestClassifier])
def test_a_trusted_subclass_predicts_with_its_own_code_and_gets_no_trees_certificate(tmp_path, cls):
    X, y = make_classification(1200, 6, n_informative=4, weights=[0.9], random_state=0)
    X = X.astype(np.float32)
    est = cls(n_estimators=30, max_depth=6, random_state=0).fit(X[:900], y[:900])
    own = est.predict(X[900:])
    assert (own != RandomForestClassifier.predict(est, X[900:])).any()  # the threshold changes some classes
    model = load_model(saved(tmp_path, est), trusted_types=[f"{cls.__module__}.{cls.__qualname__}"])
    assert (model.predict(X[900:]) == own).all()
    assert model.trees is None and "is a subclass of scikit-learn's" in model.meta["trees_error"]
    with pytest.raises(ValueError, match=r"the trees certificate needs a tree ensemble.*subclass") as e:
        family("trees")(model)
    assert "\n" not in str(e.value)


# ---------------------------------------------------------------- crafted trees -----
def _crafted(tmp_path, edit, forest: bool = False):
    """A fitted tree (or a forest's second tree) whose node arrays are edited as a crafted
    skops file would hold them: only trusted types, no code."""
    X, y = data(200)
    est = (RandomForestClassifier(3, max_depth=3, random_state=0) if forest
           else DecisionTreeClassifier(max_depth=3, random_state=0)).fit(X, y)
    tree = est.estimators_[1].tree_ if forest else est.tree_
    state = tree.__getstate__()
    nodes = state["nodes"].copy()
    edit(nodes, np.flatnonzero(nodes["left_child"] >= 0))
    state["nodes"] = nodes
    tree.__setstate__(state)
    return saved(tmp_path, est)


def _cycle(nodes, inner):
    nodes["left_child"][inner[-1]] = 0  # a deepest split's left child is the root


def _two_parents(nodes, inner):
    nodes["right_child"][inner[-1]] = nodes["left_child"][inner[-1]]


def _child_out_of_range(nodes, inner):
    nodes["right_child"][inner[0]] = len(nodes) + 7


def _feature_out_of_range(nodes, inner):
    nodes["feature"][inner[0]] = 10_000_000


def _negative_feature(nodes, inner):
    nodes["feature"][inner[-1]] = -2  # a split that scikit-learn walks (its left child is set)


@pytest.mark.parametrize("forest", [False, True])
@pytest.mark.parametrize("edit, why", [(_cycle, "reached twice"), (_two_parents, "reached twice"),
                                       (_child_out_of_range, "child index"),
                                       (_feature_out_of_range, "split on feature 10000000, the model has 5"),
                                       (_negative_feature, "negative feature")])
def test_a_crafted_tree_is_refused_at_load_in_one_line(tmp_path, edit, why, forest):
    import signal

    path = _crafted(tmp_path, edit, forest)

    def hung(*_):
        raise TimeoutError("load_model did not return")

    old = signal.signal(signal.SIGALRM, hung)
    signal.alarm(30)
    try:
        with pytest.raises(ModelError, match=r"m\.skops: \w+Classifier: malformed tree") as e:
            load_model(path)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    assert why in str(e.value) and "\n" not in str(e.value)


# ---------------------------------------------------------------- imputer -----------
@pytest.mark.parametrize("empty", [[0], [1, 3]])
@pytest.mark.parametrize("final", ["forest", "hist-gradient-boosting"])
def test_an_imputer_that_dropped_empty_columns_is_read_with_the_columns_it_keeps(tmp_path, empty, final):
    from sklearn.ensemble import HistGradientBoostingClassifier
    from sklearn.impute import SimpleImputer
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    X, y = data(500, seed=3)
    X = X * np.array([1.0, 10.0, 100.0, 0.1, 1000.0], dtype=np.float32)
    Xfit = X.copy()
    Xfit[:, empty] = np.nan  # seen empty in fit: SimpleImputer's transform drops these columns
    last = (RandomForestClassifier(15, max_depth=6, random_state=0) if final == "forest"
            else HistGradientBoostingClassifier(max_iter=15, random_state=0))
    est = make_pipeline(SimpleImputer(), StandardScaler(), last).fit(Xfit, y)
    assert est[-1].n_features_in_ == 5 - len(empty)
    model = load_model(saved(tmp_path, est), trusted_types=["numpy.dtype"])
    assert model.trees is not None, model.meta.get("trees_error")
    assert model.trees.n_features == 5 and not np.isin(model.trees.feature, empty).any()
    own = est.predict(X)
    assert (model.predict(X) == own).all()
    assert (model.trees.scores(X).argmax(axis=1) == own).mean() >= 0.99  # a point on a folded threshold may round


def test_an_unforeseen_error_reading_trees_is_a_one_line_refusal(tmp_path, monkeypatch):
    import riskpipe.models.trees as trees

    X, y = data()
    path = saved(tmp_path, RandomForestClassifier(5, random_state=0).fit(X, y))

    def broken(est):
        raise RuntimeError("unexpected\nstate")

    monkeypatch.setattr(trees, "sklearn_ensemble", broken)
    with pytest.raises(ModelError, match=r"m\.skops: reading its trees failed \(RuntimeError: unexpected") as e:
        load_model(path)
    assert "\n" not in str(e.value)


# ---------------------------------------------------------------- agreement check ---
@pytest.mark.parametrize("seed", [1, 5])
def test_a_probe_point_within_a_thresholds_slack_does_not_refuse_a_valid_model(tmp_path, seed):
    from sklearn.ensemble import GradientBoostingClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import MinMaxScaler

    X, y = make_classification(400, 7, n_informative=4, n_classes=2, random_state=seed)
    X = (X * np.array([1, 10, 100, 0.1, 1000, 1, 1], np.float32)).astype(np.float32)
    est = make_pipeline(MinMaxScaler(), GradientBoostingClassifier(n_estimators=20, random_state=0)).fit(X, y)
    model = load_model(saved(tmp_path, est))
    assert model.trees is not None, model.meta.get("trees_error")
    assert (model.predict(X) == est.predict(X)).all()


def test_the_agreement_check_still_catches_trees_that_disagree(tmp_path):
    from riskpipe.models.trees import TreeError, check_agreement, sklearn_ensemble

    X, y = data()
    ens = sklearn_ensemble(RandomForestClassifier(10, max_depth=4, random_state=0).fit(X, y))
    check_agreement(ens, lambda Z: ens.scores(Z).argmax(axis=1), 2)
    with pytest.raises(TreeError, match="disagree with the model's predict"):
        check_agreement(ens, lambda Z: 1 - ens.scores(Z).argmax(axis=1), 2)


# ---------------------------------------------------------------- LightGBM ----------
def test_a_two_class_multiclass_lightgbm_booster_is_read_by_its_objective(tmp_path):
    lgb = pytest.importorskip("lightgbm")
    X, y = data(300)
    booster = lgb.train({"objective": "multiclass", "num_class": 2, "verbose": -1, "num_leaves": 8, "num_threads": 1,
                         "seed": 0}, lgb.Dataset(X, y), 10)
    path = tmp_path / "mc2.txt"
    booster.save_model(str(path))
    assert booster.predict(X[:3], raw_score=True).shape == (3, 2)
    model = load_model(str(path))
    assert model.num_classes == 2 and model.trees is not None
    own = booster.predict(X).argmax(axis=1)
    assert (model.predict(X) == own).all()
    assert (model.trees.scores(X).argmax(axis=1) == own).mean() >= 0.99
    certs = family("trees")(model).run("certify", X[:10], list(range(10)))
    assert any(not c.abstained for c in certs)


# ---------------------------------------------------------------- declared range ----
@pytest.mark.parametrize("rng", ["-inf,inf", "0,inf", "-1e39,1"])
def test_a_non_finite_range_in_the_spec_is_refused_naming_range(tmp_path, rng):
    X, y = data()
    path = saved(tmp_path, RandomForestClassifier(5, random_state=0).fit(X, y))
    with pytest.raises(ModelError, match=r"m\.skops\?range=.*: \?range= must be finite"):
        load_model(f"{path}?range={rng}")

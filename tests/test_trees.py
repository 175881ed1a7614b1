"""Tree ensembles (issue 20): loading through the skops allow-list and the boosters' native
files, the ``trees`` certificate (exact on one tree, sound on ensembles, conformance suite),
the tree attack, and decisions through the stage. Real seeded models trained here."""

from __future__ import annotations

import json

import numpy as np
import pytest
import skops.io as sio
from sklearn.datasets import make_classification
from sklearn.ensemble import (
    ExtraTreesClassifier,
    GradientBoostingClassifier,
    HistGradientBoostingClassifier,
    RandomForestClassifier,
)
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.tree import DecisionTreeClassifier

from riskpipe.certify import family
from riskpipe.conformance import CertifierCheckError, check_certifier
from riskpipe.models import ModelError, load_model
from riskpipe.tree_attack import tree_attack

UNITS = np.array([1.0, 10.0, 100.0, 0.1, 1000.0], dtype=np.float32)  # raw units differ per feature


def data(classes: int = 2, n: int = 300, seed: int = 0):
    X, y = make_classification(n, 5, n_informative=3, n_redundant=1, n_classes=classes, random_state=seed)
    return (X * UNITS).astype(np.float32), y


ESTIMATORS = {
    "decision-tree": lambda: DecisionTreeClassifier(max_depth=5, random_state=0),
    "random-forest": lambda: RandomForestClassifier(25, max_depth=6, random_state=0),
    "extra-trees": lambda: ExtraTreesClassifier(25, max_depth=6, random_state=0),
    "gradient-boosting": lambda: GradientBoostingClassifier(n_estimators=20, max_depth=3, random_state=0),
    "hist-gradient-boosting": lambda: HistGradientBoostingClassifier(max_iter=20, random_state=0),
    "pipeline-scaler-forest": lambda: make_pipeline(StandardScaler(), RandomForestClassifier(15, max_depth=5,
                                                                                             random_state=0)),
}


def saved(tmp_path, est, name="m"):
    path = tmp_path / f"{name}.skops"
    sio.dump(est, path)
    return str(path)


# ---------------------------------------------------------------- loading -----------
@pytest.mark.parametrize("name", list(ESTIMATORS))
@pytest.mark.parametrize("classes", [2, 3])
def test_each_tree_estimator_loads_from_skops_with_its_trees(tmp_path, name, classes):
    X, y = data(classes)
    est = ESTIMATORS[name]().fit(X, y)
    model = load_model(saved(tmp_path, est))
    assert model.trees is not None, model.meta.get("trees_error")
    assert model.num_classes == classes and model.input_shape == (5,)
    assert (model.predict(X) == est.predict(X)).all()
    agree = model.trees.scores(X).argmax(axis=1) == est.predict(X)
    assert agree.mean() >= 0.99  # a point exactly on a folded scaler's threshold may round either way


def test_untrusted_type_is_refused_naming_the_types_and_the_key(tmp_path):
    from sklearn.preprocessing import FunctionTransformer

    from riskpipe.app.compose import build_entry
    from riskpipe.app.config import ConfigError, ModelConfig, default_policy_path
    from riskpipe.policy import load_policy

    X, y = data()
    est = make_pipeline(FunctionTransformer(np.round), DecisionTreeClassifier(max_depth=3)).fit(X, y)
    path = saved(tmp_path, est)
    with pytest.raises(ModelError, match=r"untrusted types \['numpy.round'\].*trusted_types"):
        load_model(path)
    policy = load_policy(default_policy_path())
    with pytest.raises(ConfigError, match=r"models.fraud.spec: .*'numpy.round'.*models.fraud.trusted_types"):
        build_entry("fraud", ModelConfig(spec=path), policy)
    model = load_model(path, trusted_types=["numpy.round"])
    assert (model.predict(X) == est.predict(X)).all()
    assert model.trees is None and "FunctionTransformer" in model.meta["trees_error"]


def test_trees_certificate_refuses_a_model_without_trees(tmp_path):
    from sklearn.linear_model import LogisticRegression

    X, y = data()
    model = load_model(saved(tmp_path, LogisticRegression().fit(X, y)))
    with pytest.raises(ValueError, match="model: the trees certificate needs a tree ensemble"):
        family("trees")(model)


def test_xgboost_json_and_ubj_boosters_load_and_certify(tmp_path):
    xgb = pytest.importorskip("xgboost")
    for classes in (2, 3):
        X, y = data(classes)
        clf = xgb.XGBClassifier(n_estimators=15, max_depth=3, random_state=0, n_jobs=1).fit(X, y)
        for suffix in ("json", "ubj"):
            path = tmp_path / f"b{classes}.{suffix}"
            clf.get_booster().save_model(str(path))
            model = load_model(str(path))
            assert model.num_classes == classes and model.trees is not None
            assert (model.predict(X) == clf.predict(X)).all()
            certs = family("trees")(model).run("certify", X[:10], list(range(10)))
            assert any(not c.abstained for c in certs)


def test_lightgbm_text_booster_loads_and_certifies(tmp_path):
    lgb = pytest.importorskip("lightgbm")
    for classes in (2, 3):
        X, y = data(classes)
        clf = lgb.LGBMClassifier(n_estimators=15, num_leaves=8, random_state=0, n_jobs=1, verbose=-1).fit(X, y)
        path = tmp_path / f"b{classes}.txt"
        clf.booster_.save_model(str(path))
        model = load_model(str(path))
        assert model.num_classes == classes and model.trees is not None
        assert (model.predict(X) == clf.predict(X)).all()
        certs = family("trees")(model).run("certify", X[:10], list(range(10)))
        assert any(not c.abstained for c in certs)


@pytest.mark.parametrize("zipmap", [True, False])
def test_skl2onnx_classifier_uses_its_probability_output(tmp_path, zipmap):
    skl2onnx = pytest.importorskip("skl2onnx")
    from skl2onnx.common.data_types import FloatTensorType

    X, y = data(3)
    est = RandomForestClassifier(10, max_depth=5, random_state=0).fit(X, y)
    onx = skl2onnx.convert_sklearn(est, initial_types=[("x", FloatTensorType([None, 5]))],
                                   options={id(est): {"zipmap": zipmap}})
    path = tmp_path / "rf.onnx"
    path.write_bytes(onx.SerializeToString())
    model = load_model(str(path))
    assert model.num_classes == 3 and model.input_shape == (5,)
    assert model.meta["onnx_output"] == "probabilities" if not zipmap else "output_probability"
    assert (model.predict(X) == est.predict(X)).mean() >= 0.99


def test_fixed_batch_onnx_runs_in_padded_chunks(tmp_path):
    import onnx
    from onnx import TensorProto, helper

    W = np.random.default_rng(0).standard_normal((5, 3)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["logits"])], "fixed",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 5])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [4, 3])],
        [helper.make_tensor("W", TensorProto.FLOAT, [5, 3], W.ravel())])
    path = tmp_path / "fixed.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), str(path))
    model = load_model(str(path))
    assert model.meta["onnx_fixed_batch"] == 4
    X = np.random.default_rng(1).standard_normal((11, 5)).astype(np.float32)  # 4 + 4 + 3 (padded)
    assert (model.predict(X) == (X @ W).argmax(axis=1)).all()


# ---------------------------------------------------------------- the certificate ---
def _leaf_regions(ens):
    """(lo, hi, class) of every leaf of tree 0 by walking it: lo < x <= hi."""
    out = []

    def walk(n, lo, hi):
        if ens.feature[n] < 0:
            out.append((lo, hi, ens.value[n]))
            return
        f, t = ens.feature[n], ens.threshold[n]
        h = hi.copy()
        h[f] = min(h[f], t)
        walk(ens.left[n], lo, h)
        lo2 = lo.copy()
        lo2[f] = max(lo2[f], t)
        walk(ens.right[n], lo2, hi)

    walk(ens.roots[0], np.full(ens.n_features, -np.inf), np.full(ens.n_features, np.inf))
    return out


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_single_tree_radius_is_exact_against_brute_force(tmp_path, seed):
    """Brute force over the thresholds: the l_inf distance from x to the nearest leaf
    region of another class (a tied leaf counts as another class) is the radius, up to
    the relative rounding slack per threshold."""
    X, y = data(3, seed=seed)
    model = load_model(saved(tmp_path, DecisionTreeClassifier(max_depth=6, random_state=seed).fit(X, y)))
    certs = family("trees")(model).run("certify", X[:60], list(range(60)))
    regions = _leaf_regions(model.trees)
    for x, c in zip(X[:60].astype(np.float64), certs):
        k = c.extra["model_class"]
        others = [(lo, hi) for lo, hi, v in regions if not (v[k] > np.delete(v, k)).all()]
        exact = min(np.max(np.maximum(np.maximum(lo - x, x - hi), 0.0)) for lo, hi in others)
        assert c.radius <= exact * (1 + 1e-6) + 1e-9
        slack = 2.5e-6 * (np.abs(x).max() + exact)  # REL_SLACK on each threshold (|t| <= |x| + exact)
        assert c.radius >= exact - slack, (c.radius, exact, c.reason)


def test_no_attack_changes_the_class_inside_a_certified_radius_of_an_ensemble(tmp_path):
    X, y = data(3)
    for est in (RandomForestClassifier(40, max_depth=7, random_state=0), GradientBoostingClassifier(
            n_estimators=30, max_depth=3, random_state=0)):
        model = load_model(saved(tmp_path, est.fit(X, y)))
        certs = family("trees")(model).run("certify", X[:30], list(range(30)))
        ok = [i for i, c in enumerate(certs) if not c.abstained]
        assert len(ok) >= 20
        r = np.array([certs[i].radius for i in ok])
        cls = np.array([certs[i].predicted_class for i in ok])
        inside = tree_attack(model.trees, model.predict, X[ok], cls, r * (1 - 1e-6), "linf", seed=0, restarts=3)
        assert (np.abs(inside - X[ok]).max(axis=1) <= r).all()
        assert (model.predict(inside) == cls).all()
        outside = tree_attack(model.trees, model.predict, X[ok], cls, r * 3, "linf", seed=0)
        assert (model.predict(outside) != cls).mean() >= 0.5, "the attack has no teeth beyond the radius"


def test_tree_attack_is_exact_on_a_single_tree(tmp_path):
    """Just beyond the exact radius the nearest other-class leaf is within reach: found."""
    X, y = data(2)
    model = load_model(saved(tmp_path, DecisionTreeClassifier(max_depth=6, random_state=0).fit(X, y)))
    certs = family("trees")(model).run("certify", X[:40], list(range(40)))
    regions = _leaf_regions(model.trees)
    hits = 0
    for i, c in enumerate(certs):
        v_own = [v for lo, hi, v in regions]
        strict = [(lo, hi) for lo, hi, v in regions if v.argmax() != c.extra["model_class"]
                  and v.max() > np.sort(v)[-2]]
        if c.abstained or not strict:
            continue
        exact = min(np.max(np.maximum(np.maximum(lo - X[i], X[i] - hi), 0.0)) for lo, hi in strict)
        adv = tree_attack(model.trees, model.predict, X[i:i + 1], [c.predicted_class], exact * 1.01 + 1e-6, "linf")
        hits += int(model.predict(adv)[0] != c.predicted_class)
        assert v_own
    assert hits >= 30


def test_scaled_and_ranged_trees_certify_in_the_scaled_norm(tmp_path):
    from riskpipe.models.scaled import scaled_model

    X, y = data(2)
    model = load_model(saved(tmp_path, RandomForestClassifier(20, max_depth=5, random_state=0).fit(X, y)))
    s = X.std(axis=0)
    g = scaled_model(model, s, "standardize(reference)")
    Z = X[:20] / s
    certs = family("trees")(g).run("certify", Z, list(range(20)))
    ok = [i for i, c in enumerate(certs) if not c.abstained]
    r = np.array([certs[i].radius for i in ok])
    assert len(ok) >= 15 and np.median(r) > 0.01  # in standard deviations, not raw units
    z_adv = tree_attack(g.trees, g.predict, Z[ok], [certs[i].predicted_class for i in ok], r * (1 - 1e-6),
                        "linf", restarts=3)
    assert (model.predict(z_adv * s) == [certs[i].predicted_class for i in ok]).all()


FACTORY = {"trees": lambda m, **kw: family("trees")(m, **kw)}


@pytest.mark.parametrize("name", ["random-forest", "hist-gradient-boosting", "gradient-boosting"])
def test_trees_family_conforms(tmp_path, name):
    X, y = data(3)
    model = load_model(saved(tmp_path, ESTIMATORS[name]().fit(X, y)) + "?range=-5000,5000")
    report = check_certifier(FACTORY["trees"], model, X[:12])
    assert report["attacked"] >= 8 and "no_attack_inside_radius" in report["checks"]


def test_suite_catches_an_inflated_tree_radius(tmp_path):
    import dataclasses

    @dataclasses.dataclass
    class Inflated(family("trees")):
        def certify_batch(self, X, seeds):
            return [c if c.abstained else c.replace(radius=c.radius * 20) for c in super().certify_batch(X, seeds)]

    X, y = data(2)
    model = load_model(saved(tmp_path, ESTIMATORS["random-forest"]().fit(X, y)))
    with pytest.raises(CertifierCheckError, match="no_attack_inside_radius"):
        check_certifier(lambda m, **kw: Inflated(m, **kw), model, X[:12])


# ---------------------------------------------------------------- the stage ---------
def _booster_file(tmp_path, name: str, X, y) -> str:
    if name == "xgboost":
        xgb = pytest.importorskip("xgboost")
        path = str(tmp_path / "booster.ubj")
        xgb.XGBClassifier(n_estimators=20, max_depth=3, random_state=0, n_jobs=1).fit(X, y).get_booster() \
            .save_model(path)
        return path
    if name == "lightgbm":
        lgb = pytest.importorskip("lightgbm")
        path = str(tmp_path / "booster.txt")
        lgb.LGBMClassifier(n_estimators=20, num_leaves=8, random_state=0, n_jobs=1, verbose=-1).fit(X, y) \
            .booster_.save_model(path)
        return path
    return saved(tmp_path, ESTIMATORS[name]().fit(X, y))


@pytest.mark.parametrize("name", [*ESTIMATORS, "xgboost", "lightgbm"])
def test_each_estimator_is_decided_through_the_stage_with_the_trees_certificate(tmp_path, name):
    from riskpipe.app.compose import build_pipeline
    from riskpipe.app.config import load_config
    from riskpipe.app.offline import run_offline
    from riskpipe.stream.events import make_event
    from streamkit import policy_with

    X, y = data(2)
    path = _booster_file(tmp_path, name, X, y)
    np.savez(tmp_path / "ref.npz", X=X[:100], y=y[:100])
    policy = policy_with(tmp_path, certifier={"method": "trees"})
    (tmp_path / "riskpipe.yaml").write_text(json.dumps({"policy": policy, "models": {"fraud": {
        "spec": path, "reference": str(tmp_path / "ref.npz"), "scale": "standardize"}}}))
    config = load_config(str(tmp_path / "riskpipe.yaml"))
    pipe = build_pipeline(config)
    events = [make_event(f"t-{i}", "fraud", x) for i, x in enumerate(X[200:216])]
    out = run_offline(events, tmp_path / "out", config, pipeline=pipe)
    audit = out.read("audit")
    assert len(audit) == 16
    for rec in audit:
        cert = rec["certificate"]
        assert cert["method"] == "trees" and cert["norm"] == "linf"
        assert "exact for a single tree" in rec["scope"] and "scaled l_inf" in rec["scope"]
        assert rec["decision"] in ("allow", "review", "block")
        if cert["abstained"]:
            assert rec["decision"] != "allow"
    assert any(not r["certificate"]["abstained"] for r in audit)
    assert len(out.read("decisions")) == 16
    json.dumps(audit)


def test_onnx_without_a_score_output_is_refused(tmp_path):
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("ArgMax", ["x"], ["label"], axis=1, keepdims=0)], "labels-only",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 5])],
        [helper.make_tensor_value_info("label", TensorProto.INT64, [None])])
    path = tmp_path / "labels.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), str(path))
    with pytest.raises(ModelError, match=r"no ONNX output holds class scores.*label tensor\(int64\)"):
        load_model(str(path))


def test_a_model_fault_is_an_uncertified_trees_certificate(tmp_path):
    """The model's own output decides the class; a row whose output breaks the contract
    (here NaN scores) is a model_fault certificate, never a radius."""
    import dataclasses

    X, y = data(2)
    model = load_model(saved(tmp_path, ESTIMATORS["random-forest"]().fit(X, y)))
    good = model._predict_fn

    def faulty(batch):
        s = np.eye(2)[np.asarray(good(batch))]
        s[np.asarray(batch)[:, 0] > 0] = np.nan
        return s

    broken = dataclasses.replace(model, _predict_fn=faulty)
    certs = family("trees")(broken).run("certify", X[:20], list(range(20)))
    for x, c in zip(X[:20], certs):
        if x[0] > 0:
            assert c.abstained and c.reason == "model_fault" and c.radius == 0 and "model_fault" in c.extra
        else:
            assert c.reason != "model_fault"
    assert any(x[0] > 0 for x in X[:20]) and any(not c.abstained for c in certs)

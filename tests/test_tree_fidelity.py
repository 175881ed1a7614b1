"""The trees certificate speaks about the model as it computes and as it is deployed: its
rounding allowance covers the model's own arithmetic (XGBoost sums in float32), scalers are
folded as their ``transform`` computes, an early-stopped XGBoost file (whose deployed
classifier uses fewer rounds than the file holds) is refused, and a two-class softprob
model is read by its objective. Real seeded models; each case failed before its fix
(the RobustScaler and with_std=False cases, which held, guard the same fold)."""

from __future__ import annotations

import numpy as np
import pytest
import skops.io as sio
from sklearn.datasets import make_classification
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import RobustScaler, StandardScaler
from sklearn.tree import DecisionTreeClassifier

from riskpipe.certify.trees import TreeBounds, TreeGeometry
from riskpipe.models import ModelError, load_model


def test_the_rounding_allowance_covers_xgboosts_float32_sums(tmp_path):
    """XGBoost adds leaf values in float32; the certificate sums them in float64. Boosted
    stumps (a common explainable configuration) differ by up to ~7e-6 between the two,
    where the allowance was 1e-9 relative (6.6e-8 here): a margin the float64 sum put just
    above zero could be class 0 for XGBoost, inside a certified radius. The allowance now
    bounds a float32 sum of every tree (and the base read back from float32 margins)."""
    xgb = pytest.importorskip("xgboost")
    X, y = make_classification(3000, 8, n_informative=7, n_redundant=0, weights=[0.97], flip_y=0.01, random_state=0)
    X = X.astype(np.float32)
    clf = xgb.XGBClassifier(n_estimators=300, max_depth=1, learning_rate=0.3, n_jobs=1, random_state=0).fit(X, y)
    clf.save_model(str(tmp_path / "stumps.json"))
    model = load_model(str(tmp_path / "stumps.json"))
    geometry = TreeGeometry(model.trees)
    rng = np.random.default_rng(0)
    P = (X[rng.integers(0, len(X), 20000)] + rng.normal(0, 0.3, (20000, 8))).astype(np.float32)
    own = clf.get_booster().inplace_predict(P, predict_type="margin").astype(np.float64)
    extracted = np.diff(model.trees.scores(P.astype(np.float64)), axis=1)[:, 0]
    gap = np.abs(own - extracted).max()
    assert gap > 1e-6  # the float32 sums do differ, so the check below has something to cover
    assert gap <= geometry.allowance, (gap, geometry.allowance)


@pytest.mark.parametrize("scaler", [StandardScaler(with_mean=False), RobustScaler(with_centering=False),
                                    StandardScaler(with_std=False)])
def test_a_scaler_is_folded_as_its_transform_computes(tmp_path, scaler):
    """StandardScaler(with_mean=False) still fits ``mean_`` but never subtracts it; the
    extraction subtracted it anyway, moving every split by the mean (5e-6 here: unseen by
    the load-time probe, and a radius of 1.4e-6 held a class change at 2e-6)."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=2000)
    x = x - x.mean() + 5e-6  # nearly centred: a mean small enough for the probe check to miss
    X = x[:, None].astype(np.float32)
    y = (x > 0.3).astype(int)
    pipe = make_pipeline(scaler, DecisionTreeClassifier(max_depth=1, random_state=0)).fit(X, y)
    sio.dump(pipe, tmp_path / "m.skops")
    model = load_model(str(tmp_path / "m.skops"))
    real = (pipe[0].inverse_transform(np.array([[pipe[1].tree_.threshold[0]]])))[0, 0]  # the split in raw units
    assert model.trees.threshold[model.trees.feature >= 0][0] == pytest.approx(real, rel=1e-9, abs=1e-12)
    # no point inside a certified radius changes the class: probe just across the real split
    z = np.array([[np.float32(real - 2e-6)]], dtype=np.float32)
    cert = TreeBounds(model, norm="linf").certify_batch(z, [0])[0]
    across = np.array([[np.nextafter(np.float32(real), np.float32(np.inf))]], dtype=np.float32)
    if not cert.abstained and abs(float(across[0, 0]) - float(z[0, 0])) < cert.radius:
        assert pipe.predict(across)[0] == cert.predicted_class


def test_an_early_stopped_xgboost_file_is_refused_naming_best_iteration(tmp_path):
    """The file holds every round and ``best_iteration``; ``XGBClassifier.load_model`` +
    ``predict`` use rounds 0..best_iteration, a ``Booster`` all of them. Read as a Booster,
    22 of 587 certified inputs had another class than the deployed classifier's. Which one
    is deployed cannot be told from the file, so it is refused with the way out."""
    xgb = pytest.importorskip("xgboost")
    X, y = make_classification(600, 5, flip_y=0.3, random_state=0)
    X = X.astype(np.float32)
    clf = xgb.XGBClassifier(n_estimators=300, max_depth=6, learning_rate=0.5, early_stopping_rounds=5, n_jobs=1,
                            random_state=0)
    clf.fit(X[:300], y[:300], eval_set=[(X[300:], y[300:])], verbose=False)
    booster = clf.get_booster()
    assert clf.best_iteration + 1 < booster.num_boosted_rounds()
    clf.save_model(str(tmp_path / "early.json"))
    with pytest.raises(ModelError, match=r"best_iteration=\d+ .*booster\[: best_iteration \+ 1\]") as e:
        load_model(str(tmp_path / "early.json"))
    assert "\n" not in str(e.value)
    trimmed = booster[: clf.best_iteration + 1]  # the way out the message names
    trimmed.save_model(str(tmp_path / "trimmed.json"))
    model = load_model(str(tmp_path / "trimmed.json"))
    assert (model.predict(X) == clf.predict(X)).all()


def test_a_two_class_softprob_xgboost_model_is_read_by_its_objective(tmp_path):
    """multi:softprob with num_class=2 gives two margins per input; it was read as a binary
    objective's one margin and refused as 'not a xgboost model file'."""
    xgb = pytest.importorskip("xgboost")
    rng = np.random.default_rng(0)
    X = rng.normal(size=(300, 4)).astype(np.float32)
    y = (X[:, 0] > 0).astype(int)
    booster = xgb.train({"objective": "multi:softprob", "num_class": 2, "max_depth": 3, "nthread": 1, "seed": 0},
                        xgb.DMatrix(X, y), 10)
    booster.save_model(str(tmp_path / "softprob.json"))
    model = load_model(str(tmp_path / "softprob.json"))
    assert model.num_classes == 2
    assert (model.predict(X) == booster.predict(xgb.DMatrix(X)).argmax(axis=1)).all()
    certs = TreeBounds(model, norm="linf").certify_batch(X[:20], list(range(20)))
    assert any(not c.abstained for c in certs)
    assert all(c.abstained or c.predicted_class == p for c, p in zip(certs, model.predict(X[:20])))


def test_a_split_at_zero_keeps_a_rounding_slack(tmp_path):
    """The model reads inputs as float32, which rounds |x| below 2**-149 to 0: a split at 0
    needs an absolute slack (it had 1e-300)."""
    X = np.array([[-1.0], [1.0]] * 50, dtype=np.float32)
    y = (X[:, 0] > 0).astype(int)
    sio.dump(DecisionTreeClassifier(random_state=0).fit(X, y), tmp_path / "sign.skops")
    trees = load_model(str(tmp_path / "sign.skops")).trees
    inner = trees.feature >= 0
    assert trees.threshold[inner][0] == 0.0 and trees.slack[inner][0] >= 2.0 ** -149

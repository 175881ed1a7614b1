"""Predict-only speed (issue 20 item 3) changes no output: scikit-learn models called without
per-call re-validation (and forests without joblib) give the same scores, classes and
seeded certificates as the estimators' own predict / predict_proba."""

from __future__ import annotations

import dataclasses
import warnings

import numpy as np
import pytest

from riskpipe.certify.smoothing import Smoothing
from riskpipe.models.base import Model
from riskpipe.models.loader import load_model
from usermodels import tabular_model


def _forest(tmp_path, n_jobs: int, cls: str = "RandomForestClassifier"):
    import skops.io as sio
    from sklearn import ensemble
    from sklearn.datasets import make_classification

    X, y = make_classification(n_samples=600, n_features=8, n_informative=5, n_classes=3, random_state=0)
    X = X.astype(np.float32)
    est = getattr(ensemble, cls)(n_estimators=40, max_depth=6, random_state=0, n_jobs=n_jobs).fit(X[:400], y[:400])
    path = tmp_path / f"{cls}.skops"
    sio.dump(est, path)
    return str(path), est, X[400:]


def _reference(model: Model, est) -> Model:
    """The same model answering through the estimator's own, fully validated predict."""
    classes_ = np.asarray(est.classes_)

    def predict(batch: np.ndarray) -> np.ndarray:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="X does not have valid feature names")
            return np.searchsorted(classes_, est.predict(np.asarray(batch).reshape(len(batch), -1)))

    return dataclasses.replace(model, _predict_fn=predict, _scores_fn=None)


def _certificates(model: Model, X: np.ndarray) -> list[tuple]:
    sm = Smoothing(model, sigma=0.5, alpha=0.001, max_samples=2000, batch_size=512)
    certs = sm.decide_batch(X, list(range(len(X))), epsilon=0.25)
    return [(c.predicted_class, c.radius, c.p_lower, c.n_samples, c.certified, c.reason) for c in certs]


@pytest.mark.parametrize("cls,n_jobs", [("RandomForestClassifier", 1), ("RandomForestClassifier", 2),
                                        ("ExtraTreesClassifier", 1)])
def test_forest_scores_classes_and_certificates_unchanged(tmp_path, cls, n_jobs):
    spec, est, X = _forest(tmp_path, n_jobs, cls)
    model = load_model(spec)
    fast = model.class_scores(X)
    assert np.array_equal(fast, est.set_params(n_jobs=1).predict_proba(X))  # same bits as one-job sklearn
    assert np.array_equal(model.predict(X), np.searchsorted(est.classes_, est.predict(X)))
    # scores are not degenerate: the forest separates at least two classes on these rows
    assert len(set(model.predict(X).tolist())) >= 2
    assert _certificates(model, X[:24]) == _certificates(_reference(model, est), X[:24])


def test_pipeline_with_feature_names_certificates_unchanged(tmp_path):
    import skops.io as sio

    user = tabular_model(tmp_path)  # StandardScaler + LogisticRegression fitted with feature names, 3 classes
    est = sio.load(user.spec, trusted=sio.get_untrusted_types(file=user.spec))
    X = np.load(user.data)["X"]
    model = load_model(user.spec)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the fast path raises no feature-name warning either
        fast = model.class_scores(X)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="X does not have valid feature names")
        assert np.array_equal(fast, est.predict_proba(X))
    sm_in = X[:16] / X.std(axis=0)  # certify in standardized-like units so the noise matters
    scaled = dataclasses.replace(model, _predict_fn=lambda z: model._predict_fn(z * X.std(axis=0)))
    ref = _reference(model, est)
    ref_scaled = dataclasses.replace(ref, _predict_fn=lambda z: ref._predict_fn(z * X.std(axis=0)))
    certs = _certificates(scaled, sm_in)
    assert certs == _certificates(ref_scaled, sm_in)
    assert any(c[4] for c in certs)  # some certified: the comparison covers real radii

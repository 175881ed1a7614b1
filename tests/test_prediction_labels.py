"""An event's ``prediction`` names a class the way its producer holds it
(riskpipe.stream.events.class_id).

The UCI wine data labels its cultivars 1, 2, 3; a scikit-learn model fitted on them has
``classes_ == [1, 2, 3]`` and ``predict()`` returns those labels. A producer sending that
label as ``prediction`` had it read as a class id: label 1 became class 2 (label 2), so a
model that predicted cultivar 1 where the certificate holds for cultivar 2 "agreed" and
could be allowed. Now such a model takes the label as a string and refuses a number
(dead letter ``wrong_type``, naming the labels); a model with named classes takes its
labels as strings too; a model with classes 0..C-1 takes class ids as before."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from riskpipe.app.compose import build_pipeline
from riskpipe.app.config import load_config
from riskpipe.app.offline import run_offline
from streamkit import policy_with, tabular_event

CHEAP = {"method": "smoothing", "mode": "decide", "sigma": 0.25, "alpha": 0.01, "max_samples": 200}


def wine_model(tmp: Path, labels) -> tuple[str, np.ndarray]:
    """A skops scaler + logistic regression on the wine data, fitted on ``labels[target]``."""
    import skops.io as sio
    from sklearn.datasets import load_wine
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    wine = load_wine()
    X, y = wine.data.astype(np.float32), np.asarray(labels)[wine.target]
    est = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000, random_state=0)).fit(X, y)
    path = tmp / "wine.skops"
    sio.dump(est, path)
    np.savez(tmp / "wine-ref.npz", X=X, y=wine.target.astype(np.int64))
    return str(path), X


def decide(tmp: Path, labels, predictions: dict):
    """Each prediction of ``predictions`` on one wine row the model labels ``labels[0]`` and
    certifies, under the shipped default policy; (audit records by id, dead letters by id)."""
    spec, X = wine_model(tmp, labels)
    config = load_config(None, models={"wine": spec}, references={"wine": str(tmp / "wine-ref.npz")},
                         policy=policy_with(tmp, "default", certifier=CHEAP))
    pipeline = build_pipeline(config)
    events = [tabular_event(eid, X[0], upstream_risk=0.1, prediction=p) for eid, p in predictions.items()]
    res = run_offline(events, tmp / "out", load_config(None), pipeline=pipeline)
    dead = {d["headers"]["__riskpipe.errors.message"]: d["headers"]["__riskpipe.errors.reason"]
            for d in res.read("dlq")}
    return {r["id"]: r for r in res.read("audit")}, dead, pipeline.entries["wine"]


def test_a_model_labelled_1_2_3_takes_the_label_and_refuses_a_number(tmp_path):
    audit, dead, entry = decide(tmp_path, [1, 2, 3], {"label-1": "1", "label-2": "2", "number-1": 1, "number-3": 3})
    assert entry.model.meta["class_names"] == ["1", "2", "3"]
    row = audit["label-1"]
    assert row["certificate"]["predicted_class"] == 0 and row["certificate"]["certified"]  # cultivar 1
    assert row["prediction"] == 0 and row["prediction_agrees"] is True and row["decision"] == "allow"
    other = audit["label-2"]  # the producer says cultivar 2: a disagreement, never allowed
    assert other["prediction"] == 1 and other["prediction_agrees"] is False and other["decision"] != "allow"
    assert "prediction_mismatch" in other["reasons"]
    # a number is refused, not read as a class id (number 1 was class id 1: cultivar 2)
    assert set(audit) == {"label-1", "label-2"} and sorted(dead.values()) == ["wrong_type", "wrong_type"]
    assert "prediction: the model labels its classes ['1', '2', '3'], so the number 1 could be a label or a " \
           "class id; give the label as a string (e.g. '3') or null" in dead


def test_a_model_with_named_classes_takes_its_names_and_class_ids(tmp_path):
    audit, dead, _ = decide(tmp_path, ["barolo", "grignolino", "barbera"],
                            {"name": "barolo", "id": 1, "other": "grignolino", "unknown": "merlot"})
    # scikit-learn sorts classes_: barbera, barolo, grignolino
    assert audit["name"]["prediction"] == 1 and audit["name"]["prediction_agrees"] is True
    assert audit["id"]["prediction"] == 1 and audit["id"]["prediction_agrees"] is True
    assert audit["other"]["prediction"] == 2 and audit["other"]["decision"] != "allow"
    assert dead == {"prediction: 'merlot' is no class of the model: give one of its labels "
                    "['barbera', 'barolo', 'grignolino'] or null": "wrong_type"}


@pytest.mark.parametrize("prediction,message", [
    ("1", "prediction: '1' is no class of the model: give a class id in [0, 3) or null"),
    (3, "prediction: must be a class id in [0, 3) or null"),
    (True, "prediction: must be a class id in [0, 3) or null"),
    (1.0, "prediction: must be a class id in [0, 3) or null"),
])
def test_a_model_with_classes_0_to_c_takes_class_ids_only(tmp_path, prediction, message):
    audit, dead, entry = decide(tmp_path, [0, 1, 2], {"ok": 0, "bad": prediction})
    assert "class_names" not in entry.model.meta
    assert audit["ok"]["prediction"] == 0 and audit["ok"]["prediction_agrees"] is True
    assert dead == {message: "wrong_type"}


def test_an_onnx_classifier_without_a_zipmap_takes_its_labels_from_the_graph(tmp_path):
    """skl2onnx with zipmap=False: the labels 1, 2, 3 are read from the classifier node, so a
    number is refused as for the skops model (it was read as a class id: label 2 as class 2,
    i.e. cultivar 3, and a disagreement was allowed)."""
    pytest.importorskip("onnxruntime")
    skl2onnx = pytest.importorskip("skl2onnx")
    from skl2onnx.common.data_types import FloatTensorType
    from sklearn.datasets import load_wine
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from riskpipe.models import load_model

    wine = load_wine()
    X, y = wine.data.astype(np.float32), np.asarray([1, 2, 3])[wine.target]
    est = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000, random_state=0)).fit(X, y)
    for zipmap in (False, True):
        onx = skl2onnx.convert_sklearn(est, initial_types=[("x", FloatTensorType([None, 13]))],
                                       options={id(est[-1]): {"zipmap": zipmap}})
        path = tmp_path / f"wine-{zipmap}.onnx"
        path.write_bytes(onx.SerializeToString())
        assert load_model(str(path)).meta["class_names"] == ["1", "2", "3"], zipmap
    np.savez(tmp_path / "wine-ref.npz", X=X, y=wine.target.astype(np.int64))
    config = load_config(None, models={"wine": str(tmp_path / "wine-False.onnx")},
                         references={"wine": str(tmp_path / "wine-ref.npz")},
                         policy=policy_with(tmp_path, "default", certifier=CHEAP))
    events = [tabular_event("label", X[0], upstream_risk=0.1, prediction="1"),
              tabular_event("number", X[0], upstream_risk=0.1, prediction=2)]
    res = run_offline(events, tmp_path / "out", load_config(None), pipeline=build_pipeline(config))
    audit = {r["id"]: r for r in res.read("audit")}
    assert set(audit) == {"label"} and audit["label"]["prediction"] == 0
    assert [d["headers"]["__riskpipe.errors.reason"] for d in res.read("dlq")] == ["wrong_type"]


def test_labels_that_are_partly_numbers_refuse_a_number(tmp_path):
    """classes_ ["1", "2", "unknown"]: the number 1 would be class id 1, label "2"."""
    audit, dead, entry = decide(tmp_path, ["1", "2", "unknown"], {"label": "1", "number": 1})
    assert entry.model.meta["class_names"] == ["1", "2", "unknown"]
    assert audit["label"]["prediction"] == 0 and set(audit) == {"label"}
    assert list(dead.values()) == ["wrong_type"]


def test_an_onnx_model_whose_labels_cannot_be_read_takes_no_prediction(tmp_path):
    """A stacking ensemble exported without a ZipMap: its classifier nodes count 0..C-1 and a
    later node maps them to 1, 2, 3, so the graph's first classifier node named no labels and
    a producer's label 1 was read as class id 1 (label 2). The model's own label output is
    now checked against its score columns on probe inputs; where they disagree no prediction
    is read at all (wrong_type), and the plain export keeps its names."""
    pytest.importorskip("onnxruntime")
    skl2onnx = pytest.importorskip("skl2onnx")
    from sklearn.ensemble import RandomForestClassifier, StackingClassifier
    from sklearn.linear_model import LogisticRegression

    from riskpipe.models import load_model
    from riskpipe.stream.errors import EventError
    from riskpipe.stream.events import class_id

    rng = np.random.default_rng(0)
    X = rng.normal(size=(300, 4)).astype(np.float32)
    y = 1 + (X[:, 0] > 0).astype(int) + (X[:, 1] > 0.5).astype(int)  # classes 1, 2, 3
    est = StackingClassifier([("a", LogisticRegression()), ("b", RandomForestClassifier(3, random_state=0))]).fit(X, y)
    path = tmp_path / "stack.onnx"
    path.write_bytes(skl2onnx.to_onnx(est, X[:1], options={id(est): {"zipmap": False}}).SerializeToString())
    model = load_model(str(path))
    assert model.meta.get("class_labels_unknown") is True and "class_names" not in model.meta
    for prediction in (1, "1", 0):
        with pytest.raises(EventError, match="does not say which label each class is"):
            class_id(prediction, model)
    assert class_id(None, model) is None

"""A model that writes into its input: an in-place normalisation (``x.sub_(0.5)``) in a
user's ``forward``, or a scikit-learn step with ``copy=False``, is common and legal. It
must change nothing riskpipe computes: every forward pass gets a batch the caller does
not go on using (riskpipe.models.base.Model.scores).

Before, the start-up output check handed the model the first rows of the reference set
itself, so such a model rewrote them: the context index and the support threshold were
built on the rewritten rows, and an input far outside the real reference data (an image
of 0.1 everywhere beside grey ones) sat next to a rewritten row and was allowed. The
interval-bound certifier's clean forward pass rewrote the very input it then bounded.
All on models that are not the demo."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from riskpipe.app.config import load_config
from riskpipe.app.offline import run_offline
from riskpipe.models import Model
from riskpipe.models.base import sha256_state_dict
from riskpipe.stream.events import make_event

SHAPE = (1, 8, 8)
MODULE = __name__


class Normalising(nn.Module):
    """A 2-class model on 1x8x8 images: brighter or darker than mid-grey. It centres its
    input first, in place (``inplace=True``) or into a new tensor: the two classify every
    input alike."""

    input_shape = SHAPE

    def __init__(self, inplace: bool) -> None:
        super().__init__()
        self.lin = nn.Linear(64, 2, bias=False)
        with torch.no_grad():
            self.lin.weight.copy_(torch.tensor([[1.0] * 64, [-1.0] * 64]))
        self.inplace = inplace

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.sub_(0.5) if self.inplace else x - 0.5
        return self.lin(x.flatten(1))


INPLACE = {"on": True}


def normalising() -> nn.Module:
    """The factory the stage loads (``tests.test_model_writes_input:normalising``); the
    test flips ``INPLACE`` so both variants have one spec, hence the same seeds."""
    return Normalising(INPLACE["on"])


def grey_images(n: int, seed: int) -> np.ndarray:
    """Dark and light grey images (0.4 or 0.6, +- a few 8-bit steps): this model's
    reference data, on the 8-bit grid."""
    rng = np.random.default_rng(seed)
    level = np.where(np.arange(n) % 2 == 0, 0.4, 0.6).reshape((n,) + (1,) * len(SHAPE))
    return (np.round((level + 0.03 * rng.standard_normal((n,) + SHAPE)) * 255) / 255).astype(np.float32)


def _stage_records(tmp_path, inplace: bool, events):
    INPLACE["on"] = inplace
    tmp_path.mkdir()
    X = grey_images(300, 1)
    with torch.no_grad():
        y = Normalising(False)(torch.from_numpy(X.copy())).argmax(1).numpy()
    ref = tmp_path / "ref.npz"
    np.savez(ref, X=X, y=y)
    spec = f"{MODULE}:normalising?range=0,1"
    config = load_config(None, models={"grey": spec}, references={"grey": str(ref)}, batch={"max_events": 16})
    res = run_offline(events, tmp_path / ("inplace" if inplace else "pure"), config)
    assert not res.read("dlq")
    return {r["id"]: r for r in res.read("audit")}, np.load(ref)["X"], X


def test_a_model_writing_into_its_input_decides_as_its_pure_twin(tmp_path):
    """Same spec, same seeds: the model that centres its input in place gets exactly the
    records of the one that does not, and dark images far from every grey reference image
    are reviewed out of support by both. On the old code the in-place model's start-up
    check rewrote 8 reference rows to about +-0.1: an image of 0.1 everywhere found one of
    them at distance 0.22 and was allowed, and so were the random dark images."""
    held = grey_images(6, 2)
    rng = np.random.default_rng(5)
    far = {"black": np.zeros(SHAPE, np.float32), "dim": np.full(SHAPE, 0.1, np.float32),
           "white": np.ones(SHAPE, np.float32)}
    far.update({f"dark-{i}": (np.round(rng.uniform(0, 0.25, SHAPE) * 255) / 255).astype(np.float32)
                for i in range(3)})
    events = [make_event(f"grey-{i}", "grey", x, upstream_risk=0.0) for i, x in enumerate(held)]
    events += [make_event(k, "grey", x, upstream_risk=0.0) for k, x in far.items()]
    pure, _, _ = _stage_records(tmp_path / "a", False, events)
    inplace, stored, X = _stage_records(tmp_path / "b", True, events)
    for k in far:
        rec = inplace[k]
        assert rec["decision"] == "review" and "out_of_support" in rec["reasons"], (k, rec["reasons"])
        assert rec["context"]["nearest_reference_distance"] > 1.0
    assert sum(pure[f"grey-{i}"]["decision"] == "allow" for i in range(6)) >= 4  # the model certifies its data
    for k, rec in pure.items():
        twin = inplace[k]
        assert (twin["decision"], twin["reasons"], twin["context"], twin["certificate"]["radius"],
                twin["certificate"]["predicted_class"]) == (rec["decision"], rec["reasons"], rec["context"],
                                                            rec["certificate"]["radius"],
                                                            rec["certificate"]["predicted_class"]), k
    np.testing.assert_array_equal(stored, X)


def _twins() -> tuple[Model, Model]:
    def model(module: nn.Module) -> Model:
        return Model(spec="test:normalising", input_shape=SHAPE, num_classes=2, sha256=sha256_state_dict(module),
                     value_range=(0.0, 1.0), module=module.eval())

    return model(Normalising(False)), model(Normalising(True))


def _relu_first(inplace: bool) -> Model:
    """A Sequential the bound families take whose first layer is ``ReLU(inplace=True)``:
    on inputs in [-1, 1] it zeroes the caller's negative values."""
    torch.manual_seed(3)
    seq = nn.Sequential(nn.ReLU(inplace=inplace), nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 4))
    return Model(spec="test:relu-first", input_shape=SHAPE, num_classes=4, sha256=sha256_state_dict(seq),
                 value_range=(-1.0, 1.0), module=seq.eval())


@pytest.mark.parametrize("method", ["smoothing", "ibp", "lipschitz"])
def test_every_certifier_leaves_the_callers_input_as_it_was(method):
    """The input array a certifier is given is unchanged after it, and the certificates
    equal the pure twin's (for the bound families the in-place layer is a first
    ``ReLU(inplace=True)`` on inputs with negative values)."""
    from riskpipe.certify import certifier_for_policy
    from riskpipe.policy.schema import Certifier

    kw = {"smoothing": dict(sigma=0.25, alpha=0.01, n0=20, n=200, max_samples=400),
          "ibp": dict(norm="linf"), "lipschitz": {}}[method]
    rng = np.random.default_rng(4)
    if method == "smoothing":
        pure, inplace = _twins()
        X = grey_images(5, 3)
    else:
        pure, inplace = _relu_first(False), _relu_first(True)
        X = rng.uniform(-1, 1, (5,) + SHAPE).astype(np.float32)
    certs = []
    for model in (pure, inplace):
        given = X.copy()
        cert = certifier_for_policy(model, Certifier.for_method(method, **kw), batch_size=64, epsilon=0.1)
        certs.append([(c.radius, c.predicted_class, c.abstained, c.reason)
                      for c in cert.certify_batch(given, list(range(5)))])
        np.testing.assert_array_equal(given, X)
    assert certs[0] == certs[1]


def test_a_predict_function_gets_its_own_copy():
    """A predict-only model (ONNX, skops) whose function writes into its numpy input, as
    ``StandardScaler(copy=False)`` in a pipeline does: the caller's batch is unchanged,
    for class ids and for class scores."""
    def predict(a: np.ndarray) -> np.ndarray:
        a -= 0.5
        return (a.reshape(len(a), -1).sum(axis=1) > 0).astype(np.int64)

    def scores(a: np.ndarray) -> np.ndarray:
        a *= 0.0
        return np.zeros((len(a), 2))

    model = Model(spec="test:predict-writes", input_shape=(4,), num_classes=2, sha256="0" * 64,
                  _predict_fn=predict, _scores_fn=scores)
    X = np.full((3, 4), 0.25, np.float32)
    t = torch.from_numpy(X)
    assert model.predict(X).tolist() == [0, 0, 0]
    assert model.classes(t).values.tolist() == [0, 0, 0]
    model.class_scores(X)
    np.testing.assert_array_equal(X, np.full((3, 4), 0.25, np.float32))

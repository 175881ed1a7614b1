"""riskpipe.context: nearest other-class distance in the threat norm, ratio, percentile,
npz persistence and the per-model cache."""

from __future__ import annotations

import numpy as np
import pytest

from riskpipe.context import ContextError, ContextIndex

ORD = {"l1": 1, "l2": 2, "linf": np.inf}


def brute_other_class(X, y, q, own, norm):
    d = np.linalg.norm(X - q, ord=ORD[norm], axis=1)
    return d[y != own].min()


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    X = rng.random((300, 1, 4, 4)).astype(np.float32)
    y = rng.integers(0, 4, 300)
    Q = rng.random((25, 1, 4, 4)).astype(np.float32)
    return X, y, Q


@pytest.mark.parametrize("norm", ["l1", "l2", "linf"])
def test_distance_matches_brute_force_in_each_norm(data, norm):
    X, y, Q = data
    index = ContextIndex.build(X, y, norm)
    preds = [int(i % 4) for i in range(len(Q))]
    radii = np.linspace(0.0, 0.5, len(Q))
    out = index.context(Q, preds, radii)
    Xf = X.reshape(len(X), -1)
    for q, p, r, c in zip(Q.reshape(len(Q), -1), preds, radii, out):
        d = brute_other_class(Xf, y, q, p, norm)
        assert c["nearest_other_class_distance"] == pytest.approx(d, rel=1e-5)
        assert c["radius_to_distance_ratio"] == pytest.approx(r / d, rel=1e-5)
        assert c["radius_percentile"] is None
        assert c["reference"] == {"name": "reference", "size": 300, "norm": norm}


def test_abstained_input_uses_the_nearest_samples_class(data):
    X, y, Q = data
    index = ContextIndex.build(X, y, "l2")
    Xf = X.reshape(len(X), -1)
    q = Q[0].reshape(-1)
    nearest_label = y[np.linalg.norm(Xf - q, axis=1).argmin()]
    c = index.context(Q[:1], [None], [0.0])[0]
    want = brute_other_class(Xf, y, q, nearest_label, "l2")
    assert c["nearest_other_class_distance"] == pytest.approx(want, rel=1e-5)
    assert c["radius_to_distance_ratio"] == 0.0


def test_percentile_among_reference_radii(data):
    X, y, Q = data
    index = ContextIndex.build(X, y, "l2", reference_radii=[0.1, 0.2, 0.3, 0.4])
    out = index.context(Q[:3], [0, 1, 2], [0.05, 0.2, 0.9])
    assert [c["radius_percentile"] for c in out] == [0.0, 50.0, 100.0]


def test_save_load_roundtrip_without_pickle(data, tmp_path):
    X, y, Q = data
    index = ContextIndex.build(X, y, "linf", reference_radii=np.arange(10) / 10, name="toy")
    path = index.save(tmp_path / "ctx.npz")
    with np.load(path, allow_pickle=False) as z:  # plain arrays only
        assert {"X", "y", "norm", "reference_radii"} <= set(z.files)
    again = ContextIndex.load(path)
    assert again.norm == "linf" and again.name == "toy"
    assert again.context(Q[:5], [0] * 5, [0.3] * 5) == index.context(Q[:5], [0] * 5, [0.3] * 5)


def test_load_plain_reference_npz_needs_a_norm(data, tmp_path):
    X, y, _ = data
    p = tmp_path / "ref.npz"
    np.savez(p, X=X, y=y)
    with pytest.raises(ContextError, match="no norm saved"):
        ContextIndex.load(p)
    assert ContextIndex.load(p, norm="l1").norm == "l1"


@pytest.mark.parametrize("X,y,norm,msg", [
    (np.zeros((5, 3)), np.zeros(5, dtype=int), "l2", "at least two classes"),
    (np.zeros((5, 3)), np.arange(4), "l2", "y: need 5 integer labels"),
    (np.full((2, 3), np.nan), np.arange(2), "l2", "NaN"),
    (np.zeros((2, 3)), np.arange(2), "l7", "norm"),
])
def test_bad_reference_is_a_one_line_error(X, y, norm, msg):
    with pytest.raises(ContextError, match=msg):
        ContextIndex.build(X, y, norm)


def test_object_arrays_are_refused(tmp_path):
    p = tmp_path / "evil.npz"
    np.savez(p, X=np.array([object()], dtype=object), y=np.arange(1))
    with pytest.raises(ContextError, match="plain arrays"):
        ContextIndex.load(p, norm="l2")


def test_context_feeds_the_policy_signal(data):
    from pathlib import Path

    from riskpipe.certify import Certificate
    from riskpipe.policy import load_policy

    X, y, Q = data
    index = ContextIndex.build(X, y, "l2", reference_radii=np.linspace(0, 1, 11))
    ctx = index.context(Q[:1], [1], [0.3])[0]
    pol = load_policy(Path(__file__).resolve().parents[1] / "policies/default.yaml")
    c = Certificate(method="smoothing", norm="l2", radius=0.3, abstained=False, predicted_class=1, mode="certify",
                    sigma=0.25, alpha=0.001, input_dim=16)
    s = pol.evaluate(c, upstream_risk=0.1, context=ctx).signals["context_risk"]
    assert s["radius_to_distance_ratio"] == pytest.approx(ctx["radius_to_distance_ratio"])
    assert s["radius_percentile"] == ctx["radius_percentile"] and not s["flagged"]

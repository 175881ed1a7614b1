"""Randomized smoothing: exact radii on a linear classifier, and alpha-level soundness."""

import copy
import itertools
import json

import numpy as np
import pytest
import torch
from scipy import stats

from riskpipe.certify import Certificate, Smoothing, smoothing
from synthetic import threshold_for, threshold_model

SIGMA = 0.5


def test_certify_linear_classifier_exact_radius():
    """The smoothed linear classifier's radius is the distance to the hyperplane;
    CERTIFY's bound approaches it from below as n grows."""
    true_r = 0.6
    m = threshold_model(true_r)
    s = Smoothing(m, sigma=SIGMA, alpha=0.001, n0=100, n=200_000)
    c = s.certify(np.zeros(1, np.float32), seed=1)
    assert not c.abstained and c.predicted_class == 0
    assert c.radius <= true_r
    assert c.radius == pytest.approx(true_r, abs=0.03)
    assert c.n_samples == 200_100


def test_certify_abstains_below_half():
    m = threshold_model(-0.05)  # p_A(class 0) < 1/2; class 1 has p = 0.54: too close to certify
    s = Smoothing(m, sigma=SIGMA, alpha=0.001, n0=100, n=1000)
    c = s.certify(np.zeros(1, np.float32), seed=3)
    assert c.abstained and c.radius == 0.0 and c.predicted_class is None


def _trial_errors(p_a: float, trials: int, n: int, alpha: float, bound: str = "cp") -> int:
    m = threshold_model(threshold_for(p_a, SIGMA))
    s = Smoothing(m, sigma=SIGMA, alpha=alpha, n0=20, n=n, bound=bound, batch_size=8192)
    certs = s.certify_batch(np.zeros((trials, 1), np.float32), list(range(trials)))
    true_r = SIGMA * stats.norm.ppf(p_a)
    return sum(c.radius > true_r + 1e-12 for c in certs if not c.abstained)


def _max_allowed(alpha: float, trials: int) -> int:
    """Largest error count still consistent with rate <= alpha (one-sided, 1e-4 level)."""
    return int(stats.binom.ppf(1 - 1e-4, trials, alpha))


@pytest.mark.parametrize("bound", ["cp", "bonferroni", "goodman"])
def test_certify_soundness_alpha_level(bound):
    trials, alpha = 3000, 0.05
    errors = _trial_errors(0.8, trials, n=200, alpha=alpha, bound=bound)
    assert errors <= _max_allowed(alpha, trials)


def test_soundness_check_would_catch_a_wrong_bound():
    """The tolerance above cannot pass by accident: a point estimate (no confidence)
    as the bound is wrong about half the time and fails the same check."""
    rng = np.random.default_rng(0)
    trials, n, p_a = 3000, 200, 0.8
    k = rng.binomial(n, p_a, size=trials)
    errors = int(np.sum(k / n > p_a))
    assert errors > _max_allowed(0.05, trials)


def test_decide_soundness_below_epsilon():
    """True radius just below epsilon: decide certifies at most about alpha of the time."""
    eps, alpha, trials = 0.5, 0.05, 3000
    tau = stats.norm.cdf(eps / SIGMA)
    m = threshold_model(threshold_for(tau - 0.002, SIGMA))
    s = Smoothing(m, sigma=SIGMA, alpha=alpha, max_samples=2000, first_look=20, batch_size=8192)
    certs = s.decide_batch(np.zeros((trials, 1), np.float32), list(range(trials)), eps)
    wrong = sum(c.certified for c in certs)
    assert wrong <= _max_allowed(alpha, trials)
    # and it is not trivially refusing: well above epsilon it certifies nearly always
    m2 = threshold_model(threshold_for(0.995, SIGMA))
    s2 = Smoothing(m2, sigma=SIGMA, alpha=alpha, max_samples=2000, first_look=20)
    ok = s2.decide_batch(np.zeros((200, 1), np.float32), list(range(200)), eps)
    assert sum(c.certified for c in ok) >= 190
    assert np.median([c.n_samples for c in ok]) <= 40


def test_decide_multiclass_selection_is_sound():
    """Three classes, none reaching tau: the top-count selection must not inflate errors."""
    import torch

    from riskpipe.models.base import Model

    # class = argmax of three noisy coordinates of a 3-d input at the origin, biased
    lin = torch.nn.Linear(3, 3)
    with torch.no_grad():
        lin.weight.copy_(torch.eye(3))
        lin.bias.copy_(torch.tensor([0.9, 0.0, 0.0]))
    m = Model(spec="synthetic:3class", input_shape=(3,), num_classes=3, sha256="1" * 64,
              value_range=(-1e9, 1e9), module=torch.nn.Sequential(lin).eval())
    x = np.zeros(3, np.float32)
    est = np.bincount(m.predict(x[None] + SIGMA * np.random.default_rng(0).standard_normal((400_000, 3))),
                      minlength=3) / 400_000
    p_top = est.max()
    eps = SIGMA * stats.norm.ppf(p_top + 0.01)  # epsilon just above the true radius
    s = Smoothing(m, sigma=SIGMA, alpha=0.05, max_samples=2000, first_look=20, batch_size=8192)
    certs = s.decide_batch(np.zeros((2000, 3), np.float32), list(range(2000)), eps)
    assert sum(c.certified for c in certs) <= _max_allowed(0.05, 2000)


def test_decide_budget_reason_and_never_wrong():
    m = threshold_model(threshold_for(0.8413, SIGMA))  # exactly at tau for eps = sigma
    s = Smoothing(m, sigma=SIGMA, alpha=0.001, max_samples=200, first_look=48)
    certs = s.decide_batch(np.zeros((50, 1), np.float32), list(range(50)), SIGMA)
    assert all(c.n_samples <= 200 for c in certs)
    assert any(c.reason == "budget" for c in certs)
    assert all(not c.certified for c in certs if c.reason == "budget")


def test_predict_abstains_on_a_coin_flip_and_answers_when_clear():
    coin = threshold_model(0.0)
    s = Smoothing(coin, sigma=SIGMA, alpha=0.001, n=1000)
    assert s.predict(np.zeros(1, np.float32), seed=0).abstained
    clear = threshold_model(1.0)
    c = Smoothing(clear, sigma=SIGMA, alpha=0.001, n=1000).predict(np.zeros(1, np.float32), seed=0)
    assert not c.abstained and c.predicted_class == 0 and c.extra["p_value"] < 0.001


def test_noise_independent_of_batch_mates_and_reproducible(demo_model, digits_test):
    X, _ = digits_test
    s = Smoothing(demo_model, sigma=0.25, n0=50, n=500, batch_size=256)
    alone = s.certify(X[3], seed=42)
    together = s.certify_batch(X[:6], [7, 8, 9, 42, 10, 11])[3]
    assert alone.p_lower == together.p_lower and alone.radius == together.radius
    d1 = s.decide(X[3], 0.25, seed=5)
    d2 = s.decide_batch(X[:5], [1, 2, 3, 5, 4], 0.25)[3]
    assert (d1.certified, d1.n_samples, d1.radius) == (d2.certified, d2.n_samples, d2.radius)


@pytest.mark.parametrize("sampler", ["gaussian", "sound"])
def test_forward_batch_sets_the_model_calls_and_changes_no_certificate(demo_model, digits_test, sampler):
    """Noise pieces are cut at batch_size offsets whatever the call size, so every
    forward_batch gives the same certificates; every model call but the last of a count
    holds exactly forward_batch rows (never fewer than batch_size)."""
    X, _ = digits_test
    sizes: list[int] = []
    model = copy.copy(demo_model)

    def classes(batch, scratch=False):
        sizes.append(len(batch))
        return demo_model.classes(batch, scratch)

    model.classes = classes
    seen = {}
    for fb, overlap in itertools.product((None, 100, 333, 1024, 10), (False, True)):
        s = Smoothing(model, sigma=0.25, n0=40, n=300, max_samples=2000, first_look=24, batch_size=64,
                      sampler=sampler, grid_levels=16, forward_batch=fb, overlap=overlap)
        sizes.clear()
        counts: list[int] = []  # samples asked of each _count
        count = s._count

        def counted(x, gens, draws, count=count):
            counts.append(int(draws.sum()))
            return count(x, gens, draws)

        s._count = counted
        certs = [*s.decide_batch(X[:30], list(range(30)), 0.25), *s.certify_batch(X[:7], list(range(7))),
                 *s.predict_batch(X[:5], list(range(5)))]
        seen[fb, overlap] = [(c.n_samples, c.radius, c.certified, c.predicted_class, c.p_lower) for c in certs]
        assert s.forward_size == max(fb or 64, 64)
        assert sizes == [min(s.forward_size, total - k) for total in counts for k in range(0, total, s.forward_size)]
    assert all(v == seen[None, False] for v in seen.values())
    with pytest.raises(ValueError, match="forward_batch"):
        Smoothing(model, forward_batch=0)


def test_drawing_ahead_only_with_a_spare_core_and_big_pieces(demo_model, monkeypatch):
    """overlap None: the noise is drawn ahead on the helper thread only when a core is left
    beside torch's threads and the pieces average OVERLAP_MIN coordinates (the demo's 8x8
    inputs: from 1024 rows a piece); True / False force it."""
    x = torch.zeros((3, *demo_model.input_shape))
    per_piece = smoothing.OVERLAP_MIN // demo_model.input_dim
    s = Smoothing(demo_model, batch_size=4096)
    monkeypatch.setattr(smoothing, "_CORES", torch.get_num_threads() + 1)
    assert s._overlaps(x, np.array([per_piece] * 3))
    assert not s._overlaps(x, np.array([per_piece - 1] * 3))
    assert not Smoothing(demo_model, batch_size=per_piece - 1)._overlaps(x, np.array([per_piece] * 3))
    assert not s._overlaps(x, np.array([], dtype=np.int64))
    monkeypatch.setattr(smoothing, "_CORES", torch.get_num_threads())
    assert not s._overlaps(x, np.array([per_piece] * 3))
    assert Smoothing(demo_model, overlap=True)._overlaps(x, np.array([1]))
    monkeypatch.setattr(smoothing, "_CORES", 64)
    assert not Smoothing(demo_model, batch_size=4096, overlap=False)._overlaps(x, np.array([per_piece] * 3))


def test_a_forked_child_gets_a_noise_thread_of_its_own(monkeypatch):
    """The parent's noise thread does not exist in a forked child: keyed by process id,
    the child starts its own instead of queueing on the parent's forever."""
    pool = smoothing._noise_pool()
    assert smoothing._noise_pool() is pool
    monkeypatch.setattr(smoothing.os, "getpid", lambda: -1)
    child = smoothing._noise_pool()
    assert child is not pool and child.submit(lambda: 7).result(timeout=10) == 7


def test_certificate_json_roundtrip_and_scope(demo_model, digits_test):
    X, _ = digits_test
    c = Smoothing(demo_model, n=500).decide(X[0], 0.25, seed=9)
    d = json.loads(c.to_json())
    assert "says nothing about whether the input is clean" in d["scope"]
    assert "sigma=0.25" in d["scope"] and "alpha=0.001" in d["scope"]
    back = Certificate.from_json(c.to_json())
    assert back == c


def test_certificate_rejects_invalid_state():
    with pytest.raises(ValueError, match="norm"):
        Certificate(method="smoothing", norm="l7", radius=1.0, abstained=False, predicted_class=0)
    with pytest.raises(ValueError, match="radius"):
        Certificate(method="smoothing", norm="l2", radius=0.5, abstained=True, predicted_class=None)
    with pytest.raises(ValueError, match="sigma"):
        Smoothing(threshold_model(0.1), sigma=0)


def test_sklearn_base_classifier(digits_test, tmp_path):
    import skops.io as sio
    from sklearn.linear_model import LogisticRegression

    from riskpipe.models import load_model
    from riskpipe.models.digits import load_split

    Xtr, ytr = load_split("train")
    clf = LogisticRegression(max_iter=500).fit(Xtr.reshape(len(Xtr), -1), ytr)
    path = tmp_path / "lr.skops"
    sio.dump(clf, path)
    m = load_model(f"{path}?shape=1,8,8")
    X, y = digits_test
    c = Smoothing(m, sigma=0.25, n0=50, n=500).certify(X[0], seed=0)
    assert c.predicted_class == y[0] or c.abstained
    assert m.num_classes == 10 and m.input_shape == (1, 8, 8)


def test_a_model_error_while_drawing_ahead_propagates_and_leaves_the_noise_thread_usable(demo_model, digits_test):
    """The model raising on its second call while the third call's noise is drawn ahead:
    the error reaches the caller (the decider then isolates the event), the draw in flight
    is awaited, and the next certification draws ahead as before, with the same result."""
    X, _ = digits_test
    model = copy.copy(demo_model)
    calls = []

    def classes(batch, scratch=False):
        calls.append(len(batch))
        if len(calls) == 2:
            raise RuntimeError("model broke")
        return demo_model.classes(batch, scratch)

    model.classes = classes
    s = Smoothing(model, n0=20, n=400, batch_size=64, overlap=True)
    with pytest.raises(RuntimeError, match="model broke"):
        s.certify_batch(X[:4], [1, 2, 3, 4])
    want = Smoothing(demo_model, n0=20, n=400, batch_size=64, overlap=False).certify_batch(X[:4], [1, 2, 3, 4])
    got = s.certify_batch(X[:4], [1, 2, 3, 4])
    assert [(c.radius, c.predicted_class) for c in got] == [(c.radius, c.predicted_class) for c in want]

"""Attacks: PGD stays in the ball and the value range, really flips predictions at large
budgets, is deterministic with a seed; norm-shift coverage follows Theorem 2; the
public view carries no radius, so it gives the guided attacker nothing extra."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from torch import nn

from riskpipe.attacks import (
    PUBLIC_FIELDS,
    GuidedAttacker,
    PublicAttacker,
    PublicView,
    TrustedView,
    norm_shift,
    norm_shift_coverage,
    pgd,
    predict_labels,
)
from riskpipe.certify.norms import vector_norm
from riskpipe.models.digits import load_split

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny(one_thread):
    """A seeded two-layer MLP on the digits (trains in well under a second)."""
    torch.manual_seed(0)
    X, y = load_split("train")
    net = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    opt = torch.optim.Adam(net.parameters(), lr=0.02)
    xt, yt = torch.from_numpy(X), torch.from_numpy(y)
    for _ in range(150):
        loss = nn.functional.cross_entropy(net(xt), yt)
        opt.zero_grad()
        loss.backward()
        opt.step()
    net.eval()
    Xte, yte = load_split("test")
    keep = predict_labels(net, Xte) == yte  # attack inputs the model gets right
    return net, Xte[keep][:40], yte[keep][:40]


@pytest.mark.parametrize("norm,eps", [("linf", 0.03), ("linf", 0.3), ("l2", 0.3), ("l2", 3.0)])
def test_pgd_stays_in_ball_and_range(tiny, norm, eps):
    net, X, y = tiny
    adv = pgd(net, X, y, eps, norm=norm, steps=10, seed=1)
    assert adv.dtype == np.float32 and adv.shape == X.shape
    assert vector_norm(adv - X, norm).max() <= eps * (1 + 1e-5) + 1e-6
    assert adv.min() >= 0.0 and adv.max() <= 1.0


@pytest.mark.parametrize("norm,small,large", [("linf", 0.01, 0.3), ("l2", 0.05, 3.0)])
def test_pgd_changes_predictions_at_large_budgets(tiny, norm, small, large):
    net, X, y = tiny
    rate = {eps: float(np.mean(predict_labels(net, pgd(net, X, y, eps, norm=norm, steps=10)) != y))
            for eps in (small, large)}
    assert rate[large] >= 0.9
    assert rate[small] < rate[large]


def test_pgd_targeted_hits_target(tiny):
    net, X, y = tiny
    target = (y + 1) % 10
    adv = pgd(net, X, y, 0.4, norm="linf", steps=15, targeted=target)
    assert np.mean(predict_labels(net, adv) == target) >= 0.8


def test_pgd_deterministic_with_seed_and_smoothed_variant(tiny):
    net, X, y = tiny
    a = pgd(net, X, y, 0.5, norm="l2", steps=5, seed=7)
    b = pgd(net, X, y, 0.5, norm="l2", steps=5, seed=7)
    c = pgd(net, X, y, 0.5, norm="l2", steps=5, seed=8)
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    s1 = pgd(net, X[:10], y[:10], 0.5, norm="l2", steps=3, seed=7, noise_sigma=0.25, noise_samples=4)
    s2 = pgd(net, X[:10], y[:10], 0.5, norm="l2", steps=3, seed=7, noise_sigma=0.25, noise_samples=4)
    assert np.array_equal(s1, s2)
    assert vector_norm(s1 - X[:10], "l2").max() <= 0.5 + 1e-5


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_pgd_per_input_budgets_and_margin_loss(tiny, norm):
    """One budget per input (e.g. each certified radius) is respected row by row; the margin
    loss flips at least as many predictions as cross-entropy at the same budget."""
    net, X, y = tiny
    eps = np.linspace(0.0, 0.3 if norm == "linf" else 3.0, len(X))
    adv = pgd(net, X, y, eps, norm=norm, steps=10, seed=3, loss="margin")
    assert np.all(vector_norm(adv - X, norm) <= eps * (1 + 1e-5) + 1e-6)
    assert np.array_equal(adv[0], X[0])  # budget 0: untouched
    flips = {loss: int(np.sum(predict_labels(net, pgd(net, X, y, eps, norm=norm, steps=10, seed=3, loss=loss)) != y))
             for loss in ("ce", "margin")}
    assert flips["margin"] >= flips["ce"] - 1 and flips["margin"] > len(X) // 2
    with pytest.raises(ValueError, match="epsilon: 3 budgets"):
        pgd(net, X, y, eps[:3], norm=norm)
    with pytest.raises(ValueError, match="loss"):
        pgd(net, X, y, 0.1, loss="hinge")


def test_pgd_rejects_bad_arguments(tiny):
    net, X, y = tiny
    with pytest.raises(ValueError, match="norm"):
        pgd(net, X, y, 0.1, norm="l1")
    with pytest.raises(ValueError, match="epsilon"):
        pgd(net, X, y, -0.1)
    with pytest.raises(ValueError, match="y:"):
        pgd(net, X, y[:3], 0.1)
    assert np.array_equal(pgd(net, X, y, 0.0), X)


def test_norm_shift_coverage_follows_theorem_2():
    d = 64  # l2 radius r covers l_inf only to r / 8
    cov = norm_shift_coverage(np.array([0.0, 0.3, 0.8, 1.6]), "l2", "linf", 0.1, d)
    assert cov.factor == pytest.approx(1 / 8)
    assert cov.needed_radius == pytest.approx(0.8)
    assert cov.covered.tolist() == [False, False, True, True]
    assert cov.naive_covered.tolist() == [False, True, True, True]
    silent = norm_shift_coverage(np.array([0.3, 0.9]), "l2", "linf", 0.25, d)
    assert silent.silent and silent.summary()["naive_covered_fraction"] == 1.0


def test_norm_shift_attack_succeeds_where_the_l2_certificate_is_silent(tiny):
    net, X, y = tiny
    # Radii of 0.5 (l2) "look" bigger than an l_inf budget of 0.2, but cover only 0.0625.
    adv, cov = norm_shift(net, X, y, np.full(len(X), 0.5), "l2", 0.2, attack_norm="linf", steps=10)
    assert cov.silent and cov.naive_covered.all()
    assert vector_norm(adv - X, "linf").max() <= 0.2 + 1e-6
    assert np.mean(predict_labels(net, adv) != y) >= 0.5
    with pytest.raises(ValueError, match="attack_norm"):
        norm_shift(net, X, y, np.zeros(len(X)), "l2", 0.2, attack_norm="l2")


def _records(radii, decisions):
    audit, public = [], []
    for i, (r, d) in enumerate(zip(radii, decisions)):
        full = {"id": f"e{i}", "ts": "2026-01-01T00:00:00Z", "decision": d, "policy_version": "1",
                "score": 1.0 - min(r, 1.0), "certificate": {"radius": r, "radius_threat": r, "abstained": r == 0.0,
                                                           "predicted_class": 3, "p_lower": 0.9}}
        audit.append(full)
        public.append({k: full[k] for k in PUBLIC_FIELDS})
    return audit, public


def test_public_view_carries_no_radius_and_gives_the_guided_attacker_nothing():
    rng = np.random.default_rng(0)
    radii = rng.uniform(0, 1, 40).round(3)
    decisions = ["allow" if r >= 0.25 else "review" for r in radii]
    audit, public = _records(radii, decisions)
    view = PublicView.from_records(public)
    # Exactly the public fields, whatever extra the records carry.
    assert {f.name for f in dataclasses.fields(view.entries[0])} == set(PUBLIC_FIELDS)
    assert PublicView.from_records(audit) == view
    # Radii (with decisions unchanged) do not move the public view at all.
    _audit2, public2 = _records(np.where(radii >= 0.25, radii * 3, radii / 2), decisions)
    assert PublicView.from_records(public2) == view
    guided, public_only = GuidedAttacker(10, 0.5, seed=3), PublicAttacker(10, seed=3)
    assert guided.choose(view) == public_only.choose(view)
    assert guided.choose(PublicView.from_records(public2)) == public_only.choose(view)
    # The trusted view does change the guided choice: it skips what is out of reach.
    chosen = guided.choose(TrustedView.from_records(audit))
    by_id = {r["id"]: r["certificate"]["radius_threat"] for r in audit}
    assert chosen != public_only.choose(view)
    assert all(by_id[i] < 0.5 for i in chosen)
    assert [by_id[i] for i in chosen if by_id[i] >= 0.25] == sorted(by_id[i] for i in chosen if by_id[i] >= 0.25)


def test_views_reject_records_without_their_fields():
    with pytest.raises(ValueError, match=r"decisions\[0\]: missing field 'decision'"):
        PublicView.from_records([{"id": "a", "ts": "t", "policy_version": "1"}])
    with pytest.raises(ValueError, match=r"audit\[0\]"):
        TrustedView.from_records([{"id": "a", "decision": "allow"}])


def test_guided_attacker_first_targets_inputs_it_can_push_a_policy_epsilon_past_the_boundary():
    audit, _ = _records([0.9, 0.6, 0.3, 0.1, 1.2], ["allow"] * 5)
    view = TrustedView.from_records(audit)
    # Budget 1.0, policy epsilon 0.5: radius 0.9 is in reach but leaves no room to be certified wrong.
    assert GuidedAttacker(5, 1.0, margin=0.5).choose(view) == ["e3", "e2", "e1", "e0"]
    assert GuidedAttacker(2, 1.0).choose(view) == ["e3", "e2"]

"""riskpipe.survey: the measurements and proposal behind `riskpipe init` (pure, no model files)."""

import numpy as np
import pytest
from scipy.spatial.distance import cdist

from riskpipe.certify.stats import max_radius
from riskpipe.survey import (
    SIGMAS,
    TOLERANCE,
    SurveyError,
    check_reference,
    other_class_distances,
    propose,
    propose_sampler,
    quantisation_grid,
    survey,
)


def blobs(n=300, dim=20, gap=6.0, seed=0):
    """Two Gaussian classes (unit variance) whose means are ``gap`` apart along axis 0."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 2
    X = rng.standard_normal((n, dim)).astype(np.float32)
    X[:, 0] += gap * y
    return X, y.astype(np.int64), (lambda Z: (Z[:, 0] > gap / 2).astype(np.int64))


def test_other_class_distances_match_brute_force():
    rng = np.random.default_rng(1)
    X = rng.standard_normal((60, 3, 4, 4)).astype(np.float32)
    y = rng.integers(0, 3, 60)
    flat = X.reshape(60, -1)
    for norm, metric in (("l2", "euclidean"), ("linf", "chebyshev")):
        D = cdist(flat, flat, metric=metric)
        D[y[:, None] == y[None, :]] = np.inf
        np.testing.assert_allclose(other_class_distances(X, y, norm), D.min(axis=1), rtol=1e-5)


def test_robust_model_gets_the_largest_sigma_within_tolerance_and_epsilon_sigma():
    X, y, predict = blobs(gap=12.0)
    sv = survey(predict, X, X, y, 2, seed=0)
    assert sv.clean_accuracy > 0.99 and sv.n_reference == 300 and sv.class_counts == {0: 150, 1: 150}
    assert [p.sigma for p in sv.sweep] == sorted(SIGMAS)  # never fell past the tolerance
    p = propose(sv, alpha=0.001, max_samples=10000)
    assert p.sigma == max(SIGMAS) and p.epsilon == 1.0  # the distance cap (p5 / 4) is larger
    assert p.max_radius == pytest.approx(max_radius(1.0, 0.001, 10000))
    assert "sigma 1:" in p.reasons[0] and "epsilon 1 (l2" in p.reasons[1] and "d = 20" in p.notes[0]


def test_sweep_stops_at_the_first_sigma_past_the_tolerance():
    X, y, predict = blobs(gap=2.0, dim=2, n=2000)
    sv = survey(predict, X, X, y, 2, seed=0)
    accs = [p.accuracy for p in sv.sweep]
    assert accs[-1] < sv.clean_accuracy - TOLERANCE  # the sweep stopped there
    assert all(a >= sv.clean_accuracy - TOLERANCE for a in accs[:-1])
    p = propose(sv, 0.001, 10000)
    assert len(sv.sweep) >= 2 and p.sigma == sv.sweep[-2].sigma


def test_epsilon_capped_by_other_class_distance_when_classes_are_close():
    X, y, predict = blobs(gap=12.0)
    Xs = X / 40.0  # same geometry, 40x closer: distances ~0.3, noise tolerance unchanged relative to them
    sv = survey(lambda Z: predict(Z * 40.0), Xs, Xs, y, 2, seed=0)
    p = propose(sv, 0.001, 10000)
    cap = 0.25 * sv.distances["l2"].p5
    assert p.epsilon <= cap < p.sigma and p.epsilon >= 0.9 * cap
    assert "5th percentile" in p.reasons[1]


def test_model_that_breaks_under_any_noise_gets_the_smallest_sigma_and_a_retrain_note():
    X, y, _ = blobs()
    rng = np.random.default_rng(0)
    key = rng.standard_normal(X.shape[1])
    labels = {tuple(np.round(x, 4)): c for x, c in zip(X, y)}  # memorises the exact clean inputs
    predict = lambda Z: np.array([labels.get(tuple(np.round(z, 4)), int(z @ key > 0)) for z in Z])  # noqa: E731
    sv = survey(predict, X, X, y, 2, seed=0)
    assert len(sv.sweep) == 1  # the first sigma already fell past the tolerance
    p = propose(sv, 0.001, 10000)
    assert p.sigma == min(SIGMAS) and "Gaussian noise augmentation" in p.reasons[0]


def test_reference_the_model_gets_wrong_is_pointed_out():
    X, y, predict = blobs(gap=12.0)
    p = propose(survey(lambda Z: 1 - predict(Z), X, X, y, 2, seed=0), 0.001, 10000)
    assert "check that X is in the units the model takes" in p.notes[0]
    assert not any("units the model takes" in n for n in propose(survey(predict, X, X, y, 2), 0.001, 10000).notes)


def test_survey_is_deterministic_for_a_seed():
    X, y, predict = blobs(gap=4.0)
    a, b = survey(predict, X, X, y, 2, seed=3), survey(predict, X, X, y, 2, seed=3)
    assert a.sweep == b.sweep and a.distances == b.distances


@pytest.mark.parametrize("X, y, shape, classes, msg", [
    (np.zeros((4, 3)), None, (3,), 2, "no array 'y'"),
    (np.zeros((4, 5)), np.array([0, 1, 0, 1]), (3,), 2, "X rows have shape [5], the model expects [3]"),
    (np.zeros((4, 3)), np.array([0, 1, 2, 1]), (3,), 2, "the model has 2 classes"),
    (np.zeros((4, 3)), np.array([1, 1, 1, 1]), (3,), 2, "one class only"),
])
def test_check_reference_errors_name_the_field(X, y, shape, classes, msg):
    with pytest.raises(SurveyError) as e:
        check_reference(X, y, shape, classes, source="ref.npz")
    assert str(e.value).startswith("ref.npz: ") and msg in str(e.value) and "\n" not in str(e.value)


def test_check_reference_reshapes_flat_rows():
    X, y = check_reference(np.zeros((4, 12)), np.array([0, 1, 0, 1]), (3, 2, 2), 2)
    assert X.shape == (4, 3, 2, 2) and X.dtype == np.float32 and y.dtype == np.int64


# ---- quantisation grid: whether init proposes the sound sampler ---------------------------

def on_grid(levels, lo, hi, shape=(300, 3, 8, 8), seed=0, ks=None):
    """float32 values lo + k (hi - lo) / levels, computed in float32 as a sender would."""
    k = np.random.default_rng(seed).integers(0, levels + 1, shape) if ks is None else ks
    return (np.float32(lo) + np.float32(hi - lo) * (k.astype(np.float32) / np.float32(levels))).astype(np.float32)


@pytest.mark.parametrize("levels", [1, 2, 16, 255, 1000, 4096, 65535])
@pytest.mark.parametrize("lo, hi", [(0.0, 1.0), (-1.0, 1.0), (0.0, 255.0)])
def test_grid_is_found_with_the_smallest_levels_and_the_sampler_takes_every_value(levels, lo, hi):
    import torch

    from riskpipe.certify.samplers import SoundSampler

    X = on_grid(levels, lo, hi)
    g = quantisation_grid(X, lo, hi)
    assert g is not None and g.levels == levels and (g.lo, g.hi) == (lo, hi)
    assert g.distinct == len(np.unique(X)) and g.max_offset < 0.05
    # the stage's sound sampler with that grid accepts every value init saw (no off_grid)
    sigma = 10 * (hi - lo) / levels  # ten steps: one small noise table for every grid
    SoundSampler(sigma, (lo, hi), X[0].size, grid_levels=g.levels).prepare(torch.from_numpy(X))


def test_grid_levels_are_the_fewest_that_hold_every_value():
    # only even steps of a 510-level grid: that is the 255-level grid, not 510
    X = on_grid(510, 0.0, 1.0, ks=2 * np.random.default_rng(1).integers(0, 256, (50, 20)))
    assert quantisation_grid(X, 0.0, 1.0).levels == 255
    # one value that only a finer grid holds makes the grid that fine
    X[0, 0] = np.float32(1 / 7)
    assert quantisation_grid(X, 0.0, 1.0).levels == 1785  # lcm(255, 7)


@pytest.mark.parametrize("case", ["continuous", "near_grid", "outside_range", "float16"])
def test_no_grid_for_values_off_every_grid(case):
    rng = np.random.default_rng(2)
    X = on_grid(255, 0.0, 1.0)
    if case == "continuous":
        X = rng.random((160, 3, 32, 32)).astype(np.float32)
    elif case == "near_grid":  # 0.002 steps off: within the sampler's 1e-3-step slack? no; within float32? no
        X = (X + np.float32(0.002 / 255) * rng.choice([-1, 1], X.shape)).astype(np.float32)
    elif case == "outside_range":
        X = X * np.float32(2.0)
    else:  # half precision cannot carry an 8-bit grid exactly
        X = X.astype(np.float16).astype(np.float32)
    assert quantisation_grid(X, 0.0, 1.0) is None


def test_sampler_proposal_says_why_what_it_costs_and_what_to_declare():
    from riskpipe import survey as sv

    g = quantisation_grid(on_grid(16, 0.0, 1.0), 0.0, 1.0)
    p = propose_sampler(g, 19200, (0.0, 1.0))
    assert (p.sampler, p.grid_levels) == ("sound", 16)
    assert "grid 0 + k * (1 - 0) / 16" in p.reasons[0] and "all 19200 reference values (17 distinct)" in p.reasons[0]
    assert f"{sv.SOUND_EVALS_IMAGE:.2f}x the gaussian sampler's model evaluations/s" in p.reasons[0]
    assert f"{sv.SOUND_EVALS_DEMO:.2f}x on the 8x8 demo model" in p.reasons[0]
    assert "UINT8" in p.reasons[0] and "grid_levels: 4080" in p.reasons[0]  # lcm(16, 255) takes 8-bit events too
    p8 = propose_sampler(quantisation_grid(on_grid(255, 0.0, 1.0), 0.0, 1.0), 1, (0.0, 1.0))
    assert (p8.sampler, p8.grid_levels) == ("sound", 255) and "so they are on this grid too" in p8.reasons[0]
    for args, why in ((((0.0, 1.0),), "on no grid 0 + k * (1 - 0) / L with L <= 65535"),
                      ((None,), "declares no single value range (lo, hi)"),
                      ((None, True), "standardized units")):
        q = propose_sampler(None, 10, *args)
        assert (q.sampler, q.grid_levels) == ("gaussian", None)
        assert why in q.reasons[0] and "not floating-point sound" in q.reasons[0]
        assert "certifier.sampler: sound with grid_levels" in q.reasons[0] and "UINT8" in q.reasons[0]


def test_sound_cost_figures_are_the_committed_benchmark():
    import json
    from pathlib import Path

    from riskpipe import survey as sv

    res = json.loads((Path(__file__).resolve().parents[1] / "bench" / "results" / "sound.json").read_text())
    ratios = {name: r["sound_over_gaussian_evals_per_s"]["after"] for name, r in res["stage"]["ratios"].items()}
    image = next(v for k, v in ratios.items() if "image" in k)
    demo = next(v for k, v in ratios.items() if "demo" in k)
    assert round(image, 2) == sv.SOUND_EVALS_IMAGE
    assert round(demo, 2) == sv.SOUND_EVALS_DEMO

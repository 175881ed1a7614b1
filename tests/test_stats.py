import numpy as np
import pytest
from scipy import stats

from riskpipe.certify.stats import (
    SequentialPlan,
    clopper_pearson_lower,
    clopper_pearson_upper,
    goodman_intervals,
    radius_from_p,
    radius_two_class,
)


@pytest.mark.parametrize("k,n,alpha,expected", [
    (99, 100, 0.001, 0.9113731112960424),   # binomtest(99,100).proportion_ci(0.998,'exact').low
    (100, 100, 0.001, 0.001 ** (1 / 100)),  # k = n: alpha ** (1/n)
    (50, 100, 0.05, 0.41362),
    (0, 100, 0.05, 0.0),
])
def test_clopper_pearson_known_values(k, n, alpha, expected):
    assert clopper_pearson_lower(k, n, alpha) == pytest.approx(expected, abs=1e-5)


def test_clopper_pearson_matches_scipy_binomtest():
    for k, n in [(1, 10), (7, 10), (950, 1000), (12, 40)]:
        ci = stats.binomtest(k, n).proportion_ci(confidence_level=1 - 2 * 0.01, method="exact")
        assert clopper_pearson_lower(k, n, 0.01) == pytest.approx(ci.low, rel=1e-9)
        assert clopper_pearson_upper(k, n, 0.01) == pytest.approx(ci.high, rel=1e-9)


def test_clopper_pearson_vectorised():
    k = np.array([0, 50, 100])
    lo = clopper_pearson_lower(k, 100, 0.001)
    assert lo.shape == (3,) and lo[0] == 0.0 and np.all(np.diff(lo) > 0)


def test_radius_monotone_and_abstain_rules():
    p = np.linspace(0.3, 0.9999, 200)
    r = radius_from_p(p, 0.25)
    assert np.all(r[p <= 0.5] == 0.0)
    assert np.all(np.diff(r[p > 0.5]) > 0)
    assert radius_from_p(stats.norm.cdf(1.0), 0.25) == pytest.approx(0.25)
    assert radius_two_class(0.9, 0.1, 0.5) == pytest.approx(0.5 * stats.norm.ppf(0.9))
    assert radius_two_class(0.4, 0.45, 0.5) == 0.0


def test_goodman_simultaneous_coverage(rng):
    p = np.array([0.6, 0.3, 0.1])
    misses = 0
    for _ in range(2000):
        c = rng.multinomial(200, p)
        lo, hi = goodman_intervals(c, 0.05)
        misses += np.any((p < lo) | (p > hi))
    assert misses / 2000 <= 0.05 + 0.015


def test_sequential_plan_thresholds_and_error_bound():
    plan = SequentialPlan.build(0.25, 0.25, 0.001, 100_000)
    assert plan.looks[0] == 48 and plan.looks[-1] == 100_000
    assert plan.error_bound <= 0.001
    assert sum(plan.alphas) <= 0.001
    for n, a, k, alpha_r in zip(plan.looks, plan.accept, plan.reject, plan.alphas):
        # accept: smallest count whose Clopper-Pearson lower bound reaches tau
        assert clopper_pearson_lower(a, n, alpha_r) >= plan.tau
        assert a - 1 < 0 or clopper_pearson_lower(a - 1, n, alpha_r) < plan.tau
        assert 2 * a >= n + 1  # convexity condition of the class-selection argument
        assert k < a
        assert k < 0 or clopper_pearson_upper(k, n, alpha_r) < plan.tau
    # information floor: 40 samples is the least any test at alpha=0.001 could use
    assert plan.looks[0] >= 40


def test_sequential_plan_falls_back_to_bonferroni_near_half():
    plan = SequentialPlan.build(0.001, 0.25, 0.001, 10_000)
    assert plan.selection.startswith("bonferroni")
    assert plan.error_bound <= 0.001


def test_sequential_plan_rejects_bad_arguments():
    with pytest.raises(ValueError):
        SequentialPlan.build(0.25, 0.0, 0.001, 100)
    with pytest.raises(ValueError):
        SequentialPlan.build(0.25, 0.25, 1.5, 100)


def test_futility_thresholds_only_stop_hopeless_inputs():
    plan = SequentialPlan.build(0.25, 0.25, 0.001, 10_000, futility=0.01)
    needed = plan.accept[-1] / plan.looks[-1]
    for n, f, a in zip(plan.looks[:-1], plan.futile[:-1], plan.accept[:-1]):
        assert f < a
        if f >= 0:  # at the futility count the budget's fraction is implausible at level 0.01
            assert clopper_pearson_upper(f, n, 0.01) < needed
            assert clopper_pearson_upper(f + 1, n, 0.01) >= needed
    assert plan.futile[-1] == -1
    off = SequentialPlan.build(0.25, 0.25, 0.001, 10_000, futility=None)
    assert all(f == -1 for f in off.futile) and off.accept == plan.accept

import numpy as np
import pytest

from riskpipe.certify.norms import check_norm, conversion_factor, convert_radius, vector_norm


@pytest.mark.parametrize("p", ["l1", "l2", "linf"])
@pytest.mark.parametrize("q", ["l1", "l2", "linf"])
def test_theorem2_containment(p, q, rng):
    """Every vector in the converted l_q ball lies inside the original l_p ball, and
    the factor is tight (some vector on the l_q sphere touches the l_p sphere)."""
    d, r_p = 64, 1.0
    r_q = convert_radius(r_p, p, q, d)
    v = rng.standard_normal((5000, d)) * rng.uniform(0.01, 3, size=(5000, 1))
    v = v / vector_norm(v, q)[:, None] * r_q  # on the l_q sphere of radius r_q
    assert np.all(vector_norm(v, p) <= r_p * (1 + 1e-9))
    # tightness: the extreme vector for this pair reaches the l_p sphere
    if p == q:
        assert r_q == r_p
    e = np.zeros(d)
    e[0] = 1
    ones = np.ones(d)
    worst = max(vector_norm((u / vector_norm(u[None], q))[None] * r_q, p)[0] for u in (e, ones))
    assert worst == pytest.approx(r_p, rel=1e-9)


def test_l2_to_linf_shrinks_by_sqrt_d():
    assert conversion_factor("l2", "linf", 64) == pytest.approx(1 / 8)
    assert conversion_factor("linf", "l2", 64) == 1.0
    assert conversion_factor("l1", "l2", 64) == pytest.approx(1 / 8)
    assert conversion_factor("l1", "linf", 64) == pytest.approx(1 / 64)
    assert conversion_factor("l2", "l1", 64) == 1.0
    assert conversion_factor("linf", "l1", 64) == 1.0


def test_norm_aliases_and_errors():
    assert check_norm("inf") == "linf" and check_norm("2") == "l2"
    with pytest.raises(ValueError, match="norm"):
        check_norm("l3")
    with pytest.raises(ValueError, match="dimension"):
        conversion_factor("l2", "linf", 0)

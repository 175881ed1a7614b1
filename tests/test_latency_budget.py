"""The latency budget (certifier.max_latency_ms): hard inputs stop with reason deadline,
not certified, without holding up their batch-mates; no alpha is spent; the stop replays."""

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from scipy import stats

from riskpipe.certify import Certificate, certifier_for_policy, family
from riskpipe.conformance import threshold_classifier
from riskpipe.metrics import StageMetrics, expose
from riskpipe.models.base import Model
from riskpipe.policy import PolicyError, parse_policy

pytestmark = pytest.mark.usefixtures("one_thread")
SIGMA, EPS = 0.5, 0.5
ROOT = Path(__file__).resolve().parents[1]


def _two_inputs_model() -> Model:
    """x[0] = 0: an input exactly at tau = Phi(eps/sigma) (undecidable); x[0] = 1: far above it."""
    t = SIGMA * stats.norm.ppf(stats.norm.cdf(EPS / SIGMA))
    lin = torch.nn.Linear(1, 2)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[-1.0], [1.0]]))
        lin.bias.copy_(torch.tensor([t, -t]))
    # class 0 when x < t; the easy input sits at -3 (far inside class 0)
    return Model(spec="synthetic:hard-and-easy", input_shape=(1,), num_classes=2, sha256="2" * 64,
                 value_range=(-1e9, 1e9), module=torch.nn.Sequential(lin).eval())


@pytest.fixture
def ticking(monkeypatch):
    """The smoothing certifier's clock advances 0.4 ms per read, however fast the machine:
    the 1 ms budgets below run out at the same look on every run (a real clock let the
    whole plan finish inside 1 ms on a fast machine)."""
    import riskpipe.certify.smoothing as smoothing_mod

    now = [0.0]

    def perf_counter() -> float:
        now[0] += 4e-4
        return now[0]

    monkeypatch.setattr(smoothing_mod, "time", SimpleNamespace(perf_counter=perf_counter))
    return now


def test_hard_input_stops_at_the_deadline_and_easy_ones_are_decided(ticking):
    m = _two_inputs_model()
    X = np.array([[0.0], [-3.0], [-3.0]], np.float32)
    free = family("smoothing")(m, sigma=SIGMA, max_samples=200_000, batch_size=512)
    slow = free.run("decide", X[:1], [1], EPS)[0]
    assert slow.reason in ("budget", "below_epsilon") and slow.n_samples > 5000  # the hard input is slow
    timed = family("smoothing")(m, sigma=SIGMA, max_samples=200_000, batch_size=512, max_latency_ms=1.0)
    hard, easy, easy2 = timed.run("decide", X, [1, 2, 3], EPS)
    assert hard.reason == "deadline" and hard.certified is False and hard.n_samples < slow.n_samples
    assert easy.certified and easy2.certified and easy.n_samples <= 96
    assert hard.extra["max_looks"] >= 1 and hard.extra["latency_budget_ms"] == 1.0
    # the stop replays exactly without the clock: same looks, same counts
    again = family("smoothing")(m, sigma=SIGMA, max_samples=200_000, batch_size=512,
                                max_looks=hard.extra["max_looks"]).run("decide", X[:1], [1], EPS)[0]
    assert (again.reason, again.n_samples, again.p_lower) == (hard.reason, hard.n_samples, hard.p_lower)


def test_deadline_spends_no_alpha():
    """Stopping after any look keeps decide's error rate at most about alpha."""
    t = SIGMA * stats.norm.ppf(stats.norm.cdf(EPS / SIGMA) - 0.002)  # true radius just below epsilon
    trials = 1500
    s = family("smoothing")(threshold_classifier(t), sigma=SIGMA, alpha=0.05, max_samples=2000, first_look=20,
                            batch_size=8192, max_looks=3)
    certs = s.run("decide", np.zeros((trials, 1), np.float32), list(range(trials)), EPS)
    assert sum(c.certified for c in certs) <= stats.binom.ppf(1 - 1e-4, trials, 0.05)
    assert sum(c.reason == "deadline" for c in certs) > trials // 2  # the stop did bite


def _policy(extra: str, mode: str = "decide") -> str:
    text = (ROOT / "policies/default.yaml").read_text()
    return text.replace("  mode: decide\n", f"  mode: {mode}\n").replace("  max_samples: 10000\n",
                                                                        f"  max_samples: 10000\n{extra}")


def test_policy_field_reaches_the_certifier_and_is_checked():
    pol = parse_policy(_policy("  max_latency_ms: 25\n"), "p.yaml")
    assert certifier_for_policy(_two_inputs_model(), pol).max_latency_ms == 25
    with pytest.raises(PolicyError, match="max_latency_ms: applies to mode decide only"):
        parse_policy(_policy("  max_latency_ms: 25\n", mode="certify"), "p.yaml")
    with pytest.raises(PolicyError, match="max_latency_ms"):
        parse_policy(_policy("  max_latency_ms: -1\n"), "p.yaml")


def test_deadline_is_counted_in_a_metric_and_treated_as_uncertified(ticking):
    m = _two_inputs_model()
    pol = parse_policy(_policy("  max_latency_ms: 1\n"), "p.yaml")
    hard = certifier_for_policy(m, pol, batch_size=512).run("decide", np.zeros((1, 1), np.float32), [1], EPS)[0]
    assert hard.reason == "deadline"
    d = pol.evaluate(Certificate.from_dict(hard.to_dict()), upstream_risk=0.05, event_id="e")
    assert not d.certified_in_threat and d.decision == "review"
    metrics = StageMetrics()
    metrics.declare({"two": pol})
    metrics.decision({"decision": d.decision, "certificate": hard.to_dict(), "model": {"name": "two"},
                      "policy": {"name": pol.name, "version": "1"}})
    text = expose(metrics.registry).decode()
    assert f'riskpipe_certify_deadline_total{{method="smoothing",model="two",policy="{pol.name}"}} 1.0' in text

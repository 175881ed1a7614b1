"""docs/records.md pins what `certificate.reason` and `elapsed_ms` mean: every reason a
certifier gives is in its table, and elapsed_ms is the batch's wall time shared by its inputs."""

from __future__ import annotations

import re
import time
from pathlib import Path

import numpy as np
import pytest

from riskpipe.certify import certifier_for_policy
from riskpipe.models import load_model
from riskpipe.policy.schema import Certifier

DOC = Path(__file__).resolve().parents[1] / "docs" / "records.md"


def documented_reasons() -> set[str]:
    text = DOC.read_text(encoding="utf-8")
    section = text.split("### Certificate reasons", 1)[1].split("\n## ", 1)[0]
    return set(re.findall(r"^\| `([a-z_]+)` \|", section, flags=re.M))


@pytest.fixture(scope="module")
def noise():
    return np.random.default_rng(0).random((16, 1, 8, 8)).astype(np.float32)


def _reasons(spec: str, section: Certifier, mode: str, X, epsilon: float) -> set:
    cert = certifier_for_policy(load_model(spec), section, batch_size=512, epsilon=epsilon)
    return {c.reason for c in cert.run(mode, X, list(range(len(X))), epsilon)}


def test_every_reason_the_certifiers_give_is_documented(noise):
    seen = set()
    seen |= _reasons("demo:digits", Certifier.for_method("smoothing", sigma=0.5, n=100, n0=20), "certify", noise, 0.5)
    seen |= _reasons("demo:digits", Certifier.for_method("smoothing", sigma=0.5, n=50, n0=20), "predict", noise, 0.5)
    seen |= _reasons("demo:digits", Certifier.for_method("smoothing", sigma=0.5, mode="decide", max_samples=200),
                     "decide", noise, 0.5)
    seen |= _reasons("demo:digits-lipschitz", Certifier.for_method("lipschitz"), "certify", noise, 5.0)
    seen |= _reasons("demo:digits-ibp", Certifier.for_method("ibp"), "certify", noise, 0.0)
    seen.discard(None)  # a certificate that holds has no reason
    # the inputs are noise, so every family withholds some certificates
    assert {"p_lower_below_half", "not_significant", "below_epsilon", "budget", "radius_below_epsilon"} <= seen
    assert seen <= documented_reasons(), seen - documented_reasons()


def test_elapsed_ms_is_the_batch_time_shared_by_its_inputs(noise):
    cert = certifier_for_policy(load_model("demo:digits"), Certifier.for_method("smoothing", sigma=0.25, n=200, n0=20),
                                batch_size=512)
    t0 = time.perf_counter()
    certs = cert.certify_batch(noise[:4], [0, 1, 2, 3])
    wall_ms = (time.perf_counter() - t0) * 1e3
    assert len({c.elapsed_ms for c in certs}) == 1  # one value for the batch's inputs
    assert 0 < sum(c.elapsed_ms for c in certs) <= wall_ms

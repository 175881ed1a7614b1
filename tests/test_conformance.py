"""The conformance suite (riskpipe.conformance) on every family and sampler, on a small
seeded 3x8x8 CNN that is not the demo model, plus proof that the suite has teeth."""

import dataclasses

import numpy as np
import pytest
import torch
from torch import nn

from riskpipe.certify import family
from riskpipe.certify.families import FAMILIES
from riskpipe.conformance import CertifierCheckError, check_certifier
from riskpipe.models.base import Model, sha256_state_dict

pytestmark = pytest.mark.usefixtures("one_thread")


def _data(n: int, seed: int):
    """3x8x8 images on the 8-bit grid; the class is the brightest channel."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n)
    X = rng.integers(40, 110, (n, 3, 8, 8))
    X[np.arange(n), y] += 120
    return (X / 255).astype(np.float32), y


@pytest.fixture(scope="module")
def cnn():
    torch.manual_seed(0)
    module = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.AvgPool2d(2), nn.Flatten(),
                           nn.Linear(6 * 4 * 4, 16), nn.ReLU(), nn.Linear(16, 3))
    X, y = _data(512, 1)
    xt, yt = torch.from_numpy(X), torch.from_numpy(y)
    opt = torch.optim.Adam(module.parameters(), lr=0.01)
    g = torch.Generator().manual_seed(0)
    for _ in range(150):
        loss = nn.functional.cross_entropy(module(xt + 0.25 * torch.randn(xt.shape, generator=g)), yt)
        opt.zero_grad()
        loss.backward()
        opt.step()
    module.eval()
    model = Model(spec="test:cnn3x8x8", input_shape=(3, 8, 8), num_classes=3, sha256=sha256_state_dict(module),
                  module=module, value_range=(0.0, 1.0))
    return model, _data(6, 2)[0]


SMOOTH = {"sigma": 0.25, "n0": 32, "n": 256, "max_samples": 1024, "batch_size": 1024}
FACTORIES = {
    "ibp": lambda m, **kw: family("ibp")(m, **kw),
    "lipschitz": lambda m, **kw: family("lipschitz")(m, **kw),
    "smoothing-gaussian": lambda m, **kw: family("smoothing")(m, **{**SMOOTH, "sampler": "gaussian", **kw}),
    "smoothing-sound": lambda m, **kw: family("smoothing")(m, **{**SMOOTH, "sampler": "sound", **kw}),
}


# Families the CNN cannot speak about, and where their conformance run is.
ELSEWHERE = {"trees": "tests/test_trees.py::test_trees_family_conforms"}


def test_every_registered_family_has_a_conformance_run():
    """A family added to the registry fails here until the suite runs on it."""
    assert {name.split("-")[0] for name in FACTORIES} | set(ELSEWHERE) == set(FAMILIES)


@pytest.mark.parametrize("name", list(FACTORIES))
def test_every_family_and_sampler_conforms(name, cnn):
    model, X = cnn
    report = check_certifier(FACTORIES[name], model, X, trials=1500)
    assert "no_attack_inside_radius" in report["checks"]
    assert report["attacked"] >= 1, "no certified input: the attack check would say nothing"
    if name.startswith("smoothing"):
        assert set(report) >= {"certify", "predict", "decide", "alpha_level"}
        assert report["alpha_level"]["certify_errors"] <= report["alpha_level"]["allowed"]


@dataclasses.dataclass
class Overconfident(family("smoothing")):
    """A smoothing certifier that reports the point estimate instead of a confidence bound."""

    def certify_batch(self, X, seeds):
        out = []
        for c in super().certify_batch(X, seeds):
            if not c.abstained:
                from scipy.stats import norm
                p = c.extra["counts_top"] / self.n
                r = self.sigma * norm.ppf(min(p, 1 - 1e-9))
                c = c.replace(radius=max(r, 1e-9))
            out.append(c)
        return out


def test_suite_catches_a_bound_without_confidence(cnn):
    model, X = cnn
    with pytest.raises(CertifierCheckError, match="alpha_level: certify over-stated"):
        check_certifier(lambda m, **kw: Overconfident(m, **{**SMOOTH, **kw}), model, X, trials=1500)


@dataclasses.dataclass
class Inflated(family("ibp")):
    """IBP radii multiplied by 50: certificates that are not true."""

    def certify_batch(self, X, seeds):
        return [c if c.abstained else c.replace(radius=c.radius * 50) for c in super().certify_batch(X, seeds)]


def test_suite_catches_an_attackable_radius(cnn):
    model, X = cnn
    with pytest.raises(CertifierCheckError, match="no_attack_inside_radius"):
        check_certifier(lambda m, **kw: Inflated(m, **kw), model, X)


@dataclasses.dataclass
class Lenient(family("lipschitz")):
    """Accepts a negative safety factor silently."""

    def __post_init__(self):
        self.safety = abs(self.safety)
        super().__post_init__()


def test_suite_catches_an_unchecked_parameter(cnn):
    model, X = cnn
    with pytest.raises(CertifierCheckError, match="invalid_parameters: safety=-1 was accepted"):
        check_certifier(lambda m, **kw: Lenient(m, **kw), model, X)

"""The sound sampler: exact table, every model input on the grid, off-grid inputs refused
(CLI error, DLQ reason off_grid), scope names the sampler; on a 3x32x32 CNN and a tabular
model, not only the demo."""

import json
import subprocess
import sys

import mpmath
import numpy as np
import pytest
import torch
from torch import nn

from riskpipe.certify import family
from riskpipe.certify.samplers import GridError, SoundSampler, _table
from riskpipe.models import load_model
from riskpipe.models.base import Model, sha256_state_dict
from riskpipe.stream.errors import EventError
from riskpipe.stream.events import Event

pytestmark = pytest.mark.usefixtures("one_thread")


class Spy(nn.Module):
    """A fixed random linear classifier that remembers every input it sees."""

    def __init__(self, d: int, k: int = 3):
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(d, k)
        self.seen: list[torch.Tensor] = []

    def forward(self, x):
        self.seen.append(x.detach().clone())
        return self.lin(x.flatten(1))


def _cnn_model(shape=(3, 32, 32), value_range=(0.0, 1.0)) -> Model:
    module = Spy(int(np.prod(shape))).eval()
    return Model(spec="test:spy", input_shape=shape, num_classes=3, sha256=sha256_state_dict(module),
                 value_range=value_range, module=module)


def test_table_is_the_rounded_gaussian_to_the_stated_precision():
    thresholds, J, tv = _table(0.25 * 255)
    q = np.diff(np.concatenate([[0], thresholds, [1 << 62]])).astype(object)  # exact integers
    mpmath.mp.dps = 50
    s = mpmath.mpf(0.25 * 255)
    worst = mpmath.mpf(0)
    for j in range(-J, J + 1, 37):  # a spread of bins, tails included
        lo = mpmath.ncdf((j - mpmath.mpf(0.5)) / s) if j > -J else 0
        hi = mpmath.ncdf((j + mpmath.mpf(0.5)) / s) if j < J else 1
        worst = max(worst, abs(mpmath.mpf(int(q[j + J])) / (1 << 62) - (hi - lo)))
    assert worst < mpmath.mpf(2) ** -62 + mpmath.ncdf(-(J + 0.5) / s)
    assert J * (1 / 255) >= 10 * 0.25 and 0 < tv < 1e-15


def test_noise_statistics_and_every_model_input_on_the_grid():
    m = _cnn_model()
    s = family("smoothing")(m, sigma=0.25, n0=10, n=300, sampler="sound", batch_size=128)
    X = np.random.default_rng(0).integers(0, 256, (1, 3, 32, 32)).astype(np.float32) / 255
    s.run("certify", X, [1])
    seen = torch.cat(m.module.seen)
    k = torch.round(seen.double() * 255)
    # each input is exactly the float of a grid point k / 255 (outside [0, 1] too): one float per lattice point
    assert torch.equal(seen, (k / 255).float())
    assert len(seen) == 310
    noise = k - torch.round(torch.from_numpy(X[0]).double() * 255)  # input 0's noise, in grid steps
    assert abs(float(noise.mean())) < 0.5
    assert float(noise.var()) == pytest.approx((0.25 * 255) ** 2 + 1 / 12, rel=0.01)  # rounded N(0, sigma^2)


def test_off_grid_input_is_refused_with_coordinate_and_value():
    m = _cnn_model()
    s = family("smoothing")(m, sigma=0.25, sampler="sound")
    X = np.full((1, 3, 32, 32), 10 / 255, np.float32)
    s.check_inputs(X)
    X[0, 1, 2, 3] = 0.5  # 127.5 / 255
    with pytest.raises(GridError, match=r"coordinate \[1, 2, 3\] of input 0 is 0.5, not on the sound sampler's grid"):
        s.check_inputs(X)
    with pytest.raises(GridError):
        s.run("certify", X, [0])
    family("smoothing")(m, sigma=0.25, sampler="gaussian").check_inputs(X)  # the gaussian sampler takes it


def test_declared_grid_for_tabular_inputs_and_unbounded_range_needs_one():
    m = _cnn_model(shape=(13,), value_range=(-np.inf, np.inf))
    with pytest.raises(ValueError, match="grid_step: the model's value range is undeclared, per feature or unbounded"):
        family("smoothing")(m, sigma=0.5, sampler="sound")
    s = family("smoothing")(m, sigma=0.5, sampler="sound", grid_step=0.01, n0=10, n=100)
    X = np.round(np.random.default_rng(1).normal(0, 3, (2, 13)), 2).astype(np.float32)
    certs = s.run("certify", X, [1, 2])
    seen = torch.cat(m.module.seen).double() * 100
    assert torch.allclose(seen, torch.round(seen), atol=1e-3)
    assert certs[0].sampler == "sound" and certs[0].extra["grid_step"] == 0.01


def test_scope_names_the_sampler(demo_model, digits_test):
    X = digits_test[0][:2]
    g = family("smoothing")(demo_model, sigma=0.25, n0=10, n=100).run("certify", X, [0, 1])[0]
    s = family("smoothing")(demo_model, sigma=0.25, n0=10, n=100, sampler="sound",
                            grid_levels=16).run("certify", X, [0, 1])[0]
    assert g.sampler == "gaussian" and "not floating-point sound" in g.scope
    assert s.sampler == "sound" and "floating-point sound for inputs and perturbations on that grid" in s.scope
    ibp = family("ibp")(load_model("demo:digits-ibp")).run("certify", X, [0, 1])[0]
    assert "no sampler" in ibp.scope


def test_sound_margin_enters_the_bounds():
    m = _cnn_model()
    s = family("smoothing")(m, sigma=0.25, sampler="sound")
    assert s.noise.margin == pytest.approx(3 * 32 * 32 * _table(0.25 * 255)[2])
    assert s.plan(0.1).tau > family("smoothing")(m, sigma=0.25).plan(0.1).tau


def test_pipeline_sends_off_grid_events_to_the_dlq_reason(tmp_path):
    from pathlib import Path

    from riskpipe.certify import certifier_for_policy
    from riskpipe.policy.loader import parse_policy
    from riskpipe.stream.pipeline import ModelEntry, Pipeline

    text = (Path(__file__).resolve().parents[1] / "policies" / "default.yaml").read_text()
    text = text.replace("  max_samples: 10000\n", "  max_samples: 10000\n  sampler: sound\n")
    pol = parse_policy(text, "sound.yaml")
    m = _cnn_model()
    pipe = Pipeline.__new__(Pipeline)
    pipe.entries = {"cnn": ModelEntry(name="cnn", model=m, policy=pol, certifier=certifier_for_policy(m, pol),
                                      epsilon_cert=0.25)}
    ok = Event("a", "cnn", np.full((3, 32, 32), 3 / 255, np.float32), "FP32")
    pipe.admit(ok)
    bad = Event("b", "cnn", np.full((3, 32, 32), 0.3333, np.float32), "FP32")
    with pytest.raises(EventError) as e:
        pipe.admit(bad)
    assert e.value.code == "off_grid" and "not on the sound sampler's grid" in str(e.value)


def test_certify_cli_sound_sampler_and_off_grid_error(tmp_path, demo_model, digits_test):
    X = digits_test[0][:2]
    np.save(tmp_path / "x.npy", X)
    base = [sys.executable, "-m", "riskpipe.cli", "certify", "--input", str(tmp_path / "x.npy"), "--n0", "10",
            "--n", "200", "--sampler", "sound"]
    bad = subprocess.run(base, capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "not on the sound sampler's grid" in bad.stderr and "Traceback" not in bad.stderr
    good = subprocess.run(base + ["--grid-levels", "16"], capture_output=True, text=True, timeout=120)
    assert good.returncode == 0, good.stderr
    rows = [json.loads(line) for line in good.stdout.splitlines()]
    assert [r["sampler"] for r in rows] == ["sound", "sound"] and rows[0]["extra"]["grid_step"] == 1 / 16


def test_bucket_lookup_equals_a_full_binary_search():
    """The fast inverse-CDF lookup gives the count of thresholds <= u for every u, at and
    around each threshold and in the tails."""
    s = SoundSampler(0.25, (0.0, 1.0), 4)
    t = torch.from_numpy(s._thresholds)
    edges = torch.cat([t - 1, t, t + 1, torch.tensor([0, 1, (1 << 62) - 1])])
    edges = edges[(edges >= 0) & (edges < (1 << 62))]
    u = torch.cat([edges, torch.randint(0, 1 << 62, (200_000,), generator=torch.Generator().manual_seed(0))])
    want = torch.searchsorted(t, u, right=True) - s.J
    assert torch.equal(s.lookup(u), want)
    in_place = u.clone()
    s.lookup(in_place, out=in_place)  # how draw() calls it: u overwritten by j
    assert torch.equal(in_place, want)

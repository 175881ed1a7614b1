"""One protocol, one policy-to-certifier function: every caller gets the same certifier."""

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from riskpipe.certify import certifier_for_policy, family
from riskpipe.models.base import Model, sha256_state_dict
from riskpipe.policy.loader import parse_policy
from riskpipe.policy.schema import Certifier

POLICY = (Path(__file__).resolve().parents[1] / "policies" / "default.yaml").read_text()


def _cnn() -> Model:
    """A small 3x16x16 CNN (not the demo model)."""
    torch.manual_seed(0)
    module = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AvgPool2d(2), nn.Flatten(),
                           nn.Linear(4 * 8 * 8, 6)).eval()
    return Model(spec="test:cnn3x16", input_shape=(3, 16, 16), num_classes=6,
                 sha256=sha256_state_dict(module), module=module)


def _policy(threat_norm: str, certifier: str):
    text = POLICY.replace("  norm: l2\n  epsilon: 0.25", f"  norm: {threat_norm}\n  epsilon: 0.02")
    start, end = text.index("certifier:\n"), text.index("signals:\n")
    return parse_policy(text[:start] + certifier + text[end:], "test.yaml")


@pytest.mark.parametrize("threat", ["l2", "linf"])
def test_ibp_norm_is_the_policy_certificate_norm_whatever_the_threat(threat):
    """The stage once chose the IBP norm from the threat model while the policy (lint, replay,
    Theorem 2) assumed linf: now the policy's certificate_norm is the only source."""
    pol = _policy(threat, "certifier:\n  method: ibp\n")
    cert = certifier_for_policy(_cnn(), pol)
    assert cert.norm == pol.certifier.certificate_norm == "linf"
    pol2 = _policy(threat, "certifier:\n  method: ibp\n  norm: l2\n")
    assert certifier_for_policy(_cnn(), pol2).norm == "l2"


def test_every_section_field_reaches_the_constructor_and_overrides_are_filtered():
    pol = _policy("l2", "certifier:\n  method: smoothing\n  mode: decide\n  sigma: 0.5\n  alpha: 0.01\n"
                        "  max_samples: 2000\n")
    s = certifier_for_policy(_cnn(), pol, batch_size=128, epsilon=3.0)  # epsilon: not a smoothing parameter
    assert (s.sigma, s.alpha, s.max_samples, s.batch_size) == (0.5, 0.01, 2000, 128)
    lip = certifier_for_policy(_cnn(), Certifier.for_method("lipschitz", sigma=0.5, n=10), epsilon=0.1)
    assert (lip.method, lip.norm, lip.epsilon) == ("lipschitz", "l2", 0.1)


def test_run_reaches_each_mode_and_refuses_the_others():
    m = _cnn()
    X = np.random.default_rng(0).random((2, 3, 16, 16), dtype=np.float32)
    s = family("smoothing")(m, sigma=0.25, n0=8, n=32, max_samples=64, first_look=16)
    assert [c.mode for c in s.run("certify", X, [1, 2])] == ["certify"] * 2
    assert [c.mode for c in s.run("predict", X, [1, 2])] == ["predict"] * 2
    assert [c.mode for c in s.run("decide", X, [1, 2], 0.1)] == ["decide"] * 2
    with pytest.raises(ValueError, match="epsilon"):
        s.run("decide", X, [1, 2])
    ibp = family("ibp")(m)
    assert ibp.run("bound", X, [1, 2])[0].method == "ibp"  # a recorded bound certificate replays in certify
    with pytest.raises(ValueError, match="mode: ibp supports certify, not 'decide'"):
        ibp.run("decide", X, [1, 2], 0.1)


def test_unknown_method_is_named():
    with pytest.raises(ValueError, match="method: 'cohen'"):
        family("cohen")


def test_policy_check_builds_the_certifier_on_a_model(tmp_path):
    """`policy check --model` runs the stage's own construction: a sound sampler on a model
    without a bounded value range and no declared grid fails with file, field and reason."""
    from click.testing import CliRunner

    from riskpipe.cli.policy_cmd import policy

    module = nn.Sequential(nn.Linear(13, 3)).eval()
    torch.jit.script(module).save(str(tmp_path / "tab.pt"))
    spec = f"{tmp_path / 'tab.pt'}?shape=13"
    text = POLICY.replace("  max_samples: 10000\n", "  max_samples: 10000\n  sampler: sound\n")
    (tmp_path / "sound.yaml").write_text(text)
    (tmp_path / "sound-grid.yaml").write_text(text.replace("  sampler: sound\n",
                                                           "  sampler: sound\n  grid_step: 0.01\n"))
    r = CliRunner().invoke(policy, ["check", str(tmp_path / "sound.yaml"), "--model", spec])
    assert r.exit_code == 1
    assert "sound.yaml:" in r.output and "certifier: on model" in r.output
    assert "grid_step: the model's value range" in r.output
    ok = CliRunner().invoke(policy, ["check", str(tmp_path / "sound-grid.yaml"), "--model", spec])
    assert ok.exit_code == 0, ok.output


@pytest.mark.parametrize("section, noise, cap", [
    ("certifier:\n  method: smoothing\n  mode: decide\n  sigma: 0.5\n  max_samples: 1000\n", 0.5, 1000),
    ("certifier:\n  method: smoothing\n  sigma: 0.25\n  n: 400\n  sampler: sound\n  grid_levels: 255\n", 0.25, 400),
    ("certifier:\n  method: ibp\n", None, None),
    ("certifier:\n  method: lipschitz\n", None, None),
])
def test_noise_and_radius_cap_come_from_the_protocol_not_the_method_name(section, noise, cap):
    """evaluate's smoothed attack reads ``noise_sigma``; lint's unreachable-radius check reads
    the section's sigma and sample budget (decide: max_samples, certify: n)."""
    from scipy.stats import norm

    from riskpipe.policy.lint import max_certifiable_radius

    model = _cnn()
    model.value_range = (0.0, 1.0)
    pol = _policy("l2", section)
    assert certifier_for_policy(model, pol).noise_sigma == noise
    r = max_certifiable_radius(pol.certifier)
    if cap is None:
        assert r is None
    else:  # every sample for the top class: the Clopper-Pearson bound is alpha ** (1 / n)
        assert r == pytest.approx(noise * norm.ppf(pol.certifier.alpha ** (1 / cap)), rel=1e-9)

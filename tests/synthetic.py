"""Synthetic classifiers whose smoothed behaviour is known exactly."""

import torch
from scipy import stats

from riskpipe.models.base import Model


def threshold_model(threshold: float, dim: int = 1, num_classes: int = 2) -> Model:
    """f(x) = 0 if x[0] < threshold else 1 (a linear classifier).

    At x = 0 under N(0, sigma^2 I) noise, p_A = P(f = 0) = Phi(threshold / sigma), and
    the smoothed classifier's exact l2 radius is the distance to the hyperplane,
    ``threshold`` (= sigma * Phi^-1(p_A)).
    """
    lin = torch.nn.Linear(dim, num_classes)
    with torch.no_grad():
        lin.weight.zero_()
        lin.bias.zero_()
        lin.weight[0, 0], lin.bias[0] = -1.0, threshold
        lin.weight[1, 0], lin.bias[1] = 1.0, -threshold
        if num_classes > 2:
            lin.bias[2:] = -1e6
    module = torch.nn.Sequential(torch.nn.Flatten(), lin).eval()
    return Model(spec=f"synthetic:threshold={threshold}", input_shape=(dim,), num_classes=num_classes,
                 sha256="0" * 64, value_range=(-1e9, 1e9), module=module)


def threshold_for(p_a: float, sigma: float) -> float:
    return float(sigma * stats.norm.ppf(p_a))


def cifar_cnn(seed: int = 0, num_classes: int = 10) -> torch.nn.Module:
    """A CIFAR-sized CNN (input 3x32x32, 603k parameters), random weights, eval mode:
    a model that is NOT the 8x8 demo model, for tests and benchmarks of throughput."""
    torch.manual_seed(seed)
    nn = torch.nn
    return nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(),
        nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(64, 128, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(128, 128, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(128 * 4 * 4, 176), nn.ReLU(), nn.Linear(176, num_classes),
    ).eval()


def save_torchscript(module: torch.nn.Module, path, input_shape) -> str:
    """Save ``module`` as a TorchScript file riskpipe can load (``PATH.pt?shape=...``)."""
    scripted = torch.jit.trace(module, torch.zeros((1, *input_shape)))
    scripted.save(str(path))
    return f"{path}?shape={','.join(str(s) for s in input_shape)}"


def policy_without_context(tmp_path) -> str:
    """The default policy with context and support risk off, written under ``tmp_path``:
    a user model then needs no reference set (for tests about something else)."""
    import json

    import yaml

    from riskpipe.app.config import default_policy_path

    pol = yaml.safe_load(open(default_policy_path()))
    pol["signals"]["context_risk"]["enabled"] = False
    pol["score"]["weights"]["context_risk"] = 0.0
    if "support_risk" in pol["signals"]:
        pol["signals"]["support_risk"]["enabled"] = False
    pol["rules"] = [r for r in pol["rules"]
                    if "context" not in json.dumps(r.get("when", {}))
                    and "support" not in json.dumps(r.get("when", {}))]
    path = tmp_path / "policy-without-context.yaml"
    path.write_text(yaml.safe_dump(pol))
    return str(path)

"""Synthetic classifiers whose smoothed behaviour is known exactly."""

import numpy as np
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

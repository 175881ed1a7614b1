"""Training recipes for the demo variants the bound-based certifiers need.

A noise-trained network has tiny interval bounds and a loose Lipschitz bound; each
family certifies something only on a network trained for it:

* ``train_ibp`` — IBP training (Gowal et al. 2018): cross-entropy on the clean logits
  mixed with cross-entropy on the worst-case margins of the l_inf box, with epsilon
  ramped up from 0 and the mix kappa from 1 to ``kappa_end``.
* ``train_lipschitz`` — Lipschitz-margin training (Tsuzuku et al. 2018) on an MLP whose
  hidden layers carry spectral normalisation (so the part before the last layer is
  about 1-Lipschitz): every wrong logit is raised by epsilon * ||W_y - W_j||, the
  most it can gain within an l2 ball of epsilon. The parametrisation is removed after
  training, so the saved model is a plain ``nn.Sequential``.

Both are deterministic given the recipe seed (``build_demo`` seeds and fixes the
thread count) and take a few seconds on 2 CPU cores. The config tags go into the
recipe's ``trainer`` field, so the cache key changes whenever a setting does.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.utils import parametrizations, parametrize

from riskpipe.models.digits import NUM_CLASSES, load_split
from riskpipe.models.layers import interval_margins


@dataclass(frozen=True)
class IBPConfig:
    eps: float = 0.12  # l_inf training radius (images in [0, 1])
    warmup: float = 0.05  # fraction of steps with eps = 0
    ramp: float = 0.5  # fraction of steps over which eps grows linearly to its value
    kappa_end: float = 0.5

    def tag(self) -> str:
        return f"ibp(eps={self.eps:g},warmup={self.warmup:g},ramp={self.ramp:g},kappa={self.kappa_end:g})"


@dataclass(frozen=True)
class LipschitzConfig:
    eps: float = 0.5  # l2 training margin radius
    hidden: int = 64

    def tag(self) -> str:
        return f"lipschitz-margin(eps={self.eps:g},hidden={self.hidden})"


IBP = IBPConfig()
LIPSCHITZ = LipschitzConfig()


def ibp_cnn(width: int = 8) -> nn.Sequential:
    """A small CNN for IBP training (Gowal et al.'s 'small' model, scaled to 8x8 inputs)."""
    return nn.Sequential(
        nn.Conv2d(1, width, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(width, 2 * width, 4, stride=2, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(2 * width * 16, 100),
        nn.ReLU(),
        nn.Linear(100, NUM_CLASSES),
    )


def lipschitz_mlp(hidden: int = LIPSCHITZ.hidden) -> nn.Sequential:
    """Flatten and three Linear layers; spectral normalisation happens in training only."""
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(64, hidden),
        nn.ReLU(),
        nn.Linear(hidden, hidden),
        nn.ReLU(),
        nn.Linear(hidden, NUM_CLASSES),
    )


def _batches(recipe, g: torch.Generator):
    X, y = load_split("train")
    Xt, yt = torch.from_numpy(X), torch.from_numpy(y)
    for epoch in range(recipe.epochs):
        perm = torch.randperm(len(Xt), generator=g)
        for i in range(0, len(Xt), recipe.batch_size):
            idx = perm[i : i + recipe.batch_size]
            yield epoch, Xt[idx], yt[idx]


def _steps(recipe) -> int:
    n = len(load_split("train")[1])
    return recipe.epochs * -(-n // recipe.batch_size)


def train_ibp(model: nn.Sequential, recipe, cfg: IBPConfig = IBP) -> None:
    """IBP training; loss = kappa * CE(z) + (1 - kappa) * CE(-margin lower bounds)."""
    torch.set_num_threads(1)  # tiny batches: one thread is faster and fixes the reduction order
    g = torch.Generator().manual_seed(recipe.seed)
    opt = torch.optim.Adam(model.parameters(), lr=recipe.lr)
    total = _steps(recipe)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=recipe.lr, total_steps=total, pct_start=0.2)
    layers = list(model)
    model.train()
    for step, (_, xb, yb) in enumerate(_batches(recipe, g)):
        t = min(max((step / total - cfg.warmup) / cfg.ramp, 0.0), 1.0)
        eps, kappa = cfg.eps * t, 1.0 - (1.0 - cfg.kappa_end) * t
        loss = kappa * nn.functional.cross_entropy(model(xb), yb)
        if eps > 0:
            lower = interval_margins(layers, (xb - eps).clamp(0, 1), (xb + eps).clamp(0, 1), yb, slack=0.0)
            loss = loss + (1 - kappa) * nn.functional.cross_entropy(-lower, yb)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    model.eval()


def train_lipschitz(model: nn.Sequential, recipe, cfg: LipschitzConfig = LIPSCHITZ) -> None:
    """Lipschitz-margin training with spectral normalisation on the hidden Linear layers."""
    torch.set_num_threads(1)
    linears = [m for m in model if isinstance(m, nn.Linear)]
    for m in linears[:-1]:
        parametrizations.spectral_norm(m, n_power_iterations=1)
    last = linears[-1]
    g = torch.Generator().manual_seed(recipe.seed)
    opt = torch.optim.Adam(model.parameters(), lr=recipe.lr)
    total = _steps(recipe)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=recipe.lr, total_steps=total, pct_start=0.2)
    model.train()
    for step, (_, xb, yb) in enumerate(_batches(recipe, g)):
        z = model(xb)
        W = last.weight
        gap = (W[yb][:, None, :] - W[None, :, :]).norm(dim=2)  # ||W_y - W_j||, 0 at j = y
        eps = cfg.eps * min(1.0, 2 * step / total)
        loss = nn.functional.cross_entropy(z + eps * gap, yb)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    model.eval()
    for m in linears[:-1]:
        parametrize.remove_parametrizations(m, "weight", leave_parametrized=True)
    model.eval()


__all__ = [
    "IBP",
    "LIPSCHITZ",
    "IBPConfig",
    "LipschitzConfig",
    "ibp_cnn",
    "lipschitz_mlp",
    "train_ibp",
    "train_lipschitz",
]

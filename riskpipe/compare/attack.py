"""A small projected-gradient attack (Madry et al. 2018) on the margin loss.

Used by the report card as an empirical *upper* bound on any certified accuracy and
by the soundness tests: no attack may find a class change inside a certified radius.
"""

from __future__ import annotations

import torch
from torch import nn


def _project(delta: torch.Tensor, eps: torch.Tensor, norm: str) -> torch.Tensor:
    if norm == "linf":
        return torch.maximum(torch.minimum(delta, eps), -eps)
    n = delta.flatten(1).norm(dim=1).clamp_min(1e-12).reshape(eps.shape)
    return delta * torch.clamp(eps / n, max=1.0)


def pgd(module: nn.Module, x: torch.Tensor, y: torch.Tensor, eps, norm: str = "linf", steps: int = 20,
        step_size: float | None = None, value_range: tuple[float, float] = (0.0, 1.0), seed: int = 0,
        target: torch.Tensor | None = None) -> torch.Tensor:
    """Points within ``eps`` (scalar or per input; norm linf or l2) of ``x`` and inside the
    value range that maximise max_{j != y} z_j - z_y (or z_target - z_y), the best seen
    over ``steps`` signed/normalised gradient steps from a random start."""
    if norm not in ("linf", "l2"):
        raise ValueError(f"norm: pgd supports linf or l2, got {norm!r}")
    lo, hi = value_range
    eps_t = torch.as_tensor(eps, dtype=x.dtype, device=x.device).reshape(-1, *([1] * (x.ndim - 1)))
    eps_t = eps_t.expand(len(x), *([1] * (x.ndim - 1)))
    alpha = eps_t * (2.5 / steps) if step_size is None else torch.full_like(eps_t, step_size)
    g = torch.Generator(device=x.device).manual_seed(seed)
    delta = (torch.rand(x.shape, generator=g, device=x.device) * 2 - 1) * eps_t
    delta = _project(delta, eps_t, norm)
    best, best_loss = x.clone(), torch.full((len(x),), -float("inf"), device=x.device)

    def loss_of(z: torch.Tensor) -> torch.Tensor:
        zy = z.gather(1, y[:, None]).squeeze(1)
        if target is not None:
            return z.gather(1, target[:, None]).squeeze(1) - zy
        return z.scatter(1, y[:, None], -float("inf")).max(dim=1).values - zy

    for _ in range(steps + 1):
        xa = (x + delta).clamp(lo, hi).detach().requires_grad_(True)
        loss = loss_of(module(xa))
        better = loss.detach() > best_loss
        best[better], best_loss[better] = xa.detach()[better], loss.detach()[better]
        (grad,) = torch.autograd.grad(loss.sum(), xa)
        if norm == "linf":
            step = grad.sign()
        else:
            step = grad / grad.flatten(1).norm(dim=1).clamp_min(1e-12).reshape(eps_t.shape)
        delta = _project(xa.detach() - x + alpha * step, eps_t, norm)
    return best

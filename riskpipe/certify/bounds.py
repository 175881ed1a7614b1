"""Interval bound propagation (IBP) for ``nn.Sequential`` classifiers.

An input box [x_lo, x_hi] is carried through the network in centre/radius form
(c, r): an affine layer maps it to (A c + b, |A| r), a monotone ReLU to the box of
[relu(c - r), relu(c + r)]. Every output of every point of the box lies inside the
propagated box (Gowal et al. 2018): the bound is sound by construction, layer by
layer. The last linear layer is folded into the margins z_y - z_j, i.e. the rows
W_y - W_j are applied to the last hidden box directly; that is tighter than
subtracting two logit intervals, which forgets that both logits see the same input.

The certified l_inf radius of an input is the largest epsilon whose margin lower
bounds stay positive over the l_inf ball of epsilon intersected with the model's
value range, found by bisection; the certificate reports the lower end of the
final bracket, which was itself checked, never the unchecked upper end.
An l2 ball of radius r lies inside the l_inf box of radius r, so the same number
is a (weaker) l2 certificate (Theorem 2 with factor 1).

Floating point: bounds are computed in the model's float32; a relative slack of
``FP_SLACK`` of the magnitudes entering the final margin is subtracted so that
rounding in the last layer cannot turn a zero margin into a certified one. This is
a guard, not outward rounding of every layer (the Certificate scope says so).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from riskpipe.certify.certificate import MODEL_FAULT, Certificate
from riskpipe.certify.norms import check_norm, convert_radius
from riskpipe.certify.protocol import CertifierBase

FP_SLACK = 1e-5


class Scale(nn.Module):
    """x * s elementwise, ``s`` shaped like one input: a diagonal linear map kept as its
    diagonal (O(d) memory; a diagonal ``nn.Linear`` would hold d^2 weights)."""

    def __init__(self, s: torch.Tensor):
        super().__init__()
        self.register_buffer("s", s)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.s


SUPPORTED = (nn.Linear, nn.Conv2d, nn.ReLU, nn.Flatten, nn.AvgPool2d, nn.BatchNorm1d, nn.BatchNorm2d,
             nn.Dropout, nn.Identity, Scale)
_SUPPORTED_NAMES = "Linear, Conv2d, ReLU, Flatten, AvgPool2d, BatchNorm1d/2d (eval), Dropout, Identity, Scale"


# ---- layers ------------------------------------------------------------------------------
def sequential_layers(module: nn.Module, what: str = "interval bounds") -> list[nn.Module]:
    """The layers of an ``nn.Sequential`` (nested Sequentials flattened), checked.

    Raises ValueError naming the first unsupported layer's type and index."""
    if not isinstance(module, nn.Sequential):
        raise ValueError(f"model: {what} need an nn.Sequential module, got {type(module).__name__}"
                         " (load it as demo:NAME or module:factory@weights)")
    out: list[nn.Module] = []

    def walk(seq: nn.Sequential, prefix: str) -> None:
        for i, layer in enumerate(seq):
            idx = f"{prefix}{i}"
            if isinstance(layer, nn.Sequential):
                walk(layer, idx + ".")
                continue
            if not isinstance(layer, SUPPORTED):
                raise ValueError(f"model: layer {idx} ({type(layer).__name__}) is not supported by {what};"
                                 f" supported: {_SUPPORTED_NAMES}")
            if isinstance(layer, nn.Conv2d) and layer.padding_mode != "zeros":
                raise ValueError(f"model: layer {idx} (Conv2d) has padding_mode={layer.padding_mode!r};"
                                 f" {what} support only 'zeros'")
            if isinstance(layer, (nn.BatchNorm1d, nn.BatchNorm2d)) and layer.running_var is None:
                raise ValueError(f"model: layer {idx} ({type(layer).__name__}) has no running statistics;"
                                 f" {what} need BatchNorm in eval mode with track_running_stats")
            out.append(layer)

    walk(module, "")
    if not out:
        raise ValueError(f"model: the Sequential is empty; {what} need at least one Linear layer")
    return out


def _bn_scale_shift(layer: nn.Module, ndim: int) -> tuple[torch.Tensor, torch.Tensor]:
    scale = torch.rsqrt(layer.running_var + layer.eps)
    if layer.weight is not None:
        scale = scale * layer.weight
    shift = -layer.running_mean * scale
    if layer.bias is not None:
        shift = shift + layer.bias
    shape = (1, -1) + (1,) * (ndim - 2)
    return scale.reshape(shape), shift.reshape(shape)


def is_passthrough(layer: nn.Module) -> bool:
    """Layers that are the identity at inference (Dropout in eval, Identity)."""
    return isinstance(layer, (nn.Dropout, nn.Identity))


def affine(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The layer itself (eval semantics) for every layer but ReLU."""
    if isinstance(layer, (nn.BatchNorm1d, nn.BatchNorm2d)):
        scale, shift = _bn_scale_shift(layer, x.ndim)
        return x * scale + shift
    if is_passthrough(layer):
        return x
    return layer(x)


def linear_part(layer: nn.Module, x: torch.Tensor, absolute: bool = False) -> torch.Tensor:
    """The linear part A x of an affine layer (bias dropped); |A| x with ``absolute``."""
    if isinstance(layer, nn.Linear):
        w = layer.weight.abs() if absolute else layer.weight
        return F.linear(x, w)
    if isinstance(layer, nn.Conv2d):
        w = layer.weight.abs() if absolute else layer.weight
        return F.conv2d(x, w, None, layer.stride, layer.padding, layer.dilation, layer.groups)
    if isinstance(layer, (nn.BatchNorm1d, nn.BatchNorm2d)):
        scale, _ = _bn_scale_shift(layer, x.ndim)
        return x * (scale.abs() if absolute else scale)
    if isinstance(layer, Scale):
        return x * (layer.s.abs() if absolute else layer.s)
    if is_passthrough(layer):
        return x
    return layer(x)  # Flatten, AvgPool2d: linear with non-negative coefficients, |A| = A


def _fold_index(layers: list[nn.Module]) -> int | None:
    """Index of the last Linear when only pass-through layers follow it, else None."""
    for i in range(len(layers) - 1, -1, -1):
        if isinstance(layers[i], nn.Linear):
            return i
        if not (is_passthrough(layers[i]) or isinstance(layers[i], nn.Flatten)):
            return None
    return None


# ---- propagation (differentiable: robust training uses it too) ---------------------------
def propagate_box(layers: Sequence[nn.Module], c: torch.Tensor, r: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Centre and radius of a box containing the image of the box (c, r) under ``layers``."""
    for layer in layers:
        if isinstance(layer, nn.ReLU):
            lo, hi = F.relu(c - r), F.relu(c + r)
            c, r = (hi + lo) / 2, (hi - lo) / 2
        else:
            c, r = affine(layer, c), linear_part(layer, r, absolute=True)
    return c, r


def interval_margins(layers: Sequence[nn.Module], x_lo: torch.Tensor, x_hi: torch.Tensor, y: torch.Tensor,
                     slack: float = FP_SLACK) -> torch.Tensor:
    """Lower bounds (B, K) of z_y - z_j over the input box [x_lo, x_hi]; column y is 0.

    With the last Linear folded in when the network ends in one (plus pass-through
    layers); otherwise lower(z_y) - upper(z_j) from the logit box.
    """
    layers = list(layers)
    c, r = (x_hi + x_lo) / 2, (x_hi - x_lo) / 2
    k = _fold_index(layers)
    if k is None:
        c, r = propagate_box(layers, c, r)
        cy, ry = c.gather(1, y[:, None]), r.gather(1, y[:, None])
        lower = (cy - c) - (ry + r)
        mag = cy.abs() + c.abs() + ry + r
    else:
        c, r = propagate_box(layers[:k], c, r)
        c, r = c.flatten(1), r.flatten(1)
        last = layers[k]
        W = last.weight
        zc = F.linear(c, W)  # (W_y - W_j) c = zc_y - zc_j: no (B, K, H) product needed
        Dabs = (W[y][:, None, :] - W[None, :, :]).abs()  # (B, K, H): |W_y - W_j|
        rm = torch.einsum("bkh,bsh->bks", Dabs, torch.stack((r, c.abs() + r), dim=1))
        lower = zc.gather(1, y[:, None]) - zc - rm[..., 0]
        mag = rm[..., 1]
        if last.bias is not None:
            bd = last.bias[y][:, None] - last.bias[None, :]
            lower = lower + bd
            mag = mag + bd.abs()
    lower = lower - slack * mag
    return lower.scatter(1, y[:, None], 0.0)


def worst_margin(lower: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """min over j != y of the margin lower bounds: > 0 means certified."""
    return lower.scatter(1, y[:, None], math.inf).min(dim=1).values


# ---- the certifier -----------------------------------------------------------------------
@dataclass
class IntervalBounds(CertifierBase):
    """IBP certifier: deterministic l_inf (or, via ball-in-box, l2) radii.

    ``tolerance`` is the bisection bracket width; ``eps_max`` caps the search
    (default: the width of the value range, where the box is the whole domain).
    ``batch_size`` caps inputs per propagation (memory grows with batch x width).
    """

    model: object
    norm: str = "linf"
    tolerance: float = 1e-3
    eps_max: float | None = None
    batch_size: int = 1024

    method = "ibp"
    modes = ("certify",)

    def __post_init__(self) -> None:
        self.norm = check_norm(self.norm)
        if self.norm not in ("linf", "l2"):
            raise ValueError(f"norm: ibp certifies linf or l2 (ball in box), got {self.norm!r}")
        if getattr(self.model, "module", None) is None:
            raise ValueError(f"model: ibp needs a torch model, {getattr(self.model, 'spec', self.model)} has none")
        self.layers = sequential_layers(self.model.module)
        rng = self.model.value_range  # None: nothing declared, search up to 1 input unit
        width = 1.0 if rng is None else float(np.max(np.asarray(rng[1]) - np.asarray(rng[0])))
        self.eps_max = width if self.eps_max is None else float(self.eps_max)
        if not self.eps_max > 0:
            raise ValueError(f"eps_max: must be > 0, got {self.eps_max}")
        if not 0 < self.tolerance < self.eps_max:
            raise ValueError(f"tolerance: must lie in (0, eps_max={self.eps_max:g}), got {self.tolerance}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size: must be >= 1, got {self.batch_size}")
        self.steps = math.ceil(math.log2(self.eps_max / self.tolerance))

    def _tensor(self, X) -> torch.Tensor:
        x = torch.as_tensor(X if isinstance(X, torch.Tensor) else np.asarray(X, dtype=np.float32))
        x = x.to(device=self.model.device, dtype=torch.float32)
        return x.reshape((len(x),) + tuple(self.model.input_shape))

    def _clip(self, x: torch.Tensor):
        """Clamp to the declared value range (scalars or per feature; none: unbounded)."""
        from riskpipe.models.base import range_tensors

        lo, hi = range_tensors(self.model.value_range, x.device)
        return lambda t: t.clamp(lo, hi)

    @torch.no_grad()
    def margin_bounds(self, X, eps, y: torch.Tensor | None = None) -> torch.Tensor:
        """Lower bounds (B, K) of z_y - z_j over the l_inf ball of ``eps`` (scalar or per
        input) intersected with the value range; y defaults to the model's argmax;
        column y is 0."""
        x = self._tensor(X)
        if y is None:
            y = self.model.classes(x).values
        eps_t = torch.as_tensor(eps, dtype=x.dtype, device=x.device).reshape(-1, *([1] * (x.ndim - 1)))
        clip = self._clip(x)
        out = []
        for s in range(0, len(x), self.batch_size):
            xb, e = x[s:s + self.batch_size], eps_t if eps_t.numel() == 1 else eps_t[s:s + self.batch_size]
            out.append(interval_margins(self.layers, clip(xb - e), clip(xb + e), y[s:s + self.batch_size]))
        return torch.cat(out)

    @torch.no_grad()
    def radii(self, X) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(certified l_inf radius, checked-failing upper end, predicted class) per input.

        Radius 0 means not even the point itself has a positive margin bound."""
        return self._radii(self._tensor(X))[:3]

    def _radii(self, x: torch.Tensor):
        """``radii`` and the model's checked forward pass (its ``bad`` rows are model faults)."""
        out = self.model.classes(x)
        y = out.values
        B = len(x)

        def ok(eps: torch.Tensor) -> torch.Tensor:
            return worst_margin(self.margin_bounds(x, eps, y), y) > 0

        lo = torch.zeros(B, device=x.device)
        hi = torch.full((B,), self.eps_max, device=x.device)
        at_point, at_max = ok(lo), ok(hi)
        for _ in range(self.steps):
            mid = (lo + hi) / 2
            good = ok(mid)
            lo, hi = torch.where(good, mid, lo), torch.where(good, hi, mid)
        top = torch.full_like(lo, self.eps_max)
        lo = torch.where(at_max, top, torch.where(at_point, lo, torch.zeros_like(lo)))
        hi = torch.where(at_max, top, torch.where(at_point, hi, torch.zeros_like(hi)))
        return lo, hi, y, out

    def certify_batch(self, X, seeds: Sequence[int]) -> list[Certificate]:
        """One certificate per input: the model's class is constant on the l_inf ball of
        the reported radius (inside the value range); abstains when no positive radius
        within ``tolerance`` is certified. Seeds are recorded, IBP uses no randomness."""
        t0 = time.perf_counter()
        x = self._tensor(X)
        if len(seeds) != len(x):
            raise ValueError(f"seeds: need one per input ({len(x)}), got {len(seeds)}")
        with torch.no_grad():
            r_lo, r_hi, y, fwd = self._radii(x)
        r_lo, r_hi, y, bad = (t.cpu().numpy() for t in (r_lo, r_hi, y, fwd.bad))
        per_input_ms = (time.perf_counter() - t0) * 1e3 / max(len(x), 1)
        passes = self.steps + 2
        out = []
        for i in range(len(x)):
            radius = convert_radius(float(r_lo[i]), "linf", self.norm, self.model.input_dim)
            abstain = radius <= 0.0 or bool(bad[i])
            reason = None
            if bad[i]:  # the bounds speak about a model whose output broke the contract
                reason = MODEL_FAULT
            elif abstain:
                reason = "margin_not_positive" if r_hi[i] == 0 else "radius_below_tolerance"
            out.append(Certificate(
                method="ibp", mode="bound", norm=self.norm, radius=0.0 if abstain else radius,
                abstained=abstain, predicted_class=None if abstain else int(y[i]), n_samples=passes,
                elapsed_ms=per_input_ms, seed=int(seeds[i]), input_dim=self.model.input_dim, reason=reason,
                extra={**({MODEL_FAULT: fwd.reason} if bad[i] else {}),
                       "model_class": int(y[i]), "linf_radius": float(r_lo[i]), "linf_upper": float(r_hi[i]),
                       "tolerance": self.tolerance, "eps_max": self.eps_max, "passes": passes,
                       "value_range": None if self.model.value_range is None
                       else [np.asarray(v).tolist() for v in self.model.value_range]}))
        return out


__all__ = ["FP_SLACK", "IntervalBounds", "Scale", "affine", "interval_margins", "linear_part", "propagate_box",
           "sequential_layers", "worst_margin"]

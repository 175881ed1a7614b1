"""The layers of an ``nn.Sequential`` classifier that the bound-based certifiers
understand, their eval semantics, and interval arithmetic through them.

An input box [x_lo, x_hi] is carried through the network in centre/radius form
(c, r): an affine layer maps it to (A c + b, |A| r), a monotone ReLU to the box of
[relu(c - r), relu(c + r)]. Every output of every point of the box lies inside the
propagated box (Gowal et al. 2018): the bound is sound by construction, layer by
layer. ``interval_margins`` folds the last linear layer into the margins z_y - z_j,
i.e. applies the rows W_y - W_j to the last hidden box directly; that is tighter than
subtracting two logit intervals, which forgets that both logits see the same input.

Floating point: bounds are computed in the model's float32; a relative slack of
``FP_SLACK`` of the magnitudes entering the final margin is subtracted so that
rounding in the last layer cannot turn a zero margin into a certified one. This is
a guard, not outward rounding of every layer (the Certificate scope says so).

Why this sits in models/, below certify/: the propagation is differentiable and the
demo models' IBP training (``riskpipe.models.robust_training``) uses it as a loss, and
``Scale`` is a layer of the scaled models (``riskpipe.models.scaled``); the IBP
certifier (``riskpipe.certify.bounds``) and the Lipschitz certifier build on it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

FP_SLACK = 1e-5


class Scale(nn.Module):
    """x * s elementwise, ``s`` shaped like one input: a diagonal linear map kept as its
    diagonal (O(d) memory; a diagonal ``nn.Linear`` would hold d^2 weights)."""

    s: torch.Tensor

    def __init__(self, s: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("s", s)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.s


class BinaryScores(nn.Linear):
    """The one output z of a binary classifier as two class scores (t, z): class 1 exactly
    where z > t (argmax takes the first of equal scores), with t = 0 for a logit and 0.5
    for a probability (riskpipe.models.loader's ``?binary=``). A fixed ``nn.Linear(1, 2)``
    (weights (0, 1), biases (t, 0)), so the interval-bound and Lipschitz certifiers take
    it as the linear layer it is: the margin between the classes is z - t. An output of
    shape (n,) is read as (n, 1)."""

    def __init__(self, threshold: float) -> None:
        super().__init__(1, 2)
        with torch.no_grad():
            self.weight.copy_(torch.tensor([[0.0], [1.0]]))
            self.bias.copy_(torch.tensor([float(threshold), 0.0]))
        self.requires_grad_(False)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return super().forward(z.reshape(len(z), -1))


SUPPORTED = (nn.Linear, nn.Conv2d, nn.ReLU, nn.Flatten, nn.AvgPool2d, nn.BatchNorm1d, nn.BatchNorm2d,
             nn.Dropout, nn.Identity, Scale)
_SUPPORTED_NAMES = "Linear, Conv2d, ReLU, Flatten, AvgPool2d, BatchNorm1d/2d (eval), Dropout, Identity, Scale"


# ---- layers ------------------------------------------------------------------------------
# methods a subclass may define without changing what a layer computes (torch's
# parametrizations define the last three; their weights are properties the bounds read too)
_NO_COMPUTE = frozenset({"__init__", "extra_repr", "reset_parameters", "__getstate__", "__setstate__",
                         "__deepcopy__"})


def _computes_otherwise(module: nn.Module, own: tuple[type, ...]) -> str | None:
    """Why ``module`` may compute something other than what the bounds take it for, or None.

    The bounds are those of the classes in ``own`` (what ``isinstance`` matched), so the
    code that runs must be theirs. A subclass that overrides any of their methods but
    ``_NO_COMPUTE`` (``forward``, ``__call__``, also a helper the forward calls, as
    ``Conv2d._conv_forward``), a method replaced on the instance (``layer.forward = ...``)
    or a forward hook changes the function while the layer still looks supported, and
    its radii would be those of another model (unsound). Subclasses that add data or
    properties (parametrized weights) pass.
    """
    cls = type(module)
    matched = [c for c in own if isinstance(module, c)]
    known = {k for c in matched for k in c.__mro__}
    for c in cls.__mro__:
        if c in known:
            continue
        for name, value in vars(c).items():
            # a function, or any descriptor (property, classmethod, staticmethod) in its place
            if name not in _NO_COMPUTE and (callable(value) or hasattr(value, "__get__")) \
                    and any(hasattr(m, name) for m in matched):
                return f"its class {c.__qualname__} overrides {name} ({c.__qualname__}.{name})"
    for name, value in vars(module).items():
        if callable(value) and callable(getattr(cls, name, None)):
            return f"its {name} is replaced on the instance"
    if module._forward_hooks or module._forward_pre_hooks:
        return "it has a forward hook"
    if module.training and isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d, nn.Dropout)):
        return "it is in training mode (the bounds take eval semantics)"
    return None


def sequential_layers(module: nn.Module | None, what: str = "interval bounds") -> list[nn.Module]:
    """The layers of an ``nn.Sequential`` (nested Sequentials flattened), checked: each a
    supported type computing exactly that type's forward (``_computes_otherwise``).

    Raises ValueError naming the first unsupported layer's type and index."""
    if not isinstance(module, nn.Sequential):
        raise ValueError(f"model: {what} need an nn.Sequential module, got {type(module).__name__}"
                         " (load it as demo:NAME or module:factory@weights)")
    hooks = nn.modules.module
    if hooks._global_forward_hooks or hooks._global_forward_pre_hooks:
        raise ValueError(f"model: a global module forward hook is registered; {what} bound the layers"
                         " as they are, not as a hook changes them")
    out: list[nn.Module] = []

    def refuse(idx: str, layer: nn.Module, why: str) -> ValueError:
        return ValueError(f"model: {'the Sequential' if not idx else f'layer {idx}'} ({type(layer).__name__})"
                          f" computes something other than its layers: {why}; {what} bound plain layers only"
                          " (write the computation as layers, or certify with smoothing, which only calls"
                          " the model)")

    def walk(seq: nn.Sequential, prefix: str) -> None:
        why = _computes_otherwise(seq, (nn.Sequential,))
        if why:
            raise refuse(prefix.rstrip("."), seq, why)
        for i, layer in enumerate(seq):
            idx = f"{prefix}{i}"
            if isinstance(layer, nn.Sequential):
                walk(layer, idx + ".")
                continue
            if not isinstance(layer, SUPPORTED):
                raise ValueError(f"model: layer {idx} ({type(layer).__name__}) is not supported by {what};"
                                 f" supported: {_SUPPORTED_NAMES}")
            why = _computes_otherwise(layer, (*SUPPORTED, BinaryScores))
            if why:
                raise refuse(idx, layer, why)
            if isinstance(layer, nn.AvgPool2d) and layer.divisor_override is not None and layer.divisor_override <= 0:
                raise ValueError(f"model: layer {idx} (AvgPool2d) has divisor_override={layer.divisor_override};"
                                 f" {what} take a pool's coefficients as non-negative (a divisor > 0)")
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


def _bn_scale_shift(layer: nn.BatchNorm1d | nn.BatchNorm2d, ndim: int) -> tuple[torch.Tensor, torch.Tensor]:
    var, mean = layer.running_var, layer.running_mean
    if var is None or mean is None:  # sequential_layers refuses such layers
        raise ValueError(f"{type(layer).__name__} without running statistics")
    scale = torch.rsqrt(var + layer.eps)
    if layer.weight is not None:
        scale = scale * layer.weight
    shift = -mean * scale
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
        last = cast(nn.Linear, layers[k])  # _fold_index found a Linear there
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


__all__ = ["FP_SLACK", "Scale", "affine", "interval_margins", "is_passthrough", "linear_part", "propagate_box",
           "sequential_layers", "worst_margin"]

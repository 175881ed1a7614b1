"""Global Lipschitz certificates (Tsuzuku, Sato & Sugiyama 2018; GloRo abstain, Leino et al. 2021).

Split the ``nn.Sequential`` at its ReLUs into affine groups A_1, ..., A_m (a ReLU is
1-Lipschitz in l2). The network before the last group is Lipschitz with constant
L_rest <= prod_k ||A_k||_2, and the margin z_i - z_j = (W_i - W_j) h + const of the
last group (matrix W) is Lipschitz with constant L_ij = ||W_i - W_j||_2 * L_rest. So
no input within l2 distance  min_j (z_y - z_j) / L_yj  of x changes the class: that
is the certified radius. Following GloRo, a radius below the threat epsilon is an
abstention (the bottom class), never a smaller certificate.

Spectral norms (:func:`spectral_bound`): A is the group's *actual* linear operator
(convolutions with their stride, padding and dilation; the adjoint by autograd, i.e.
conv_transpose), in float64. Up to ``EXACT_MAX`` inputs the Gram matrix A^T A is formed
and its top eigenvalue solved: the norm itself; beyond, the Hoelder bound sqrt(||A||_1
||A||_inf) from |A|. Both are upper bounds, times (1 + ``safety``) as a margin. Power
iteration, used before, approaches the norm from below and was no bound (it stopped at
0.2 for a norm of 1 when started near another singular vector). The last group's rows
are exact (K vector-Jacobian products). Constants are computed once per layer stack and
parameters, and kept in memory: the cache key is a fingerprint of the layers actually
bounded (each layer's type and settings, its weights and buffers) and the input shape,
not ``model.sha256``, which names the model file and is shared by the scaled model g(z)
= f(s * z) built from it (riskpipe.models.scaled): keyed by it, a scaled model certified
after its unscaled model in one process got the unscaled constant, and radii ``max(s)``
times too large.
"""

from __future__ import annotations

import copy
import hashlib
import math
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from riskpipe.certify.certificate import MODEL_FAULT, Certificate
from riskpipe.certify.protocol import CertifierBase
from riskpipe.models.layers import affine, linear_part, sequential_layers

if TYPE_CHECKING:
    from riskpipe.certify.protocol import Batch
    from riskpipe.models.base import Model

FP_SLACK = 1e-6
# (layers_fingerprint, safety) -> constants
_CACHE: OrderedDict[tuple[str, float], LipschitzConstants] = OrderedDict()
_CACHE_SIZE = 16


@dataclass(frozen=True)
class LipschitzConstants:
    """Per-model constants: ``pairwise[i, j]`` bounds the l2 Lipschitz constant of z_i - z_j."""

    pairwise: np.ndarray
    group_norms: tuple[float, ...]
    iterations: tuple[int, ...]  # operator applications per group (the basis size when exact)
    elapsed_ms: float
    params: dict[str, Any] = field(default_factory=dict)

    @property
    def rest(self) -> float:
        """Bound on the Lipschitz constant of everything before the last affine group."""
        return float(np.prod(self.group_norms)) if self.group_norms else 1.0


def _groups(layers: list[nn.Module]) -> list[list[nn.Module]]:
    groups: list[list[nn.Module]] = [[]]
    for layer in layers:
        if isinstance(layer, nn.ReLU):
            groups.append([])
        else:
            groups[-1].append(layer)
    return groups


def _linear_map(group: Sequence[nn.Module]) -> Callable[[torch.Tensor], torch.Tensor]:
    def apply(x: torch.Tensor) -> torch.Tensor:
        for layer in group:
            x = linear_part(layer, x)
        return x
    return apply


EXACT_MAX = 2048  # inputs of an affine group up to which its Gram matrix is formed and solved exactly


def spectral_bound(group: Sequence[nn.Module], in_shape: tuple[int, ...]) -> tuple[float, int]:
    """A provable upper bound on ||A||_2 for the linear part A of ``group`` (float64), and
    how many operator applications it took.

    Up to ``EXACT_MAX`` inputs: the Gram matrix A^T A is formed column by column (A, then
    its adjoint by autograd, on batches of basis vectors) and its largest eigenvalue
    solved (LAPACK, float64): the norm itself, up to rounding far below ``safety``. Beyond:
    ||A||_2 <= sqrt(||A||_1 ||A||_inf) (Hoelder), both read off |A| (every layer's
    coefficients made non-negative bound the product's from above): looser, never below
    the norm. Power iteration approaches the norm from *below* and
    can stop far under it (a start vector near another singular vector: 0.2 for a norm of
    1, radii five times too large), so it is no bound."""
    d = int(np.prod(in_shape))
    apply = _linear_map(group)
    if d <= EXACT_MAX:
        gram = torch.empty((d, d), dtype=torch.float64)
        for s in range(0, d, 256):
            n = min(256, d - s)
            basis = torch.zeros((n, d), dtype=torch.float64)
            basis[torch.arange(n), torch.arange(s, s + n)] = 1.0
            v = basis.reshape((n,) + tuple(in_shape)).requires_grad_(True)
            u = apply(v)
            (w,) = torch.autograd.grad(u, v, grad_outputs=u.detach())  # A^T A on each basis vector
            gram[s:s + n] = w.reshape(n, d)
        gram = (gram + gram.T) / 2
        top = float(torch.linalg.eigvalsh(gram)[-1])
        return math.sqrt(max(top, 0.0)) * (1 + 1e-9), d
    x = torch.ones((1,) + tuple(in_shape), dtype=torch.float64, requires_grad=True)
    y = x
    for layer in group:
        y = linear_part(layer, y, absolute=True)
    (cols,) = torch.autograd.grad(y.sum(), x)  # |A|^T 1: the column sums of |A|
    return math.sqrt(float(y.max()) * float(cols.max())), 2


def layers_fingerprint(model: Model) -> str:
    """SHA-256 of what the constants of ``model`` depend on: the input shape, the class
    count, and each layer of its Sequential in order (type and settings as ``repr`` gives
    them, weights and buffers by name). Costs a pass over the weights: take it once per
    certifier, not per batch."""
    h = hashlib.sha256(repr((tuple(model.input_shape), int(model.num_classes))).encode())
    for layer in sequential_layers(model.module, "Lipschitz bounds"):
        h.update(repr(layer).encode())
        for name, t in sorted(layer.state_dict().items()):
            h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
            h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def lipschitz_constants(model: Model, safety: float = 0.01, fingerprint: str | None = None) -> LipschitzConstants:
    """Pairwise margin Lipschitz constants of ``model``, cached per ``layers_fingerprint``
    (pass it when known) and parameters."""
    key = (fingerprint or layers_fingerprint(model), safety)
    if key in _CACHE:
        _CACHE.move_to_end(key)
        return _CACHE[key]
    t0 = time.perf_counter()
    layers = [copy.deepcopy(layer).to(device="cpu", dtype=torch.float64).eval()
              for layer in sequential_layers(model.module, "Lipschitz bounds")]
    groups = _groups(layers)
    norms: list[float] = []
    iters: list[int] = []
    x = torch.zeros((1,) + tuple(model.input_shape), dtype=torch.float64)
    with torch.no_grad():
        shapes: list[tuple[int, ...]] = []
        for _gi, group in enumerate(groups):
            shapes.append(tuple(x.shape[1:]))
            for layer in group:
                x = affine(layer, x)
    for group, shape in zip(groups[:-1], shapes[:-1]):
        s, it = spectral_bound(group, shape)
        norms.append(s * (1.0 + safety))
        iters.append(it)
    last = _linear_map(groups[-1])
    jac: torch.Tensor = torch.autograd.functional.jacobian(last, torch.zeros((1,) + shapes[-1], dtype=torch.float64))
    W = jac.reshape(jac.shape[1], -1)  # (K, H): the last group's matrix
    if W.shape[0] != model.num_classes:
        raise ValueError(f"model: last layer has {W.shape[0]} outputs, expected {model.num_classes} classes")
    diff = W[:, None, :] - W[None, :, :]
    rest = float(np.prod(norms)) if norms else 1.0
    pairwise = (torch.linalg.vector_norm(diff, dim=2) * rest * (1 + FP_SLACK)).numpy()
    consts = LipschitzConstants(pairwise=pairwise, group_norms=tuple(norms), iterations=tuple(iters),
                                elapsed_ms=(time.perf_counter() - t0) * 1e3,
                                params={"safety": safety, "exact_max": EXACT_MAX})
    _CACHE[key] = consts
    while len(_CACHE) > _CACHE_SIZE:
        _CACHE.popitem(last=False)
    return consts


@dataclass
class GlobalLipschitz(CertifierBase):
    """Lipschitz-margin certifier: l2 radius min_j margin_j / L_yj, abstain below ``epsilon``."""

    model: Model
    epsilon: float = 0.0
    safety: float = 0.01

    method = "lipschitz"
    norm = "l2"
    modes = ("certify",)

    def __post_init__(self) -> None:
        if not (self.epsilon >= 0 and math.isfinite(self.epsilon)):
            raise ValueError(f"epsilon: must be a finite number >= 0, got {self.epsilon}")
        if not self.safety >= 0:
            raise ValueError(f"safety: must be >= 0, got {self.safety}")
        if getattr(self.model, "module", None) is None:
            raise ValueError(f"model: Lipschitz bounds need a torch model, "
                             f"{getattr(self.model, 'spec', self.model)} has none")
        self._fingerprint = layers_fingerprint(self.model)  # checks the layers too

    def prepare(self) -> None:
        self.constants  # noqa: B018 - computed once per layer stack and cached

    @property
    def constants(self) -> LipschitzConstants:
        return lipschitz_constants(self.model, self.safety, fingerprint=self._fingerprint)

    @torch.no_grad()
    def radii(self, X: Batch) -> tuple[np.ndarray, np.ndarray]:
        """(certified l2 radius before the epsilon abstain, predicted class) per input."""
        radius, y, _, _ = self._radii(X)
        return radius, y

    def _radii(self, X: Batch) -> tuple[np.ndarray, np.ndarray, np.ndarray, str | None]:
        """``radii``, and which rows' model output broke the contract (and how): those
        rows' radii are 0 and their certificates model faults."""
        pair = self.constants.pairwise
        x = torch.as_tensor(X if isinstance(X, torch.Tensor) else np.asarray(X, dtype=np.float32))
        x = x.to(device=self.model.device, dtype=torch.float32).reshape((len(x),) + tuple(self.model.input_shape))
        out = self.model.scores(x)
        z = out.values.double().cpu().numpy()
        bad = out.bad.cpu().numpy()
        y = z.argmax(axis=1)
        rows = np.arange(len(z))
        zy = z[rows, y][:, None]
        margin = zy - z - FP_SLACK * (np.abs(zy) + np.abs(z))
        L = pair[y]
        with np.errstate(divide="ignore", invalid="ignore"):
            r = np.where(L > 0, margin / L, np.where(margin > 0, np.inf, -np.inf))
        r[rows, y] = np.inf
        return np.where(bad, 0.0, np.maximum(r.min(axis=1), 0.0)), y, bad, out.reason

    def certify_batch(self, X: Batch, seeds: Sequence[int]) -> list[Certificate]:
        """One l2 certificate per input: the model's class is constant on the l2 ball of
        the reported radius; abstains (GloRo's bottom class) when that radius is below
        ``epsilon`` or the margin is not positive. The one-time constant computation is
        reported in ``extra`` and not charged to the input."""
        consts = self.constants
        t0 = time.perf_counter()
        radius, y, bad, why = self._radii(X)
        if len(seeds) != len(radius):
            raise ValueError(f"seeds: need one per input ({len(radius)}), got {len(seeds)}")
        per_input_ms = (time.perf_counter() - t0) * 1e3 / max(len(radius), 1)
        out = []
        for i, r in enumerate(radius):
            r = float(r)
            if not math.isfinite(r):
                raise ValueError("model: a margin has zero Lipschitz constant and no finite radius;"
                                 " the model ignores its input")
            abstain = r <= 0.0 or r < self.epsilon or bool(bad[i])
            reason = None if not abstain else ("margin_not_positive" if r <= 0 else "radius_below_epsilon")
            if bad[i]:  # the margin speaks about a model whose output broke the contract
                reason = MODEL_FAULT
            out.append(Certificate(
                method=self.method, mode="bound", norm="l2", radius=0.0 if abstain else r, abstained=abstain,
                predicted_class=None if abstain else int(y[i]), n_samples=1, elapsed_ms=per_input_ms,
                seed=int(seeds[i]), epsilon=float(self.epsilon), certified=not abstain, reason=reason,
                input_dim=self.model.input_dim,
                extra={**({MODEL_FAULT: why} if bad[i] else {}), "model_class": int(y[i]), "radius_bound": r,
                       "lipschitz_rest": consts.rest,
                       "constant_ms": consts.elapsed_ms, "safety": self.safety}))
        return out


__all__ = ["GlobalLipschitz", "LipschitzConstants", "lipschitz_constants", "spectral_bound"]

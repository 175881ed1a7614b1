"""Interval bound propagation (IBP) certifier for ``nn.Sequential`` classifiers.

The box arithmetic and its soundness argument live in :mod:`riskpipe.models.layers`
(an input box carried through the network in centre/radius form, sound layer by
layer, the last linear layer folded into the margins; ``FP_SLACK`` guards the final
margin against float32 rounding).

The certified l_inf radius of an input is the largest epsilon whose margin lower
bounds stay positive over the l_inf ball of epsilon intersected with the model's
value range, found by bisection; the certificate reports the lower end of the
final bracket, which was itself checked, never the unchecked upper end.
An l2 ball of radius r lies inside the l_inf box of radius r, so the same number
is a (weaker) l2 certificate (Theorem 2 with factor 1).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from riskpipe.certify.certificate import MODEL_FAULT, Certificate
from riskpipe.certify.norms import check_norm, convert_radius
from riskpipe.certify.protocol import CertifierBase
from riskpipe.models.base import range_tensors
from riskpipe.models.layers import interval_margins, sequential_layers, worst_margin

if TYPE_CHECKING:
    from riskpipe.certify.protocol import Batch
    from riskpipe.models.base import Model
    from riskpipe.models.output import Checked


# ---- the certifier -----------------------------------------------------------------------
@dataclass
class IntervalBounds(CertifierBase):
    """IBP certifier: deterministic l_inf (or, via ball-in-box, l2) radii.

    ``tolerance`` is the bisection bracket width; ``eps_max`` caps the search
    (default: the width of the value range, where the box is the whole domain).
    ``batch_size`` caps inputs per propagation (memory grows with batch x width).
    """

    model: Model
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

    def _tensor(self, X: Batch) -> torch.Tensor:
        x = torch.as_tensor(X if isinstance(X, torch.Tensor) else np.asarray(X, dtype=np.float32))
        x = x.to(device=self.model.device, dtype=torch.float32)
        return x.reshape((len(x),) + tuple(self.model.input_shape))

    def _clip(self, x: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
        """Clamp to the declared value range (scalars or per feature; none: unbounded)."""
        lo, hi = range_tensors(self.model.value_range, x.device)
        return lambda t: t.clamp(lo, hi)

    @torch.no_grad()
    def margin_bounds(self, X: Batch, eps: float | torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
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
    def radii(self, X: Batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(certified l_inf radius, checked-failing upper end, predicted class) per input.

        Radius 0 means not even the point itself has a positive margin bound."""
        lo, hi, y, _ = self._radii(self._tensor(X))
        return lo, hi, y

    def _radii(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, Checked]:
        """``radii`` and the model's checked forward pass (its ``bad`` rows are model faults)."""
        assert self.eps_max is not None  # set in __post_init__
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

    def certify_batch(self, X: Batch, seeds: Sequence[int]) -> list[Certificate]:
        """One certificate per input: the model's class is constant on the l_inf ball of
        the reported radius (inside the value range); abstains when no positive radius
        within ``tolerance`` is certified. Seeds are recorded, IBP uses no randomness."""
        t0 = time.perf_counter()
        x = self._tensor(X)
        if len(seeds) != len(x):
            raise ValueError(f"seeds: need one per input ({len(x)}), got {len(seeds)}")
        with torch.no_grad():
            lo_t, hi_t, y_t, fwd = self._radii(x)
        r_lo, r_hi, y, bad = (t.cpu().numpy() for t in (lo_t, hi_t, y_t, fwd.bad))
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
                method=self.method, mode="bound", norm=self.norm, radius=0.0 if abstain else radius,
                abstained=abstain, predicted_class=None if abstain else int(y[i]), n_samples=passes,
                elapsed_ms=per_input_ms, seed=int(seeds[i]), input_dim=self.model.input_dim, reason=reason,
                extra={**({MODEL_FAULT: fwd.reason} if bad[i] else {}),
                       "model_class": int(y[i]), "linf_radius": float(r_lo[i]), "linf_upper": float(r_hi[i]),
                       "tolerance": self.tolerance, "eps_max": self.eps_max, "passes": passes,
                       "value_range": None if self.model.value_range is None
                       else [np.asarray(v).tolist() for v in self.model.value_range]}))
        return out


__all__ = ["IntervalBounds"]
